"""GPU benchmark: batchgen against bare diffusers and a well-written diffusers LoRA loop, at full SD1.5, SDXL and
FLUX.1-dev size, with peak memory per offload plan.

Models, with random weights built on the GPU from batchgen's shipped component configs (nothing is downloaded; the
tokenizers are batchgen's tiny ones, the T5 one at real T5's special ids):
- sd15: SD1.5 at 512x512, 20 steps, fp16, 4 LoRA states x 8 images;
- sdxl: SDXL at 1024x1024, 20 steps, fp16, 4 LoRA states x 4 images;
- flux: FLUX.1-dev (12B transformer, T5-XXL) in bf16 at 512x512, 8 steps (not its 1024x1024 and 28: the whole bench
  has about 8 minutes), guidance 3.5, 4 LoRA states x 2 images;
- flux_fp8: the same files with the transformer's weights stored in float8 e4m3 and computed in bf16: batchgen's
  `run.weights=fp8`, and for the diffusers contestants `transformer.enable_layerwise_casting(...)`.
LoRAs: 4 random rank-16 files, kohya on the UNet's and text encoders' attention for SD, diffusers/PEFT on the
transformer's and CLIP-L's attention for FLUX.1. Three contestants render the same images:

- bare: plain diffusers, no LoRA, a state's images in one call, one CPU generator per image;
- strong: plain diffusers as a careful user writes it: each LoRA loaded once as a named adapter, `set_adapters` per
  state, a state's images in one call, one generator per image (fp8: the adapters are loaded before the cast, as
  diffusers requires, on the host, so that the GPU never holds the bf16 transformer; their loading still counts as
  rendering, as batchgen's LoRA reading does);
- batchgen: the `batchgen` CLI entry point in this process (`executor.devices=1` renders here) with
  `run.offload=none`, writing its PNGs, manifest, grids and index as a user's run does.

Per model they run interleaved, A B C [plans] C B A; each figure is the median over its runs. Between the halves,
batchgen runs once per other offload plan (`run.offload=encoders`, `model`; `sequential` with --sequential), and
for FLUX.1 under `run.offload=auto` planned for a smaller card (`run.gpu_memory_gb`: 32 in bf16, 24 with fp8
weights, the cards issue 35 says it fits), the plan it took read from its dry run. Every run
records `torch.cuda.max_memory_allocated` (peaks reset before it), and each batchgen setting's `--dry-run` (also the
untimed warm-up: it hashes the model and LoRA files, which the timed runs then find cached) gives the estimated
peak printed beside the measured one. A contestant's time runs from its pipeline load on; img/s is given over that
time less the model load (what a long sweep sees) and end to end. The share of the physical limit is the denoiser's
FLOPs per step x steps (guidance doubling SD's batch) plus one VAE decode, counted with torch's FlopCounterMode on
the meta device, times img/s, over the GPU's dense bf16/fp16 peak (bench_gpu_report.PEAKS; "unknown GPU" otherwise).

Time: --budget-s (default 480 s) is shared out between the models as bench_gpu_report.Budget says: a model whose
reserve (build, dry run, one run per contestant) no longer fits is skipped, and so is a plan or repeat run that
would not end within the model's share (time an earlier model left unused passes on); each skip is printed with
its reason and recorded. A model the GPU's memory cannot hold resident for the diffusers contestants is skipped too.

Pixels: batchgen's images must match the strong loop's within the compute dtype's tolerance (fp16 2/255, bf16 4/255)
and every plan's images those of batchgen's `run.offload=none` render, or the bench exits 1; fp8 against diffusers'
layerwise casting is reported, not checked (diffusers keeps FLUX.1's modulation Linears in bf16; batchgen does not).
A model that fails (an exception, a batchgen exit code) is recorded with its first line and the bench goes on to the
next; the JSON figures are rewritten after each model, and each model's lines printed as soon as it is measured.

Usage: .venv/bin/python benchmarks/bench_gpu.py            (make bench-gpu; CUDA only; appends to BENCHMARKS.md)
       .venv/bin/python benchmarks/bench_gpu.py --tiny --out FILE
         (the same code path on CPU with batchgen's tiny models of the same bases, fp8 included: 64x64, 2 steps,
         2 LoRA states x 1 image, fp32 (fp8: bf16 compute), each contestant once, no time budget; a test runs it)
       add --only flux,flux_fp8 to run some models, --budget-s S, --sequential, --keep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from bench_gpu_models import Arch, build_full, build_tiny, count_flops
from bench_gpu_report import (
    Budget,
    chosen_plan,
    estimated_peak_gb,
    markdown_section,
    model_lines,
    peak_for,
    summary_lines,
)
from bench_gpu_runs import (
    CPU_THREADS,
    GIB,
    BenchError,
    Timed,
    batchgen_images,
    batchgen_settings,
    dry_run,
    max_pixel_diff,
    release,
    run_batchgen,
    run_diffusers,
    write_config,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "bench" / "gpu.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
ORDER = ("bare", "strong", "batchgen", "batchgen", "strong", "bare")  # A B C C B A; the plans run between the halves
TINY_ORDER = ORDER[:3]  # --tiny: each contestant once (the repeats are the same code; the test stays short)
PLANS = ("encoders", "model")  # beside none, which the batchgen contestant runs
# How much longer than batchgen's resident run a plan is assumed to take, before it has run once (budgeting only).
PLAN_COST = {"encoders": 1.3, "model": 2.0, "sequential": 10.0, "auto": 2.0}
# Largest per-channel difference (of 255) allowed between batchgen and the strong loop, by compute dtype.
PIXEL_TOLERANCE = {"fp32": 2, "fp16": 2, "bf16": 4}
# batchgen's run.weights=fp8 stores every Linear weight of the transformer in fp8 (engine/fp8.py); diffusers' casting
# skips FLUX.1's `norm` modules, whose modulation Linears then stay bf16 (15.2 GB of transformer instead of 11.9).
FP8_NOTE = "diffusers' layerwise casting keeps FLUX.1's modulation Linears in bf16, batchgen's fp8 does not"
BUDGET_S = 480.0  # `make bench-gpu` must finish within the device's 10-minute command limit, with room to spare
LABELS = {"sd-1": "SD1.5", "sdxl": "SDXL", "flux": "FLUX.1-dev"}

# key, base, tiny model, built model, size, steps, LoRA states, images per state, guidance, dtype, fp8 weights,
# cards to plan auto for (GB), device memory needed (GB), reserve and share of the budget (s; rough H100 figures).
FULL = (
    Arch("sd15", "sd-1", "tiny_sd1", "sd15", 512, 20, 4, 8, 7.5, "fp16", False, (), 8, 45, 60),
    Arch("sdxl", "sdxl", "tiny_sdxl", "sdxl", 1024, 20, 4, 4, 7.5, "fp16", False, (), 16, 80, 100),
    # bf16 weights: 23.8 GB transformer + 9.5 GB T5-XXL + 0.4 GB CLIP-L and VAE, resident for the diffusers loops;
    # fp8: diffusers' cast transformer 15.2 GB. Reserves: building and saving 34 GB, hashing it in the dry run.
    # Cards: the claims, FLUX.1-dev renders on 32 GB in bf16 (encoders first) and on 24 GB with fp8 weights.
    Arch("flux", "flux", "tiny_flux", "flux", 512, 8, 4, 2, 3.5, "bf16", False, (32,), 40, 180, 200),
    Arch("flux_fp8", "flux", "tiny_flux", "flux", 512, 8, 4, 2, 3.5, "bf16", True, (24,), 32, 90, 120),
)
# --tiny: the same models at batchgen's tiny size; fp32, fp8's compute bf16; no device memory or time to reserve.
TINY_SIZE = {"size": 64, "steps": 2, "states": 2, "per_state": 1, "min_memory_gb": 0.0, "reserve_s": 0.0, "share_s": 1}
TINY = tuple(replace(a, dtype="bf16" if a.fp8 else "fp32", **TINY_SIZE) for a in FULL)


@dataclass
class Context:
    """What the models of one bench share: device, work folder, budget, and which built models are still needed."""

    device: str
    tiny: bool
    work: Path
    budget: Budget
    keep: bool
    plans: tuple[str, ...]
    order: tuple[str, ...]
    memory_gb: float | None  # the device's, which batchgen plans against without run.gpu_memory_gb
    out: Path  # the JSON figures, rewritten after each model so that a killed bench keeps what it measured
    built: dict[str, float] = field(default_factory=dict)  # model folder -> build seconds
    flops: dict[tuple[str, int, int], dict[str, float]] = field(default_factory=dict)  # by (model, size, steps)


# --- one model -------------------------------------------------------------------------------------------------------


def ensure_built(arch: Arch, ctx: Context) -> Path:
    root = ctx.work / "roots" / arch.model
    if arch.model not in ctx.built:
        print(f"{arch.key}: building {'tiny' if ctx.tiny else 'full-size random'} {arch.model} and LoRAs ...",
              flush=True)  # fmt: skip
        start = time.perf_counter()
        build_tiny(arch, root) if ctx.tiny else build_full(arch, root, ctx.device)
        release(ctx.device)
        ctx.built[arch.model] = time.perf_counter() - start
    return root


def figures(timings: list[Timed], flops_per_image: float, peak: float | None) -> dict:
    seconds = statistics.median(t.seconds for t in timings)
    rendering = statistics.median(t.seconds - t.load_seconds for t in timings)
    images = timings[0].images
    out = {
        "img_per_s": images / rendering,
        "img_per_s_end_to_end": images / seconds,
        "seconds": [t.seconds for t in timings],
        "load_seconds": [t.load_seconds for t in timings],
        "peak_gb": max((t.peak_gb for t in timings if t.peak_gb is not None), default=None),
        "reserved_gb": max((t.reserved_gb for t in timings if t.reserved_gb is not None), default=None),
    }
    out["achieved_tflops"] = out["img_per_s"] * flops_per_image / 1e12
    out["share_of_peak"] = out["achieved_tflops"] / peak if peak else None
    return out


def bench_arch(arch: Arch, ctx: Context, peak: float | None) -> dict:
    root = ensure_built(arch, ctx)
    checkpoint = root / "main" / arch.model
    # Counted on the meta device, a few seconds per model: flux_fp8 takes flux's, the same modules and shapes.
    counted = (arch.model, arch.size, arch.steps)
    flops = ctx.flops[counted] = ctx.flops.get(counted) or count_flops(checkpoint, arch)
    config_dir = ctx.work / "conf" / arch.key
    sweep = write_config(config_dir, arch, root)
    out_dir = ctx.work / "out" / arch.key
    skipped: list[str] = []

    def settings(plan: str) -> list[str]:
        return batchgen_settings(arch, plan, ctx.tiny)

    # Untimed: the dry run's estimate for the resident plan, and the hashing of the model and LoRA files (cached by
    # path, size and mtime in $BATCHGEN_CACHE), which every timed run then finds done.
    print(f"{arch.key}: dry run ...", flush=True)
    code, text = dry_run(config_dir, sweep, out_dir, settings("none"))
    if code != 0:
        raise BenchError(f"batchgen --dry-run {' '.join(settings('none'))} exited {code}: {text.strip()[-500:]}")
    estimates = {"none": estimated_peak_gb(text, arch.key)}
    chosen = {"none": "none"}

    runs: dict[str, list[Timed]] = {"bare": [], "strong": [], "batchgen": []}
    plan_runs: dict[str, Timed] = {}
    plan_diffs: dict[str, int] = {}
    strong_images: dict = {}
    resident_images: dict = {}
    diffs: list[int] = []
    # auto for a card first: whether the model renders on the card the issue names is the figure most wanted.
    plans = [*(f"auto@{card}" for card in arch.cards), *ctx.plans]
    steps = [*ctx.order[:3], *(f"plan:{p}" for p in plans), *ctx.order[3:]]
    for index, step in enumerate(steps):
        plan = step.removeprefix("plan:") if step.startswith("plan:") else None
        if index >= 3:  # A B C run once the model has started; repeats and plans only if the budget allows
            last = runs["batchgen"][0].seconds if plan else runs[step][-1].seconds
            need = last * PLAN_COST[plan.partition("@")[0]] if plan else last
            what = f"plan {plan}" if plan else f"the repeat of {step}"
            reason = ctx.budget.skip_reason(arch.key, what, need)
            if reason:
                skipped.append(reason)
                print(f"{arch.key}: skipped {reason}", flush=True)
                continue
        print(f"{arch.key}: {step} ...", flush=True)
        if plan:
            code, text = dry_run(config_dir, sweep, out_dir, settings(plan))
            if code != 0:
                reason = text.strip().splitlines()[-1] if text.strip() else f"exit {code}"
                skipped.append(f"plan {plan}: its dry run refuses it ({reason})")
                print(f"{arch.key}: skipped {skipped[-1]}", flush=True)
                continue
            estimates[plan] = estimated_peak_gb(text, arch.key)
            chosen[plan] = chosen_plan(text, arch.key) if plan.startswith("auto") else plan
            plan_runs[plan], rows = run_batchgen(config_dir, sweep, out_dir, settings(plan), ctx.device)
            plan_diffs[plan] = max_pixel_diff(batchgen_images(rows, out_dir), resident_images)
            continue
        if step == "batchgen":
            timed, rows = run_batchgen(config_dir, sweep, out_dir, settings("none"), ctx.device)
            images = batchgen_images(rows, out_dir)
            resident_images = resident_images or images
            if strong_images:
                diffs.append(max_pixel_diff(images, strong_images))
        else:
            timed, images = run_diffusers(step, root, arch, ctx.device)
            strong_images = images if step == "strong" else strong_images
        runs[step].append(timed)

    result: dict = {
        "label": LABELS[arch.base] + (" fp8" if arch.fp8 else ""),
        "base": arch.base,
        "precision": f"{arch.dtype}" + (" + fp8 weights" if arch.fp8 else ""),
        "dtype": arch.dtype,
        "weights": "fp8" if arch.fp8 else "auto",
        "size": arch.size,
        "steps": arch.steps,
        "guidance_scale": arch.guidance,
        "states": arch.states,
        "images_per_state": arch.per_state,
        "images": arch.states * arch.per_state,
        "build_seconds": ctx.built[arch.model],
        "flops": flops,
        "skipped_runs": skipped,
    }
    for name, timings in runs.items():
        result[name] = figures(timings, flops["per_image"], peak)
    for other in ("bare", "strong"):
        result[f"batchgen_vs_{other}"] = result["batchgen"]["img_per_s"] / result[other]["img_per_s"]
        ratio = result["batchgen"]["img_per_s_end_to_end"] / result[other]["img_per_s_end_to_end"]
        result[f"batchgen_vs_{other}_end_to_end"] = ratio
    tolerance = PIXEL_TOLERANCE[arch.dtype]
    result["pixel_max_diff"] = max(diffs)
    result["pixel_tolerance"] = None if arch.fp8 else tolerance
    result["pixel_check_passed"] = None if arch.fp8 else max(diffs) <= tolerance
    result["pixel_note"] = FP8_NOTE if arch.fp8 else ""
    measured = {"none": (runs["batchgen"], 0)} | {p: ([t], plan_diffs[p]) for p, t in plan_runs.items()}
    result["plans"] = {}
    for plan, (timings, diff) in measured.items():
        entry = figures(timings, flops["per_image"], peak)
        result["plans"][plan] = {
            "img_per_s": entry["img_per_s"],
            "img_per_s_end_to_end": entry["img_per_s_end_to_end"],
            "seconds": entry["seconds"],
            "peak_gb": entry["peak_gb"],
            "reserved_gb": entry["reserved_gb"],
            "estimated_peak_gb": estimates[plan],
            "chosen": chosen[plan],  # what run.offload=auto took, from the dry run (None where it names none)
            "planned_gb": float(plan.partition("@")[2]) if "@" in plan else ctx.memory_gb,
            "pixel_max_diff_vs_none": diff,
            "pixel_check_passed": diff <= tolerance,
        }
    return result


def run_models(archs: tuple[Arch, ...], ctx: Context, peak: float | None, results: dict) -> None:
    memory = ctx.memory_gb
    runnable = [arch for arch in archs if memory is None or memory >= arch.min_memory_gb]
    for arch in archs:
        if arch not in runnable:
            results["skipped"][arch.key] = (
                f"needs about {arch.min_memory_gb:g} GB resident for the diffusers contestants; the GPU has "
                f"{memory:.1f} GB"
            )
            print(f"{arch.key}: skipped: {results['skipped'][arch.key]}", flush=True)
    ctx.budget.share([(arch.key, arch.share_s) for arch in runnable])
    for index, arch in enumerate(runnable):
        reason = ctx.budget.start_reason(arch.reserve_s)
        if reason:
            print(f"{arch.key}: skipped: {reason}", flush=True)
            results["skipped"][arch.key] = reason
        else:
            try:
                results["models"][arch.key] = bench_arch(arch, ctx, peak)
                print("\n".join(model_lines(arch.key, results["models"][arch.key])), flush=True)
            except Exception as error:  # one model's failure must not lose the others' figures
                traceback.print_exc()
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                results["skipped"][arch.key] = f"failed: {type(error).__name__}: {first}"
                results["failed"].append(arch.key)
            release(ctx.device)  # after the except clause: its traceback held the failed run's pipeline
        if not ctx.keep and all(later.model != arch.model for later in runnable[index + 1 :]):
            shutil.rmtree(ctx.work / "roots" / arch.model, ignore_errors=True)  # the disk holds one FLUX.1 at a time
        save(results, ctx)


def save(results: dict, ctx: Context) -> None:
    results["bench_seconds"] = ctx.budget.elapsed()
    ctx.out.parent.mkdir(parents=True, exist_ok=True)
    ctx.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, batchgen's tiny models, 64x64, 2 steps")
    parser.add_argument("--out", type=Path, help=f"the JSON figures (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary models and runs, and print where")
    parser.add_argument("--only", help="comma-separated models to run: " + ", ".join(a.key for a in FULL))
    parser.add_argument("--sequential", action="store_true", help="also measure run.offload=sequential (slow)")
    parser.add_argument("--budget-s", type=float, help=f"seconds for the whole bench (default {BUDGET_S:g}; --tiny: "
                        "none)")  # fmt: skip
    args = parser.parse_args(argv)
    archs = TINY if args.tiny else FULL
    if args.only:
        wanted = args.only.split(",")
        unknown = [k for k in wanted if k not in {a.key for a in archs}]
        if unknown:
            sys.stderr.write(f"bench_gpu: --only {unknown[0]}: no such model; use {', '.join(a.key for a in FULL)}\n")
            return 2
        archs = tuple(a for a in archs if a.key in wanted)
    if not args.tiny and not torch.cuda.is_available():
        sys.stderr.write("bench_gpu: no CUDA device (torch.cuda.is_available() is False); use a GPU or --tiny\n")
        return 2
    device = "cpu" if args.tiny else "cuda"
    order = TINY_ORDER if args.tiny else ORDER
    if args.tiny:
        torch.set_num_threads(CPU_THREADS)
    warnings.filterwarnings("ignore")  # PEFT and diffusers warn about choices made here on purpose
    from bench_models import quiet_libraries

    quiet_libraries()
    budget = Budget(args.budget_s if args.budget_s is not None else math.inf if args.tiny else BUDGET_S)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    source, peak = peak_for(name) if device == "cuda" else ("unknown", None)
    memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else None
    results: dict = {
        "tiny": args.tiny,
        "command": "make bench-gpu" if not argv else " ".join([".venv/bin/python benchmarks/bench_gpu.py", *argv]),
        "device": name,
        "device_memory_gb": memory_gb,
        "peak_source": source,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_s": budget.seconds,
        "order": list(order),
        "plans": ["none", *PLANS, *(["sequential"] if args.sequential else [])],
        "models": {},
        "skipped": {},
        "failed": [],
    }
    parent = None if args.tiny else REPO / "runs" / "bench"  # full size: the repo's disk, not a RAM-backed /tmp
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="batchgen-bench-gpu-", dir=parent))
    os.environ["BATCHGEN_CACHE"] = str(work / "cache")  # the tiny builds and the hash cache, private to this run
    plans = tuple(results["plans"][1:])
    ctx = Context(device, args.tiny, work, budget, args.keep, plans, order, memory_gb, args.out or DEFAULT_OUT)
    try:
        run_models(archs, ctx, peak, results)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    save(results, ctx)
    print()
    print("\n".join(summary_lines(results)))
    print(f"results: {ctx.out}")
    if not args.tiny:
        if not BENCHMARKS_MD.exists():
            BENCHMARKS_MD.write_text("# Benchmarks\n")
        with BENCHMARKS_MD.open("a") as f:
            f.write(markdown_section(results))
        print(f"appended: {BENCHMARKS_MD}")
    failed = [k for k, r in results["models"].items() if r["pixel_check_passed"] is False]
    for key, r in results["models"].items():
        failed += [f"{key} plan {plan}" for plan, entry in r["plans"].items() if not entry["pixel_check_passed"]]
    if failed:
        sys.stderr.write(f"bench_gpu: pixel check failed for {', '.join(failed)}\n")
    if results["failed"]:
        sys.stderr.write(f"bench_gpu: {', '.join(results['failed'])} failed (see above)\n")
    return 1 if failed or results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
