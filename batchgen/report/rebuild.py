"""`batchgen report RUN_DIR`: grids and index.html again from the manifest (or the PNGs), without rendering."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.axes import check_max_megapixels
from batchgen.columns import MANIFEST_COLUMNS
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, read_latest
from batchgen.report.curves import strength_plots
from batchgen.report.effects import fill_measurements
from batchgen.report.grids import DEFAULT_MAX_MEGAPIXELS, build_grids
from batchgen.report.index import build_index
from batchgen.report.pngs import Recovered, write_manifest_from_pngs
from batchgen.report.summary import latest_invocation

NO_Z = ("", "none", "null")  # what `--z` accepts to drop a z axis the run recorded


@dataclass(frozen=True)
class ReportRequest:
    """`lock`: the run lock's context manager for a run directory (the runner's RunLock, handed down by the cli),
    held while the manifest is rewritten in place; never while a render appends to it."""

    run_dir: Path
    x: str | None = None  # None: the axes the run was rendered with (its recorded sweep.grid), else stack/prompt
    y: str | None = None
    z: str | None = None
    max_megapixels: float | None = None
    from_pngs: bool = False
    lock: Callable[[Path], AbstractContextManager] = lambda run_dir: nullcontext()


@dataclass(frozen=True)
class ReportResult:
    grids: list[Path]
    index: Path
    rows: int
    recovered: Recovered | None
    measured: int = 0  # rows given effect, ssim or degenerate now (a run from before batchgen measured)
    plots: list[Path] = field(default_factory=list)


def _recorded_axes(run_dir: Path) -> tuple[dict, float | None]:
    latest = latest_invocation(run_dir)
    if latest is None:
        return {}, None
    grid = ((latest.config.get("sweep") or {}).get("grid")) or {}
    limit = (latest.config.get("report") or {}).get("max_grid_megapixels")
    return (grid if isinstance(grid, dict) else {}), limit


def _check_run_dir(run_dir: Path, from_pngs: bool) -> None:
    if not run_dir.is_dir():
        raise BatchgenError(f"{run_dir}: no such run directory; pass one such as runs/styles")
    if not from_pngs and not (run_dir / MANIFEST).is_file():
        raise BatchgenError(
            f"{run_dir}: no {MANIFEST} here; pass a run directory such as runs/styles, "
            "or rebuild the manifest from the PNGs' metadata with --from-pngs"
        )


def rebuild_report(request: ReportRequest) -> ReportResult:
    run_dir = Path(request.run_dir)
    _check_run_dir(run_dir, request.from_pngs)
    recovered = write_manifest_from_pngs(run_dir) if request.from_pngs else None
    with request.lock(run_dir):
        measured = fill_measurements(run_dir) if (run_dir / MANIFEST).is_file() else 0
    grid, recorded_limit = _recorded_axes(run_dir)
    x = request.x or grid.get("x") or "stack"
    y = request.y or grid.get("y") or "prompt"
    z = request.z if request.z is not None else grid.get("z")
    z = None if z is None or str(z).lower() in NO_Z else str(z)
    limit = next(v for v in (request.max_megapixels, recorded_limit, DEFAULT_MAX_MEGAPIXELS) if v is not None)
    table = read_latest(run_dir)
    slots = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    grids = build_grids(table, run_dir, str(x), str(y), slots, z=z, max_megapixels=check_max_megapixels(limit))
    plots = strength_plots(table, run_dir)
    index = build_index(table, run_dir, grids, plots=plots)
    return ReportResult(grids, index, len(table), recovered, measured, plots)
