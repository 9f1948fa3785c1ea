"""`batchgen +sweep=NAME --watch`: after the render, watch every model's LoRA and embedding folders and render
what each new or rewritten file adds (an epoch a trainer saved), on the workers and loaded models the first render
started, until SIGINT (exit 130) or SIGTERM (143).

A file is read once it has kept its size and mtime for `settle_s` seconds (a trainer may still be writing it). Each
cycle plans the sweep again, as a rerun would, and renders only the jobs that have no row yet (job_ids hash the
files' bytes, so a file rewritten under its name gives new jobs), then the post-render steps. A file planning
refuses is one line, and watching goes on without it until it changes again.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from batchgen.assets.embeddings import TI_SUFFIXES
from batchgen.assets.loras import LORA_SUFFIXES
from batchgen.config import Composed
from batchgen.errors import BatchgenError, Stopped
from batchgen.executors.base import Executor, HoldsWorkers, PlanningDevice
from batchgen.library_log import LOG as LIBRARY_LOG
from batchgen.library_log import routed
from batchgen.manifest import MANIFEST, completed_jobs, failed_jobs
from batchgen.plan import Plan
from batchgen.runlock import RunLock
from batchgen.runner import prepare, render_locked, stop_signals
from batchgen.spec import ModelSpec

SETTLE_S = 2.0
POLL_S = 0.5  # how often pending files are looked at again; a signal is handled at once regardless
SUFFIXES = frozenset(LORA_SUFFIXES + TI_SUFFIXES)

Stat = Callable[[Path], tuple[int, int] | None]


def file_state(path: Path) -> tuple[int, int] | None:
    """(size, mtime_ns), or None when the path is gone or is no file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns) if path.is_file() else None


