"""--watch: a long-lived worker renders each new or rewritten LoRA file with its own bytes, and the watch loop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.confs import SMALL, write_conf

pytestmark = pytest.mark.slow


def _lora(folder: Path, source: Path, name: str, scale: float, epoch: int, mtime_ns: int | None = None) -> Path:
    """A copy of a tiny kohya LoRA with its up weights scaled (so that its images differ), saved as a trainer
    would: written beside its name, then renamed over it. Returns its path."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v * scale if k.endswith("lora_up.weight") else v for k, v in load_file(source).items()}
    path = folder / f"{name}.safetensors"
    save_file(tensors, folder / f".{name}.part", {"ss_epoch": str(epoch), "ss_steps": str(epoch * 100)})
    os.replace(folder / f".{name}.part", path)
    if mtime_ns is not None:  # a rewrite within the filesystem's timestamp resolution must still look new
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _conf(tmp: Path, tiny_cache: Path, folder: Path, body: str = "") -> Path:
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    stacks = "  prompts: ['a castle']\n  stacks: {epochs: {'mylora*': 1.0}}\n  grid: {x: epoch, y: seed}\n"
    model = f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n"
    return write_conf(tmp / "conf", "w", stacks + SMALL + body, {"mine": model})


def test_a_held_renderer_renders_a_rewritten_file_with_its_new_bytes(tiny_cache: Path, tmp_path: Path) -> None:
    from batchgen.config import compose_config
    from batchgen.engine import worker
    from batchgen.runner import prepare

    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    path = _lora(folder, source, "mylora", 0.5, 1)
    conf = _conf(tmp_path, tiny_cache, folder)
    composed = compose_config(["+sweep=w", f"run.out_dir={tmp_path / 'run'}"], conf)
    first = prepare(composed)
    loads = []
    real_load = worker.load_pipeline

    def counting_load(*args, **kwargs):
        loads.append(args[0].name)
        return real_load(*args, **kwargs)

    held = worker.Renderer(first.models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "load_pipeline", counting_load)
        before = {r.job_id: np.asarray(r.image) for r in held.render(first.jobs)}
        # The trainer's final save over the same name: new bytes, so new job_ids, and the held renderer must
        # neither keep the old layers nor the text encodings made with them.
        _lora(folder, source, "mylora", 1.5, 2, mtime_ns=path.stat().st_mtime_ns + 10**9)
        second = prepare(composed)
        held.update_models(second.models)
        after = {r.job_id: np.asarray(r.image) for r in held.render(second.jobs)}
    assert loads == ["mine"]  # one load for both plans
    lora_jobs = [job for job in second.jobs if job.loras]
    assert len(lora_jobs) == 1 and lora_jobs[0].job_id not in before
    reference = next(job.job_id for job in second.jobs if not job.loras)
    assert reference in before  # the no-LoRA reference kept its id: same bytes, same job
    fresh = {r.job_id: np.asarray(r.image) for r in worker.Renderer(second.models).render(second.jobs)}
    assert np.array_equal(after[lora_jobs[0].job_id], fresh[lora_jobs[0].job_id])
    old = next(job.job_id for job in first.jobs if job.loras)
    assert not np.array_equal(before[old], after[lora_jobs[0].job_id])
    # Back to the pristine weights: the reference renders as before, bit for bit.
    assert np.array_equal(after[reference], before[reference])


def _request(plan, run_dir: Path, done: set[str] = frozenset()):
    from batchgen.executors.base import ExecutorRequest

    rows = {r["job_id"]: r for r in plan.table.to_dict("records")}
    return ExecutorRequest([j for j in plan.jobs if j.job_id not in done], rows, plan.models, run_dir)


@pytest.mark.parametrize("devices", [1, 2])
def test_held_local_workers_keep_their_processes_and_models_between_runs(
    tiny_cache: Path, tmp_path: Path, devices: int
) -> None:
    from batchgen.cells import parse_timings
    from batchgen.config import compose_config
    from batchgen.executors.registry import make_executor
    from batchgen.runner import prepare

    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    _lora(folder, source, "mylora-000001", 0.5, 1)
    conf = _conf(tmp_path, tiny_cache, folder, "  batch_size: 1\n")
    overrides = ["+sweep=w", "sweep.seeds=[1,2]", f"run.out_dir={tmp_path / 'run'}", f"executor.devices={devices}"]
    composed = compose_config(overrides, conf)
    executor = make_executor(composed.config.executor, prepare(composed).engine)
    executor.hold()
    runs: list[list[dict]] = []
    processes, held = [], []
    try:
        executor.start_early()
        for epoch in (1, 2):
            if epoch == 2:
                _lora(folder, source, "mylora-000002", 1.5, 2)
            plan = prepare(composed)
            rows: list[dict] = []
            done = {row["job_id"] for run in runs for row in run}
            executor.run(_request(plan, tmp_path / "run", done), rows.append)
            runs.append(rows)
            if devices == 2:
                held = [process for process, _ in executor._early.spares.values()]
                processes.append({process.pid for process in held})
    finally:
        executor.discard()
    assert [len(rows) for rows in runs] == [4, 2]  # two seeds of the reference and epoch 1, then of epoch 2
    assert all(row["status"] == "ok" for rows in runs for row in rows)
    loads = [sum("load" in parse_timings(row["timings"]) for row in rows) for rows in runs]
    assert 1 <= loads[0] <= devices and loads[1] == 0  # a worker loads the model in the first run only
    if devices == 2:
        assert processes[0] == processes[1] and len(processes[0]) == 2  # the same two worker processes
        assert not any(process.is_alive() for process in held)  # discard() ended them
