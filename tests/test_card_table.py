"""README's "which card renders what" table is benchmarks/card_table.py's output: batchgen's memory plan for the
full-size SD1.5, SDXL, SD3.5 large and FLUX.1-dev, sized from sparse safetensors files over the committed shape
fixtures (tests/fixtures/*_shapes.json), so the table follows the estimator."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
card_table = importlib.import_module("card_table")

START = "<!-- card-table: python benchmarks/card_table.py -->\n"
END = "<!-- /card-table -->"

# The releases' parameter counts (their files' sizes agree): SD1.5 (UNet 3.4 GB in fp32), SDXL base 1.0, SD3.5 large
# (transformer 16.3 GB in bf16; CLIP-L with its text projection), FLUX.1-dev (tests/test_memory_plan.py).
PARAMS = {
    "sd15_shapes.json": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sdxl_shapes.json": {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    },
    "sd35_large_shapes.json": {
        "transformer": 8_146_280_768,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "text_encoder_3": 4_762_310_656,
        "vae": 83_819_683,
    },
}


def test_the_readme_table_is_the_estimators_output() -> None:
    readme = (REPO / "README.md").read_text()
    assert START in readme and END in readme, "README.md lost the card-table markers around its table"
    shown = readme.split(START, 1)[1].split(END, 1)[0]
    assert shown == card_table.table(), "README's card table is stale: run python benchmarks/card_table.py"


def test_the_table_plans_each_release_as_a_render_on_cuda_would(tmp_path: Path) -> None:
    spec = card_table.sparse_model("flux", "flux1_dev_shapes.json", tmp_path / "flux")
    job = card_table.default_job(spec)
    assert (job.width, job.height, job.guidance_scale, job.max_sequence_length) == (1024, 1024, 3.5, 0)
    on_24 = card_table.plan(spec, job, 24)
    # As tests/test_memory_plan.py plans FLUX.1-dev for a 24 GB card.
    assert (on_24.offload, on_24.dtype, card_table.cell(on_24)) == ("model", "bf16", "model 23.6 GB")
    sd3 = card_table.default_job(card_table.sparse_model("sd-3", "sd35_large_shapes.json", tmp_path / "sd3"))
    assert (sd3.width, sd3.height, sd3.guidance_scale) == (1024, 1024, 3.5)  # the 3.5 large release's defaults
    sd1 = card_table.sparse_model("sd-1", "sd15_shapes.json", tmp_path / "sd1")
    plan = card_table.plan(sd1, card_table.default_job(sd1), 8)
    # 512x512 with its guidance pair: two rows of 64x64 latents at the UNet's 320 channels, in fp16.
    assert (plan.dtype, plan.batch_size, plan.activation_bytes) == ("fp16", 1, 28 * 2 * 64 * 64 * 320 * 2)


@pytest.mark.parametrize("shapes", sorted(PARAMS))
def test_the_shape_fixtures_hold_the_releases_parameters(shapes: str) -> None:
    table = json.loads((card_table.FIXTURES / shapes).read_text())
    assert {c: sum(math.prod(shape) for _, shape in rows) for c, rows in table.items()} == PARAMS[shapes]


@pytest.mark.slow
def test_the_shape_fixtures_are_the_shipped_configs_built_on_meta(tmp_path: Path) -> None:
    card_table.write_shapes(tmp_path)
    for model in {m.shapes for m in card_table.MODELS}:
        assert (tmp_path / model).read_text() == (card_table.FIXTURES / model).read_text(), model
