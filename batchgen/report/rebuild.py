"""`batchgen report RUN_DIR`: grids and index.html again from the manifest (or the PNGs), without rendering."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.assets.metric_models import MetricFolders, MetricModels, folder, metric_models
from batchgen.axes import check_max_megapixels
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, read_manifest
from batchgen.report.after_render import GridLayout, after_render
from batchgen.report.grids import DEFAULT_MAX_MEGAPIXELS
from batchgen.report.invocations import RecordedMetrics, recorded
from batchgen.report.pngs import Recovered, write_manifest_from_pngs
from batchgen.report.semantic import check_carried

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
    # clip_t, clip_i, dino_i for the rows that lack them: these folders (relative to the working directory) over the
    # run's recorded sweep.metrics; `builtin_root` finds a recorded builtin set's folder (the runner's).
    clip: str | None = None
    dino: str | None = None
    concepts: dict[str, str] = field(default_factory=dict)
    builtin_root: Callable[[str], Path] | None = None


@dataclass(frozen=True)
class ReportResult:
    grids: list[Path]
    index: Path
    rows: int
    recovered: Recovered | None
    measured: int = 0  # rows given effect, ssim or degenerate now (a run from before batchgen measured)
    plots: list[Path] = field(default_factory=list)
    tradeoffs: list[Path] = field(default_factory=list)
    semantic: int = 0  # rows given clip_t, clip_i, dino_i or their reference values now


def _layout(request: ReportRequest, run_dir: Path) -> GridLayout:
    """The request's axes and page limit, else those the run was rendered with, else the defaults."""
    run = recorded(run_dir)
    z = request.z if request.z is not None else run.grid_z
    limit = next(v for v in (request.max_megapixels, run.max_grid_megapixels, DEFAULT_MAX_MEGAPIXELS) if v is not None)
    return GridLayout(
        x=request.x or run.grid_x or "stack",
        y=request.y or run.grid_y or "prompt",
        z=None if z is None or z.lower() in NO_Z else z,
        max_megapixels=check_max_megapixels(limit),
    )


def _metrics(request: ReportRequest, run_dir: Path) -> MetricModels | None:
    """The request's folders over those the run recorded (a recorded builtin set only where builtin_root finds it),
    checked."""
    run = recorded(run_dir).metrics or RecordedMetrics()
    root = request.builtin_root(run.builtin) if run.builtin and request.builtin_root else None
    usable = not run.builtin or root is not None
    given = MetricFolders(
        clip=folder(request.clip) or (folder(run.clip, root) if usable else None),
        dino=folder(request.dino) or (folder(run.dino, root) if usable else None),
        concepts={n: p for n, v in run.concepts.items() if usable and (p := folder(v, root))}
        | {n: p for n, v in request.concepts.items() if (p := folder(v))},
        where={"clip": "--clip", "dino": "--dino"} | {n: f"--concept {n}" for n in request.concepts},
    )
    return metric_models(given)


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
    layout = _layout(request, run_dir)  # a bad axis limit is refused before anything is written
    metrics = _metrics(request, run_dir)  # bad folders too, before anything is written
    recovered = write_manifest_from_pngs(run_dir) if request.from_pngs else None
    if metrics is not None and request.concepts:
        check_carried(metrics, read_manifest(run_dir), {n: f"--concept {n}" for n in request.concepts})
    done = after_render(run_dir, layout, lock=request.lock(run_dir), metrics=metrics)
    return ReportResult(
        done.grids, done.index, done.rows, recovered, done.measured, done.plots, done.tradeoffs, semantic=done.semantic
    )
