"""The manifest's columns, each declared once: its name and place, who writes it, its cell codec, whether a PNG's
bytes may depend on it, what index.html and `batchgen diff` do with it, and what its empty cell in an older
manifest means.

The manifest's column order, what rendering a job records over the plan's row (the runner's merged table), what
the PNG's JSON chunk leaves out, index.html's job table and filters, diff's matching and blank-filling all read
this table. A render setting's column comes from its entry in batchgen.settings, so a setting stays one entry
there. Pure: no torch, pandas or Hydra.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchgen.cells import DEGENERATE, LORAS, NAMES, TEXT, TIMINGS, TRIGGERS, Codec, format_value
from batchgen.settings import SETTINGS, Setting, Shown

JSON_CHUNK = "batchgen"  # the PNG text chunk holding the job as JSON (report.pngs rebuilds a manifest from it)
# A planner table column, never a manifest one: the stack as the PNG's JSON chunk names it, by its content
# (cells.stack_label, a glob's files by the glob), as it did before the manifest's `stack` held the sweep's key; so
# a job's PNG bytes do not depend on what the sweep called its stack.
PNG_STACK = "_png_stack"


class Writer(enum.Enum):
    PLAN = "plan"  # the planner's row: what the job is and what the sweep called it
    RENDER = "render"  # rendering (or measuring) the job records it over the plan's row


@dataclass(frozen=True)
class Column:
    name: str
    writer: Writer
    codec: Codec = TEXT
    # Never in a PNG's JSON chunk: what rendering records and what was added after PNGs first had the chunk, so
    # that a job's PNG bytes do not change when the code learns to write it.
    volatile: bool = False
    index: Shown | None = None  # how index.html's job table shows it; None: it does not
    diff: bool = False  # `batchgen diff --by settings` matches rows on it
    empty_cell: str | None = None  # what an empty cell means in a manifest written before the column existed
    setting: Setting | None = None  # the render setting whose column it is


def _plan(name: str, **fields: Any) -> Column:
    return Column(name, Writer.PLAN, **fields)


def _render(name: str, **fields: Any) -> Column:
    return Column(name, Writer.RENDER, volatile=True, **fields)


# The manifest's fixed columns, in order (other tools read these names; columns are only ever added, at the end);
# each render setting's column follows the column its entry names, and one column per prompt slot ends a row.
_FIXED = (
    _plan("job_id"),
    _render("status", index=Shown(0, filter=3)),  # the plan's `skipped` (or empty) until a render records it
    _plan("model", index=Shown(1, filter=0), diff=True),
    _plan("base"),
    _plan("prompt", index=Shown(3, filter=2), diff=True),
    _plan("negative_prompt", diff=True),
    _plan("embeddings", codec=NAMES),  # the triggers a job uses
    _plan("loras", codec=LORAS, diff=True),
    _render("image", index=Shown(8)),
    _render("image_sha256"),
    _render("seconds"),
    _render("worker"),
    _render("finished_at"),
    _render("error", index=Shown(12)),  # the plan writes why a job is skipped
    _plan("stack", index=Shown(2, filter=1)),  # the sweep's key; index.html shows the state's label
    _plan("prompt_template"),
    _render("timings", codec=TIMINGS),  # per-stage seconds of this image, shared costs divided
    _plan("lora_triggers", codec=TRIGGERS),  # what was put before the prompt for the job's LoRAs
    _plan("epoch"),  # the file(s) a LoRA glob matched, as `mylora e4 (760 steps)`; empty for a stack without a glob
    _plan("reference", volatile=True),  # a LoRA job's no-LoRA twin: its job_id; empty for a no-LoRA job
    _render("effect", index=Shown(9, numeric=True)),  # mean absolute pixel difference from the reference, 0-255
    _render("ssim", index=Shown(10, numeric=True)),  # structural similarity to the reference, 1 = identical
    _render("degenerate", codec=DEGENERATE, index=Shown(11, filter=4)),  # empty while not measured
    # what the job computed in: fp16, bf16 or fp32 (run.dtype, models.X.dtype, the base's auto), or fp8 (weights
    # stored in fp8, computed in bf16: run.weights=fp8)
    _render("dtype"),
    # sweep.metrics (report/semantic.py), empty where not computed: 100 * max(0, CLIP cos(image, prompt's words))
    _render("clip_t"),
    _render("clip_i"),  # mean CLIP cos(image, each image of the concepts the job carries)
    _render("dino_i"),  # the same with the DINO model's CLS token
    _render("reference_clip_i"),  # the job's no-LoRA reference image against the same concept images
    _render("reference_dino_i"),
)


def _setting_column(setting: Setting) -> Column:
    codec = Codec(setting.name, format_value, setting.read)
    return _plan(
        setting.name,
        codec=codec,
        index=setting.index,
        diff=setting.diff,
        empty_cell=setting.empty_cell,
        setting=setting,
    )


def _with_settings(columns: tuple[Column, ...]) -> tuple[Column, ...]:
    out = list(columns)
    for setting in SETTINGS:
        if setting.column_after is None:
            continue
        names = [c.name for c in out]
        if setting.column_after not in names:
            raise ValueError(f"setting {setting.name}: column_after '{setting.column_after}' is no manifest column")
        out.insert(names.index(setting.column_after) + 1, _setting_column(setting))
    return tuple(out)


COLUMNS = _with_settings(_FIXED)
BY_NAME = {c.name: c for c in COLUMNS}
MANIFEST_COLUMNS = tuple(c.name for c in COLUMNS)
RECORDED = tuple(c.name for c in COLUMNS if c.writer is Writer.RENDER)  # what a render writes over the plan's row
VOLATILE = frozenset(c.name for c in COLUMNS if c.volatile)
# What `batchgen diff --by settings` matches rows on: the job as a person wrote it, then the diff settings.
DIFF_COLUMNS = tuple(c.name for c in COLUMNS if c.diff)
EMPTY_CELLS = {c.name: c.empty_cell for c in COLUMNS if c.empty_cell is not None}
# index.html's job table, left to right (by header: width and height show as one `size` cell), the columns it
# sorts as numbers, and the columns it filters on, in the filters' order.
_SHOWN = sorted((c for c in COLUMNS if c.index is not None), key=lambda c: c.index.place)
INDEX_COLUMNS = tuple(c.index.header or c.name for c in _SHOWN)
INDEX_NUMERIC = frozenset(c.index.header or c.name for c in _SHOWN if c.index.numeric)
INDEX_FILTERS = tuple(
    c.name for c in sorted((c for c in _SHOWN if c.index.filter is not None), key=lambda c: c.index.filter)
)


def png_job(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a PNG's JSON chunk holds of a planned row: everything that defines the job (its prompt slots too), the
    stack by its content. The same job always gives the same PNG bytes."""
    job = {k: v for k, v in row.items() if k not in VOLATILE}
    if PNG_STACK in job:
        job["stack"] = job.pop(PNG_STACK)  # the stack by its content, as PNGs always held it, not the sweep's key
    return job
