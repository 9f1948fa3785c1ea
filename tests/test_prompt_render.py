"""Prompt syntax end to end on the tiny models: what a new user types, a TI's strength as a slot axis, the PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ONE = (
    *("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.seeds=[1]", "sweep.slots={}"),
    *("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris"),
)


def _run(run_cli, tmp_path: Path, name: str, *overrides: str) -> pd.DataFrame:
    code, _, err = run_cli(*ONE, *overrides, f"run.out_dir=runs/{name}")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "runs" / name / "manifest.csv", keep_default_na=False)
    assert set(table["stack"]) == {"none"} and set(table["status"]) == {"ok"}
    return table


def _pixels(tmp_path: Path, name: str, row: pd.Series) -> np.ndarray:
    return np.asarray(Image.open(tmp_path / "runs" / name / row["image"])).astype(int)


@pytest.mark.slow
def test_emphasis_renders_a_new_image_and_the_png_keeps_the_prompt_as_written(run_cli, tmp_path: Path) -> None:
    prompts = "sweep.prompts=['a (castle:1.5) at night', 'a castle at night']"
    a1111 = _run(run_cli, tmp_path, "a1111", prompts)
    plain = _run(run_cli, tmp_path, "plain", prompts, "sweep.prompt_syntax=plain")
    assert list(a1111["prompt"]) == list(plain["prompt"]) == ["a (castle:1.5) at night", "a castle at night"]
    assert list(a1111["prompt_syntax"]) == ["a1111"] * 2 and list(plain["prompt_syntax"]) == ["plain"] * 2
    # The weighted prompt is its own job and image; the prompt without syntax is the same job under both.
    assert a1111["job_id"][0] != plain["job_id"][0] and a1111["job_id"][1] == plain["job_id"][1]
    assert a1111["image_sha256"][0] != plain["image_sha256"][0]
    weighted, unweighted = (_pixels(tmp_path, "a1111", a1111.iloc[i]) for i in (0, 1))
    assert np.abs(weighted - unweighted).max() > 8  # the weight shows
    png = Image.open(tmp_path / "runs" / "a1111" / a1111["image"][0])
    assert png.text["parameters"].split("\n")[0] == "a (castle:1.5) at night"  # A1111 re-reads the weight
    assert json.loads(png.text["batchgen"])["prompt_syntax"] == "a1111"


@pytest.mark.slow
def test_a_ti_strength_slot_is_a_grid_axis(run_cli, tmp_path: Path) -> None:
    table = _run(
        run_cli,
        tmp_path,
        "strength",
        "sweep.prompts=['a portrait of {alf} in ink']",
        "+sweep.slots.alf=['(<alf>:0.5)', '<alf>', '(<alf>:1.3)', '(<alf>:1.0)']",
        "sweep.grid.x=alf",
        "sweep.grid.y=seed",
    )
    # (<alf>:1.0) is <alf>: one job (the manifest keeps one row per job, as for any duplicate combination); the
    # other strengths are their own jobs and images.
    assert list(table["alf"]) == ["(<alf>:0.5)", "(<alf>:1.0)", "(<alf>:1.3)"]
    assert set(table["embeddings"]) == {"alf"} and table["job_id"].nunique() == 3
    images = [_pixels(tmp_path, "strength", table.iloc[i]) for i in range(3)]
    assert all(np.abs(images[i] - images[j]).max() > 0 for i, j in ((0, 1), (1, 2), (0, 2)))
    grids = sorted(p.name for p in (tmp_path / "runs" / "strength" / "grids").iterdir())
    assert grids == ["tiny_sd1.png"]
