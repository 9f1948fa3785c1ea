"""The local executor: one worker per device on this machine (`executor=local`).

One worker renders in this process. Several run as spawned processes (executors/process.py), each holding its own
loaded models, under the shared dispatcher (executors/base.py), which the parent runs; it alone writes the manifest.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import queue
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.executors.base import (
    POLL_S,
    Crashed,
    ExecutorRequest,
    Gone,
    Idle,
    Message,
    Pairs,
    PlanningDevice,
    Row,
    Sink,
    WorkerSetup,
    dispatch,
)
from batchgen.executors.process import HOLD

if TYPE_CHECKING:  # the engine imports torch: only a worker pays that
    from batchgen.engine.worker import Renderer


@dataclass(frozen=True)
class LocalOptions:
    name: str = "local"
    devices: Any = "auto"  # auto | N | [0, 2]


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: its manifest name, torch device and (on CPU) intra-op thread count."""

    name: str
    device: str
    threads: int | None = None


def plan_slots(devices: Any, cuda_count: int, cores: int, threads: int | None = None) -> list[Slot]:
    """`auto`: one worker per CUDA device, or one on CPU; `N`: N workers; `[0, 2]`: those CUDA devices.
    CPU workers split the cores between them unless `threads` (run.threads, checked by EngineOptions) fixes each
    one's count."""
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
    return plan_slots(devices, cuda_device_count(), os.cpu_count() or 1, threads)


def cuda_device_count() -> int:
    """The CUDA (or ROCm) devices torch sees. A torch built for neither sees none, and its version.py says so
    without importing torch: that import takes a second, which spawned workers would wait for and share the
    cores with."""
    if "torch" not in sys.modules and not torch_has_gpu_build():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_memory(devices: list[str]) -> int:
    """The smallest total memory of these CUDA devices: a plan that fits it fits every worker."""
    import torch  # lazy: only where CUDA devices are visible, which has imported torch already

    return min(torch.cuda.get_device_properties(torch.device(d)).total_memory for d in devices)


def torch_has_gpu_build(version_file: Path | None = None) -> bool:
    """False only where torch's version.py sets both `cuda` and `hip` to None (a CPU wheel); any doubt is True."""
    if version_file is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return True
        version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        tree = ast.parse(version_file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return True
    builds = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [None])[0]
        if isinstance(target, ast.Name) and target.id in ("cuda", "hip") and getattr(node, "value", None):
            builds[target.id] = node.value
    return set(builds) != {"cuda", "hip"} or any(
        not (isinstance(value, ast.Constant) and value.value is None) for value in builds.values()
    )


class LocalExecutor:
    options: ClassVar[type] = LocalOptions

    def __init__(self, options: LocalOptions, engine: EngineOptions) -> None:
        self.slots = visible_slots(options.devices, engine.threads)
        self.engine = engine
        self._early: ProcessPool | None = None  # started early, or held between runs
        self._here: Renderer | None = None  # the one in-process worker's, held between runs
        self._hold = False

    def note(self, jobs: int) -> str:
        return f", {len(self.slots)} workers" if len(self.slots) > 1 and jobs > 1 else ""

    def start_early(self) -> None:
        # Worker processes spend seconds importing torch and diffusers: let them do it while this process plans.
        if len(self.slots) > 1 and self._early is None:
            self._early = ProcessPool(self.slots, self.engine)
            self._early.start_spares()

    def hold(self) -> None:
        self._hold = True
        if self._early is not None:
            self._early.holding = True

    def discard(self) -> None:
        self._here = None
        if self._early is not None:
            self._early.holding = False
            self._early.close()
            self._early = None

    def planning_device(self) -> PlanningDevice:
        cuda = sorted({slot.device for slot in self.slots if slot.device.startswith("cuda")})
        return PlanningDevice("cuda", device_memory(cuda)) if cuda else PlanningDevice("cpu")

    def run(self, request: ExecutorRequest, sink: Sink) -> None:
        # Held workers render even a single job: they hold the loaded models.
        if len(self.slots) == 1 or (len(request.jobs) == 1 and not self._hold):
            here = self._here
            self.discard()
            setup = WorkerSetup(request.models, self.engine, request.run_dir)
            renderer = _run_here(request, setup, self.slots[0], sink, here)
            self._here = renderer if self._hold else None
            return
        pool, self._early = self._early or ProcessPool(self.slots, self.engine), None
        pool.holding = self._hold
        pool.bind(request)
        try:
            dispatch(request, pool, [slot.name for slot in self.slots], sink, unit_size=self.engine.unit_size)
        finally:
            if self._hold:
                self._early = pool  # its workers wait for the next run's WorkerSetup


