"""The Ray executor: render actors across a cluster (`executor=ray`, `pip install 'batchgen[ray]'`).

Each actor holds one Renderer, so its loaded model, TIs and patched LoRA state live as long as it does. The driver
hands out units by affinity as actors finish (executors/units.py), gets each unit's rows back (with PNG bytes,
unless `shared_fs`, where actors write into run.out_dir themselves) and alone writes the manifest. An actor that
dies has its unit put back and is replaced, at most `RESTARTS` times per actor slot.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.errors import BatchgenError
from batchgen.executors.local import ExecutorRequest, Sink
from batchgen.executors.units import StateKey, UnitQueue, make_units

RESTARTS = 2
POLL_S = 0.5


@dataclass(frozen=True)
class RayOptions:
    address: str | None  # None: start a local Ray; "auto"; "ray://host:port"
    actors: int | str  # "auto": one per GPU in the cluster, else one per cpus_per_actor CPUs
    cpus_per_actor: int
    shared_fs: bool
    threads: int | None  # run.threads; default: cpus_per_actor


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise BatchgenError("executor=ray needs Ray: pip install 'batchgen[ray]' (or use executor=local)") from None


class RenderActor:
    """Made a Ray actor class at run time (see `_actor_class`), so importing this module needs no Ray."""

    def __init__(self, settings: tuple, name: str, threads: int, run_dir: Path | None) -> None:
        import torch

        from batchgen.engine.worker import Renderer

        self.models, dtype, batch_size, compile_unet = settings
        torch.set_num_threads(threads)
        # Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPU, which is then always device 0.
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        self.renderer = Renderer(self.models, device, dtype, name, batch_size, compile_unet)
        self.run_dir = run_dir

    def pid(self) -> int:
        return os.getpid()

    def render(self, pairs: list[tuple[Any, dict[str, Any]]]) -> list[tuple[dict[str, Any], bytes | None, bool]]:
        """(row, PNG bytes or None, already stored) per job, in finish order."""
        from batchgen.engine.writer import encode_row, store_row

        rows = {job.job_id: row for job, row in pairs}
        out = []
        for result in self.renderer.render([job for job, _ in pairs]):
            row, data = encode_row(self.models, rows[result.job_id], result)
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


def run_ray(request: ExecutorRequest, options: RayOptions, sink: Sink) -> None:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from batchgen.engine.writer import store_row

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
    resources = ray.cluster_resources()
    count = actor_count(options, resources)
    gpus = resources.get("GPU", 0) > 0
    Actor = _actor_class(ray, options, gpus)
    settings = (request.models, request.dtype, request.batch_size, request.compile_unet)
    threads = options.threads or options.cpus_per_actor
    actor_dir = request.run_dir.resolve() if options.shared_fs else None
    batch = request.batch_size if isinstance(request.batch_size, int) else 1
    pending = UnitQueue(make_units(request.jobs, count, batch))
    actors: dict[int, Any] = {}
    restarts: dict[int, int] = dict.fromkeys(range(count), 0)
    held: dict[int, StateKey | None] = dict.fromkeys(range(count))
    in_flight: dict[Any, tuple[int, Any]] = {}

    def start(aid: int) -> None:
        actors[aid] = Actor.remote(settings, f"ray{aid}", threads, actor_dir)

    def assign(aid: int) -> None:
        unit = pending.next_for(held[aid])
        if unit is None:
            return
        held[aid] = unit.key
        pairs = [(job, request.rows[job.job_id]) for job in unit.jobs]
        in_flight[actors[aid].render.remote(pairs)] = (aid, unit)

    def fail(jobs, reason: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for job in jobs:
            sink({**request.rows[job.job_id], "status": "failed", "error": reason, "finished_at": now})

    try:
        for aid in range(count):
            start(aid)
            assign(aid)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
            for ref in ready:
                aid, unit = in_flight.pop(ref)
                try:
                    results = ray.get(ref)
                except RayActorError as e:  # the actor's process died: its unit goes back, the actor is replaced
                    restarts[aid] += 1
                    pending.put_back(list(unit.jobs))
                    del actors[aid]
                    if restarts[aid] <= RESTARTS:
                        held[aid] = None
                        start(aid)
                        assign(aid)
                    elif not actors:
                        fail([j for u in pending.drain() for j in u.jobs], f"every Ray actor died: {e}")
                    continue
                except RayTaskError as e:
                    fail(unit.jobs, f"Ray task failed: {' '.join(str(e.cause).split())[:300]}")
                    assign(aid)
                    continue
                for row, data, stored in results:
                    sink(row if stored else store_row(request.run_dir, row, data))
                assign(aid)
            for aid in list(actors):  # actors idled by an exhausted queue pick up put-back work
                if not any(a == aid for a, _ in in_flight.values()):
                    assign(aid)
    finally:
        for actor in actors.values():
            ray.kill(actor)
        if started_here:
            ray.shutdown()
