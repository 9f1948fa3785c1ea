"""Effect, ssim and degenerate for rows that have none yet: LoRA jobs whose reference landed after them (another
worker, a later run), and runs rendered before batchgen measured (`batchgen report` fills them).

The writer measures most images as they land (engine.writer); this pass fills the rest in place in each job's
latest row, through the manifest module (fill_cells: atomically, under the run lock, no row added or lost).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from batchgen.manifest import fill_cells, latest_positions, with_cells
from batchgen.metrics import degenerate, measure, read_rgb
from batchgen.settings import SETTINGS

# What makes two rows the same job but for their LoRAs: a run recorded before the reference column existed is
# matched on these (the prompt column holds the text as encoded, trigger words included).
SAME_JOB = ("model", "prompt", "negative_prompt", "embeddings", *(s.name for s in SETTINGS if s.column_after))


def measurements(rows: pd.DataFrame, run_dir: Path) -> dict[int, dict[str, str]]:
    """{position in rows: {column: value}} for the latest ok rows missing a reference, effect, ssim or degenerate
    that can be had now. `rows`: read_manifest(run_dir)."""
    latest = rows.iloc[latest_positions(rows, run_dir)]
    ok = latest[latest["status"] == "ok"]
    images = {job: image for job, image in zip(ok["job_id"], ok["image"], strict=True) if (run_dir / image).is_file()}
    twins = {_key(row): row["job_id"] for _, row in ok.iterrows() if not row["loras"]}
    pixels: dict[str, object] = {}

    def load(job_id: str):
        if job_id not in pixels:
            pixels[job_id] = read_rgb(run_dir / images[job_id])
        return pixels[job_id]

    updates: dict[int, dict[str, str]] = {}
    for position, row in ok.iterrows():
        if row["job_id"] not in images:
            continue
        update: dict[str, str] = {}
        if not row["degenerate"]:
            update["degenerate"] = degenerate(load(row["job_id"]))
        reference = row["reference"] or (twins.get(_key(row), "") if row["loras"] else "")
        if reference and not row["reference"]:
            update["reference"] = reference
        if reference and not row["effect"] and reference in images:
            measured = measure(load(row["job_id"]), load(reference))
            update |= {"effect": str(measured.effect), "ssim": str(measured.ssim)}
        if update:
            updates[int(position)] = update
    return updates


def fill_measurements(run_dir: Path) -> int:
    """Write what measurements() finds into manifest.csv; the caller holds the run lock. Returns rows updated."""
    return fill_cells(run_dir, lambda rows: measurements(rows, run_dir))


def with_measurements(rows: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """`rows` with measurements() applied, for a reader that must not write (batchgen check)."""
    return with_cells(rows, measurements(rows, run_dir))


def _key(row: pd.Series) -> tuple:
    return tuple(str(row.get(column, "")) for column in SAME_JOB)
