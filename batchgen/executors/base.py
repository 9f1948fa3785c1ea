"""What every executor shares: the request, the sink, and the one dispatcher that hands work units to workers.

An executor with several workers is a `Pool`: it starts a worker in a numbered slot, sends it a unit, and reports
what its workers say as messages. The dispatcher owns everything else: units by affinity (executors/units.py),
which jobs each worker holds, failed rows, and the replacement of a dead worker, whose unreported jobs go back to
the queue, at most `RESTARTS` times per slot. Workers write their own PNGs (atomically, before a row is reported)
or hand back the bytes for the pool to write; either way only the parent's sink writes the manifest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from batchgen.engine_options import EngineOptions
from batchgen.executors.units import StateKey, UnitQueue, group_by_state, make_units
from batchgen.spec import Job, ModelSpec

if TYPE_CHECKING:  # the engine imports torch: only a worker pays that
    from batchgen.engine.worker import Renderer

RESTARTS = 2
POLL_S = 0.2

Sink = Callable[[dict[str, Any]], None]
Pairs = list[tuple[Job, dict[str, Any]]]  # a unit as sent to a worker: each job with its manifest row


@dataclass(frozen=True)
class ExecutorRequest:
    """What to render; how is the executor's EngineOptions, given when it was built."""

    jobs: list[Job]
    rows: dict[str, dict[str, Any]]  # job_id -> the job's manifest row before rendering
    models: dict[str, ModelSpec]
    run_dir: Path


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker of a run is built from, sent to it once: the models it may load, the options it renders with,
    and the run directory it writes its PNGs into (None: it sends their bytes back instead)."""

    models: dict[str, ModelSpec]
    engine: EngineOptions
    run_dir: Path | None

    def renderer(self, device: str, name: str) -> Renderer:
        """The worker's Renderer on `device`, its rows naming it `name`."""
        from batchgen.engine.worker import Renderer  # lazy: torch and diffusers load in the worker only

        return Renderer(self.models, self.engine, device, name)


@dataclass(frozen=True)
class PlanningDevice:
    """What each model's memory plan is made for before anything loads (batchgen/plan/memory.py): the kind of
    device the workers render on and the least memory among their devices."""

    kind: str | None  # cuda | cpu; None: not known here (each worker plans for its own device at load)
    memory_bytes: int | None = None  # None: no limit (CPU) or not known here


class Executor(Protocol):
    """What the runner calls; built from the executor's options and the run's EngineOptions (checked by planning:
    its thread count, batch size, dtype), `executor_class(name)(options, engine)`; it checks its own options."""

    def note(self, jobs: int) -> str:
        """What the run's first line adds after the run directory (", 2 workers"), or ""."""
        ...

    def start_early(self) -> None:
        """Called before planning when a render will follow: start what takes long to start (worker processes and
        their imports), loading no model. A no-op where nothing pays."""
        ...

    def discard(self) -> None:
        """Stop what start_early started and run() did not take over (planning failed, nothing to render)."""
        ...

    def run(self, request: ExecutorRequest, sink: Sink) -> None:
        """Render every job of the request; each finished row goes to `sink`, in this process, in finish order."""
        ...

    def planning_device(self) -> PlanningDevice:
        """The device the memory plans are made for (starting nothing): its kind, and its total memory where this
        process can read it."""
        ...


@runtime_checkable
class HoldsWorkers(Protocol):
    """An executor whose workers can outlive run(): --watch renders each new file on the workers, and the models,
    that the first render loaded. Executors without it start their workers again for each run()."""

    def hold(self) -> None:
        """From now on run() leaves its workers up, their models loaded, for the next run(); discard() ends them."""
        ...


@dataclass(frozen=True)
class Row:
    wid: int
    row: dict[str, Any]  # complete, its PNG already written


@dataclass(frozen=True)
class Idle:
    """The worker is up (or done rendering what it was sent) and takes a unit."""

    wid: int


@dataclass(frozen=True)
class Crashed:
    """The worker could not render what it held (it could not start, or its loop raised): those jobs fail."""

    wid: int
    reason: str


@dataclass(frozen=True)
class Gone:
    """The worker ended, asked to or not; `how` says how, as in "exit code -9"."""

    wid: int
    how: str


Message = Row | Idle | Crashed | Gone


