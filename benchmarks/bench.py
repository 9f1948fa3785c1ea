"""batchgen benchmark: LoRA switching, compute-bound overhead, LoRA memory, scaling and start-up, against diffusers.

- W1, LoRA switching: batchgen's tiny SD1 model with its TIs and 4 rank-16 kohya LoRAs, 24 stack states x 2 prompts
  x 2 seeds, 64x64, 8 steps. Contestants: *strong* (what a competent diffusers user writes: every LoRA loaded once as
  a named adapter, set_adapters per state, a state's 4 images in one call, one generator per image), *bare* (the same
  images and batches with no LoRA at all) and *naive* (per image load, weight and unload its LoRAs; continuity).
  Figures: w1.vs_bare, w1.vs_strong, w1.vs_naive, w1.switch_share.
- W2, compute bound: a larger SD1-architecture model, 256x256, 20 steps, 2 rank-16 LoRAs, 8 states x 2 seeds, against
  bare at the same batch size: w2.overhead, w2.switch_share.
- Memory: peak RSS of batchgen with 100 loaded LoRAs over (plain pipeline peak + the 100 files): memory.ratio_100.
- Scaling: N workers x 1 thread against 1 worker x 1 thread, local and Ray.
- Start-up: `batchgen +sweep=styles --dry-run` in a fresh process: startup.dry_run_s.

Every timed contestant of a workload runs the same number of times in palindrome order (A B C C B A ...); figures
are medians, printed with their min-max, ratios paired run by run. No contestant gets extra runs. batchgen runs in
this process through its CLI entry point, timed around the call; the baselines run in the same process with the same
thread count. Peak memory is measured in child processes through peak_rss.py. All models are built here, seeded,
under runs/bench/; nothing is downloaded. Writes runs/bench/results.json and appends a dated section to BENCHMARKS.md.

Usage: .venv/bin/python benchmarks/bench.py [--quick]   (or: make bench)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from bench_models import (
    TINY,
    Job,
    State,
    build_sd1_root,
    build_w1_root,
    expand_jobs,
    sweep_body,
    write_config_dir,
)
from bench_report import (
    FIGURE_HEADER,
    FULL_COMMAND,
    MEMORY_COMMAND,
    QUICK_COMMAND,
    SCALING_COMMAND,
    TARGETS,
    Spread,
    figure_row,
    markdown_table,
    paired_ratios,
    palindrome_order,
    text_table,
)
from PIL import Image

from batchgen.cli import main as batchgen_main

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "runs" / "bench"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
# Every contestant in one process run uses the same intra-op thread count, so ratios compare like with like.
THREADS = 2
# Runs per contestant, the same for every contestant of a workload, in palindrome order. W1 is cheap (3 runs); W2 and
# scaling are 2 runs each (A B B A, a whole palindrome) so that the bench stays near 10 minutes.
W1_REPEATS = 3
REPEATS = 2
STARTUP_RUNS = 3
# Share of a run's wall time in which some task waited for a CPU above which its figure is flagged: the bench alone
# stays near 0.01-0.03 (its writer thread), another process on the 2 cores pushes it past 0.5.
STALL_LIMIT = 0.10
# Longest wait for a quiet machine before each run; --quick, which checks the bench and not its figures, waits not.
QUIET_WAIT_S = 180.0
STAGE_ORDER = ("load", "patch", "encode", "denoise", "decode", "write")
PROMPT = "a castle at night, watercolor"

W1_LORAS = ["bench_a", "bench_b", "bench_c", "bench_d"]
W1_PROMPTS = ["a portrait of <alf>, ink drawing", PROMPT]  # the first needs the <alf> TI
W1_SEEDS = [1, 2]
W1_SCALARS = {"steps": 8, "guidance_scale": 7.5, "width": 64, "height": 64}
W1_BATCH = 4  # batchgen's automatic CPU batch size; a W1 state has exactly 4 images

W2_MODEL = "w2_sd1"
W2_LORAS = ["w2_a", "w2_b"]
W2_SEEDS = [1, 2]
# Two seeds per state: a batch of 2 is the largest batch that never mixes two LoRA states.
W2_BATCH = 2
W2_SCALARS = {"steps": 20, "guidance_scale": 7.5, "width": 256, "height": 256}
# The W2 images at 8 steps: 2 interleaved runs of 3 contestants at 20 steps would take 10 minutes alone.
SCALE_SCALARS = W2_SCALARS | {"steps": 8}
MEMORY_LORAS = [f"mem_{i:03d}" for i in range(100)]
MEMORY_SCALARS = {"steps": 1, "guidance_scale": 7.5, "width": 64, "height": 64, "batch_size": 1}


class BenchError(RuntimeError):
    pass


@dataclass
class Contest:
    """A plain-diffusers contestant's result; images only where they are compared pixel for pixel."""

    seconds: float
    count: int
    images: dict | None = None


@dataclass
class BatchgenRun:
    seconds: float
    table: pd.DataFrame
    out_dir: Path
    stdout: str
    stderr: str


# --- states ----------------------------------------------------------------------------------------------------------


def w1_states() -> list[State]:
    """24 states: each LoRA alone at 4 weights, 4 pairs, 2 triples, all four at 2 weights."""
    a, b, c, d = W1_LORAS
    singles = [State(f"{n[-1]}_{round(w * 100):03d}", {n: w}) for n in W1_LORAS for w in (0.25, 0.5, 0.75, 1.0)]
    stacks = [
        State("ab", {a: 0.6, b: 0.6}),
        State("cd", {c: 0.8, d: 0.4}),
        State("ac", {a: 1.0, c: 0.5}),
        State("bd", {b: 0.7, d: 0.7}),
        State("abc", {a: 0.5, b: 0.5, c: 0.5}),
        State("bcd", {b: 0.8, c: 0.4, d: 0.6}),
        State("abcd_050", dict.fromkeys(W1_LORAS, 0.5)),
        State("abcd_100", dict.fromkeys(W1_LORAS, 1.0)),
    ]
    return singles + stacks


