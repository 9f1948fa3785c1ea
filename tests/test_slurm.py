"""executor=slurm for real, on submitit's local cluster: each job a subprocess of this machine, as on SLURM.

The sweep is 4 jobs in 2 units (one model, no LoRAs, batches of 2), so two jobs run at once on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from batchgen.config import compose_config
from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.executors.base import ExecutorRequest
from batchgen.executors.slurm import SlurmExecutor, SlurmOptions
from batchgen.runner import prepare

SWEEP = (
    "+sweep=styles",
    "sweep.models=[tiny_sd1]",
    "sweep.steps=2",
    "sweep.prompts=[a castle]",
    "~sweep.slots.style",  # no prompt left to fill it
    "~sweep.stacks.ink",
    "~sweep.stacks.ink_grain",
    "~sweep.stacks.peft",
    "~sweep.stacks.lycoris",
    "sweep.seeds=[1,2,3,4]",
    "sweep.batch_size=2",
    "run.threads=1",  # CPU pixels depend on the thread count: the same in both executors
)
ON_THIS_MACHINE = (
    "executor=slurm",
    "executor.cluster=local",
    "executor.workers=2",
    "executor.gpus_per_task=0",
    "executor.cpus_per_task=1",
)


def _manifest(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)


def _job_pids(marker: str) -> list[int]:
    """submitit's job processes (`python -m submitit.core._submit FOLDER`) whose folder contains `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and marker.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_slurm_jobs_render_the_local_images_and_a_killed_job_is_rendered_again(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(*SWEEP, "run.out_dir=local")
    assert code == 0, err
    local = _manifest(tmp_path / "local")
    assert len(local) == 4 and set(local["status"]) == {"ok"}
    log = tmp_path / "slurm.log"
    with log.open("wb") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchgen.cli", *SWEEP, *ON_THIS_MACHINE, "run.out_dir=slurm"],
            cwd=tmp_path,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
    try:
        deadline = time.monotonic() + 120
        while not (victims := _job_pids(str(tmp_path / "slurm"))):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no SLURM job started"
            time.sleep(0.05)
        os.kill(victims[0], 9)  # the job is still loading: none of its unit is rendered
        assert process.wait(timeout=300) == 0, log.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    text = log.read_text()
    died = r"batchgen: worker slurm[01] died \(SLURM job \d+ ended without a result, state \w+\); 2 unfinished jobs"
    assert re.search(died, text), text
    table = _manifest(tmp_path / "slurm")
    assert len(table) == 4 and table["job_id"].is_unique and set(table["status"]) == {"ok"}
    assert set(table["worker"]) <= {"slurm0", "slurm1"}
    hashes = dict(zip(table["job_id"], table["image_sha256"], strict=True))
    assert hashes == dict(zip(local["job_id"], local["image_sha256"], strict=True))
    assert all((tmp_path / "slurm" / image).is_file() for image in table["image"])


@pytest.mark.slow
def test_a_job_that_raises_gives_each_of_its_jobs_a_failed_row_with_its_worker(
    tiny_cache: Path, tmp_path: Path
) -> None:
    composed = compose_config([*SWEEP, "sweep.batch_size=4"])
    plan = prepare(composed)
    rows = {r["job_id"]: r for r in plan.table.to_dict("records")}
    run = tmp_path / "run"
    run.mkdir()
    # A file where the job's log folder goes: the job raises as it starts, outside any batch
    (run / ".batchgen").write_text("")
    request = ExecutorRequest(plan.jobs, rows, plan.models, run)
    folder = tmp_path / "submitit"
    options = SlurmOptions(cluster="local", workers=1, gpus_per_task=0, cpus_per_task=1, folder=str(folder))
    recorded: list[dict] = []
    SlurmExecutor(options, plan.engine).run(request, recorded.append)
    assert [r["job_id"] for r in recorded] == [job.job_id for job in plan.jobs]
    raised = f"FileExistsError: [Errno 17] File exists: '{run.resolve() / '.batchgen'}'"
    assert {(r["status"], r["worker"], r["error"]) for r in recorded} == {
        ("failed", "slurm0", f"worker slurm0 crashed: {raised}")
    }
    assert list(folder.glob("*_log.err")), "submitit kept no job log"


def test_slurm_without_submitit_is_a_clear_error(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # what an install without the slurm extra looks like
    code, _, err = run_cli(*SWEEP, "executor=slurm")
    assert code == 2
    assert err == (
        "batchgen: error: executor=slurm needs submitit: pip install 'batchgen[slurm]' (or use executor=local)\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("executor.workers=0", "executor.workers=0: give a whole number of at least 1"),
        ("executor.time_min=0", "executor.time_min=0: give a whole number of at least 1"),
        (
            "+executor.devices=2",
            "executor.devices: not a setting of executor=slurm; it takes name, cluster, partition, account, qos, "
            "gpus_per_task, cpus_per_task, mem_gb, time_min, workers, sbatch, folder",
        ),
    ],
)
def test_bad_slurm_settings_exit_2_before_anything_is_written(
    run_cli, tmp_path: Path, override: str, message: str
) -> None:
    code, _, err = run_cli(*SWEEP, "executor=slurm", override)
    assert code == 2
    assert err == f"batchgen: error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_sbatch_options_are_a_mapping() -> None:
    # Hydra refuses a list over the packaged {} already; a user's own conf/executor/*.yaml reaches this check
    with pytest.raises(BatchgenError) as caught:
        SlurmExecutor(SlurmOptions(sbatch=["exclusive"]), EngineOptions())
    assert str(caught.value) == "executor.sbatch=['exclusive']: give a mapping of #SBATCH options"
