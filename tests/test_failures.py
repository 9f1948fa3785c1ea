"""Jobs that fail, the run lock, out-of-memory retries and --retry-failed, in-process on the tiny model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from batchgen.engine import worker

# The prompts replace the styles sweep's, so its {style} slot goes too (no prompt left to fill: a warning).
ONE_MODEL = (
    "+sweep=styles",
    "sweep.models=[tiny_sd1]",
    "sweep.steps=2",
    "sweep.prompts=[a castle]",
    "~sweep.slots.style",
)
NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris")
SMALL = (*ONE_MODEL, *NO_LORAS, "sweep.seeds=[1,2,3,4]")  # 4 jobs, one LoRA state


def _table() -> pd.DataFrame:
    return pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (np.nan, "NaN in the decoded image (the model overflowed; try run.dtype=fp32)"),
        (0.0, "image is all black (the model produced no signal; try run.dtype=fp32 or another scheduler)"),
    ],
)
def test_nan_and_black_images_are_failed_rows(run_cli, monkeypatch: pytest.MonkeyPatch, value, error) -> None:
    real = worker.Renderer._generate

    def broken(self, pipe, batch, embeds):
        images = real(self, pipe, batch, embeds)
        return [
            np.full_like(image, value) if job.seed == 3 else image for job, image in zip(batch, images, strict=True)
        ]

    monkeypatch.setattr(worker.Renderer, "_generate", broken)
    code, out, err = run_cli(*SMALL)
    assert code == 1 and "rendered 3, failed 1" in out
    table = _table()
    assert list(table["status"]) == ["ok", "ok", "failed", "ok"]
    assert table["error"][2] == error and table["image"][2] == ""
    assert not Path(f"runs/styles/images/{table['job_id'][2]}.png").exists()


def test_cuda_out_of_memory_halves_the_batch_and_retries(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    real = worker.Renderer._generate
    sizes: list[int] = []

    def small_gpu(self, pipe, batch, embeds):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, pipe, batch, embeds)

    monkeypatch.setattr(worker.Renderer, "_generate", small_gpu)
    code, out, _ = run_cli(*SMALL, "sweep.batch_size=4")
    assert code == 0 and "rendered 4, failed 0" in out
    assert sizes == [4, 2, 1, 1, 2, 1, 1]  # halved until it fits; the cap then holds for later batches
    assert set(_table()["status"]) == {"ok"}


def test_out_of_memory_on_a_single_image_is_a_failed_row(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memory(self, pipe, batch, embeds):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker.Renderer, "_generate", no_memory)
    code, _, err = run_cli(*SMALL, "sweep.batch_size=1")
    assert code == 1
    assert set(_table()["error"]) == {"OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_retry_failed_renders_only_the_failed_jobs(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    real = worker.Renderer._generate

    def flaky(self, pipe, batch, embeds):
        if any(job.seed == 2 for job in batch):
            raise RuntimeError("simulated fault")
        return real(self, pipe, batch, embeds)

    monkeypatch.setattr(worker.Renderer, "_generate", flaky)
    assert run_cli(*SMALL, "sweep.batch_size=1")[0] == 1
    monkeypatch.setattr(worker.Renderer, "_generate", real)
    # a new seed joins the sweep; --retry-failed still renders only what failed
    code, out, err = run_cli(*SMALL, "sweep.seeds=[1,2,3,4,5]", "--retry-failed")
    assert code == 0
    assert "styles: 1 to render, 3 already done, 0 skipped, 1 never rendered left for a run without " in err
    assert "rendered 1, failed 0, skipped 0, already done 3" in out
    table = _table()
    assert list(table["status"]) == ["ok", "failed", "ok", "ok", "ok"]
    assert table["job_id"][4] == table["job_id"][1]
    code, out, _ = run_cli(*SMALL, "sweep.seeds=[1,2,3,4,5]")
    assert code == 0 and "rendered 1, failed 0, skipped 0, already done 4" in out


def test_a_second_batchgen_on_the_same_run_dir_is_refused(run_cli) -> None:
    lock = Path("runs/styles/.batchgen/lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getppid()}\n")  # a live process that is not this one
    code, _, err = run_cli(*SMALL)
    assert code == 2
    assert err == (
        f"batchgen: error: runs/styles is in use by batchgen (pid {os.getppid()}); wait for it to finish, "
        "or render into another run.out_dir\n"
    )
    assert not Path("runs/styles/manifest.csv").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{dead.pid}\n")  # its owner is gone: taken over
    code, out, _ = run_cli(*SMALL)
    assert code == 0 and "rendered 4" in out
    assert not lock.exists()


def test_ray_executor_without_ray_is_a_clear_error(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the ray extra looks like
    code, _, err = run_cli(*SMALL, "executor=ray")
    assert code == 2
    assert err == "batchgen: error: executor=ray needs Ray: pip install 'batchgen[ray]' (or use executor=local)\n"
    assert not Path("runs").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("executor.name=dask", "executor=dask: unknown executor; use one of local, ray, slurm"),
        (
            "executor.devices=[0,1]",
            "executor.devices=[0, 1] names CUDA devices but none is visible; use executor.devices=2 for 2 CPU workers",
        ),
        ("run.threads=0", "run.threads=0: give a thread count of at least 1, or null for automatic"),
    ],
)
def test_bad_executor_settings_exit_2_before_anything_is_written(run_cli, override: str, message: str) -> None:
    code, _, err = run_cli(*SMALL, override)
    assert code == 2
    assert err == f"batchgen: error: {message}\n"
    assert not Path("runs").exists()
