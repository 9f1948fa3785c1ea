"""One render invocation: resolve models, plan, skip what is done, execute, record, report."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from batchgen.assets.bases import BY_NAME
from batchgen.assets.hashing import HashCache
from batchgen.assets.models import ModelSource, denoiser_variant, inspect_assets, resolve_model, scan_checkpoints
from batchgen.axes import check_max_megapixels
from batchgen.cells import parse_timings
from batchgen.columns import RECORDED
from batchgen.config import Composed
from batchgen.errors import OUTPUT_ERRNOS, Stopped, output_error
from batchgen.executors.base import Executor, ExecutorRequest, PlanningDevice
from batchgen.executors.registry import executor_options, make_executor
from batchgen.library_log import LOG as LIBRARY_LOG
from batchgen.library_log import routed
from batchgen.manifest import (
    MANIFEST,
    Manifest,
    completed_jobs,
    failed_jobs,
    read_latest,
    record_invocation,
    remove_stale_temp_files,
)
from batchgen.plan import Plan, build_plan, read_prompts_file, select_models, used_assets
from batchgen.plan.memory import GIB, MemoryPlan, check_fits, gb, memory_plan, peaks_by_kind
from batchgen.plan.metrics import check_metrics
from batchgen.progress import Progress
from batchgen.runlock import RunLock
from batchgen.settings import SETTINGS
from batchgen.spec import STAGES, ModelSpec, format_number
from batchgen.tiny import cache_root


@dataclass(frozen=True)
class Outcome:
    rendered: int
    failed: int
    skipped: int
    already_done: int
    run_dir: Path

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def prepare(
    composed: Composed,
    all_assets: bool = False,
    device: PlanningDevice | None = None,
    ignore: frozenset[Path] = frozenset(),
) -> Plan:
    """Everything that can fail on bad input, before any model weights load.

    Only the LoRAs and TIs the sweep mentions are hashed and read, unless `all_assets` (for --list, which plans no
    memory). `device`: what the memory plans are made for (the executor's planning_device; None: the configured
    executor's, built here). `ignore`: LoRA and TI files (absolute) planned as if absent (--watch: files refused
    or still being written).
    """
    cfg = composed.config
    executor_options(cfg.executor)  # an unknown executor or key is a config error, before any file is read
    hashes = HashCache(cache_root() / "hashes.json")
    check_max_megapixels(cfg.report.max_grid_megapixels)  # the grids come last; a bad guard must fail first
    names = select_models(cfg.sweep, list(cfg.models))
    rows = read_prompts_file(cfg.sweep.prompts_file) if cfg.sweep.prompts_file else []
    loras, triggers = (None, None) if all_assets else used_assets(cfg.sweep, rows)
    models = {}
    unused = []
    for name in names:
        spec = resolve_model(name, ModelSource(**vars(cfg.models[name])), hashes, _builtin_root)
        if ignore:
            spec = _without_files(spec, ignore)
        models[name], _ = inspect_assets(spec, loras, triggers, hashes)
        if triggers is not None:
            unused += [
                f"models.{name}.embeddings: <{t}> is never used by a prompt of this sweep"
                for t in spec.listed_triggers
                if t not in triggers
            ]
    hashes.save()
    plan = build_plan(cfg.sweep, models, rows, cfg.run)
    plan.warnings.extend(unused)
    metrics, notes = check_metrics(cfg.sweep.metrics, plan.models, builtin_metrics_root)
    plan = replace(plan, metrics=metrics)
    plan.warnings.extend(notes)
    if not all_assets:
        plan.memory.update(plan_memory(plan, device or make_executor(cfg.executor, plan.engine).planning_device()))
        with_memory_peaks(plan)
    return plan


def _without_files(spec: ModelSpec, paths: frozenset[Path]) -> ModelSpec:
    loras = tuple(f for f in spec.loras if Path(f.path).resolve() not in paths)
    embeddings = tuple(f for f in spec.embeddings if Path(f.path).resolve() not in paths)
    return replace(spec, loras=loras, embeddings=embeddings)


def plan_memory(plan: Plan, device: PlanningDevice) -> dict[str, MemoryPlan]:
    """Each model's memory plan against run.gpu_memory_gb (GiB), else the device's total; a plan that cannot fit
    is refused here, before anything loads, for a render and a dry run alike. Where neither the device nor a
    budget is known here (Ray, SLURM), each worker plans at load and nothing is refused."""
    options = plan.engine
    budget = int(options.gpu_memory_gb * GIB) if options.gpu_memory_gb is not None else device.memory_bytes
    kind = device.kind or ("cuda" if budget is not None else None)
    if kind is None:
        return {}
    plans = {}
    for name, spec in plan.models.items():
        plans[name] = memory_plan(spec, [job for job in plan.jobs if job.model == name], options, budget, kind)
        check_fits(plans[name])
    return plans


def with_memory_peaks(plan: Plan) -> None:
    """Each model's plan peaks into its ModelSpec, for the workers: a worker that learns its device's memory only
    when it starts (Ray, SLURM, run.gpu_memory_gb left to the device) chooses run.offload=auto from them."""
    for name, spec in plan.models.items():
        jobs = [job for job in plan.jobs if job.model == name]
        plan.models[name] = replace(spec, memory_peaks=peaks_by_kind(spec, jobs, plan.engine))


def dry_run(composed: Composed, plan: Plan, out: TextIO) -> None:
    run_dir = Path(composed.config.run.out_dir)
    done = completed_jobs(run_dir)
    todo = [j for j in plan.jobs if j.job_id not in done]
    skipped = int((plan.table["status"] == "skipped").sum())
    out.write(f"sweep {composed.config.sweep.name}: {len(plan.table)} combinations -> {run_dir}\n")
    for axis, count in plan.axis_counts().items():
        out.write(f"  {axis:<14}  {count}\n")  # a long name keeps two spaces before its count
    out.write("settings of each model, where not an axis:\n")
    resolved = resolved_settings(plan)
    indent = max(map(len, resolved)) + 4
    for name, pairs in resolved.items():
        line = f"  {name}".ljust(indent)
        for i, (key, value) in enumerate(pairs):
            item = f"{key} {value}{',' if i < len(pairs) - 1 else ''}"
            if len(line) + len(item) >= 119 and line.strip() != name:  # wrap between settings, never inside one
                out.write(line.rstrip() + "\n")
                line = " " * indent
            line += item + " "
        out.write(line.rstrip() + "\n")
    out.write(
        f"jobs: {len(plan.jobs)} to render in total, {len(todo)} new, {len(plan.jobs) - len(todo)} already done, "
        f"{skipped} skipped\n"
    )
    if plan.references_added:
        out.write(
            f"  references: {plan.references_added} of these jobs are no-LoRA references no stack renders "
            "(sweep.references=false leaves them out, and effect sizes with them)\n"
        )
    for reason, count in plan.table.loc[plan.table["status"] == "skipped", "error"].value_counts().items():
        out.write(f"  skipped {count}: {reason}\n")
    out.write("memory of each model:\n")
    for line in memory_lines(plan):
        out.write(line + "\n")


def memory_lines(plan: Plan) -> list[str]:
    """Per model: each component's size, the activations and decode, the plan chosen, its estimated peak and the
    memory it was planned against (batchgen/plan/memory.py)."""
    if not plan.memory:
        return [f"  each worker plans for its own device at load ({_FOR_A_CARD})"]
    indent = max(map(len, plan.memory)) + 4
    lines = []
    for name, memory in plan.memory.items():
        sizes = [f"{c.component} {gb(c.bytes)}," for c in memory.components]
        if memory.lora_bytes:
            sizes.append(f"LoRAs {gb(memory.lora_bytes)},")
        sizes[-1] = sizes[-1].rstrip(",") + ";"
        weights = ", fp8 Linear weights" if memory.weights == "fp8" else ""
        items = [f"{memory.dtype}{weights}:", *sizes]
        items += [f"activations {gb(memory.activation_bytes)} (batch {memory.batch_size}),"]
        items += [f"decode {gb(memory.decode_bytes)}"]
        lines += _wrapped(f"  {name}", items, indent)
        chosen = [f"plan {memory.offload}", f"(run.offload={memory.requested}):"]
        chosen += [f"estimated peak {gb(memory.peak_bytes)},"]
        if memory.budget_bytes is not None:
            chosen += [f"planned against {gb(memory.budget_bytes)}", f"({memory.budget_source})"]
        elif memory.device_kind == "cpu":
            chosen += ["no limit on CPU", f"({_FOR_A_CARD})"]
        else:
            chosen += ["each worker plans for its own device at load", f"({_FOR_A_CARD})"]
        lines += _wrapped("", chosen, indent)
        lines += [" " * indent + f"note: {note}" for note in memory.notes]
    return lines


_FOR_A_CARD = "run.gpu_memory_gb=24 plans for a 24 GB card"


def _wrapped(head: str, items: list[str], indent: int) -> list[str]:
    """`head` padded to `indent`, then the items joined by spaces, wrapped before 119 columns between items."""
    lines, line = [], head.ljust(indent)
    for item in items:
        if len(line) + len(item) >= 119 and line.strip() != head.strip():
            lines.append(line.rstrip())
            line = " " * indent
        line += item + " "
    lines.append(line.rstrip())
    return lines


def resolved_settings(plan: Plan) -> dict[str, list[tuple[str, str]]]:
    """Per model, (setting, value as text) for each setting with one value there, as its jobs take it (a value the
    sweep leaves to the model resolved); a T5 length only for a base with T5, 0 with the length it stands for."""
    out = {}
    for name, spec in plan.models.items():
        rows = plan.table.loc[plan.table["model"] == name]
        base = BY_NAME[spec.base]
        pairs = []
        for s in SETTINGS:
            # The table holds what the jobs take (a prompts_file row's own seed included); the rest the plan's.
            values = list(dict.fromkeys(rows[s.name])) if s.name in rows.columns else plan.settings[name][s.name]
            if len(values) != 1 or (s.name == "max_sequence_length" and not base.t5_tokens):
                continue
            pairs.append((s.name, _setting_text(values[0])))
            if s.name == "max_sequence_length" and values[0] == 0:
                pairs[-1] = (s.name, f"0 (the pipeline's {base.t5_tokens})")
        out[name] = pairs
    return out


def _setting_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return format_number(value) if isinstance(value, float) else str(value)


def list_assets(plan: Plan, out: TextIO) -> None:
    """One line per asset, per model: what it is, what it fits, where it lives; then what was refused and why."""
    for spec in plan.models.values():
        variant = denoiser_variant(spec.config_dir, spec.base)
        out.write(f"{spec.name} ({spec.base}{f', {variant}' if variant else ''})  {spec.checkpoint}\n")
        for part in spec.components:
            out.write(f"  {part.component}  {part.path.name}  whole file, {part.kind}  {part.path}\n")
        for layout, base, path in scan_checkpoints(spec.models_root) if spec.models_root else []:
            out.write(f"  checkpoint  {path.name}  {layout}, {base}  {path}\n")
        for ti in spec.embeddings:
            vectors = f"{ti.vectors} vector{'s' if ti.vectors != 1 else ''}"
            out.write(f"  embedding  <{ti.trigger}>  {ti.format}, {vectors}, {ti.base}  {ti.path}\n")
        for lora in spec.loras:
            hits = ", ".join(f"{component} {n}" for component, n in lora.modules)
            tags = f"  trigger: {lora.trigger}" if lora.trigger else ""
            tags += f"  tags: {lora.tags}" if lora.tags else ""
            kind = f"{lora.layout} {'+'.join(lora.layer_types)}"
            summary = f"{kind}, rank {lora.rank}, {lora.base or 'base unknown'}, {hits}"
            if lora.epoch is not None or lora.steps is not None:
                summary += f", epoch {'?' if lora.epoch is None else lora.epoch}, {lora.steps or '?'} steps"
            out.write(f"  lora  {lora.name}  {summary}  {lora.path}{tags}\n")
        for refused in spec.refused:
            label = f"<{refused.name}>" if refused.kind == "embedding" else refused.name
            # Most reasons are errors that already start with the path; the line names it once.
            reason = refused.reason.removeprefix(f"{refused.path}: ")
            out.write(f"  refused {refused.kind}  {label}  {refused.path}: {reason}\n")


def render(
    composed: Composed,
    plan: Plan,
    out: TextIO | None = None,
    err: TextIO | None = None,
    retry_failed: bool = False,
    executor: Executor | None = None,
) -> Outcome:
    cfg = composed.config
    # A bad executor setting is a config error: found before anything is written.
    executor = executor or make_executor(cfg.executor, plan.engine)
    run_dir = Path(cfg.run.out_dir)
    with RunLock(run_dir), routed(run_dir / LIBRARY_LOG), stop_signals():
        return render_locked(composed, plan, executor, out or sys.stdout, err or sys.stderr, retry_failed)


def render_locked(
    composed: Composed,
    plan: Plan,
    executor: Executor,
    out: TextIO,
    err: TextIO,
    retry_failed: bool = False,
    live_clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """A render with the run lock held (render, and each cycle of --watch). `live_clock`: what index.html's
    rewrites while rendering are timed by (report.live)."""
    from batchgen.report.after_render import GridLayout, after_render
    from batchgen.report.index import build_index, write_live_index
    from batchgen.report.live import LivePage

    cfg = composed.config
    run_dir = Path(cfg.run.out_dir)
    started = time.monotonic()
    manifest = Manifest(run_dir, plan.slots)
    remove_stale_temp_files(run_dir)  # a killed run's half-written PNGs; the lock says no one else is writing
    if manifest.dropped_torn_line:
        err.write(f"manifest: dropped a torn last line in {manifest.path} (a previous run was killed mid-write)\n")
    record_invocation(run_dir, composed.container, composed.overrides)
    done = completed_jobs(run_dir)
    rows = {r["job_id"]: r for r in plan.table.to_dict("records")}
    skipped = _record_skipped(plan, manifest)
    todo = [j for j in plan.jobs if j.job_id not in done]
    already = len(plan.jobs) - len(todo)
    left = ""
    if retry_failed:
        failed_before = failed_jobs(run_dir)
        later = [j for j in todo if j.job_id not in failed_before]
        todo = [j for j in todo if j.job_id in failed_before]
        left = f", {len(later)} never rendered left for a run without --retry-failed" if later else ""
    progress = Progress(len(todo), stream=err)
    failures: list[str] = []

    stage_totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    # The grids are the last render's until this one ends; the page shows the rows as they land.
    live = LivePage(
        lambda: write_live_index(merged_table(plan.table, run_dir), run_dir, grid_files(run_dir)), clock=live_clock
    )

    def on_row(row: dict[str, Any]) -> None:
        manifest.append(row)
        progress.update(row["status"] == "ok")
        for stage, seconds in parse_timings(row.get("timings")).items():
            stage_totals[stage] += seconds
        if row["status"] == "failed":
            failures.append(f"{row['job_id']}: {row['error']}")
        live.landed()

    err.write(
        f"{cfg.sweep.name}: {len(todo)} to render, {already} already done, "
        f"{skipped} skipped{left} -> {run_dir}{executor.note(len(todo))}\n"
    )
    try:
        if todo:
            executor.run(ExecutorRequest(todo, rows, plan.models, run_dir), on_row)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        raise output_error(e, progress.done - progress.failed) from None
    except Stopped as e:
        err.write(
            f"batchgen: stopped by {e.signal_name} after {progress.done} of {len(todo)} images; the manifest is "
            f"intact, run the same command again to continue\n"
        )
        if live.writes:  # a page that says it is rendering would reload itself for good
            build_index(merged_table(plan.table, run_dir), run_dir, grid_files(run_dir))
        raise
    finally:
        manifest.close()
    summary = {
        "sweep": cfg.sweep.name,
        "overrides": " ".join(composed.overrides),
        "jobs": str(len(plan.table)),
        "rendered now": str(len(todo) - len(failures)),
        "failed": str(len(failures)),
        "skipped": str(skipped),
        "seconds": f"{time.monotonic() - started:.1f}",
    }
    grid = cfg.sweep.grid
    layout = GridLayout(grid.x, grid.y, grid.z, cfg.report.max_grid_megapixels, plan.slots)
    # The run lock is held already; the measurements are those of LoRA jobs whose reference landed after them.
    report = after_render(run_dir, layout, lambda d: merged_table(plan.table, d), summary, metrics=plan.metrics)
    elapsed = time.monotonic() - started
    for line in failures[:10]:
        err.write(f"failed {line}\n")
    if todo:
        out.write("stages: " + ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in stage_totals.items()) + "\n")
    out.write(
        f"{cfg.sweep.name}: rendered {len(todo) - len(failures)}, failed {len(failures)}, skipped {skipped}, "
        f"already done {already} in {elapsed:.1f}s -> {run_dir / MANIFEST}, "
        f"{len(report.grids)} grids, {report.index}\n"
    )
    return Outcome(len(todo) - len(failures), len(failures), skipped, already, run_dir)


@contextlib.contextmanager
def stop_signals():
    """Turn SIGINT and SIGTERM into `Stopped` in the main thread, so every `finally` runs (writer drained,
    workers stopped, manifest closed) and the exit code says which signal it was (130, 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def grid_files(run_dir: Path) -> list[Path]:
    """The grids a run directory holds now (the last report's)."""
    return sorted((run_dir / "grids").glob("*.png"))


def merged_table(table: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """The plan's rows with each job's latest recorded row (manifest.latest_rows) over what a render records:
    what the run's grids and index.html show. Jobs never recorded keep the plan's status (pending or skipped)."""
    latest = read_latest(run_dir).set_index("job_id")
    merged = table.copy()
    for column in RECORDED:
        values = merged["job_id"].map(latest[column])
        merged[column] = values.where(values.notna(), merged[column])
    return merged


def _record_skipped(plan: Plan, manifest: Manifest) -> int:
    """Skipped jobs get one row each, once: re-running must not grow the manifest."""
    skipped = plan.table[plan.table["status"] == "skipped"].drop_duplicates("job_id")
    already = manifest.recorded("skipped")
    for row in skipped.to_dict("records"):
        if row["job_id"] not in already:
            manifest.append(row)
    return len(skipped)


def _builtin_root(name: str) -> Path:
    from batchgen.tiny import ensure_tiny

    return ensure_tiny(name)


def builtin_metrics_root(name: str) -> Path:
    """sweep.metrics.builtin's folder (plan.metrics.BUILTINS), built on first use."""
    from batchgen.tiny import ensure_tiny_metrics

    return ensure_tiny_metrics()
