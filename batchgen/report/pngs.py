"""Rebuild a lost manifest.csv from the `batchgen` JSON chunk every rendered PNG carries.

Only `ok` jobs come back (failed and skipped jobs have no PNG) and the per-render fields (seconds, worker,
finished_at, timings) are not in the PNG, so they stay empty. `image_sha256` is recomputed from the file, so a
later render in this folder treats the recovered images as done.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batchgen.columns import JSON_CHUNK, MANIFEST_COLUMNS
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, Manifest

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_REQUIRED = ("job_id", "model", "prompt", "seed", "steps", "guidance_scale", "width", "height")
# The planner's order, so recovered rows group like the original run: model, then stack, prompt, the numbers.
_ORDER = ("model", "stack", "prompt_template", "prompt", "seed", "steps", "guidance_scale", "width", "height")


@dataclass(frozen=True)
class Recovered:
    rows: list[dict[str, Any]]
    slots: list[str]
    ignored: list[tuple[Path, str]]  # PNGs that are not batchgen images, and why


def _read_job(path: Path) -> dict[str, Any]:
    """The JSON chunk of one PNG; ValueError says why it is not a batchgen image."""
    try:
        with Image.open(path) as img:
            chunk = getattr(img, "text", {}).get(JSON_CHUNK)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable PNG ({e})") from None
    if chunk is None:
        raise ValueError(f"no '{JSON_CHUNK}' text chunk")
    try:
        job = json.loads(chunk)
    except ValueError:
        raise ValueError(f"'{JSON_CHUNK}' chunk is not JSON") from None
    if not isinstance(job, dict):
        raise ValueError(f"'{JSON_CHUNK}' chunk is not a JSON object")
    missing = [k for k in _REQUIRED if k not in job]
    if missing:
        raise ValueError(f"'{JSON_CHUNK}' chunk lacks {', '.join(missing)}")
    if not _JOB_ID.match(str(job["job_id"])):
        raise ValueError(f"job_id {job['job_id']!r} is not 16 hex digits")
    return job


def _cell(value: Any) -> Any:
    # Slots a prompt does not use are NaN in the plan's table, and json.dumps wrote them as NaN.
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _sort_key(row: dict[str, Any]) -> tuple:
    def part(name: str) -> tuple[int, float, str]:
        value = row.get(name, "")
        try:
            return (0, float(value), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(value))

    return (*(part(name) for name in _ORDER), str(row["job_id"]))


def manifest_from_pngs(run_dir: Path) -> Recovered:
    """One ok row per job found in run_dir/images/*.png (the newest file wins when a job appears twice)."""
    images = Path(run_dir) / "images"
    rows: dict[str, dict[str, Any]] = {}
    ignored: list[tuple[Path, str]] = []
    for path in sorted(images.glob("*.png"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        try:
            job = _read_job(path)
        except ValueError as e:
            ignored.append((path, str(e)))
            continue
        row = {key: _cell(value) for key, value in job.items()}
        row.update(
            status="ok",
            image=path.relative_to(run_dir).as_posix(),
            image_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            error="",
        )
        rows[str(job["job_id"])] = row
    ordered = sorted(rows.values(), key=_sort_key)
    slots = sorted({key for row in ordered for key in row if key not in MANIFEST_COLUMNS})
    return Recovered(ordered, slots, ignored)


def write_manifest_from_pngs(run_dir: Path) -> Recovered:
    """Write run_dir/manifest.csv from the PNGs; refuses to replace an existing manifest."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST).exists():
        raise BatchgenError(
            f"{run_dir / MANIFEST} exists; --from-pngs only rebuilds a missing manifest (move it away first)"
        )
    recovered = manifest_from_pngs(run_dir)
    if not recovered.rows:
        why = f" ({len(recovered.ignored)} PNGs without batchgen metadata)" if recovered.ignored else ""
        raise BatchgenError(f"{run_dir / 'images'}: no batchgen PNGs to rebuild a manifest from{why}")
    manifest = Manifest(run_dir, recovered.slots)
    try:
        for row in recovered.rows:
            manifest.append(row)
    finally:
        manifest.close()
    return recovered