def w2_states(names: list[str]) -> list[State]:
    """8 states of 2 LoRAs; `none` first so the state carrying the model load carries no patching."""
    a, b = names
    return [
        State("none"),
        State("a_050", {a: 0.5}),
        State("a_100", {a: 1.0}),
        State("b_050", {b: 0.5}),
        State("b_100", {b: 1.0}),
        State("ab_050", {a: 0.5, b: 0.5}),
        State("ab_100", {a: 1.0, b: 1.0}),
        State("ab_mix", {a: 0.8, b: 0.3}),
    ]


# --- plain diffusers contestants -------------------------------------------------------------------------------------


def load_plain(checkpoint: Path, device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(checkpoint), dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render_kwargs(scalars: dict) -> dict:
    return {
        "num_inference_steps": scalars["steps"],
        "guidance_scale": scalars["guidance_scale"],
        "width": scalars["width"],
        "height": scalars["height"],
    }


def warm_up(checkpoint: Path, scalars: dict, batch: int, device: str, dtype: torch.dtype) -> None:
    """One untimed 1-step render at the workload's shapes, so neither contestant pays first-call kernel setup."""
    pipe = load_plain(checkpoint, device, dtype)
    generators = [torch.Generator("cpu").manual_seed(0) for _ in range(batch)]
    pipe([PROMPT] * batch, generator=generators, **(render_kwargs(scalars) | {"num_inference_steps": 1}))
    del pipe
    release(device)


def release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def load_embeddings(pipe, root: Path) -> None:
    embedding_dir = root / "embedding"
    if embedding_dir.is_dir():
        for path in sorted(embedding_dir.iterdir()):
            pipe.load_textual_inversion(str(path), token=f"<{path.stem}>")


def image_key(job: Job) -> tuple:
    return (job.state.key(), job.prompt, job.seed)


def state_batches(jobs: list[Job], batch: int) -> list[list[Job]]:
    """Consecutive jobs of one state, at most `batch` at a time: batchgen never mixes two LoRA states in a batch."""
    batches: list[list[Job]] = []
    for job in jobs:
        if batches and batches[-1][0].state == job.state and len(batches[-1]) < batch:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def render_batch(pipe, chunk: list[Job], scalars: dict) -> list:
    # One CPU generator per image, as batchgen uses: each image depends only on its own seed.
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in chunk]
    return pipe([job.prompt for job in chunk], generator=generators, **render_kwargs(scalars)).images


def render_naive(root: Path, checkpoint: Path, jobs: list[Job], scalars: dict) -> Contest:
    """The loop many scripts write: pipeline and TIs once, then per image load, weight, render and unload its LoRAs.

    Timed from the pipeline load on, like batchgen's wall time, which also holds its model load.
    """
    images = {}
    start = time.perf_counter()
    pipe = load_plain(checkpoint, "cpu", torch.float32)
    load_embeddings(pipe, root)
    for job in jobs:
        names = list(job.state.loras)
        for name in names:
            pipe.load_lora_weights(str(root / "lora" / f"{name}.safetensors"), adapter_name=name)
        if names:
            pipe.set_adapters(names, adapter_weights=[job.state.loras[n] for n in names])
        image = pipe(job.prompt, generator=torch.Generator("cpu").manual_seed(job.seed), **render_kwargs(scalars))
        if names:
            pipe.unload_lora_weights()
        images[image_key(job)] = np.asarray(image.images[0])
    seconds = time.perf_counter() - start
    del pipe
    release("cpu")
    return Contest(seconds, len(jobs), images)


def render_strong(root: Path, checkpoint: Path, jobs: list[Job], scalars: dict, batch: int) -> Contest:
    """What a competent diffusers user writes: every LoRA loaded once as a named adapter, `set_adapters` per state
    (LoRAs disabled for a state without any), a state's images in one call at batchgen's batch size."""
    images = {}
    start = time.perf_counter()
    pipe = load_plain(checkpoint, "cpu", torch.float32)
    load_embeddings(pipe, root)
    names = sorted({name for job in jobs for name in job.state.loras})
    for name in names:
        pipe.load_lora_weights(str(root / "lora" / f"{name}.safetensors"), adapter_name=name)
    enabled = bool(names)
    for chunk in state_batches(jobs, batch):
        loras = chunk[0].state.loras
        if loras:
            if not enabled:
                pipe.enable_lora()
                enabled = True
            pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
        elif enabled:
            pipe.disable_lora()
            enabled = False
        for job, image in zip(chunk, render_batch(pipe, chunk, scalars), strict=True):
            images[image_key(job)] = np.asarray(image)
    seconds = time.perf_counter() - start
    del pipe
    release("cpu")
    return Contest(seconds, len(jobs), images)


def render_bare(root: Path | None, checkpoint: Path, jobs: list[Job], scalars: dict, batch: int) -> Contest:
    """The same images and batches with no LoRA and no files: what the hardware costs, load (and TIs) included."""
    count = 0
    start = time.perf_counter()
    pipe = load_plain(checkpoint, "cpu", torch.float32)
    if root is not None:
        load_embeddings(pipe, root)
    for chunk in state_batches(jobs, batch):
        count += len(render_batch(pipe, chunk, scalars))
    seconds = time.perf_counter() - start
    del pipe
    release("cpu")
    return Contest(seconds, count)


# --- batchgen --------------------------------------------------------------------------------------------------------


