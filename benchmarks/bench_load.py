"""batchgen under CPU load: the styles sweep with 0, 1 and 2 competing busy processes, one worker and two.

Usage: python benchmarks/bench_load.py. Each condition is a fresh `batchgen +sweep=styles` process (72 images,
8 steps) into its own run directory, timed around the whole process, conditions interleaved in palindrome order
with 2 runs each, medians reported; the busy processes are plain Python loops started before the render and killed
after it. Appends a section to BENCHMARKS.md. Targets (issue 18, 2 cores): one busy process <= 2x the quiet time,
two <= 3x.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "bench-load"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
COMMAND = "python benchmarks/bench_load.py"
SWEEP = ["+sweep=styles", "sweep.steps=8"]
WORKERS = {"1 worker": [], "2 workers x 1 thread": ["executor.devices=2", "run.threads=1"]}
TARGETS = {0: None, 1: 2.0, 2: 3.0}
RUNS = 2


def render_seconds(label: str, extra: list[str], busy: int, cache: Path) -> float:
    run_dir = OUT / "runs" / label.replace(" ", "_") / str(busy)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"BATCHGEN_CACHE": str(cache)}
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5 if loops else 0.0)  # the loops are running when batchgen looks at the CPUs
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "batchgen.cli", *SWEEP, *extra, f"run.out_dir={run_dir}"],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    if result.returncode != 0:
        raise SystemExit(f"{label}, {busy} busy: batchgen exited {result.returncode}:\n{result.stderr[-2000:]}")
    return seconds


def main() -> int:
    cache = OUT / "cache"
    subprocess.run(  # build the tiny models once, outside the timings
        [sys.executable, "-m", "batchgen.cli", *SWEEP, "--dry-run"],
        cwd=REPO, env=os.environ | {"BATCHGEN_CACHE": str(cache)}, capture_output=True, check=True,
    )  # fmt: skip
    conditions = [(label, busy) for label in WORKERS for busy in TARGETS]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in conditions}
    started = time.perf_counter()
    for run in range(RUNS):
        for label, busy in conditions if run % 2 == 0 else reversed(conditions):
            seconds = render_seconds(label, WORKERS[label], busy, cache)
            times[(label, busy)].append(seconds)
            print(f"{label}, {busy} busy: {seconds:.1f} s", flush=True)
    rows = []
    for label, busy in conditions:
        median = statistics.median(times[(label, busy)])
        quiet = statistics.median(times[(label, 0)])
        ratio = median / quiet
        target = TARGETS[busy]
        verdict = "-" if target is None else ("met" if ratio <= target else "not met")
        spread = f"{min(times[(label, busy)]):.1f}-{max(times[(label, busy)]):.1f}"
        rows.append(
            f"| {label} | {busy} | {median:.1f} s ({spread}) | {ratio:.2f} | "
            f"{'-' if target is None else f'<= {target:g}'} | {verdict} | `{COMMAND}` |"
        )
    section = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M:%S %z')}: `{COMMAND}`, {(time.perf_counter() - started) / 60:.1f}"
        " minutes\n",
        f"`batchgen {' '.join(SWEEP)}` (72 images) on {os.cpu_count()} cores beside 0, 1 or 2 busy Python loops;"
        f" {RUNS} runs per condition, palindrome order, medians (min-max); ratio = the condition's median over the"
        " same workers' quiet median.\n",
        "| workers | busy processes | wall | ratio to quiet | target | | command |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(section) + "\n"
    print(text)
    with BENCHMARKS_MD.open("a") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
