"""The SLURM executor: one cluster job per work unit, through submitit (`executor=slurm`, `pip install
'batchgen[slurm]'`).

A unit is a run of jobs with one (model, LoRA state) (executors/units.py), so a job loads its model once and
patches it once. Jobs are short and independent: a preempted, timed-out or killed job loses one unit, which the
shared dispatcher (executors/base.py) queues again; a job waits in SLURM's queue instead of holding an idle GPU;
and nothing talks to a running job, so the only channel is submitit's files. Jobs read the models from their
configured paths and write their PNGs into the run directory, so both must be on a filesystem every node mounts;
the rows come back as the job's result and only this process writes the manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from batchgen.engine_options import EngineOptions
from batchgen.errors import OUTPUT_ERRNOS, BatchgenError
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

# A job that ended shows its result file late on some shared filesystems; submitit waits as long.
RESULT_GRACE_S = 15.0


@dataclass(frozen=True)
class SlurmOptions:
    name: str = "slurm"
    cluster: str = "slurm"  # submitit's AutoExecutor cluster; local: jobs run as subprocesses here, no SLURM
    partition: str | None = None  # null: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int = 4  # also each job's torch threads, unless run.threads is set
    mem_gb: float | None = None  # null: the partition's default
    time_min: int = 60  # each job's time limit; a job renders one unit
    workers: int = 4  # jobs queued or running at once
    sbatch: dict[str, Any] = field(default_factory=dict)  # more #SBATCH options, e.g. {constraint: a100}
    folder: str | None = None  # submitit's job files and logs; null: RUN_DIR/.batchgen/slurm


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise BatchgenError(
            "executor=slurm needs submitit: pip install 'batchgen[slurm]' (or use executor=local)"
        ) from None


def _check_count(key: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise BatchgenError(f"executor.{key}={value!r}: give a whole number of at least {least}")


class SlurmExecutor:
    options: ClassVar[type] = SlurmOptions

    def __init__(self, options: SlurmOptions, engine: EngineOptions) -> None:
        for key, least in (("gpus_per_task", 0), ("cpus_per_task", 1), ("time_min", 1), ("workers", 1)):
            _check_count(key, getattr(options, key), least)
        if not isinstance(options.sbatch, dict):
            raise BatchgenError(f"executor.sbatch={options.sbatch!r}: give a mapping of #SBATCH options")
        require_submitit()
        self.slurm = options
        self.engine = engine
        self.threads = engine.threads or options.cpus_per_task

    def start_early(self) -> None:
        pass  # a SLURM job is submitted with its unit and the run's settings; nothing can start before

    def discard(self) -> None:
        pass

    def note(self, jobs: int) -> str:
        return ""

    def planning_device(self) -> PlanningDevice:
        # A job's GPU is known only on its node: each worker plans for its own at load.
        return PlanningDevice("cuda" if self.slurm.gpus_per_task else "cpu")

    def run(self, request: ExecutorRequest, sink: Sink) -> None:
        pool = JobPool(request, self.engine, self.slurm, self.threads)
        names = [f"slurm{i}" for i in range(self.slurm.workers)]
        dispatch(request, pool, names, sink, unit_size=self.engine.unit_size)


class JobPool:
    """A slot is a place for one submitted job at a time: "starting" a worker only makes the slot take a unit."""

    def __init__(self, request: ExecutorRequest, engine: EngineOptions, options: SlurmOptions, threads: int) -> None:
        import submitit

        folder = Path(options.folder) if options.folder else request.run_dir / ".batchgen" / "slurm"
        self.executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
        parameters: dict[str, Any] = {
            "name": "batchgen",
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": options.gpus_per_task,  # one task per job
            "cpus_per_task": options.cpus_per_task,
            "timeout_min": options.time_min,
        }
        if options.mem_gb is not None:
            parameters["mem_gb"] = options.mem_gb
        # Ignored by submitit's other clusters (local), so one config serves the tests and the cluster.
        slurm = {"partition": options.partition, "account": options.account, "qos": options.qos}
        parameters.update({f"slurm_{key}": value for key, value in slurm.items() if value is not None})
        if options.sbatch:
            parameters["slurm_additional_parameters"] = dict(options.sbatch)
        self.executor.update_parameters(**parameters)
        self.setup = WorkerSetup(request.models, engine, request.run_dir.resolve())
        self.threads = threads
        self.jobs: dict[int, Any] = {}  # slot -> its submitted job
        self.no_result_since: dict[int, float] = {}
        self.said: list[Message] = []  # what start and stop say without asking SLURM

    def start(self, wid: int) -> None:
        self.said.append(Idle(wid))

    def send(self, wid: int, unit: Pairs) -> None:
        name = f"slurm{wid}"
        self.jobs[wid] = self.executor.submit(render_unit, self.setup, name, self.threads, unit)

    def stop(self, wid: int) -> None:
        self.said.append(Gone(wid, "stopped"))

    def poll(self, timeout: float) -> list[Message]:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        messages, self.said = self.said, []
        now = time.monotonic()
        for wid, job in list(self.jobs.items()):
            if not job.done():
                continue
            if not job.paths.result_pickle.exists():
                if now - self.no_result_since.setdefault(wid, now) < RESULT_GRACE_S:
                    continue
                del self.jobs[wid], self.no_result_since[wid]
                messages.append(Gone(wid, f"SLURM job {job.job_id} ended without a result, state {job.state}"))
                continue
            del self.jobs[wid]
            self.no_result_since.pop(wid, None)
            try:
                outcome = job.result()
            except FailedJobError as e:  # the job raised: what it held fails, the slot takes the next unit
                messages += [Crashed(wid, f"worker slurm{wid} crashed: {_raised(str(e))}"), Idle(wid)]
                continue
            except UncompletedJobError as e:
                messages.append(Gone(wid, f"SLURM job {job.job_id} has no readable result: {_raised(str(e))}"))
                continue
            if outcome[0] == "output":  # a job could not write into the run directory: the whole run stops
                raise OSError(*outcome[1:])
            messages += [Row(wid, row) for row in outcome[1]]
            messages.append(Idle(wid))
        if not messages:
            time.sleep(timeout)
        return messages

    def close(self) -> list[dict[str, Any]]:
        for job in self.jobs.values():
            job.cancel(check=False)  # scancel; a job's PNGs are written atomically, so a kill leaves none half done
        self.jobs.clear()
        return []


def render_unit(setup: WorkerSetup, name: str, threads: int, unit: Pairs) -> tuple:
    """The body of one SLURM job: ("rows", rows) with the PNGs written, or ("output", errno, strerror, filename)."""
    import torch

    from batchgen.engine.writer import finish_row
    from batchgen.library_log import LOG, route

    run_dir = setup.run_dir  # JobPool always gives one: a SLURM job writes its PNGs into the shared run directory
    route(run_dir / LOG)
    torch.set_num_threads(threads)
    # SLURM narrows CUDA_VISIBLE_DEVICES to the job's GPUs, so its first is always device 0.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    renderer = setup.renderer(device, name)
    rows = {job.job_id: row for job, row in unit}
    try:
        finished = [
            finish_row(run_dir, setup.models, rows[result.job_id], result)
            for result in renderer.render([job for job, _ in unit])
        ]
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        return ("output", e.errno, e.strerror, e.filename)
    return ("rows", finished)


def _raised(message: str) -> str:
    """The last line of the traceback inside submitit's error text (`FileExistsError: [Errno 17] ...`), else its first
    line."""
    lines = [line for line in message.splitlines() if line.strip()]
    rule = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    if len(rule) >= 2 and rule[1] > rule[0] + 1:
        return lines[rule[1] - 1].strip()
    return lines[0].strip() if lines else message