def run_batchgen_process(config_dir: Path, sweep: str, out_dir: Path, extra: tuple[str, ...] = ()) -> BatchgenRun:
    """The same call as `run_batchgen`, as a fresh `python -m batchgen.cli` process timed from its start to its
    exit: every contestant pays its own imports and model loads, which an in-process call would have warm."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cache = out_dir.with_name(out_dir.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    argv = ["--config-dir", str(config_dir), f"+sweep={sweep}", f"run.out_dir={out_dir}", *extra]
    env = os.environ | {"BATCHGEN_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchgen.cli", *argv], capture_output=True, text=True, cwd=REPO, env=env
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"batchgen {' '.join(argv)} exited {done.returncode}:\n{tail(done.stdout + done.stderr)}")
    table = pd.read_csv(out_dir / "manifest.csv", dtype=str, keep_default_na=False)
    return BatchgenRun(seconds, table, out_dir, done.stdout, done.stderr)


def run_halves(config_dir: Path, sweep: str, out_dir: Path, extra: tuple[str, ...], seeds: list[int]) -> BatchgenRun:
    """One independent batchgen process per seed, all started at once, timed until the last exits: what two
    workers could reach on this machine with no executor at all (the cores' shared caches, memory bandwidth and
    clock limit it, not batchgen)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(len(seeds)) as pool:
        parts = list(
            pool.map(
                lambda seed: run_batchgen_process(
                    config_dir, sweep, out_dir / f"seed{seed}", (*extra, f"sweep.seeds=[{seed}]")
                ),
                seeds,
            )
        )
    seconds = time.perf_counter() - start
    for seed, part in zip(seeds, parts, strict=True):
        part.table["image"] = f"seed{seed}/" + part.table["image"]  # relative to out_dir, as verify() reads it
    table = pd.concat([part.table for part in parts], ignore_index=True)
    return BatchgenRun(seconds, table, out_dir, "", "")


def run_batchgen(config_dir: Path, sweep: str, out_dir: Path, extra: tuple[str, ...] = ()) -> BatchgenRun:
    """One `batchgen --config-dir DIR +sweep=NAME run.out_dir=OUT` call in this process, timed around main()."""
    shutil.rmtree(out_dir, ignore_errors=True)
    # A fresh hash cache per call: a first run's hashing is part of the work, and a warm cache from an earlier bench
    # run would make results depend on history.
    cache = out_dir.with_name(out_dir.name + "-cache")
    shutil.rmtree(cache, ignore_errors=True)
    previous = os.environ.get("BATCHGEN_CACHE")
    os.environ["BATCHGEN_CACHE"] = str(cache)
    argv = ["--config-dir", str(config_dir), f"+sweep={sweep}", f"run.out_dir={out_dir}", *extra]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            start = time.perf_counter()
            code = batchgen_main(argv)
            seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("BATCHGEN_CACHE", None)
        else:
            os.environ["BATCHGEN_CACHE"] = previous
    if code != 0:
        raise BenchError(f"batchgen {' '.join(argv)} exited {code}:\n{tail(out.getvalue() + err.getvalue())}")
    table = pd.read_csv(out_dir / "manifest.csv", dtype=str, keep_default_na=False)
    return BatchgenRun(seconds, table, out_dir, out.getvalue(), err.getvalue())


def verify(run: BatchgenRun, expected: int, label: str) -> None:
    """Cheap correctness: every row ok, one per job, as many images on disk as the baseline rendered."""
    table = run.table
    bad = table[table["status"] != "ok"]
    if len(bad):
        first = bad.iloc[0]
        raise BenchError(f"{label}: {len(bad)} batchgen rows not ok, first: {first['status']} {first['error']}")
    images = [p for p in table["image"] if p and (run.out_dir / p).is_file()]
    if table["job_id"].nunique() != expected or len(images) != expected:
        raise BenchError(
            f"{label}: batchgen wrote {table['job_id'].nunique()} jobs and {len(images)} images, baseline {expected}"
        )


def lora_key(cell: str) -> frozenset[tuple[str, float]]:
    """The manifest's `name:w;name:w` (split weights `unet/te`, not used here) as a state key."""
    pairs = []
    for entry in filter(None, cell.split(";")):
        name, _, weight = entry.partition(":")
        pairs.append((name, float(weight.split("/")[0])))
    return frozenset(pairs)


def max_pixel_diff(run: BatchgenRun, images: dict) -> int:
    """Largest per-channel difference between batchgen's PNGs and a contestant's images of the same jobs (0-255)."""
    worst = 0
    for row in run.table.itertuples(index=False):
        theirs = images[(lora_key(row.loras), row.prompt, int(row.seed))]
        ours = np.asarray(Image.open(run.out_dir / row.image).convert("RGB"))
        worst = max(worst, int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()))
    return worst


def stage_totals(run: BatchgenRun) -> tuple[dict[str, float], str]:
    """Seconds per stage summed over images, and where they came from.

    The manifest's `timings` column (`load=..;patch=..;...`, per image, batch costs shared) is preferred; engines
    that do not write it yet may still print a `stages:` line; older ones give nothing.
    """
    if "timings" in run.table.columns and (run.table["timings"] != "").any():
        totals: dict[str, float] = {}
        for cell in run.table.loc[run.table["status"] == "ok", "timings"]:
            for part in filter(None, cell.split(";")):
                name, _, value = part.partition("=")
                totals[name.strip()] = totals.get(name.strip(), 0.0) + float(value)
        return totals, "manifest timings"
    line = next((x for x in reversed(run.stdout.splitlines()) if x.startswith("stages:")), None)
    if line is not None:
        # `load 0.40s, patch 1.2s` or `load=0.40`: tolerate either spelling.
        pairs = re.findall(r"([A-Za-z_]+)\s*[=:]?\s*([0-9]*\.?[0-9]+)", line.removeprefix("stages:"))
        return {name: float(value) for name, value in pairs}, "stdout stages line"
    return {}, "none (engine records no stage timings)"


def estimate_patch(run: BatchgenRun) -> float:
    """Switch cost from per-image `seconds` when no stage timings exist: the first image of each state pays the
    switch, so it is that image's excess over the state's other images. The first state also pays the model load
    and is left out; only meaningful at batch size 1, where `seconds` is per image.
    """
    seconds = pd.to_numeric(run.table["seconds"], errors="coerce").tolist()
    states = run.table["loras"].tolist()
    groups: list[list[float]] = []
    for i, value in enumerate(seconds):
        if i == 0 or states[i] != states[i - 1]:
            groups.append([])
        groups[-1].append(value)
    return sum(max(0.0, g[0] - statistics.median(g[1:])) for g in groups[1:] if len(g) > 1)