class Settler:
    """Files that changed, each handed out by `ready()` once it has kept its size and mtime for `settle_s` seconds
    of `clock`; a file that is gone is dropped."""

    def __init__(
        self, settle_s: float = SETTLE_S, clock: Callable[[], float] = time.monotonic, stat: Stat = file_state
    ):
        self.settle_s = settle_s
        self.clock = clock
        self.stat = stat
        self._pending: dict[Path, tuple[tuple[int, int], float] | None] = {}  # path -> (state, since when)

    def changed(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self._pending[path] = None  # looked at again from now: a write restarts the wait

    @property
    def pending(self) -> frozenset[Path]:
        return frozenset(self._pending)

    def ready(self) -> list[Path]:
        now = self.clock()
        settled = []
        for path, seen in list(self._pending.items()):
            state = self.stat(path)
            if state is None:
                del self._pending[path]
            elif seen is None or seen[0] != state:
                self._pending[path] = (state, now)
            elif now - seen[1] >= self.settle_s:
                settled.append(path)
                del self._pending[path]
        return sorted(settled)


@dataclass(frozen=True)
class Watched:
    """What a watch looks at: folders (every asset file under them) and files named one by one in a config."""

    folders: tuple[Path, ...]
    files: frozenset[Path]

    def covers(self, path: Path) -> bool:
        if path.suffix.lower() not in SUFFIXES or path.name.startswith("."):
            return False
        return path in self.files or any(path.is_relative_to(folder) for folder in self.folders)

    @property
    def roots(self) -> list[Path]:
        """What to hand the file watcher: the folders, and the folder of each file named alone."""
        return sorted({*self.folders, *(file.parent for file in self.files)})


def watched(models: Iterable[ModelSpec]) -> Watched:
    """Every model's LoRA and embedding folders (and TI files listed one by one), as absolute paths."""
    folders, files = set(), set()
    for spec in models:
        for path in (*spec.lora_dirs, *spec.embedding_dirs):
            path = Path(path).resolve()
            if path.is_dir():
                folders.add(path)
            elif path.parent.is_dir():
                files.add(path)
    return Watched(tuple(sorted(folders)), frozenset(files))


class FolderEvents:
    """watchfiles in a thread: the main thread takes the paths that changed with `take(timeout)`. The wait is a
    queue's, so a signal's handler runs in the main thread at once and its exception (runner.stop_signals) comes
    out of `take`; watchfiles' own wait would swallow it."""

    def __init__(self, roots: list[Path]) -> None:
        self._queue: queue.Queue[set[Path] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(roots,), name="batchgen-watch", daemon=True)
        self._thread.start()

    def _loop(self, roots: list[Path]) -> None:
        try:
            import watchfiles  # lazy: only --watch pays its import

            for changes in watchfiles.watch(
                *roots, stop_event=self._stop, debounce=300, rust_timeout=500, yield_on_timeout=True
            ):
                paths = {Path(path) for change, path in changes if change != watchfiles.Change.deleted}
                if paths:
                    self._queue.put(paths)
        except BaseException as e:  # handed to the main thread: a watch that cannot watch must not look idle
            self._queue.put(e)

    def take(self, timeout: float) -> set[Path]:
        """The paths that changed, waiting at most `timeout` seconds for the first."""
        paths: set[Path] = set()
        try:
            item = self._queue.get(timeout=timeout)
            while True:
                if isinstance(item, BaseException):
                    raise BatchgenError(f"--watch: the file watcher stopped: {type(item).__name__}: {item}")
                paths |= item
                item = self._queue.get_nowait()
        except queue.Empty:
            return paths

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass(frozen=True)
class WatchOptions:
    settle_s: float = SETTLE_S
    poll_s: float = POLL_S
    clock: Callable[[], float] = time.monotonic


def watch_run(
    composed: Composed,
    plan: Plan,
    executor: Executor,
    device: PlanningDevice | None,
    out: TextIO,
    err: TextIO,
    retry_failed: bool = False,
    options: WatchOptions = WatchOptions(),
) -> None:
    """Render the plan, then each new file's jobs, until a signal ends it with `Stopped` (the manifest holds
    every image rendered; no file is left half written). `device`: what each cycle's memory plan is made for."""
    run_dir = Path(composed.config.run.out_dir)
    if isinstance(executor, HoldsWorkers):
        executor.hold()  # the workers and their loaded models stay up between cycles
    seen = watched(plan.models.values())
    if not seen.roots:
        names = ", ".join(f"models.{name}" for name in plan.models)
        verb = "names" if len(plan.models) == 1 else "name"
        raise BatchgenError(f"--watch: {names} {verb} no LoRA or embedding folder to watch; give loras: [FOLDER]")
    rendering = True  # a render interrupted says so itself
    with RunLock(run_dir), routed(run_dir / LIBRARY_LOG), stop_signals():
        # Watching starts before the first render: a file saved while it runs is rendered next.
        events = FolderEvents(seen.roots)
        try:
            render_locked(composed, plan, executor, out, err, retry_failed)
            rendering = False
            _report_watching(seen, err)
            cycle = _Cycle(composed, device, err, set(plan.warnings))
            settler = Settler(options.settle_s, options.clock)
            while True:
                settler.changed(path for path in events.take(options.poll_s) if seen.covers(path))
                ready = settler.ready()
                if not ready:
                    continue
                todo = cycle.plan(ready, settler.pending)
                if todo is None:
                    continue
                seen = watched(todo.models.values())  # a model's folder may have appeared
                if todo.jobs:
                    rendering = True
                    render_locked(composed, todo, executor, out, err)
                    rendering = False
        except Stopped as e:
            if not rendering:
                err.write(
                    f"batchgen: watch: stopped by {e.signal_name}; every image rendered is in {run_dir / MANIFEST}\n"
                )
            raise
        finally:
            events.close()


def _report_watching(seen: Watched, err: TextIO) -> None:
    where = [str(path) for path in (*seen.folders, *sorted(seen.files))]
    listed = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    err.write(f"watching {listed} for new LoRA and embedding files; Ctrl-C to stop\n")


@dataclass
class _Cycle:
    """Planning for one watch cycle: the sweep again, without the files refused so far or still being written."""

    composed: Composed
    device: PlanningDevice | None
    err: TextIO
    warned: set[str]
    refused: set[Path] = dataclasses.field(default_factory=set)

    def plan(self, ready: list[Path], writing: frozenset[Path]) -> Plan | None:
        """The plan whose jobs are those that have no row yet (none: nothing new), each settled file that adds
        nothing said in one line; None when planning refused the sweep for no file of `ready`."""
        self.refused -= set(ready)  # a refused file written again is read again
        plan = None
        while plan is None:
            try:
                plan = prepare(self.composed, device=self.device, ignore=frozenset(self.refused | writing))
            except BatchgenError as e:
                self.err.write(f"batchgen: watch: refused {e}; watching goes on\n")
                named = [path for path in ready if path not in self.refused and _names(str(e), path)]
                if not named:
                    return None
                self.refused |= set(named)
        for warning in plan.warnings:
            if warning not in self.warned:
                self.warned.add(warning)
                self.err.write(f"batchgen: warning: {warning}\n")
        used = _used_files(plan)
        for path in ready:
            if path in used or path in self.refused:
                continue
            reason = _refusal(plan, path)
            if reason is not None:
                self.err.write(f"batchgen: watch: refused {reason}; watching goes on\n")
            else:
                self.err.write(f"watch: {path}: no stack or prompt of the sweep uses it\n")
        run_dir = Path(self.composed.config.run.out_dir)
        # Only what has no row yet: a job that failed before is left to --retry-failed, as a rerun leaves it.
        failed = failed_jobs(run_dir)
        done = completed_jobs(run_dir) | failed
        new = [job for job in plan.jobs if job.job_id not in done]
        if not new:
            return dataclasses.replace(plan, jobs=[])
        names = [path.name for path in ready if path in used] or ["the folders' files"]
        self.err.write(f"watch: {', '.join(names)}: {len(new)} new job{'s' if len(new) != 1 else ''}\n")
        return dataclasses.replace(plan, jobs=[job for job in plan.jobs if job.job_id not in failed])


def _names(message: str, path: Path) -> bool:
    return str(path) in message or os.path.relpath(path) in message


def _used_files(plan: Plan) -> set[Path]:
    """The LoRA and TI files the plan's jobs read."""
    used = set()
    for job in plan.jobs:
        spec = plan.models[job.model]
        for name in job.lora_state.loras:
            lora = spec.lora(name)
            if lora is not None:
                used.add(Path(lora.path).resolve())
        used |= {Path(ti.path).resolve() for ti in spec.embeddings}
    return used


def _refusal(plan: Plan, path: Path) -> str | None:
    """Why the models refused this file (its first model's reason), or None where none did."""
    for spec in plan.models.values():
        for refused in spec.refused:
            if Path(refused.path).resolve() == path:
                return refused.reason if refused.reason.startswith(str(refused.path)) else f"{path}: {refused.reason}"
    return None