def _run_here(
    request: ExecutorRequest, setup: WorkerSetup, slot: Slot, sink: Sink, renderer: Renderer | None = None
) -> Renderer:
    """Render in this process, on `renderer` (one held from a previous run, given the new models) or a new one;
    returns it."""
    import torch

    from batchgen.engine.writer import ImageWriter

    if renderer is None:
        renderer = setup.renderer(slot.device, slot.name)
    else:
        renderer.update_models(request.models)
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
    return renderer


class ProcessPool:
    """Spawned worker processes: units go down a queue per worker, messages come back on one shared queue."""

    def __init__(self, slots: list[Slot], engine: EngineOptions) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")  # forking a process that holds torch threads is unsafe
        self.outbox = self.ctx.Queue()
        self.engine = engine
        self.setup: WorkerSetup | None = None
        self.slots = slots
        self.processes: dict[int, Any] = {}
        self.inboxes: dict[int, Any] = {}
        self.spares: dict[int, tuple[Any, Any]] = {}  # started before the request was known, not yet given work
        # Held (LocalExecutor.hold): a worker that finished a run waits, its models loaded, for the next run's
        # WorkerSetup as a spare, and close() leaves the spares up.
        self.holding = False

    def start_spares(self) -> None:
        """One process per slot, importing its libraries; each waits for the run's WorkerSetup (`start`)."""
        for wid in range(len(self.slots)):
            self.spares[wid] = self._spawn(wid)

    def bind(self, request: ExecutorRequest) -> None:
        self.setup = WorkerSetup(request.models, self.engine, request.run_dir)

    def start(self, wid: int) -> None:
        process, inbox = self.spares.pop(wid, (None, None))
        if process is None or not process.is_alive():
            process, inbox = self._spawn(wid)  # no spare, or it died importing: a fresh one
        inbox.put(self.setup)
        self.processes[wid], self.inboxes[wid] = process, inbox

    def _spawn(self, wid: int) -> tuple[Any, Any]:
        from batchgen.executors.process import worker_main

        inbox = self.ctx.Queue()
        process = self.ctx.Process(target=worker_main, args=(wid, self.slots[wid], inbox, self.outbox), daemon=True)
        process.start()
        return process, inbox

    def send(self, wid: int, unit: Pairs) -> None:
        self.inboxes[wid].put(unit)

    def stop(self, wid: int) -> None:
        self.inboxes[wid].put(HOLD if self.holding else None)

    def poll(self, timeout: float = POLL_S) -> list[Message]:
        try:
            return [self._take(self.outbox.get(timeout=timeout))]
        except queue.Empty:
            pass
        messages: list[Message] = []
        for wid, process in list(self.processes.items()):
            if wid in self.processes and not process.is_alive():
                messages += [self._take(m) for m in self._drain()]  # rows it sent before dying still count
                if wid in self.processes:  # unless it said done before it died
                    messages.append(self._forget(wid, f"exit code {process.exitcode}"))
        return messages

    def _take(self, message: tuple) -> Message:
        if message[0] == "done":  # it reported every row and exits by itself; its exit is not waited for
            wid = message[1]
            if self.holding and wid in self.processes:  # or waits for the next run, its models loaded
                self.spares[wid] = (self.processes[wid], self.inboxes[wid])
            return self._forget(wid, "finished")
        return self._message(message)

    def _forget(self, wid: int, why: str) -> Gone:
        del self.processes[wid], self.inboxes[wid]
        return Gone(wid, why)

    def close(self) -> list[dict[str, Any]]:
        everyone = list(self.processes.values())
        if not self.holding:
            everyone += [process for process, _ in self.spares.values()]
            self.spares.clear()
        for process in everyone:
            if process.is_alive():
                process.terminate()  # images are written atomically: a kill mid-write leaves none
        for process in everyone:
            process.join(timeout=10)
        return [m[2] for m in self._drain() if m[0] == "row"]

    def _drain(self) -> list[tuple]:
        messages = []
        while True:
            try:
                messages.append(self.outbox.get_nowait())
            except (queue.Empty, OSError, EOFError):
                return messages

    @staticmethod
    def _message(message: tuple) -> Message:
        kind, wid = message[0], message[1]
        if kind == "row":
            return Row(wid, message[2])
        if kind == "idle":
            return Idle(wid)
        if kind == "crash":
            return Crashed(wid, message[2])
        # "output": a worker could not write into the run directory; the whole run stops
        raise OSError(message[2], message[3], message[4])