# --- memory ----------------------------------------------------------------------------------------------------------


def child_peak_rss_kib(cmd: list[str], log: Path, cache: Path | None = None) -> int:
    """Run ``cmd`` to completion through peak_rss.py and return its own peak RSS in KiB (Linux ru_maxrss units).

    Not getrusage(RUSAGE_CHILDREN) here: a child of this process inherits this process's RSS peak (over 1 GiB by
    now) in its ru_maxrss, which hid the plain pipeline's real peak (678 MiB read as 1275 MiB); and RUSAGE_CHILDREN
    is the maximum over every child reaped so far, so a second measurement could only report the larger one.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        env["BATCHGEN_CACHE"] = str(cache)
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rss")
    result.unlink(missing_ok=True)
    launcher = [sys.executable, "-S", str(Path(__file__).resolve().parent / "peak_rss.py"), str(result)]
    with log.open("wb") as f:
        code = subprocess.run([*launcher, *cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if code != 0:
        raise BenchError(f"{' '.join(cmd)} exited {code}:\n{tail(log.read_text(errors='replace'))}")
    return int(result.read_text())


def batchgen_child_peak_kib(config_dir: Path, sweep: str, expected: int) -> int:
    out = BENCH_DIR / "runs" / sweep
    shutil.rmtree(out, ignore_errors=True)
    args = ["--config-dir", str(config_dir), f"+sweep={sweep}", f"run.out_dir={out}"]
    cmd = [sys.executable, "-m", "batchgen.cli", *args]
    peak = child_peak_rss_kib(cmd, BENCH_DIR / "logs" / f"{sweep}.log", cache=BENCH_DIR / "runs" / f"{sweep}-cache")
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    if len(table) != expected or set(table["status"]) != {"ok"}:
        raise BenchError(f"{sweep}: expected {expected} ok rows, got {table['status'].tolist()}")
    return peak


def lora_memory(config_dir: Path, root: Path, checkpoint: Path) -> dict:
    files = [root / "lora" / f"{name}.safetensors" for name in MEMORY_LORAS]
    lora_kib = sum(p.stat().st_size for p in files) / 1024
    here = Path(__file__).resolve().parent
    size = (str(MEMORY_SCALARS["width"]), str(MEMORY_SCALARS["height"]), str(MEMORY_SCALARS["steps"]))
    plain = child_peak_rss_kib(
        [sys.executable, str(here / "pipeline_child.py"), str(checkpoint), *size], BENCH_DIR / "logs" / "mem_plain.log"
    )
    ours = batchgen_child_peak_kib(config_dir, "w2_memory", len(MEMORY_LORAS))
    # Not part of the figure: batchgen's peak for the same sweep with no LoRA splits the excess into what batchgen
    # costs anyway (imports, bookkeeping) and what the LoRAs cost.
    no_lora = batchgen_child_peak_kib(config_dir, "w2_memory_none", 1)
    return {
        "memory.loras": len(MEMORY_LORAS),
        "memory.ratio_100": ours / (plain + lora_kib),
        "memory.batchgen_peak_mib": ours / 1024,
        "memory.batchgen_no_lora_peak_mib": no_lora / 1024,
        "memory.per_lora_mib": (ours - no_lora) / 1024 / len(MEMORY_LORAS),
        "memory.per_lora_file_mib": lora_kib / 1024 / len(MEMORY_LORAS),
        "memory.plain_peak_mib": plain / 1024,
        "memory.lora_files_mib": lora_kib / 1024,
        "memory.model_files_mib": folder_bytes(checkpoint) / 2**20,
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- workloads -------------------------------------------------------------------------------------------------------


def sample(results: dict, contestants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list]:
    """Run every contestant `repeats` times in palindrome order (A B C C B A ...): each gets early and late slots, so
    a drift in machine speed favours nobody, and no contestant is rerun for being slow. Returns, per contestant,
    (noise label, result) pairs in run order."""
    out: dict[str, list] = {name: [] for name in contestants}
    for name, number in palindrome_order(list(contestants), repeats):
        label = f"{name}#{number}"
        wait_for_quiet()  # before every run alike: it delays runs, never picks them
        with watched(results, label):
            out[name].append((label, contestants[name]()))
        print(f"{label}: {out[name][-1][1].seconds:.1f} s", flush=True)
    return out


def wait_for_quiet(limit_s: float | None = None) -> None:
    """Wait, up to `limit_s`, until no task has waited for a CPU for 10 s: another process's test run on these
    2 cores slows torch several times over, which no amount of repetition averages out."""
    deadline = time.monotonic() + (QUIET_WAIT_S if limit_s is None else limit_s)
    while (pressure := cpu_pressure_now()) is not None and pressure > 2.0 and time.monotonic() < deadline:
        time.sleep(5)


def seconds_of(runs: list) -> list[float]:
    return [result.seconds for _, result in runs]


def median_run(runs: list) -> Any:
    """The run whose wall time is the median (the lower middle one for an even count): stage tables come from it."""
    ordered = sorted((result for _, result in runs), key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def contention_notes(results: dict, notes: list[str], names: list[str]) -> None:
    """Information only: which runs shared the CPUs with another process. Nothing is rerun or dropped for it."""
    for label, noise in results["noise"].items():
        if label.split("#")[0] in names and noise["cpu_stall_share"] > STALL_LIMIT:
            notes.append(f"{label}: tasks waited for a CPU {noise['cpu_stall_share']:.0%} of its time (information)")


def record_ratio(results: dict, key: str, top: list[float], bottom: list[float]) -> None:
    ratios = paired_ratios(top, bottom)
    spread = Spread.of(ratios)
    results[key] = spread.median
    results[key + "_runs"] = ratios
    results[key + "_spread"] = [spread.low, spread.high]


def record_seconds(results: dict, key: str, runs: list) -> None:
    values = seconds_of(runs)
    spread = Spread.of(values)
    results[key] = spread.median
    results[key + "_each"] = {label: result.seconds for label, result in runs}
    results[key + "_spread"] = [spread.low, spread.high]


def switch_seconds(run: BatchgenRun, notes: list[str]) -> float:
    stages, source = stage_totals(run)
    if "patch" in stages:
        return stages["patch"]
    note = f"switch time estimated from per-image seconds (stage timings: {source})"
    if note not in notes:
        notes.append(note)
    return estimate_patch(run)


def record_switch_share(results: dict, prefix: str, runs: list, notes: list[str]) -> None:
    shares = [switch_seconds(run, notes) / run.seconds for _, run in runs]
    spread = Spread.of(shares)
    results[f"{prefix}.switch_share"] = spread.median
    results[f"{prefix}.switch_share_spread"] = [spread.low, spread.high]
    results[f"{prefix}.patch_seconds"] = statistics.median(switch_seconds(run, notes) for _, run in runs)


def workload_w1(models: Path, repeats: int, quick: bool, results: dict, notes: list[str]) -> tuple[Path, BatchgenRun]:
    start = time.perf_counter()
    root = build_w1_root(models / "w1_tiny", W1_LORAS)
    results["w1.build_seconds"] = time.perf_counter() - start
    states = w1_states()[:: 4 if quick else 1]
    jobs = expand_jobs(states, W1_PROMPTS, W1_SEEDS)
    config_dir = write_config_dir(
        BENCH_DIR / "conf" / "w1",
        "w1_tiny",
        root,
        TINY,
        {"w1": sweep_body("w1", states, W1_PROMPTS, W1_SEEDS, batch_size=W1_BATCH, **W1_SCALARS)},
    )
    checkpoint = root / "main" / TINY
    warm_up(checkpoint, W1_SCALARS, W1_BATCH, "cpu", torch.float32)
    warm_up(checkpoint, W1_SCALARS, 1, "cpu", torch.float32)
    runs = sample(
        results,
        {
            "w1.batchgen": lambda: run_batchgen(config_dir, "w1", BENCH_DIR / "runs" / "w1"),
            "w1.strong": lambda: render_strong(root, checkpoint, jobs, W1_SCALARS, W1_BATCH),
            "w1.bare": lambda: render_bare(root, checkpoint, jobs, W1_SCALARS, W1_BATCH),
            "w1.naive": lambda: render_naive(root, checkpoint, jobs, W1_SCALARS),
        },
        repeats,
    )
    ours = runs["w1.batchgen"]
    for _, run in ours:
        verify(run, len(jobs), "w1")
    strong_diff = max_pixel_diff(ours[-1][1], runs["w1.strong"][-1][1].images)
    if strong_diff > 2:  # 2/255 is float noise between two correct implementations (the repo's oracle test uses it)
        raise BenchError(f"W1: batchgen and the strong loop differ by up to {strong_diff}/255: not the same renders")
    naive_diff = max_pixel_diff(ours[-1][1], runs["w1.naive"][-1][1].images)
    if naive_diff > 2:
        notes.append(f"W1: batchgen and naive images differ by up to {naive_diff}/255: not the same renders")
    ours_s = seconds_of(ours)
    for name in ("batchgen", "strong", "bare", "naive"):
        record_seconds(results, f"w1.{name}_seconds", runs[f"w1.{name}"])
    record_ratio(results, "w1.vs_bare", ours_s, seconds_of(runs["w1.bare"]))
    record_ratio(results, "w1.vs_strong", seconds_of(runs["w1.strong"]), ours_s)
    record_ratio(results, "w1.vs_naive", seconds_of(runs["w1.naive"]), ours_s)
    record_switch_share(results, "w1", ours, notes)
    contention_notes(results, notes, list(runs))
    results |= {
        "w1.images": len(jobs),
        "w1.batch_size": W1_BATCH,
        "w1.repeats": repeats,
        "w1.max_pixel_diff_strong": strong_diff,
        "w1.max_pixel_diff_naive": naive_diff,
    }
    return root, median_run(ours)


def workload_w2(
    models: Path, tokenizer_dir: Path, repeats: int, quick: bool, results: dict, notes: list[str]
) -> BatchgenRun:
    start = time.perf_counter()
    root = build_sd1_root(models / "w2", W2_MODEL, tokenizer_dir, W2_LORAS + MEMORY_LORAS, full_size=False)
    results["w2.build_seconds"] = time.perf_counter() - start
    quick_steps = {"steps": 4} if quick else {}
    scalars = W2_SCALARS | quick_steps
    scale_scalars = SCALE_SCALARS | quick_steps
    states = w2_states(W2_LORAS)
    jobs = expand_jobs(states, [PROMPT], W2_SEEDS)
    memory_states = [State(f"m{i:03d}", {name: 1.0}) for i, name in enumerate(MEMORY_LORAS)]
    config_dir = write_config_dir(
        BENCH_DIR / "conf" / "w2",
        W2_MODEL,
        root,
        W2_MODEL,
        {
            "w2": sweep_body("w2", states, [PROMPT], W2_SEEDS, batch_size=W2_BATCH, **scalars),
            "w2_memory": sweep_body("w2_memory", memory_states, [PROMPT], [1], **MEMORY_SCALARS),
            "w2_memory_none": sweep_body("w2_memory_none", [State("none")], [PROMPT], [1], **MEMORY_SCALARS),
            "w2_scale": sweep_body("w2_scale", states, [PROMPT], W2_SEEDS, batch_size=W2_BATCH, **scale_scalars),
        },
    )
    checkpoint = root / "main" / W2_MODEL
    warm_up(checkpoint, scalars, W2_BATCH, "cpu", torch.float32)
    runs = sample(
        results,
        {
            "w2.bare": lambda: render_bare(None, checkpoint, jobs, scalars, W2_BATCH),
            "w2.batchgen": lambda: run_batchgen(config_dir, "w2", BENCH_DIR / "runs" / "w2"),
        },
        repeats,
    )
    bare, ours = runs["w2.bare"], runs["w2.batchgen"]
    for _, run in ours:
        verify(run, bare[0][1].count, "w2")
    record_seconds(results, "w2.bare_seconds", bare)
    record_seconds(results, "w2.batchgen_seconds", ours)
    record_ratio(results, "w2.overhead", seconds_of(ours), seconds_of(bare))
    record_switch_share(results, "w2", ours, notes)
    contention_notes(results, notes, list(runs))
    results |= {
        "w2.images": len(jobs),
        "w2.batch_size": W2_BATCH,
        "w2.steps": scalars["steps"],
        "w2.repeats": repeats,
    }
    with watched(results, "memory"):
        results |= lora_memory(config_dir, root, checkpoint)
    workload_scaling(config_dir, len(jobs), scale_scalars["steps"], repeats, results, notes)
    return median_run(ours)


def workload_scaling(config_dir: Path, images: int, steps: int, repeats: int, results: dict, notes: list[str]) -> None:
    """The W2 images (at SCALE_SCALARS steps) with 1 and 2 local workers and 1 and 2 Ray actors, every worker
    1 thread (run.threads=1, which the local and Ray executors pass to each worker's torch): equal thread budgets
    per worker, so the figure measures the executor and not two workers sharing one thread pool. Each run is a
    fresh batchgen process (a user's command), so one worker pays its imports as two spawned workers do; each
    executor is compared with itself at one worker (Ray's start-up is Ray's, not the scaling's)."""
    one_thread = ("run.threads=1",)
    options = {
        "scale.local1": ("executor.devices=1", *one_thread),
        "scale.local2": ("executor.devices=2", *one_thread),
        "scale.ray1": ("executor=ray", "executor.actors=1", *one_thread),
        "scale.ray2": ("executor=ray", "executor.actors=2", *one_thread),
    }
    runs_dir = BENCH_DIR / "runs"
    contestants = {
        label: (lambda out=runs_dir / label, extra=extra: run_batchgen_process(config_dir, "w2_scale", out, extra))
        for label, extra in options.items()
    }
    # The machine's own ceiling: two independent 1-worker processes, one per seed, side by side.
    halves = ("executor.devices=1", *one_thread)
    halves_dir = runs_dir / "scale.halves"
    contestants["scale.halves"] = lambda: run_halves(config_dir, "w2_scale", halves_dir, halves, W2_SEEDS)
    runs = sample(results, contestants, repeats)
    base = None
    for label, pairs in runs.items():
        for _, run in pairs:
            verify(run, images, label)
            hashes = dict(zip(run.table["job_id"], run.table["image_sha256"], strict=True))
            base = hashes if base is None else base
            if hashes != base:
                notes.append(f"{label}: images differ from one worker's at the same thread count")
    one = seconds_of(runs["scale.local1"])
    for label in options:
        record_seconds(results, f"{label}_seconds", runs[label])
    # Efficiency = one worker's time / (N workers' time x N), paired run by run.
    record_ratio(results, "scale.local_efficiency", [t / 2 for t in one], seconds_of(runs["scale.local2"]))
    record_seconds(results, "scale.halves_seconds", runs["scale.halves"])
    record_ratio(results, "scale.ceiling_efficiency", [t / 2 for t in one], seconds_of(runs["scale.halves"]))
    ray_one = [t / 2 for t in seconds_of(runs["scale.ray1"])]
    record_ratio(results, "scale.ray_efficiency", ray_one, seconds_of(runs["scale.ray2"]))
    contention_notes(results, notes, list(runs))
    results |= {"scale.images": images, "scale.steps": steps, "scale.threads_per_worker": 1}


def workload_startup(runs: int, results: dict) -> None:
    """`batchgen +sweep=styles --dry-run`, each in a fresh process: what a user waits before anything renders."""
    out = BENCH_DIR / "runs" / "startup"
    cmd = [sys.executable, "-m", "batchgen.cli", "+sweep=styles", "--dry-run", f"run.out_dir={out}"]
    times = []
    for number in range(1, runs + 1):
        with watched(results, f"startup#{number}"):
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail(done.stdout + done.stderr)}")
    spread = Spread.of(times)
    results |= {
        "startup.dry_run_s": spread.median,
        "startup.dry_run_s_each": times,
        "startup.dry_run_s_spread": [spread.low, spread.high],
    }


# --- reporting -------------------------------------------------------------------------------------------------------


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def cpu_stall_seconds() -> float | None:
    """Cumulative seconds in which some runnable task waited for a CPU (Linux PSI), machine wide; None without PSI."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(first.rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def cpu_pressure_now() -> float | None:
    """PSI's `some avg10`: the % of the last 10 s in which some task waited for a CPU. Unlike the load average it
    does not remember a process that just ended (such as a previous bench run), only current contention."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(first.split("avg10=", 1)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def watched(results: dict, label: str):
    """Record how contended the machine was around one contestant.

    Another process on this 2-core machine makes torch's OpenMP threads wait on each other and can slow it many
    times over. The 1-minute load before the contestant and the share of its wall time in which some task waited
    for a CPU (PSI; near 0 when the bench runs alone) say which figures to distrust.
    """
    load, stall, start = load_average(), cpu_stall_seconds(), time.perf_counter()
    yield
    wall = time.perf_counter() - start
    after = cpu_stall_seconds()
    share = (after - stall) / wall if stall is not None and after is not None else float("nan")
    results.setdefault("noise", {})[label] = {"load_before": load, "cpu_stall_share": round(share, 3)}


def machine() -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": THREADS}


def spread_of(results: dict, key: str) -> Spread:
    low, high = results.get(key + "_spread", [results[key], results[key]])
    return Spread(results[key], low, high)


def figure_details(r: dict) -> dict[str, Callable[[], str]]:
    """How each figure was made, as text; lazy, so that a run of one workload (--only) needs only its keys."""

    def secs(key: str) -> str:
        return spread_of(r, key).text("s", 1)

    return {
        "w1.vs_bare": lambda: (
            f"batchgen wall / bare wall (same images, batches of {r['w1.batch_size']}, no LoRA); batchgen"
            f" {secs('w1.batchgen_seconds')}, bare {secs('w1.bare_seconds')}"
        ),
        "w1.vs_strong": lambda: (
            f"strong wall / batchgen wall; strong (adapters loaded once, set_adapters per state) "
            f"{secs('w1.strong_seconds')}, max pixel diff {r['w1.max_pixel_diff_strong']}/255"
        ),
        "w1.vs_naive": lambda: f"naive wall / batchgen wall (continuity); naive {secs('w1.naive_seconds')}",
        "w1.switch_share": lambda: f"`patch` stage / batchgen wall; median {r['w1.patch_seconds']:.2f} s switching",
        "w2.overhead": lambda: f"batchgen {secs('w2.batchgen_seconds')}, bare {secs('w2.bare_seconds')}",
        "w2.switch_share": lambda: f"median {r['w2.patch_seconds']:.2f} s switching",
        "memory.ratio_100": lambda: (
            f"{r['memory.loras']} LoRAs, one run: peak {r['memory.batchgen_peak_mib']:.0f} MiB / (plain"
            f" {r['memory.plain_peak_mib']:.0f} + LoRA files {r['memory.lora_files_mib']:.0f} MiB); batchgen with"
            f" no LoRA {r['memory.batchgen_no_lora_peak_mib']:.0f} MiB, each LoRA adds {r['memory.per_lora_mib']:.1f}"
            f" MiB for a {r['memory.per_lora_file_mib']:.1f} MiB file"
        ),
        "scale.local_efficiency": lambda: (
            f"{r['scale.images']} W2 images at {r['scale.steps']} steps, every worker 1 thread: 1 worker "
            f"{secs('scale.local1_seconds')}, 2 local workers {secs('scale.local2_seconds')}"
        ),
        "scale.ceiling_efficiency": lambda: (
            f"the same with no executor: two independent 1-worker batchgen processes side by side, one per seed "
            f"(the most 2 workers can reach on these cores) {secs('scale.halves_seconds')}"
        ),
        "scale.ray_efficiency": lambda: (
            f"1 Ray actor's wall / (2 x 2 actors' wall), every actor 1 thread, local Ray started by each run: "
            f"1 actor {secs('scale.ray1_seconds')}, 2 actors {secs('scale.ray2_seconds')}"
        ),
        "startup.dry_run_s": lambda: (
            f"`batchgen +sweep=styles --dry-run`, a fresh process each, {len(r['startup.dry_run_s_each'])} runs"
        ),
    }


def figure_rows(results: dict, command: str, keys: Iterable[str] = ()) -> list[tuple[str, ...]]:
    detail = figure_details(results)
    return [figure_row(key, spread_of(results, key), detail[key](), command) for key in (keys or TARGETS)]


def stage_rows(runs: dict[str, BatchgenRun]) -> tuple[list[str], list[list[str]], list[str]]:
    """A per-stage table: seconds and share of wall per workload; `other` is wall minus the stages."""
    totals = {label: stage_totals(run) for label, run in runs.items()}
    names = [s for s in STAGE_ORDER if any(s in t for t, _ in totals.values())]
    names += sorted({s for t, _ in totals.values() for s in t} - set(names))
    header = ["stage"] + [f"{label} {unit}" for label in runs for unit in ("s", "% of wall")]
    rows = []
    for stage in [*names, "other", "wall"]:
        row = [stage]
        for label, run in runs.items():
            stages = totals[label][0]
            if stage == "wall":
                value = run.seconds
            elif stage == "other":
                # Unattributed: config, hashing, planning, grids, index; negative when writes overlap rendering.
                value = run.seconds - sum(stages.values()) if stages else float("nan")
            else:
                value = stages.get(stage, float("nan"))
            row += [f"{value:.2f}", f"{100 * value / run.seconds:.1f}"]
        rows.append(row)
    sources = [f"{label}: {source}" for label, (_, source) in totals.items()]
    return header, rows, sources


def append_markdown(results: dict, runs: dict[str, BatchgenRun], notes: list[str]) -> None:
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n")  # the workload description is kept by hand at the top
    r = results
    m = r["machine"]
    noise = ", ".join(f"{k} {v['load_before']:.2f}/{v['cpu_stall_share']:.2f}" for k, v in r["noise"].items())
    header, rows, sources = stage_rows(runs)
    section = [
        f"\n## {r['date']}: `{FULL_COMMAND}`, {r['bench_seconds'] / 60:.1f} minutes\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads). "
        f"Bench wall {r['bench_seconds']:.0f} s (measured); model builds (not counted)"
        f" W1 {r['w1.build_seconds']:.1f} s, W2 {r['w2.build_seconds']:.1f} s."
        f" Runs per contestant, palindrome order: W1 {r['w1.repeats']}, W2 and"
        f" scaling {r['w2.repeats']}; figures are medians (min-max), ratios paired run by run.\n",
        f"Contention per run, information only (load average before / share of its time some task waited for a CPU;"
        f" near 0/0 is a quiet machine): {noise}.\n",
        markdown_table(FIGURE_HEADER, figure_rows(results, FULL_COMMAND)),
        "",
        f"W1: {r['w1.images']} images, max pixel difference batchgen vs strong {r['w1.max_pixel_diff_strong']}/255,"
        f" vs naive {r['w1.max_pixel_diff_naive']}/255. W2: {r['w2.images']} images, batch {r['w2.batch_size']},"
        f" {r['w2.steps']} steps; memory workload on the W2 model"
        f" (model files {r['memory.model_files_mib']:.0f} MiB).",
        "",
        f"batchgen time per stage in its median run, summed over images, from `{FULL_COMMAND}`"
        f" ({'; '.join(sources)}):\n",
        markdown_table(header, rows),
    ]
    section += [f"\nNote: {note}" for note in notes]
    with BENCHMARKS_MD.open("a") as f:
        f.write("\n".join(section) + "\n")


def fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="6 W1 states, 4 W2 steps, one run each: checks the bench itself; no BENCHMARKS.md",
    )
    parser.add_argument(
        "--only",
        choices=["memory", "scaling"],
        help="run one workload and append its figures alone to BENCHMARKS.md (memory: memory.ratio_100, ~2 min;"
        " scaling: scale.local_efficiency and scale.ray_efficiency, ~12 min)",
    )
    args = parser.parse_args(argv)
    if args.only:
        return only_workload(args.only)
    if args.quick:
        global QUIET_WAIT_S
        QUIET_WAIT_S = 0.0

    torch.set_num_threads(THREADS)
    # PEFT warns on every extra adapter and diffusers/transformers on choices made on purpose; the naive loop
    # would otherwise flood the table with them.
    warnings.filterwarnings("ignore")
    from bench_models import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    notes: list[str] = ["--quick run: reduced workloads, figures not comparable"] if args.quick else []
    pressure = cpu_pressure_now()
    if pressure is not None and pressure > 5.0:
        print(f"warning: tasks waited for a CPU {pressure:.0f}% of the last 10 s; timings will be noisy")

    models = BENCH_DIR / "models"
    shutil.rmtree(models, ignore_errors=True)  # rebuilt every run: the figures never depend on stale files
    w1_root, w1_run = workload_w1(models, 1 if args.quick else W1_REPEATS, args.quick, results, notes)
    tokenizer = w1_root / "main" / TINY / "tokenizer"
    w2_run = workload_w2(models, tokenizer, 1 if args.quick else REPEATS, args.quick, results, notes)
    workload_startup(STARTUP_RUNS, results)
    results["bench_seconds"] = time.perf_counter() - started

    runs = {"W1": w1_run, "W2": w2_run}
    print()
    print(text_table(FIGURE_HEADER, figure_rows(results, QUICK_COMMAND if args.quick else FULL_COMMAND)))
    header, rows, sources = stage_rows(runs)
    print(f"\nbatchgen per stage, median run ({'; '.join(sources)}):")
    print(text_table(header, rows))
    for note in notes:
        print(f"note: {note}")
    print(f"\nbench wall {results['bench_seconds']:.0f} s; contention (load before, cpu stall share):")
    for label, noise in results["noise"].items():
        print(f"  {label:<13} {noise['load_before']:.2f}  {noise['cpu_stall_share']:.2f}")

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    out = BENCH_DIR / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results: {out.relative_to(REPO)}")
    if not args.quick:
        append_markdown(results, runs, notes)
        print(f"appended: {BENCHMARKS_MD.relative_to(REPO)}")
    return 0


def only_workload(name: str) -> int:
    """One workload alone, as `make bench` runs it, its figures appended to BENCHMARKS.md as their own section:
    memory (the W2 model with its 100 LoRAs, in child processes) or scaling (the W2 images, fresh processes)."""
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    notes: list[str] = []
    models = BENCH_DIR / "models"
    shutil.rmtree(models, ignore_errors=True)
    tokenizer = build_w1_root(models / "w1_tiny", W1_LORAS) / "main" / TINY / "tokenizer"
    root = build_sd1_root(models / "w2", W2_MODEL, tokenizer, W2_LORAS + MEMORY_LORAS, full_size=False)
    if name == "memory":
        memory_states = [State(f"m{i:03d}", {lora: 1.0}) for i, lora in enumerate(MEMORY_LORAS)]
        bodies = {
            "w2_memory": sweep_body("w2_memory", memory_states, [PROMPT], [1], **MEMORY_SCALARS),
            "w2_memory_none": sweep_body("w2_memory_none", [State("none")], [PROMPT], [1], **MEMORY_SCALARS),
        }
        command, keys = MEMORY_COMMAND, ["memory.ratio_100"]
    else:
        states = w2_states(W2_LORAS)
        bodies = {"w2_scale": sweep_body("w2_scale", states, [PROMPT], W2_SEEDS, batch_size=W2_BATCH, **SCALE_SCALARS)}
        command, keys = SCALING_COMMAND, ["scale.local_efficiency", "scale.ray_efficiency", "scale.ceiling_efficiency"]
    config_dir = write_config_dir(BENCH_DIR / "conf" / "w2", W2_MODEL, root, W2_MODEL, bodies)
    if name == "memory":
        with watched(results, "memory"):
            results |= lora_memory(config_dir, root, root / "main" / W2_MODEL)
        what = f"model files {results['memory.model_files_mib']:.0f} MiB"
    else:
        images = len(expand_jobs(w2_states(W2_LORAS), [PROMPT], W2_SEEDS))
        workload_scaling(config_dir, images, SCALE_SCALARS["steps"], REPEATS, results, notes)
        what = f"{REPEATS} runs per contestant, palindrome order, medians (min-max), ratios paired run by run"
    results["bench_seconds"] = time.perf_counter() - started
    rows = figure_rows(results, command, keys)
    print(text_table(FIGURE_HEADER, rows))
    m = results["machine"]
    loads = ", ".join(f"{label} {noise['load_before']:.2f}" for label, noise in results["noise"].items())
    section = [
        f"\n## {results['date']}: `{command}`, {results['bench_seconds'] / 60:.1f} minutes\n",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. The {name} workload of `{FULL_COMMAND}` alone;"
        f" {what}. Load average before each run: {loads}.\n",
        markdown_table(FIGURE_HEADER, rows),
        *(f"\nNote: {note}" for note in notes),
    ]
    with BENCHMARKS_MD.open("a") as f:
        f.write("\n".join(section) + "\n")
    print(f"appended: {BENCHMARKS_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
