"""GPU benchmark: batchgen against bare diffusers and a well-written diffusers LoRA loop, at full SD1.5 and SDXL size.

Per architecture (SD1.5 at 512x512, SDXL at 1024x1024, 20 steps, fp16), with random weights built here from
batchgen's shipped component configs (nothing is downloaded; the tokenizers are batchgen's tiny BPE ones) and 4
random rank-16 kohya LoRAs on the UNet's and text encoders' attention projections, three contestants render the
same sweep of 4 LoRA states x 8 images:

- bare: plain diffusers, no LoRA, a state's images in one call, one CPU generator per image;
- strong: plain diffusers as a careful user writes it: each LoRA loaded once as a named adapter, `set_adapters` per
  state, a state's images in one call, one generator per image;
- batchgen: the `batchgen` CLI entry point (in this process; its local executor renders in a worker process) on the
  same sweep, writing its PNGs, manifest, grids and index as a user's run does.

They run interleaved, A B C C B A, and each figure is the median over its runs. A contestant's time is taken from its
pipeline load on; img/s is given over that time less the model load (what a long sweep sees) and end to end. The
share of the physical limit is (UNet FLOPs per step x steps, guidance doubling the batch, plus one VAE decode), counted
with torch's FlopCounterMode, times img/s, over the GPU's dense fp16 peak. batchgen's images must match the strong
loop's within 2/255 or the bench fails.

Usage: .venv/bin/python benchmarks/bench_gpu.py            (make bench-gpu; CUDA only; appends to BENCHMARKS.md)
       .venv/bin/python benchmarks/bench_gpu.py --tiny --out FILE
         (the same code path on CPU with batchgen's tiny models, 64x64, 2 steps, 2 images per state; a test runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runs" / "bench" / "gpu.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
PROMPT = "a castle at night, watercolor"
GUIDANCE = 7.5
LORA_NAMES = ("gpu_a", "gpu_b", "gpu_c", "gpu_d")
LORA_RANK = 16
LORA_ALPHA = 8.0
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Stacks, not single LoRAs only: a switch then touches modules that two LoRAs share.
STATES: tuple[tuple[str, dict[str, float]], ...] = (
    ("a", {"gpu_a": 1.0}),
    ("b", {"gpu_b": 0.8}),
    ("ac", {"gpu_a": 0.5, "gpu_c": 0.5}),
    ("bcd", {"gpu_b": 0.4, "gpu_c": 0.7, "gpu_d": 0.6}),
)
ORDER = ("bare", "strong", "batchgen", "batchgen", "strong", "bare")  # A B C C B A
PIXEL_TOLERANCE = 2  # of 255
CPU_THREADS = 2  # --tiny: the baselines and batchgen's worker use the same intra-op thread count
# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"H100|H200", "H100/H200 SXM", 989.0),
    (r"A100", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
    (r"RTX 4090", "RTX 4090", 165.0),
)


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Arch:
    """One architecture's workload."""

    key: str  # sd15 / sdxl
    base: str  # batchgen base and model_configs folder
    tiny: str  # batchgen.tiny model for --tiny
    size: int
    steps: int
    per_state: int


@dataclass
class Timed:
    """One contestant run: seconds from its pipeline load on, of which model load; images rendered."""

    seconds: float
    load_seconds: float
    images: int


FULL = (Arch("sd15", "sd-1", "tiny_sd1", 512, 20, 8), Arch("sdxl", "sdxl", "tiny_sdxl", 1024, 20, 8))
TINY = tuple(Arch(a.key, a.base, a.tiny, 64, 2, 2) for a in FULL)


# --- models ----------------------------------------------------------------------------------------------------------


