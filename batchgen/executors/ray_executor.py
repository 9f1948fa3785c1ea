"""The Ray executor: render actors across a cluster (`executor=ray`, `pip install 'batchgen[ray]'`).

Each actor holds one Renderer, so its loaded model, TIs and patched LoRA state live as long as it does. The shared
dispatcher (executors/base.py) hands out the units and replaces dead actors; each unit's rows come back with their
PNG bytes, written here by the driver, unless `shared_fs`, where actors write into run.out_dir themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.executors.base import (
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


@dataclass(frozen=True)
class RayOptions:
    name: str = "ray"
    address: str | None = None  # null starts a local Ray; auto (`ray start --head`); ray://host:10001
    actors: Any = "auto"  # auto (one per GPU, else one per cpus_per_actor CPUs) | N
    cpus_per_actor: int = 1
    shared_fs: bool = False  # actors write PNGs into run.out_dir themselves (every node mounts it)


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BatchgenError("executor=ray needs Ray: pip install 'batchgen[ray]' (or use executor=local)") from None


class RenderActor:
    """Made a Ray actor class at run time (see `_actor_class`), so importing this module needs no Ray."""

    def __init__(self, setup: WorkerSetup, name: str, threads: int) -> None:
        import torch

        from batchgen.library_log import LOG, route

        # Without shared_fs the actor has no run directory (it may be on another node): its PNGs go back as bytes.
        route(None if setup.run_dir is None else setup.run_dir / LOG)
        torch.set_num_threads(threads)
        # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, which is then always device 0.
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.renderer = setup.renderer(device, name)
        self.models = setup.models
        self.run_dir = setup.run_dir

    def render(self, pairs: list[tuple[Any, dict[str, Any]]]) -> list[tuple[dict[str, Any], bytes | None, bool]]:
        """(row, PNG bytes or None, already stored) per job, in finish order."""
        from batchgen.engine.writer import encode_row, store_row

        rows = {job.job_id: row for job, row in pairs}
        out = []
        for result in self.renderer.render([job for job, _ in pairs]):
            row, data = encode_row(self.models, rows[result.job_id], result, self.run_dir)
            if self.run_dir is not None:
                out.append((store_row(self.run_dir, row, data), None, True))
            else:
                out.append((row, data, False))
        return out


def _actor_class(ray, options: RayOptions, gpus: bool):
    return ray.remote(num_cpus=options.cpus_per_actor, num_gpus=1 if gpus else 0)(RenderActor)


def actor_count(options: RayOptions, resources: dict[str, float]) -> int:
    if options.actors != "auto":
        if isinstance(options.actors, bool) or not isinstance(options.actors, int) or options.actors < 1:
            raise BatchgenError(f"executor.actors={options.actors!r}: give a number of actors (1 or more) or auto")
        return options.actors
    gpus = int(resources.get("GPU", 0))
    return gpus or max(1, int(resources.get("CPU", 1)) // options.cpus_per_actor)


class RayExecutor:
    options: ClassVar[type] = RayOptions

    def __init__(self, options: RayOptions, engine: EngineOptions) -> None:
        require_ray()
        self.ray_options = options
        self.engine = engine
        self.threads = engine.threads or options.cpus_per_actor

    def start_early(self) -> None:
        pass  # actors are made with the run's settings, which planning gives

    def discard(self) -> None:
        pass

    def note(self, jobs: int) -> str:
        return ""

    def planning_device(self) -> PlanningDevice:
        return PlanningDevice(None)  # the cluster's devices are known only to its actors

    def run(self, request: ExecutorRequest, sink: Sink) -> None:
        import ray

        options = self.ray_options
        started_here = not ray.is_initialized()
        if started_here:
            # A local Ray when no address is given; quiet, with no dashboard: batchgen reports progress itself.
            ray.init(
                address=options.address,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
                configure_logging=True,
            )
        try:
            resources = ray.cluster_resources()
            count = actor_count(options, resources)
            actor_class = _actor_class(ray, options, resources.get("GPU", 0) > 0)
            pool = ActorPool(request, self.engine, actor_class, self.threads, options)
            dispatch(request, pool, [f"ray{aid}" for aid in range(count)], sink, unit_size=self.engine.unit_size)
        finally:
            if started_here:
                ray.shutdown()


class ActorPool:
    """One Ray actor per slot; a unit is one `render` call, whose rows come back when it returns."""

    def __init__(
        self, request: ExecutorRequest, engine: EngineOptions, actor_class: Any, threads: int, options: RayOptions
    ) -> None:
        self.actor_class = actor_class
        self.setup = WorkerSetup(request.models, engine, request.run_dir.resolve() if options.shared_fs else None)
        self.threads = threads
        self.run_dir = request.run_dir
        self.actors: dict[int, Any] = {}
        self.in_flight: dict[Any, int] = {}  # render call -> slot
        self.said: list[Message] = []  # what start and stop say without asking Ray

    def start(self, wid: int) -> None:
        self.actors[wid] = self.actor_class.remote(self.setup, f"ray{wid}", self.threads)
        self.said.append(Idle(wid))  # Ray queues calls to an actor that is still starting

    def send(self, wid: int, unit: Pairs) -> None:
        self.in_flight[self.actors[wid].render.remote(unit)] = wid

    def stop(self, wid: int) -> None:
        import ray

        ray.kill(self.actors.pop(wid))
        self.said.append(Gone(wid, "stopped"))

    def poll(self, timeout: float) -> list[Message]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from batchgen.engine.writer import store_row

        messages, self.said = self.said, []
        if messages:
            return messages
        if not self.in_flight:
            time.sleep(timeout)
            return []
        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            wid = self.in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError:  # the actor's process died
                del self.actors[wid]
                messages.append(Gone(wid, "its Ray actor died"))
                continue
            except RayTaskError as e:
                messages += [Crashed(wid, f"Ray task failed: {' '.join(str(e.cause).split())[:300]}"), Idle(wid)]
                continue
            for row, data, stored in results:
                messages.append(Row(wid, row if stored else store_row(self.run_dir, row, data)))
            messages.append(Idle(wid))
        return messages

    def close(self) -> list[dict[str, Any]]:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        return []
