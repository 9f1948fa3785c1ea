"""The GPU bench's runs: the plain diffusers contestants, batchgen through its CLI entry point (renders and dry
runs), the device's memory peaks, and the pixel comparison between two renders of the same images."""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_gpu_models import LORA_NAMES, Arch
from PIL import Image

PROMPT = "a castle at night, watercolor"
# Stacks, not single LoRAs only: a switch then touches modules that two LoRAs share. --tiny takes the first two.
STATES: tuple[tuple[str, dict[str, float]], ...] = (
    ("a", {"gpu_a": 1.0}),
    ("ac", {"gpu_a": 0.5, "gpu_c": 0.5}),
    ("b", {"gpu_b": 0.8}),
    ("bcd", {"gpu_b": 0.4, "gpu_c": 0.7, "gpu_d": 0.6}),
)
CPU_THREADS = 2  # --tiny: the baselines and batchgen's worker use the same intra-op thread count
GIB = 2**30  # a GB here, as in batchgen's dry run and run.gpu_memory_gb


class BenchError(RuntimeError):
    pass


@dataclass
class Timed:
    """One run: seconds from its pipeline load on, of which model load; images rendered; device memory peaks."""

    seconds: float
    load_seconds: float
    images: int
    peak_gb: float | None = None  # torch.cuda.max_memory_allocated over the run
    reserved_gb: float | None = None  # torch.cuda.max_memory_reserved over the run


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peaks(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peaks(device: str) -> tuple[float | None, float | None]:
    if not device.startswith("cuda"):
        return None, None
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def states(arch: Arch) -> tuple[tuple[str, dict[str, float]], ...]:
    return STATES[: arch.states]


def used_loras(arch: Arch) -> list[str]:
    return [name for name in LORA_NAMES if any(name in loras for _, loras in states(arch))]


def seeds(arch: Arch) -> list[int]:
    return list(range(1, arch.per_state + 1))


# --- plain diffusers contestants -------------------------------------------------------------------------------------


def load_loras(pipe, root: Path, arch: Arch) -> None:
    for name in used_loras(arch):
        pipe.load_lora_weights(str(root / "lora" / f"{name}.safetensors"), adapter_name=name)


def load_pipe(checkpoint: Path, arch: Arch, device: str, lora_root: Path | None = None):
    """The pipeline on the device; (pipe, seconds spent loading LoRAs inside, which the caller counts as render).
    fp8: adapters first (layerwise casting leaves their layers alone), then the cast, both on the host."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(checkpoint), dtype=arch.torch_dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    lora_seconds = 0.0
    if arch.fp8:
        if lora_root is not None:
            start = time.perf_counter()
            load_loras(pipe, lora_root, arch)
            lora_seconds = time.perf_counter() - start
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=arch.torch_dtype)
    return pipe.to(device), lora_seconds


def call(pipe, arch: Arch, seeds: list[int]) -> list[np.ndarray]:
    from batchgen.assets.bases import BY_NAME

    # One CPU generator per image, as batchgen draws noise: each image depends only on its own seed.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kwargs: dict = {}
    if BY_NAME[arch.base].reads_negative_prompt:
        # An explicit empty negative, as batchgen (and A1111) encode it: SDXL's pipeline would zero a missing one.
        kwargs["negative_prompt"] = [""] * len(seeds)
    out = pipe(
        [PROMPT] * len(seeds),
        num_inference_steps=arch.steps,
        guidance_scale=arch.guidance,
        width=arch.size,
        height=arch.size,
        generator=generators,
        **kwargs,
    )
    return [np.asarray(image.convert("RGB")) for image in out.images]


def run_diffusers(contestant: str, root: Path, arch: Arch, device: str) -> tuple[Timed, dict]:
    """bare: no LoRA; strong: each LoRA loaded once as an adapter, set_adapters per state. A state's images in one
    call either way."""
    strong = contestant == "strong"
    checkpoint = root / "main" / arch.model
    images: dict[tuple[str, int], np.ndarray] = {}
    reset_peaks(device)
    start = time.perf_counter()
    pipe, lora_seconds = load_pipe(checkpoint, arch, device, root if strong else None)
    sync(device)
    loaded = time.perf_counter()
    if strong and not arch.fp8:
        load_loras(pipe, root, arch)
    for state, loras in states(arch):
        if strong:
            pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
        for seed, pixels in zip(seeds(arch), call(pipe, arch, seeds(arch)), strict=True):
            images[(state, seed)] = pixels
    sync(device)
    timed = Timed(time.perf_counter() - start, loaded - start - lora_seconds, len(images), *peaks(device))
    del pipe
    release(device)
    return timed, images


# --- batchgen --------------------------------------------------------------------------------------------------------


def write_config(config_dir: Path, arch: Arch, root: Path) -> str:
    """model/<key>.yaml and sweep/<key>.yaml for `batchgen --config-dir`; returns the sweep name."""
    (config_dir / "model").mkdir(parents=True, exist_ok=True)
    (config_dir / "sweep").mkdir(parents=True, exist_ok=True)
    model = {"base": arch.base, "root": str(root.resolve()), "checkpoint": arch.model}
    (config_dir / "model" / f"{arch.key}.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    sweep = {
        "name": arch.key,
        "prompts": [PROMPT],
        "stacks": {state: dict(loras) for state, loras in states(arch)},
        "references": False,  # the same images as the diffusers contestants, no reference jobs
        "seeds": seeds(arch),
        "steps": arch.steps,
        "guidance_scale": arch.guidance,
        "width": arch.size,
        "height": arch.size,
        "batch_size": arch.per_state,
    }
    body = {"defaults": [{f"/model@models.{arch.key}": arch.key}], "sweep": sweep}
    (config_dir / "sweep" / f"{arch.key}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    return arch.key


def batchgen_settings(arch: Arch, plan: str, tiny: bool) -> list[str]:
    """The overrides every batchgen run of this model and plan takes: its dtype, plan, fp8, one worker here.
    ``plan`` is a run.offload value, or `auto@N`: run.offload=auto planned for an N GB card (run.gpu_memory_gb)."""
    offload, _, card = plan.partition("@")
    settings = [f"run.dtype={arch.dtype}", f"run.offload={offload}", "executor.devices=1"]
    if card:
        settings.append(f"run.gpu_memory_gb={card}")
    if arch.fp8:
        settings.append("run.weights=fp8")
    if tiny:
        settings.append(f"run.threads={CPU_THREADS}")
    return settings


def _batchgen(argv: list[str]) -> tuple[int, str, float]:
    from batchgen.cli import main as batchgen_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        start = time.perf_counter()
        code = batchgen_main(argv)
        seconds = time.perf_counter() - start
    return code, out.getvalue() + err.getvalue(), seconds


def dry_run(config_dir: Path, sweep: str, out_dir: Path, settings: list[str]) -> tuple[int, str]:
    """`batchgen --dry-run` with a run's settings: (exit code, what it printed). Hashes the files on first use."""
    code, text, _ = _batchgen(["--dry-run", "--config-dir", str(config_dir), f"+sweep={sweep}",
                               f"run.out_dir={out_dir}", *settings])  # fmt: skip
    return code, text


def run_batchgen(config_dir: Path, sweep: str, out_dir: Path, settings: list[str], device: str) -> tuple[Timed, list]:
    """One in-process `batchgen --config-dir DIR +sweep=NAME run.out_dir=OUT ...` call, timed around main()."""
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--config-dir", str(config_dir), f"+sweep={sweep}", f"run.out_dir={out_dir}", *settings]
    reset_peaks(device)
    code, text, seconds = _batchgen(argv)
    memory = peaks(device)
    release(device)
    if code != 0:
        raise BenchError(f"batchgen {' '.join(argv)} exited {code}:\n" + "\n".join(text.strip().splitlines()[-20:]))
    with (out_dir / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise BenchError(f"{sweep}: {len(bad)} batchgen rows not ok, first: {bad[0]['status']} {bad[0]['error']}")
    load = sum(stage(r.get("timings", ""), "load") for r in rows)
    return Timed(seconds, load, len(rows), *memory), rows


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


def batchgen_images(rows: list[dict], out_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    return {
        (state_of(row["loras"]), int(row["seed"])): np.asarray(Image.open(out_dir / row["image"]).convert("RGB"))
        for row in rows
    }


def max_pixel_diff(ours: dict[tuple[str, int], np.ndarray], theirs: dict[tuple[str, int], np.ndarray]) -> int:
    """Largest per-channel difference (0-255) between two renders of the same images."""
    if sorted(ours) != sorted(theirs):
        raise BenchError(f"rendered {sorted(ours)}, against {sorted(theirs)}")
    return max(int(np.abs(ours[k].astype(np.int16) - theirs[k].astype(np.int16)).max()) for k in ours)