def build_full(arch: Arch, root: Path, device: str, dtype: torch.dtype) -> Path:
    """The base's real architecture from batchgen's shipped configs, default-initialised on the device, saved."""
    import diffusers
    import transformers

    from batchgen.assets.bases import SHIPPED_CONFIGS
    from batchgen.tiny.tokenizer import EOS, SDXL_PAD, load_tokenizer

    configs = SHIPPED_CONFIGS / arch.base
    folder = root / "main" / arch.key
    index = json.loads((configs / "model_index.json").read_text())
    parts: dict[str, object] = {}
    with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []), torch.no_grad():
        torch.manual_seed(1234)
        for name in ("tokenizer", "tokenizer_2"):
            if name in index:
                parts[name] = load_tokenizer(folder / name, SDXL_PAD if name == "tokenizer_2" else EOS)
        for name, (library, cls_name) in index.items():
            if name.startswith("_") or name.startswith("tokenizer") or library is None:
                continue
            cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
            if name == "scheduler":
                parts[name] = cls.from_config(cls.load_config(configs / name))
            elif library == "transformers":
                config = transformers.AutoConfig.from_pretrained(configs / name, local_files_only=True)
                tokenizer = parts["tokenizer_2" if name == "text_encoder_2" else "tokenizer"]
                # batchgen's tokenizer has its own special-token ids; the pooled output is read at the eos id.
                config.bos_token_id = tokenizer.bos_token_id
                config.eos_token_id = tokenizer.eos_token_id
                config.pad_token_id = tokenizer.pad_token_id
                with torch.device(device):
                    parts[name] = cls(config).to(dtype).eval()
            else:
                with torch.device(device):
                    parts[name] = cls.from_config(cls.load_config(configs / name)).to(dtype).eval()
        extra = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
        if arch.base == "sd-1":
            parts |= {"safety_checker": None, "feature_extractor": None}
        pipe = getattr(diffusers, index["_class_name"])(**parts, **extra)
        pipe.save_pretrained(folder, safe_serialization=True)
        write_loras(pipe, root / "lora", arch)
    del pipe, parts
    release(device)
    return root


def build_tiny(arch: Arch, root: Path) -> Path:
    """batchgen's tiny model of the same base, its own LoRAs swapped for this bench's rank-16 ones."""
    from diffusers import DiffusionPipeline

    from batchgen.tiny import build_tiny as build

    build(arch.tiny, root)
    shutil.rmtree(root / "lora")
    (root / "main" / arch.tiny).rename(root / "main" / arch.key)
    pipe = DiffusionPipeline.from_pretrained(str(root / "main" / arch.key), local_files_only=True)
    write_loras(pipe, root / "lora", arch)
    return root


