"""Synthetic run directories for the report and diff tests: solid-colour PNGs, so pixels identify jobs."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pandas as pd
from PIL import Image

from batchgen.manifest import Manifest

MODELS = ["tiny_sd1", "tiny_sdxl"]
STACKS = ["none", "ink 0.8 + grain 0.6", "ink 0.5"]  # deliberately not sorted
TEMPLATE = "a portrait of <alf> in {style}"
STYLES = ["ink drawing", "<cartoona> style"]
CELL = 64


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours, far from the white background and the grey placeholder."""
    digest = hashlib.sha256(str(index).encode()).digest()
    return (digest[0] // 2, 128 + digest[1] // 2, digest[2] // 2)


def make_run(
    run_dir: Path,
    models: list[str] = MODELS,
    stacks: list[str] = STACKS,
    styles: list[str] = STYLES,
    seeds: list[int] = (1,),
    skip: set[int] = frozenset(),
    size: tuple[int, int] = (CELL, CELL),
) -> pd.DataFrame:
    """Planner order: model, then stack, then prompt, then seed; job i gets colour(i) unless skipped."""
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (model, stack, style, seed) in enumerate(itertools.product(models, stacks, styles, seeds)):
        job_id = f"{i:016x}"
        row = {
            "job_id": job_id,
            "status": "ok",
            "model": model,
            "stack": stack,
            "loras": loras_cell(stack),
            "prompt": TEMPLATE.replace("{style}", style),
            "prompt_template": TEMPLATE,
            "style": style,
            "seed": seed,
            "steps": 20,
            "guidance_scale": 7.5,
            "width": size[0],
            "height": size[1],
            "scheduler": "ddim",
            "image": f"images/{job_id}.png",
            "error": "",
        }
        if i in skip:
            row.update(status="skipped", image="", error=f"LoRA 'ink' has no file for {model}")
        else:
            Image.new("RGB", size, colour(i)).save(run_dir / row["image"])
        rows.append(row)
    return pd.DataFrame(rows)


def loras_cell(stack: str) -> str:
    """The manifest's `loras` cell for a planner stack label: `ink 0.8 + grain 0.6` -> `grain:0.6;ink:0.8`."""
    if stack == "none":
        return ""
    pairs = sorted(part.split(" ") for part in stack.split(" + "))
    return ";".join(f"{name}:{weight}" for name, weight in pairs)


def write_manifest(run_dir: Path, table: pd.DataFrame, slots: tuple[str, ...] = ("style",)) -> Path:
    """manifest.csv through the real writer, one row per table row."""
    manifest = Manifest(run_dir, slots)
    try:
        for row in table.to_dict("records"):
            manifest.append(row)
    finally:
        manifest.close()
    return manifest.path
