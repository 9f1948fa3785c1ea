"""Crash safety and scale-out, with real processes: kill -9 at any point, SIGTERM/SIGINT, dead workers, two workers.

Each run is a `python -m batchgen.cli` child in its own process group, so a kill takes its workers with it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

# 36 jobs on one model, 2 steps, one image per call: rows land steadily, so kills hit every phase.
SWEEP = ("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.steps=2", "sweep.batch_size=1")
JOBS = 36

pytestmark = pytest.mark.slow


def _start(tmp: Path, out: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{out}.{time.monotonic_ns()}.log"
    with log.open("wb") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchgen.cli", *SWEEP, f"run.out_dir={out}", *extra],
            cwd=tmp,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ.copy(),
        )
    return process, log


def _rows(tmp: Path, out: str) -> int:
    manifest = tmp / out / "manifest.csv"
    return max(0, manifest.read_bytes().count(b"\n") - 1) if manifest.is_file() else 0


def _wait(process: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the point the test wanted to interrupt"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _finish(tmp: Path, out: str, *extra: str) -> tuple[int, str]:
    process, log = _start(tmp, out, *extra)
    code = process.wait(timeout=300)
    return code, log.read_text()


def _ok_hashes(tmp: Path, out: str) -> dict[str, str]:
    """job_id -> image hash, checking every job has exactly one ok row and its PNG decodes and matches."""
    table = pd.read_csv(tmp / out / "manifest.csv", dtype=str, keep_default_na=False)
    ok = table[table["status"] == "ok"]
    assert ok["job_id"].is_unique, "a job was recorded ok twice"
    for row in ok.itertuples():
        with Image.open(tmp / out / row.image) as image:
            image.verify()
    assert not list((tmp / out).glob("**/.*.tmp")), "a temp file was left behind"
    return dict(zip(ok["job_id"], ok["image_sha256"], strict=True))


@pytest.fixture(scope="module")
def reference(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("reference")
    code, log = _finish(tmp, "ref")
    assert code == 0, log
    hashes = _ok_hashes(tmp, "ref")
    assert len(hashes) == JOBS
    return hashes


def test_kill_9_at_any_point_loses_nothing_and_duplicates_nothing(tmp_path: Path, reference: dict) -> None:
    points = [
        lambda log: b"to render" in log.read_bytes(),  # while the model loads
        lambda log: _rows(tmp_path, "run") >= 3,  # mid-sweep
        lambda log: _rows(tmp_path, "run") >= 14,  # with rows and images being written
    ]
    for point in points:
        process, log = _start(tmp_path, "run")
        _wait(process, lambda log=log, point=point: point(log))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before = _rows(tmp_path, "run")
    assert 14 <= done_before < JOBS
    code, log = _finish(tmp_path, "run")
    assert code == 0, log
    assert _ok_hashes(tmp_path, "run") == reference


def test_a_kill_mid_write_leaves_a_torn_line_and_a_temp_file_that_the_next_run_cleans(
    tmp_path: Path, reference: dict
) -> None:
    process, _ = _start(tmp_path, "run")
    _wait(process, lambda: _rows(tmp_path, "run") >= 5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # what a kill inside Manifest.append and inside atomic_write leave behind
    with (tmp_path / "run" / "manifest.csv").open("a") as f:
        f.write("deadbeefdeadbeef,ok,tiny_sd1,sd-1,a half")
    (tmp_path / "run" / "images" / ".deadbeefdeadbeef.png.123.tmp").write_bytes(b"\x89PNG half")
    code, log = _finish(tmp_path, "run")
    assert code == 0, log
    assert "dropped a torn last line" in log
    assert _ok_hashes(tmp_path, "run") == reference


@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_sigint_flush_and_exit_with_the_signal_code(
    tmp_path: Path, reference: dict, sig: int, code: int, name: str
) -> None:
    process, log = _start(tmp_path, "run")
    _wait(process, lambda: _rows(tmp_path, "run") >= 3)
    os.killpg(process.pid, sig)  # as a terminal's Ctrl-C or a CI runner's cancel would
    assert process.wait(timeout=60) == code
    text = log.read_text()
    assert f"batchgen: stopped by {name} after " in text and "run the same command again to continue" in text
    assert "Traceback" not in text
    kept = _ok_hashes(tmp_path, "run")
    assert 3 <= len(kept) < JOBS and all(reference[job] == sha for job, sha in kept.items())
    assert not (tmp_path / "run" / ".batchgen" / "lock").exists()
    finished, log_text = _finish(tmp_path, "run")
    assert finished == 0, log_text
    assert f"already done {len(kept)}" in log_text
    assert _ok_hashes(tmp_path, "run") == reference


def _worker_pids(parent: int) -> list[int]:
    """The parent's multiprocessing workers (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                pids.append(int(child))
    return pids


def test_two_workers_render_the_same_images_and_survive_a_dead_worker(tmp_path: Path, tiny_cache: Path) -> None:
    # CPU pixels depend on the intra-op thread count (oneDNN picks kernels by it), so the one-worker reference
    # uses the thread count each of two workers gets on 2 cores.
    # 8 steps: long enough that the second worker is up before the first has rendered everything
    code, log = _finish(tmp_path, "one", "run.threads=1", "sweep.steps=8")
    assert code == 0, log
    one = _ok_hashes(tmp_path, "one")
    process, log = _start(tmp_path, "two", "executor.devices=2", "run.threads=1", "sweep.steps=8")
    _wait(process, lambda: _rows(tmp_path, "two") >= 3)
    victims = _worker_pids(process.pid)
    assert len(victims) == 2
    for pid in victims:  # one of them is mid-unit; both are replaced
        os.kill(pid, signal.SIGKILL)
    assert process.wait(timeout=300) == 0, log.read_text()
    assert _ok_hashes(tmp_path, "two") == one
    text = log.read_text()
    assert "2 workers" in text
    assert re.search(r"batchgen: worker cpu[01] died \(exit code -9\); [1-9]\d* unfinished jobs go back", text), text
    table = pd.read_csv(tmp_path / "two" / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == JOBS and set(table["worker"]) <= {"cpu0", "cpu1"}
    # a worker process loads the model once: at most one batch per process carries a load time, and each slot
    # had two processes (the first and its replacement)
    loads = table[table["timings"].str.contains("load=")]["worker"].value_counts()
    assert loads.max() <= 2


def _ray_actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::RenderActor"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_ray_actors_render_the_local_images_and_survive_a_dead_actor(tmp_path: Path, tiny_cache: Path) -> None:
    code, log = _finish(tmp_path, "local", "run.threads=1")
    assert code == 0, log
    local = _ok_hashes(tmp_path, "local")
    # a local Ray this run starts itself, with two single-thread actors on the 2 CPUs
    process, log = _start(tmp_path, "ray", "executor=ray", "executor.actors=2", "run.threads=1")
    _wait(process, lambda: _rows(tmp_path, "ray") >= 1)
    actors = _ray_actor_pids()
    assert len(actors) == 2
    os.kill(actors[0], signal.SIGKILL)
    assert process.wait(timeout=300) == 0, log.read_text()
    assert _ok_hashes(tmp_path, "ray") == local
    table = pd.read_csv(tmp_path / "ray" / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(table["worker"]) == {"ray0", "ray1"} and len(table) == JOBS