def write_loras(pipe, folder: Path, arch: Arch) -> None:
    from batchgen.tiny import write_lycoris

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    targets: dict[str, dict[str, tuple[int, ...]]] = {"lora_unet": {}}
    for component, prefix in (("text_encoder", "lora_te1" if sdxl else "lora_te"), ("text_encoder_2", "lora_te2")):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            targets[prefix] = {
                path: tuple(m.weight.shape)
                for path, m in encoder.named_modules()
                if path.rsplit(".", 1)[-1] in TEXT_TARGETS
            }
    for path, module in pipe.unet.named_modules():
        if (".attn1." in path or ".attn2." in path) and any(path.endswith("." + t) for t in UNET_TARGETS):
            targets["lora_unet"][path] = tuple(module.weight.shape)
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(LORA_NAMES):
        seed = 1000 * (arch.key == "sdxl") + index  # distinct LoRAs: identical ones could hide a switch's cost
        write_lycoris(folder / f"{name}.safetensors", targets, "lora", rank=LORA_RANK, alpha=LORA_ALPHA, seed=seed)


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- FLOPs and peak --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def flops_per_image(checkpoint: Path, arch: Arch, device: str, dtype: torch.dtype) -> dict[str, float]:
    """UNet FLOPs of one step at guidance's batch of 2, and one VAE decode, for one image at this size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", dtype=dtype, local_files_only=True).to(device)
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae", dtype=dtype, local_files_only=True).to(device)
    cfg = unet.config
    side = arch.size // 8
    sample = torch.zeros(2, cfg.in_channels, side, side, device=device, dtype=dtype)
    context = torch.zeros(2, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    kwargs: dict = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(2, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(2, 6, device=device, dtype=dtype),
        }
    with FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500, device=device), context, **kwargs)
    unet_step = float(counter.get_total_flops())
    latent = torch.zeros(1, vae.config.latent_channels, side, side, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        vae.decode(latent)
    decode = float(counter.get_total_flops())
    del unet, vae
    release(device)
    return {"unet_step_cfg": unet_step, "vae_decode": decode, "per_image": unet_step * arch.steps + decode}


def peak_tflops(device: str) -> tuple[str, str, float | None]:
    """(device name, the table row used or "unknown", dense fp16 TFLOP/s or None)."""
    if not device.startswith("cuda"):
        return "cpu", "unknown", None
    name = torch.cuda.get_device_name(0)
    for pattern, label, peak in PEAKS:
        if re.search(pattern, name):
            return name, label, peak
    return name, "unknown", None


# --- plain diffusers contestants -------------------------------------------------------------------------------------


def load_pipe(checkpoint: Path, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(checkpoint), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call(pipe, arch: Arch, seeds: list[int], steps: int | None = None) -> list[np.ndarray]:
    # One CPU generator per image, as batchgen draws noise: each image depends only on its own seed.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        [PROMPT] * len(seeds),
        # An explicit empty negative, as batchgen (and A1111) encode it: SDXL's pipeline would zero a missing one.
        negative_prompt=[""] * len(seeds),
        num_inference_steps=steps or arch.steps,
        guidance_scale=GUIDANCE,
        width=arch.size,
        height=arch.size,
        generator=generators,
    )
    return [np.asarray(image.convert("RGB")) for image in out.images]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_bare(checkpoint: Path, arch: Arch, device: str, dtype: torch.dtype) -> tuple[Timed, dict]:
    start = time.perf_counter()
    pipe = load_pipe(checkpoint, device, dtype)
    sync(device)
    loaded = time.perf_counter()
    count = sum(len(call(pipe, arch, seeds(arch))) for _ in STATES)
    sync(device)
    timed = Timed(time.perf_counter() - start, loaded - start, count)
    del pipe
    release(device)
    return timed, {}


def run_strong(root: Path, checkpoint: Path, arch: Arch, device: str, dtype: torch.dtype) -> tuple[Timed, dict]:
    """Each LoRA loaded once as an adapter, set_adapters per state, a state's images in one call."""
    images: dict[tuple[str, int], np.ndarray] = {}
    start = time.perf_counter()
    pipe = load_pipe(checkpoint, device, dtype)
    sync(device)
    loaded = time.perf_counter()
    for name in LORA_NAMES:
        pipe.load_lora_weights(str(root / "lora" / f"{name}.safetensors"), adapter_name=name)
    for state, loras in STATES:
        pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
        for seed, pixels in zip(seeds(arch), call(pipe, arch, seeds(arch)), strict=True):
            images[(state, seed)] = pixels
    sync(device)
    timed = Timed(time.perf_counter() - start, loaded - start, len(images))
    del pipe
    release(device)
    return timed, images


def seeds(arch: Arch) -> list[int]:
    return list(range(1, arch.per_state + 1))


# --- batchgen --------------------------------------------------------------------------------------------------------


