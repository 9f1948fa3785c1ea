"""The steps after rendering, one function for both `batchgen +sweep=...` (after its last image) and `batchgen
report RUN_DIR`: measurements the manifest lacks go into it, then the grids, strength and trade-off plots and
index.html are built from each job's latest row (manifest.read_latest).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from batchgen.assets.metric_models import MetricModels
from batchgen.manifest import MANIFEST, read_latest, slot_columns
from batchgen.report.curves import strength_plots
from batchgen.report.effects import fill_measurements
from batchgen.report.grids import build_grids
from batchgen.report.index import build_index
from batchgen.report.semantic import fill_semantic
from batchgen.report.tradeoff import tradeoff_plots


@dataclass(frozen=True)
class GridLayout:
    """How the grids are laid out: axes by name (batchgen.axes), each page's size limit, the prompt slots."""

    x: str
    y: str
    z: str | None
    max_megapixels: float
    slots: list[str] | None = None  # None: the table's columns that are not manifest columns


@dataclass(frozen=True)
class AfterRender:
    measured: int  # rows given effect, ssim or degenerate now
    rows: int  # jobs in the table shown
    grids: list[Path]
    plots: list[Path]
    index: Path
    tradeoffs: list[Path] = field(default_factory=list)  # clip_i against clip_t (report.tradeoff)
    semantic: int = 0  # rows given clip_t, clip_i, dino_i or their reference values now (sweep.metrics)


def after_render(
    run_dir: Path,
    layout: GridLayout,
    table_of: Callable[[Path], pd.DataFrame] = read_latest,
    summary: dict[str, str] | None = None,
    lock: AbstractContextManager | None = None,
    metrics: MetricModels | None = None,
) -> AfterRender:
    """`table_of(run_dir)`: the jobs to show, read after the measurements are in (a render adds the jobs it has not
    recorded yet; the report shows the manifest's). `summary`: facts of the invocation that just rendered, for the
    top of index.html. `lock`: held while the manifest is written (a render holds the run lock already). `metrics`:
    sweep.metrics' models and concepts, checked; None: clip_t, clip_i and dino_i are not measured (nothing loads)."""
    with lock or nullcontext():
        recorded = (run_dir / MANIFEST).is_file()
        measured = fill_measurements(run_dir) if recorded else 0
        # After the effects: it reads the references those filled in.
        semantic = fill_semantic(run_dir, metrics) if recorded else 0
    table = table_of(run_dir)
    slots = slot_columns(table) if layout.slots is None else layout.slots
    grids = build_grids(table, run_dir, layout.x, layout.y, slots, z=layout.z, max_megapixels=layout.max_megapixels)
    plots = strength_plots(table, run_dir)
    tradeoffs = tradeoff_plots(table, run_dir)
    index = build_index(table, run_dir, grids, summary, plots, tradeoffs, view=(layout.x, layout.y, layout.z))
    return AfterRender(measured, len(table), grids, plots, index, tradeoffs, semantic=semantic)