class Pool(Protocol):
    """Workers in numbered slots; a worker out of space in the run directory raises that OSError from `poll`."""

    def start(self, wid: int) -> None:
        """Start a worker in this slot (a first one or a replacement); it says Idle when it takes work."""
        ...

    def send(self, wid: int, unit: Pairs) -> None: ...

    def stop(self, wid: int) -> None:
        """No more work for this worker: it finishes what it holds, reports it, and is then Gone."""
        ...

    def poll(self, timeout: float) -> list[Message]:
        """What the workers said, in order, waiting at most `timeout` seconds for the first message."""
        ...

    def close(self) -> list[dict[str, Any]]:
        """End every worker now; returns the rows they finished but had not reported."""
        ...


@dataclass
class _Worker:
    name: str
    restarts: int = 0
    held: StateKey | None = None
    outstanding: dict[str, Job] = field(default_factory=dict)  # sent, not yet reported
    idle: bool = False
    stopping: bool = False


def dispatch(request: ExecutorRequest, pool: Pool, names: list[str], sink: Sink, *, unit_size: int) -> None:
    """Render the request on one worker per name (its manifest `worker`); every job ends with exactly one row.
    `unit_size`: EngineOptions.unit_size, so that a fixed batch is never cut across workers."""
    pending = UnitQueue(make_units(request.jobs, len(names), unit_size))
    position = {job.job_id: i for i, job in enumerate(request.jobs)}
    workers: dict[int, _Worker] = {}

    def start(wid: int, restarts: int = 0) -> None:
        workers[wid] = _Worker(names[wid], restarts)
        pool.start(wid)

    def assign(wid: int) -> None:
        worker = workers[wid]
        unit = pending.next_for(worker.held)
        worker.idle = unit is None
        if unit is None:
            return
        worker.held = unit.key
        worker.outstanding.update({job.job_id: job for job in unit.jobs})
        pool.send(wid, [(job, request.rows[job.job_id]) for job in unit.jobs])

    def gone(wid: int, how: str) -> None:
        worker = workers.pop(wid)
        if worker.stopping and not worker.outstanding:
            return
        lost = sorted(worker.outstanding.values(), key=lambda job: position[job.job_id])
        sys.stderr.write(
            f"batchgen: worker {worker.name} died ({how}); {len(lost)} unfinished jobs go back to the queue\n"
        )
        if worker.restarts >= RESTARTS:
            reason = f"worker {worker.name} died ({how}) {RESTARTS + 1} times on these jobs"
            for job in lost:
                sink(failed_row(request.rows[job.job_id], worker.name, reason))
            return
        for group in reversed(group_by_state(lost)):
            pending.put_back(group)
        start(wid, worker.restarts + 1)

    def handle(message: Message) -> None:
        if isinstance(message, Row):
            if message.wid in workers:
                workers[message.wid].outstanding.pop(message.row["job_id"], None)
            sink(message.row)
        elif isinstance(message, Idle):
            if not workers[message.wid].stopping:
                assign(message.wid)
        elif isinstance(message, Crashed):
            worker = workers[message.wid]
            for job in worker.outstanding.values():
                sink(failed_row(request.rows[job.job_id], worker.name, message.reason))
            worker.outstanding.clear()
        else:
            gone(message.wid, message.how)

    def settle() -> None:
        # Idle workers wait rather than stop while others render: a dead one's jobs come back to the queue.
        for wid, worker in list(workers.items()):
            if worker.idle and not worker.stopping and pending:
                assign(wid)
        if not pending and all(w.idle or w.stopping for w in workers.values()):
            for wid, worker in workers.items():
                if not worker.stopping:
                    worker.stopping = True
                    pool.stop(wid)

    try:
        for wid in range(len(names)):
            start(wid)
        while workers:
            for message in pool.poll(POLL_S):
                handle(message)
            settle()
        reason = "no worker left to render it (see the failed rows above)"
        for unit in pending.drain():  # every slot gave up: nothing may be left unrecorded
            for job in unit.jobs:
                sink(failed_row(request.rows[job.job_id], "", reason))
    finally:
        for row in pool.close():
            sink(row)


def failed_row(row: dict[str, Any], worker: str, reason: str) -> dict[str, Any]:
    """A job's manifest row when its worker could not render it; `worker` is "" when none was left to try."""
    return {
        **row,
        "status": "failed",
        "error": reason,
        "worker": worker,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
