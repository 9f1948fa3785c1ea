"""Kill -9 soak: render a sweep, SIGKILL the renderer (and its workers) at seeded random moments, resume each time,
then check that nothing was lost or duplicated and that the images are those of an uninterrupted run.

`make soak` runs 20 points with the local executor (2 workers of 1 thread, so a kill also takes workers mid-unit)
and 20 with Ray (2 actors), python -m tests.soak 20; tests/test_soak.py runs 4 local ones. Random moments cover
start-up and model loading, rendering, PNG writes, manifest appends and the gaps between work units.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from batchgen.manifest import read_manifest, sha256_file

SWEEP = ("+sweep=styles", "sweep.steps=4", "executor.devices=2", "run.threads=1")
# Ray: a local Ray the run starts, 2 actors; killing the driver's process group takes Ray's own processes with it.
RAY_SWEEP = ("+sweep=styles", "sweep.steps=4", "executor=ray", "executor.actors=2", "run.threads=1")


@dataclass(frozen=True)
class Kill:
    """When to SIGKILL a render: `delay` seconds after it has appended `rows` new manifest lines (0: into its
    start-up, model loading included)."""

    rows: int
    delay: float


def _render(run_dir: Path, cache: Path, kill: Kill | None, sweep: tuple[str, ...]) -> int | None:
    """Render into run_dir; with `kill`, SIGKILL the whole process group then. The exit code, or None if killed."""
    env = os.environ | {"BATCHGEN_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "batchgen.cli", *sweep, f"run.out_dir={run_dir}"]
    start_rows = _rows(run_dir)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if kill is None:
        return proc.wait(timeout=600)
    deadline = time.monotonic() + 600
    while _rows(run_dir) < start_rows + kill.rows:
        if proc.poll() is not None:
            return proc.returncode
        assert time.monotonic() < deadline, "a render stalled"
        time.sleep(0.005)
    time.sleep(kill.delay)
    if proc.poll() is not None:
        return proc.returncode
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)  # spawned workers are in the same group; let the kernel reap them
    return None


def _rows(run_dir: Path) -> int:
    manifest = run_dir / "manifest.csv"
    return manifest.read_bytes().count(b"\n") if manifest.is_file() else 0


def _where(run_dir: Path, rows_before: int) -> str:
    """Where a kill landed, read from what it left: a torn manifest line, a PNG temp file, no new row yet (start-up
    and model load), or rows appended (mid-sweep, between or inside batches); grids and index.html come last."""
    manifest = run_dir / "manifest.csv"
    if manifest.is_file() and manifest.stat().st_size and not manifest.read_bytes().endswith(b"\n"):
        return "mid manifest append"
    if any((run_dir / "images").glob(".*.tmp")):
        return "mid PNG write"
    if any(run_dir.rglob(".*.tmp")):
        return "mid report write"
    return "start-up or load" if _rows(run_dir) == rows_before else "mid-sweep"


def _hashes(run_dir: Path) -> dict[str, str]:
    table = read_manifest(run_dir)
    ok = table[table["status"] == "ok"]
    return dict(zip(ok["job_id"], ok["image_sha256"], strict=True))


def soak(points: int, seed: int, work: Path, cache: Path, sweep: tuple[str, ...] = SWEEP, longest: float = 9.0) -> str:
    """Returns the one-line summary; raises AssertionError naming what was lost, duplicated or changed. One kill in
    four lands in start-up (up to `longest` s after a start, model loading included), the others a random
    0-0.3 s after a random number of new rows: inside batches, PNG writes and manifest appends."""
    rng = random.Random(seed)
    reference, run = work / "reference", work / "soaked"
    assert _render(reference, cache, None, sweep) == 0
    expected = _hashes(reference)
    started = time.perf_counter()
    assert _render(run, cache, None if points == 0 else Kill(0, 0.0), sweep) in (None, 0)  # before anything ran
    kills = 1 if points else 0
    landed = {"before any render": 1} if points else {}
    while kills < points:
        rows_before = _rows(run)
        left = len(expected) - len(_hashes(run)) if rows_before else len(expected)
        if rng.random() < 0.25 or left < 2:
            kill = Kill(0, rng.uniform(0.2, longest))
        else:
            kill = Kill(rng.randint(1, left - 1), rng.uniform(0.0, 0.3))
        code = _render(run, cache, kill, sweep)
        if code is None:
            where = _where(run, rows_before)
            landed[where] = landed.get(where, 0) + 1
        if code == 0:  # finished before its kill: start over, so that every point lands in a live render
            for path in sorted(run.rglob("*"), reverse=True):
                path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
            continue
        assert code is None, f"a render exited {code}"
        kills += 1
    assert _render(run, cache, None, sweep) == 0  # resume to the end
    table = read_manifest(run)
    ok = table[table["status"] == "ok"]
    duplicated = ok["job_id"][ok["job_id"].duplicated()].tolist()
    assert not duplicated, f"jobs with more than one ok row: {duplicated[:5]}"
    assert set(ok["job_id"]) == set(expected), "jobs lost or added"
    for _, row in ok.iterrows():
        assert sha256_file(run / row["image"]) == row["image_sha256"], f"{row['image']}: bytes differ from the row"
    leftovers = [str(p) for p in run.rglob(".*.tmp")]
    assert not leftovers, f"temp files left: {leftovers[:5]}"
    changed = [job for job, sha in _hashes(run).items() if expected[job] != sha]
    assert not changed, f"images differ from the uninterrupted run: {changed[:5]}"
    rows = len(pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False))
    return (
        f"soak: {kills} kill -9 points (seed {seed}), {len(expected)} jobs each exactly one ok row, {rows} manifest"
        f" rows, every PNG matches its sha256 and the uninterrupted run, no temp files; kills landed "
        + ", ".join(f"{where} {n}" for where, n in sorted(landed.items(), key=lambda kv: -kv[1]))
        + f"; {time.perf_counter() - started:.0f} s"
    )


def main(argv: list[str]) -> int:
    import tempfile

    points = int(argv[0]) if argv else 20
    seed = int(argv[1]) if len(argv) > 1 else 0
    parts = []
    with tempfile.TemporaryDirectory(prefix="batchgen-soak-") as tmp:
        for label, sweep, longest in (("local, 2 workers", SWEEP, 9.0), ("Ray, 2 actors", RAY_SWEEP, 15.0)):
            work = Path(tmp) / label.split(",")[0]
            summary = soak(points, seed, work, Path(tmp) / "cache", sweep, longest)
            parts.append(f"{label}: " + summary.removeprefix("soak: "))
    print("soak: " + " | ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
