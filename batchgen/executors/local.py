"""The local executor: one worker per device on this machine.

One worker renders in this process. Several run as spawned processes, each holding its own loaded models; the
parent hands out work units by affinity (executors/units.py), receives finished rows over a queue and alone
writes the manifest. Workers write their own PNGs (atomically, before the row is sent). A worker that dies has
its unreported jobs put back and is replaced, at most `RESTARTS` times per slot.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgen.errors import BatchgenError
from batchgen.executors.units import StateKey, UnitQueue, group_by_state, make_units
from batchgen.spec import Job, ModelSpec

RESTARTS = 2
POLL_S = 0.2

Sink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ExecutorRequest:
    jobs: list[Job]
    rows: dict[str, dict[str, Any]]  # job_id -> the job's manifest row before rendering
    models: dict[str, ModelSpec]
    run_dir: Path
    dtype: str
    devices: Any
    batch_size: int | str = "auto"
    compile_unet: bool = False


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: its manifest name, torch device and (on CPU) intra-op thread count."""

    name: str
    device: str
    threads: int | None = None


def plan_slots(devices: Any, cuda_count: int, cores: int, threads: int | None = None) -> list[Slot]:
    """`auto`: one worker per CUDA device, or one on CPU; `N`: N workers; `[0, 2]`: those CUDA devices.
    CPU workers split the cores between them unless `threads` (run.threads) fixes each one's count."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BatchgenError(f"run.threads={threads!r}: give a thread count of at least 1, or null for automatic")
    if isinstance(devices, bool) or not (devices == "auto" or isinstance(devices, int | list | tuple)):
        raise BatchgenError(f"executor.devices={devices!r}: use auto, a worker count such as 2, or a list like [0,2]")
    if isinstance(devices, list | tuple):
        if not devices or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
            raise BatchgenError(f"executor.devices={list(devices)}: list CUDA device numbers, such as [0,2]")
        if cuda_count == 0:
            raise BatchgenError(
                f"executor.devices={list(devices)} names CUDA devices but none is visible; "
                f"use executor.devices={len(devices)} for {len(devices)} CPU workers"
            )
        missing = [d for d in devices if d >= cuda_count]
        if missing:
            raise BatchgenError(
                f"executor.devices: CUDA device {missing[0]} does not exist (this machine has {cuda_count})"
            )
        return [Slot(f"cuda{d}", f"cuda:{d}") for d in devices]
    if devices == "auto":
        count = cuda_count or 1
    elif devices < 1:
        raise BatchgenError(f"executor.devices={devices}: need at least 1 worker")
    else:
        count = devices
    if cuda_count:
        return [
            Slot(f"cuda{i % cuda_count}-{i}" if count > cuda_count else f"cuda{i}", f"cuda:{i % cuda_count}")
            for i in range(count)
        ]
    if count == 1:
        return [Slot("cpu0", "cpu", threads)]
    # CPU workers split the cores; two workers on one core would only thrash.
    return [Slot(f"cpu{i}", "cpu", threads or max(1, cores // count)) for i in range(count)]


def visible_slots(devices: Any, threads: int | None = None) -> list[Slot]:
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return plan_slots(devices, cuda, os.cpu_count() or 1, threads)


def run_local(request: ExecutorRequest, slots: list[Slot], sink: Sink) -> None:
    """Render every job of the request; each finished row goes to `sink` (in this process, in finish order)."""
    if len(slots) == 1:
        _run_here(request, slots[0], sink)
    else:
        _run_processes(request, slots, sink)


def _run_here(request: ExecutorRequest, slot: Slot, sink: Sink) -> None:
    import torch

    from batchgen.engine.worker import Renderer
    from batchgen.engine.writer import ImageWriter

    renderer = Renderer(
        request.models, slot.device, request.dtype, slot.name, request.batch_size, request.compile_unet
    )
    writer = ImageWriter(request.run_dir, request.models, sink)
    previous_threads = torch.get_num_threads()
    if slot.threads:
        torch.set_num_threads(slot.threads)
    try:
        for result in renderer.render(request.jobs):
            writer.submit(request.rows[result.job_id], result)
    finally:
        writer.close()  # an interrupted run still records the images it already rendered
        torch.set_num_threads(previous_threads)


@dataclass
class _Worker:
    slot: Slot
    process: Any
    inbox: Any
    restarts: int = 0
    held: StateKey | None = None
    outstanding: dict[str, Job] = field(default_factory=dict)  # sent, not yet reported
    stopping: bool = False


def _run_processes(request: ExecutorRequest, slots: list[Slot], sink: Sink) -> None:
    import multiprocessing as mp

    from batchgen.executors.process import worker_main

    ctx = mp.get_context("spawn")  # forking a process that holds torch threads is unsafe
    outbox = ctx.Queue()
    settings = (request.models, request.run_dir, request.dtype, request.batch_size, request.compile_unet)
    batch = request.batch_size if isinstance(request.batch_size, int) else 1
    pending = UnitQueue(make_units(request.jobs, len(slots), batch))
    workers: dict[int, _Worker] = {}
    position = {job.job_id: i for i, job in enumerate(request.jobs)}

    def start(wid: int, slot: Slot, restarts: int = 0) -> None:
        inbox = ctx.Queue()
        process = ctx.Process(target=worker_main, args=(wid, slot, settings, inbox, outbox), daemon=True)
        process.start()
        workers[wid] = _Worker(slot, process, inbox, restarts)

    def assign(wid: int) -> None:
        worker = workers[wid]
        unit = pending.next_for(worker.held)
        if unit is None:
            worker.inbox.put(None)
            worker.stopping = True
            return
        worker.held = unit.key
        worker.outstanding.update({job.job_id: job for job in unit.jobs})
        worker.inbox.put([(job, request.rows[job.job_id]) for job in unit.jobs])

    def handle(message: tuple) -> None:
        kind, wid = message[0], message[1]
        if kind == "row":
            row = message[2]
            workers[wid].outstanding.pop(row["job_id"], None)
            sink(row)
        elif kind in ("ready", "idle"):
            assign(wid)
        elif kind == "output":  # a worker could not write into the run directory: stop the whole run
            raise OSError(message[2], message[3], message[4])
        elif kind == "crash":  # the worker could not start (or its loop raised): fail what it held
            for job in workers[wid].outstanding.values():
                sink(_failed_row(request.rows[job.job_id], workers[wid].slot.name, message[2]))
            workers[wid].outstanding.clear()

    for wid, slot in enumerate(slots):
        start(wid, slot)
    try:
        while workers:
            try:
                handle(outbox.get(timeout=POLL_S))
                continue
            except queue.Empty:
                pass
            for wid, worker in list(workers.items()):
                if worker.process.is_alive():
                    continue
                _drain(outbox, handle)  # rows it sent before dying still count
                if worker.stopping and not worker.outstanding:
                    del workers[wid]
                    continue
                lost = sorted(worker.outstanding.values(), key=lambda job: position[job.job_id])
                del workers[wid]
                sys.stderr.write(
                    f"batchgen: worker {worker.slot.name} died (exit code {worker.process.exitcode}); "
                    f"{len(lost)} unfinished jobs go back to the queue\n"
                )
                if worker.restarts >= RESTARTS:
                    code = worker.process.exitcode
                    reason = f"worker {worker.slot.name} died (exit code {code}) {RESTARTS + 1} times on these jobs"
                    for job in lost:
                        sink(_failed_row(request.rows[job.job_id], worker.slot.name, reason))
                    continue
                for group in reversed(group_by_state(lost)):
                    pending.put_back(group)
                start(wid, worker.slot, worker.restarts + 1)
        for unit in pending.drain():  # every slot gave up: nothing may be left unrecorded
            for job in unit.jobs:
                reason = "no worker left to render it (see the failed rows above)"
                sink(_failed_row(request.rows[job.job_id], "", reason))
    finally:
        for worker in workers.values():
            if worker.process.is_alive():
                worker.process.terminate()  # images are written atomically: a kill mid-write leaves none
        for worker in workers.values():
            worker.process.join(timeout=10)
        _drain(outbox, lambda m: sink(m[2]) if m[0] == "row" else None)


def _drain(outbox, handle) -> None:
    while True:
        try:
            handle(outbox.get_nowait())
        except (queue.Empty, OSError, EOFError):
            return


def _failed_row(row: dict[str, Any], worker: str, reason: str) -> dict[str, Any]:
    import time

    return {
        **row,
        "status": "failed",
        "error": reason,
        "worker": worker,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