def write_config(config_dir: Path, arch: Arch, root: Path, extra: dict) -> str:
    """model/<key>.yaml and sweep/<key>.yaml for `batchgen --config-dir`; returns the sweep name."""
    (config_dir / "model").mkdir(parents=True, exist_ok=True)
    (config_dir / "sweep").mkdir(parents=True, exist_ok=True)
    model = {"base": arch.base, "root": str(root.resolve()), "checkpoint": arch.key}
    (config_dir / "model" / f"{arch.key}.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    sweep = {
        "name": arch.key,
        "prompts": [PROMPT],
        "stacks": {state: dict(loras) for state, loras in STATES},
        "references": False,  # the same images as the diffusers contestants, no reference jobs
        "seeds": seeds(arch),
        "steps": arch.steps,
        "guidance_scale": GUIDANCE,
        "width": arch.size,
        "height": arch.size,
        "batch_size": arch.per_state,
        **extra,
    }
    body = {"defaults": [{f"/model@models.{arch.key}": arch.key}], "sweep": sweep}
    (config_dir / "sweep" / f"{arch.key}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    return arch.key


def run_batchgen(config_dir: Path, sweep: str, out_dir: Path, extra: list[str]) -> tuple[Timed, list[dict]]:
    """One in-process `batchgen --config-dir DIR +sweep=NAME run.out_dir=OUT` call, timed around main()."""
    from batchgen.cli import main as batchgen_main

    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--config-dir", str(config_dir), f"+sweep={sweep}", f"run.out_dir={out_dir}", *extra]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        start = time.perf_counter()
        code = batchgen_main(argv)
        seconds = time.perf_counter() - start
    if code != 0:
        text = (out.getvalue() + err.getvalue()).strip().splitlines()[-20:]
        raise BenchError(f"batchgen {' '.join(argv)} exited {code}:\n" + "\n".join(text))
    with (out_dir / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise BenchError(f"{sweep}: {len(bad)} batchgen rows not ok, first: {bad[0]['status']} {bad[0]['error']}")
    load = sum(stage(r.get("timings", ""), "load") for r in rows)
    return Timed(seconds, load, len(rows)), rows


def stage(cell: str, name: str) -> float:
    """One stage's seconds from the manifest's `load=..;patch=..` timings cell (0 when absent)."""
    for part in filter(None, cell.split(";")):
        key, _, value = part.partition("=")
        if key.strip() == name:
            return float(value)
    return 0.0


def state_of(cell: str) -> str:
    """The STATES name of a manifest `loras` cell, `name:w;name:w`."""
    found = {n: float(w.split("/")[0]) for n, _, w in (e.partition(":") for e in filter(None, cell.split(";")))}
    for state, loras in STATES:
        if found == loras:
            return state
    raise BenchError(f"batchgen rendered LoRA state {cell!r}, which the sweep does not have")


def max_pixel_diff(rows: list[dict], out_dir: Path, images: dict[tuple[str, int], np.ndarray]) -> int:
    """Largest per-channel difference (0-255) between batchgen's PNGs and the strong loop's images."""
    if len(rows) != len(images):
        raise BenchError(f"batchgen rendered {len(rows)} images, the strong loop {len(images)}")
    worst = 0
    for row in rows:
        theirs = images[(state_of(row["loras"]), int(row["seed"]))]
        ours = np.asarray(Image.open(out_dir / row["image"]).convert("RGB"))
        worst = max(worst, int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max()))
    return worst


# --- one architecture ------------------------------------------------------------------------------------------------


def bench_arch(arch: Arch, work: Path, device: str, dtype: torch.dtype, tiny: bool, peak: float | None) -> dict:
    print(f"{arch.key}: building {'tiny' if tiny else 'full-size random'} model and LoRAs ...", flush=True)
    start = time.perf_counter()
    root = work / "roots" / arch.key
    build_tiny(arch, root) if tiny else build_full(arch, root, device, dtype)
    build_seconds = time.perf_counter() - start
    checkpoint = root / "main" / arch.key
    flops = flops_per_image(checkpoint, arch, device, dtype)
    extra = [f"run.threads={CPU_THREADS}"] if tiny else []
    sweep = write_config(work / "conf" / arch.key, arch, root, {})
    # Untimed warm-up: first-call kernel setup for the plain pipeline, and batchgen's hashing of the model and
    # LoRA files (cached by path, size and mtime in $BATCHGEN_CACHE), which every timed run then finds done.
    pipe = load_pipe(checkpoint, device, dtype)
    call(pipe, arch, seeds(arch), steps=1)
    del pipe
    release(device)
    run_batchgen(work / "conf" / arch.key, sweep, work / "out" / "warm", [*extra, "sweep.steps=1"])

    runs: dict[str, list[Timed]] = {"bare": [], "strong": [], "batchgen": []}
    diffs: list[int] = []
    strong_images: dict = {}
    for contestant in ORDER:
        print(f"{arch.key}: {contestant} ...", flush=True)
        if contestant == "bare":
            timed, _ = run_bare(checkpoint, arch, device, dtype)
        elif contestant == "strong":
            timed, strong_images = run_strong(root, checkpoint, arch, device, dtype)
        else:
            out_dir = work / "out" / arch.key
            timed, rows = run_batchgen(work / "conf" / arch.key, sweep, out_dir, extra)
            if strong_images:
                diffs.append(max_pixel_diff(rows, out_dir, strong_images))
        runs[contestant].append(timed)
        release(device)

    result: dict = {
        "size": arch.size,
        "steps": arch.steps,
        "states": len(STATES),
        "images_per_state": arch.per_state,
        "images": len(STATES) * arch.per_state,
        "build_seconds": build_seconds,
        "flops": flops,
    }
    for name, timings in runs.items():
        seconds = statistics.median(t.seconds for t in timings)
        rendering = statistics.median(t.seconds - t.load_seconds for t in timings)
        images = timings[0].images
        figures = {
            "img_per_s": images / rendering,
            "img_per_s_end_to_end": images / seconds,
            "seconds": [t.seconds for t in timings],
            "load_seconds": [t.load_seconds for t in timings],
        }
        achieved = figures["img_per_s"] * flops["per_image"] / 1e12
        figures["achieved_tflops"] = achieved
        figures["share_of_peak"] = achieved / peak if peak else None
        result[name] = figures
    for other in ("bare", "strong"):
        result[f"batchgen_vs_{other}"] = result["batchgen"]["img_per_s"] / result[other]["img_per_s"]
        ratio = result["batchgen"]["img_per_s_end_to_end"] / result[other]["img_per_s_end_to_end"]
        result[f"batchgen_vs_{other}_end_to_end"] = ratio
    result["pixel_max_diff"] = max(diffs)
    result["pixel_check_passed"] = max(diffs) <= PIXEL_TOLERANCE
    return result


# --- reporting -------------------------------------------------------------------------------------------------------


def summary_lines(results: dict) -> list[str]:
    peak = results["peak_tflops"]
    lines = [
        f"device: {results['device']}; peak used: {results['peak_source']}"
        + (f" ({peak:g} TFLOP/s dense fp16)" if peak else "")
    ]
    for key, r in results["models"].items():
        lines.append(
            f"{key}: {r['images']} images ({r['states']} LoRA states x {r['images_per_state']}), {r['size']}x"
            f"{r['size']}, {r['steps']} steps; {r['flops']['per_image'] / 1e9:.3g} GFLOP per image"
        )
        for name in ("bare", "strong", "batchgen"):
            c = r[name]
            share = f"{100 * c['share_of_peak']:.1f}% of peak" if c["share_of_peak"] is not None else "peak unknown"
            lines.append(
                f"  {name:<9} {c['img_per_s']:8.3f} img/s ({c['img_per_s_end_to_end']:.3f} end to end), "
                f"{c['achieved_tflops']:.1f} TFLOP/s, {share}"
            )
        lines.append(
            f"  batchgen / bare {r['batchgen_vs_bare']:.3f} ({r['batchgen_vs_bare_end_to_end']:.3f} end to end), "
            f"batchgen / strong {r['batchgen_vs_strong']:.3f} ({r['batchgen_vs_strong_end_to_end']:.3f}); "
            f"pixels vs strong: max {r['pixel_max_diff']}/255 "
            f"{'ok' if r['pixel_check_passed'] else f'FAILED (> {PIXEL_TOLERANCE}/255)'}"
        )
    return lines


def append_markdown(results: dict) -> None:
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n")
    head = ["model", "contestant", "img/s", "img/s end to end", "TFLOP/s", "share of peak", "batchgen / it"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, r in results["models"].items():
        for name in ("bare", "strong", "batchgen"):
            c = r[name]
            share = f"{100 * c['share_of_peak']:.1f}%" if c["share_of_peak"] is not None else "unknown"
            ratio = f"{r[f'batchgen_vs_{name}']:.3f}" if name != "batchgen" else ""
            row = [key, name, f"{c['img_per_s']:.3f}", f"{c['img_per_s_end_to_end']:.3f}"]
            table.append("| " + " | ".join([*row, f"{c['achieved_tflops']:.1f}", share, ratio]) + " |")
    peak = results["peak_tflops"]
    section = [
        f"\n## GPU {results['date']}: {results['device']}\n",
        f"`make bench-gpu` (`.venv/bin/python benchmarks/bench_gpu.py`; raw figures in `runs/bench/gpu.json`), "
        f"torch {results['torch']}, fp16, bench wall {results['bench_seconds']:.0f} s. Full-size SD1.5 (512x512) and "
        f"SDXL (1024x1024) architectures with random weights, 20 steps, 4 LoRA states x 8 images, 4 rank-16 kohya "
        f"LoRAs. *bare*: diffusers without LoRA; *strong*: diffusers with each LoRA loaded once as an adapter and "
        f"`set_adapters` per state; both a state's images per call. Interleaved A B C C B A, medians; img/s over "
        f"each run less its model load (end to end: with it). Share of peak: counted UNet + VAE-decode FLOPs x "
        f"img/s over {results['peak_source']}" + (f" {peak:g} TFLOP/s dense fp16." if peak else " (peak unknown)."),
        "",
        *table,
        "",
        "Pixels, batchgen vs strong: "
        + ", ".join(f"{k} max {r['pixel_max_diff']}/255" for k, r in results["models"].items())
        + f" (limit {PIXEL_TOLERANCE}/255).",
    ]
    with BENCHMARKS_MD.open("a") as f:
        f.write("\n".join(section) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, batchgen's tiny models, 64x64, 2 steps")
    parser.add_argument("--out", type=Path, help=f"the JSON figures (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary models and runs, and print where")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.stderr.write("bench_gpu: no CUDA device (torch.cuda.is_available() is False); use a GPU or --tiny\n")
        return 2
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.float16)
    if args.tiny:
        torch.set_num_threads(CPU_THREADS)
    warnings.filterwarnings("ignore")  # PEFT and diffusers warn about choices made here on purpose
    from bench_models import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    name, source, peak = peak_tflops(device)
    results: dict = {
        "tiny": args.tiny,
        "device": name,
        "peak_source": source,
        "peak_tflops": peak,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pixel_tolerance": PIXEL_TOLERANCE,
        "order": list(ORDER),
        "models": {},
    }
    work = Path(tempfile.mkdtemp(prefix="batchgen-bench-gpu-"))
    os.environ["BATCHGEN_CACHE"] = str(work / "cache")  # the tiny builds and the hash cache, private to this run
    try:
        for arch in TINY if args.tiny else FULL:
            results["models"][arch.key] = bench_arch(arch, work, device, dtype, args.tiny, peak)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["bench_seconds"] = time.perf_counter() - started
    print()
    print("\n".join(summary_lines(results)))
    out = args.out or DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results: {out}")
    if not args.tiny:
        append_markdown(results)
        print(f"appended: {BENCHMARKS_MD}")
    failed = [k for k, r in results["models"].items() if not r["pixel_check_passed"]]
    if failed:
        sys.stderr.write(
            f"bench_gpu: pixel check failed for {', '.join(failed)}: batchgen's images differ from the strong loop's"
            f" by more than {PIXEL_TOLERANCE}/255\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
