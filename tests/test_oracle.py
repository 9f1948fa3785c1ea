"""Oracle: every image batchgen renders equals what a plain diffusers pipeline renders for the same job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batchgen.tiny import tiny_root
from tests.reference import load_embedding, render_with_adapters

MAX_PIXEL_DIFF = 2  # out of 255: float tolerance between two correct implementations

ORACLE_SWEEP = (
    "+sweep=styles",
    "sweep.prompts=['a portrait of <alf> in <cartoona> style']",
    "~sweep.stacks.ink",
    "~sweep.stacks.lycoris",  # LoHa/LoKr: diffusers cannot load them; tests/test_formula_oracle.py covers them
    "+sweep.stacks.split={pastel: {unet: 1.0, text_encoder: 0.3}}",
    "+sweep.stacks.trio={ink: [0.5, 1.0], grain: 0.6, pastel: 0.4}",
    "sweep.seeds=[3]",
    "sweep.steps=4",
)


def _reference_pipeline(model: str, cache: Path):
    from diffusers import DiffusionPipeline

    root = tiny_root(model, cache)
    pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for path in sorted((root / "embedding").iterdir()):
        load_embedding(pipe, path, f"<{path.stem}>")
    return pipe, root


def _reference_image(pipe, root: Path, row: pd.Series) -> np.ndarray:
    image = render_with_adapters(pipe, row, "unet", lambda name: str(root / "lora" / f"{name}.safetensors"))
    return np.asarray(image, dtype=np.int16)


@pytest.mark.slow
def test_images_equal_plain_diffusers(run_cli, tiny_cache: Path) -> None:
    code, out, err = run_cli(*ORACLE_SWEEP)
    assert code == 0, err
    run = Path("runs/styles")
    table = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)
    # 2 models x (none, ink_grain, peft, split, trio at 2 ink weights) x 1 prompt x 1 seed
    assert len(table) == 12 and set(table["status"]) == {"ok"}
    assert set(table["loras"]) == {
        "",
        "grain:0.6;ink:0.8",
        "peft_sketch:0.8",
        "pastel:1/0.3",
        "grain:0.6;ink:0.5;pastel:0.4",
        "grain:0.6;ink:1;pastel:0.4",
    }
    diffs = {}
    for model, rows in table.groupby("model"):
        pipe, root = _reference_pipeline(model, tiny_cache)
        for _, row in rows.iterrows():
            ours = np.asarray(Image.open(run / row["image"]).convert("RGB"), dtype=np.int16)
            theirs = _reference_image(pipe, root, row)
            diffs[(model, row["loras"])] = int(np.abs(ours - theirs).max())
    assert max(diffs.values()) <= MAX_PIXEL_DIFF, diffs
    print("max pixel difference per job:", diffs)
    # The oracle is only meaningful if LoRAs and weights change pixels.
    images = {
        tuple(table.loc[i, ["model", "loras"]]): np.asarray(Image.open(run / table.loc[i, "image"]))
        for i in table.index
    }
    for model in ("tiny_sd1", "tiny_sdxl"):
        assert not np.array_equal(images[(model, "")], images[(model, "pastel:1/0.3")])
        assert not np.array_equal(
            images[(model, "grain:0.6;ink:0.5;pastel:0.4")], images[(model, "grain:0.6;ink:1;pastel:0.4")]
        )
