"""batchgen.columns: the manifest's columns declared once, and every place that lists columns reading it.

The expected tuples and sets are the lists each place kept before the table (main at b699c15): spec._COLUMNS with
the settings, runner.RECORDED, engine.writer._VOLATILE, report.index JOB_COLUMNS / NUMERIC / FILTERS, settings
DIFF_COLUMNS / EMPTY_CELLS. Other tools read the manifest's column names in this order: they never move.
"""

from __future__ import annotations

import pytest

from batchgen import columns
from batchgen.columns import COLUMNS, MANIFEST_COLUMNS, PNG_STACK, Writer
from batchgen.settings import SETTINGS

MANIFEST_BEFORE = (
    *("job_id", "status", "model", "base", "prompt", "negative_prompt", "embeddings", "loras", "seed", "steps"),
    *("guidance_scale", "width", "height", "scheduler", "image", "image_sha256", "seconds", "worker"),
    *("finished_at", "error", "stack", "prompt_template", "timings", "clip_skip", "prompt_syntax"),
    *("pad_prompts", "lora_triggers", "epoch", "reference", "effect", "ssim", "degenerate"),
    "max_sequence_length",
    "dtype",
    *("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i"),
)
RECORDED_BEFORE = (
    *("status", "image", "image_sha256", "error", "seconds", "worker", "finished_at", "timings"),
    *("effect", "ssim", "degenerate", "dtype"),
    *("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i"),
)
VOLATILE_BEFORE = {"status", "image", "image_sha256", "error", "seconds", "worker", "finished_at", "timings"} | {
    "reference",
    "effect",
    "ssim",
    "degenerate",
    "dtype",
    *("clip_t", "clip_i", "dino_i", "reference_clip_i", "reference_dino_i"),
}


def test_manifest_columns_keep_their_order() -> None:
    assert MANIFEST_COLUMNS == MANIFEST_BEFORE
    assert len(set(MANIFEST_COLUMNS)) == len(MANIFEST_COLUMNS)


def test_what_a_render_records_and_what_no_png_holds() -> None:
    assert set(columns.RECORDED) == set(RECORDED_BEFORE)
    assert columns.VOLATILE == VOLATILE_BEFORE
    # What rendering writes can never be in PNG bytes: the image would depend on how long it took.
    assert all(c.volatile for c in COLUMNS if c.writer is Writer.RENDER)


def test_index_diff_and_empty_cells_are_those_from_before() -> None:
    assert columns.INDEX_COLUMNS == (
        *("status", "model", "stack", "prompt", "seed", "steps", "guidance_scale", "size", "image"),
        *("effect", "ssim", "degenerate", "error"),
    )
    assert columns.INDEX_NUMERIC == {"seed", "steps", "guidance_scale", "effect", "ssim"}
    assert columns.INDEX_FILTERS == ("model", "stack", "prompt", "status", "degenerate")
    assert len({c.index.place for c in COLUMNS if c.index}) == len(columns.INDEX_COLUMNS)
    assert columns.DIFF_COLUMNS == (
        *("model", "prompt", "negative_prompt", "loras", "seed", "steps", "guidance_scale", "width", "height"),
        *("scheduler", "clip_skip"),
    )
    assert columns.EMPTY_CELLS == {"clip_skip": "1"}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_a_settings_column_is_its_entry(setting) -> None:
    column = columns.BY_NAME.get(setting.name)
    if setting.column_after is None:
        assert column is None
        return
    assert column.setting is setting and column.writer is Writer.PLAN and not column.volatile
    assert MANIFEST_COLUMNS.index(setting.name) == MANIFEST_COLUMNS.index(setting.column_after) + 1
    assert (column.diff, column.empty_cell, column.index) == (setting.diff, setting.empty_cell, setting.index)
    assert column.codec.parse is not None and column.codec.parse("") == setting.value_default


def test_the_png_chunk_holds_the_job_and_its_stack_by_content() -> None:
    row = {name: f"<{name}>" for name in MANIFEST_COLUMNS} | {"style": "ink", PNG_STACK: "ink 0.5"}
    job = columns.png_job(row)
    kept = [name for name in MANIFEST_COLUMNS if name not in VOLATILE_BEFORE]
    assert sorted(job) == sorted([*kept, "style"])
    assert job["stack"] == "ink 0.5" and job["loras"] == "<loras>"
    # A row without the planner's column (one rebuilt from a PNG) keeps its stack.
    assert columns.png_job({"stack": "ink", "seconds": 1.0}) == {"stack": "ink"}


def test_the_chunk_name_is_the_one_the_report_reads() -> None:
    from batchgen.engine import png
    from batchgen.report import pngs

    assert png.JSON_CHUNK is pngs.JSON_CHUNK is columns.JSON_CHUNK == "batchgen"


def test_index_html_reads_the_table() -> None:
    from batchgen.report import index

    assert index.INDEX_COLUMNS is columns.INDEX_COLUMNS and index.INDEX_FILTERS is columns.INDEX_FILTERS
