"""A model's memory plan: where its components live while it renders, chosen before any weight loads.

Every plan's peak is estimated from the components' sizes (batchgen/assets/component_sizes.py, read from the weight
files' headers) and the shapes of the model's jobs; `run.offload=auto` takes the fastest plan whose peak fits the
memory planned against (`run.gpu_memory_gb` in GiB, else the device's total; no limit on CPU without it, where the
plan is `none`). The engine executes the plan (engine/placement.py); --dry-run prints it. Pure: no torch.

Plans, fastest first, and their peaks (W: weights on the device, A: activations):

    none        W(all) + max(A_text, A_denoise, A_decode)
    encoders    max(W(encoders) + A_text, W(denoiser) + W(vae) + max(A_denoise, A_decode)): every text is encoded
                first, then the encoders leave the device before the denoiser arrives
    model       max(W(encoders) + A_text, W(denoiser) + A_denoise, W(vae) + A_decode): as encoders, and the
                denoiser leaves the device while the VAE decodes
    sequential  W(largest module) + max(A_text, A_denoise, A_decode): one module at a time

Each but sequential adds the LoRA files the model's jobs use (their factors stay on the device, in the file's
dtype, so a file costs its size; under sequential they stay on the CPU with the weights they patch) and, on CUDA,
RESERVE: the CUDA context, cuBLAS/cuDNN workspaces and allocator slack.

Activations, in bytes, with s the compute dtype's size, H x W the image, h x w = H/f x W/f the latent (f the VAE's
scale, 2 ** (len(block_out_channels) - 1)):

    A_denoise  K x rows x tokens x width x s
        UNet         K = UNET_TENSORS, rows = batch x (2 with a negative pass, Base.negative_pass), tokens = h x w,
                     width = block_out_channels[0]: its first level holds the most
        transformer  K = TRANSFORMER_TENSORS, rows = 2 with a negative pass else 1 (batchgen runs each image's rows
                     alone, engine/mmdit.py, so the batch does not enter), tokens = h x w x latent_channels /
                     (in_channels x patch_size ** 2) + the text's (T5's max_sequence_length, else the base's
                     t5_tokens, + CLIP_TOKENS), width = num_attention_heads x attention_head_dim
        under run.weights=fp8, plus the largest Linear weight in the compute dtype (dequantized for its product)
    A_decode   DECODE_TENSORS x block_out_channels[0] x H x W x s: the VAE decodes image by image, and its peak is
               the full-resolution stage; s is 4 where diffusers' SDXL pipeline upcasts an fp16 VAE (force_upcast),
               whose weights then count in fp32 too
    A_text     TEXT_TENSORS x tokens x width x s for the widest encoder (77 tokens for CLIP, T5's length for T5):
               one text per call

The batch is `sweep.batch_size`, or for auto the planning assumption AUTO_BATCH: 4 on CPU (engine/worker.py's
CPU_BATCH) and 1 on CUDA, where the worker sizes its batch from the memory the plan leaves free; it is capped by
how many of the model's jobs share a shape.

The constants are estimates, measured on CPU in fp32 (peak resident memory above the weights: SD1.5's UNet at
512x512 with a guidance pair, 28 tensors; two FLUX.1 blocks at 1536 and 2816 tokens, 16.9 extrapolated to 1024x1024;
FLUX.1's VAE decoding 256 and 384 pixels, 7.5-7.9; T5-XXL's width at 512 tokens, 6.8), to be calibrated on GPUs by
`make bench-gpu` (its peak memory per plan). tests/test_memory_measured.py (slow) measures the SD1.5 UNet's again:
303.9 MB resident above its weights against A_denoise's 293.6 MB (28.98 tensors), its weights 3,440.6 MB against
3,438.1 MB (10^6 bytes; glibc's mmap threshold fixed there, since its dynamic one keeps freed activations resident).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import Base
from batchgen.assets.component_sizes import ITEMSIZE, ModelSizes, model_sizes
from batchgen.engine_options import PLANS, EngineOptions, choose_offload, dtype_name
from batchgen.errors import BatchgenError
from batchgen.spec import Job, ModelSpec

GIB = 2**30
UNET_TENSORS = 28
TRANSFORMER_TENSORS = 17
DECODE_TENSORS = 8
TEXT_TENSORS = 8
CLIP_TOKENS = 77
RESERVE = {"cuda": GIB, "cpu": 0}
AUTO_BATCH = {"cuda": 1, "cpu": 4}
UPCASTING_PIPELINES = frozenset({"StableDiffusionXLPipeline"})  # fp16 VAEs with force_upcast decode in fp32
FP8_COMPUTE = "bf16"  # run.weights=fp8 computes in bf16 whatever run.dtype says (engine/fp8.py compute_dtype)


@dataclass(frozen=True)
class ComponentBytes:
    component: str
    role: str  # denoiser | text_encoder | vae
    bytes: int  # held on the device, in the plan's dtype and weight format
    note: str = ""  # where it was sized other than from safetensors headers


@dataclass(frozen=True)
class Shape:
    """What one pipeline call of a model's jobs looks like, for the activation estimate."""

    width: int
    height: int
    negative_pass: bool
    t5_tokens: int  # 0: the base reads no T5
    images: int  # how many of the model's jobs share this shape: a batch holds no more


@dataclass(frozen=True)
class Parts:
    """The terms of every plan's peak, in bytes."""

    encoders: tuple[int, ...]  # each text encoder's weights
    denoiser: int
    vae: int
    largest_module: int
    loras: int
    text: int  # activations: one text through the widest encoder
    denoise: int  # the largest batch through the denoiser
    decode: int  # one image through the VAE
    reserve: int

    def peaks(self) -> dict[str, int]:
        # engine/placement.py brings the encoders onto the device together (a text goes through all of them), and
        # keeps the LoRA factors on the device except under sequential, where they stay with the CPU weights.
        encoders = sum(self.encoders) + self.text
        active = max(self.text, self.denoise, self.decode)
        peaks = {
            "none": sum(self.encoders) + self.denoiser + self.vae + active + self.loras,
            "encoders": max(encoders, self.denoiser + self.vae + max(self.denoise, self.decode)) + self.loras,
            "model": max(encoders, self.denoiser + self.denoise, self.vae + self.decode) + self.loras,
            "sequential": self.largest_module + active,
        }
        return {plan: peak + self.reserve for plan, peak in peaks.items()}


@dataclass(frozen=True)
class MemoryPlan:
    """One model's plan, as --dry-run prints it and the engine executes it (engine/placement.py)."""

    model: str
    device_kind: str  # cuda | cpu: what it was planned for
    dtype: str  # what it computes in: fp16 | bf16 | fp32 (bf16 under run.weights=fp8)
    weights: str  # run.weights: auto | fp8
    components: tuple[ComponentBytes, ...]
    lora_bytes: int
    batch_size: int  # the largest batch planned for
    activation_bytes: int  # the denoiser's, at that batch
    decode_bytes: int
    text_bytes: int
    reserve_bytes: int
    budget_bytes: int | None  # the memory planned against; None: no limit
    budget_source: str  # what set it: "run.gpu_memory_gb" or "the device's total"; "" without one
    requested: str  # run.offload as given (auto or a plan)
    offload: str  # the plan chosen: none | encoders | model | sequential
    peak_bytes: int  # its estimated peak
    fits: bool
    peaks: Mapping[str, int]  # every plan's peak under this plan's weights
    fp8_peaks: Mapping[str, int]  # the same with run.weights=fp8

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(c.note for c in self.components if c.note)


def gb(size: int) -> str:
    """A size as the dry run and messages print it: GiB with one decimal (GB = 2**30 bytes), MB below 0.1 GB."""
    if size >= GIB / 10:
        return f"{size / GIB:.1f} GB"
    return f"{size / 2**20:.1f} MB"


def planned_batch(options: EngineOptions, device_kind: str) -> int:
    if isinstance(options.batch_size, int):
        return options.batch_size
    return AUTO_BATCH["cuda" if device_kind.startswith("cuda") else "cpu"]


def shapes(jobs: Iterable[Job], base: Base, denoiser_config: Mapping[str, object]) -> list[Shape]:
    """The distinct call shapes of a model's jobs, each with how many jobs have it."""
    counts = Counter(
        (
            int(job.width),
            int(job.height),
            base.negative_pass(float(job.guidance_scale), denoiser_config),
            (int(job.max_sequence_length) or base.t5_tokens) if base.t5_tokens else 0,
        )
        for job in jobs
    )
    return [Shape(*key, images=n) for key, n in sorted(counts.items())]


def latent_scale(vae_config: Mapping[str, object]) -> int:
    channels = vae_config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else 8


def denoise_bytes(
    sizes: ModelSizes, base: Base, shape: Shape, batch: int, itemsize: int, fp8_linear_bytes: int = 0
) -> int:
    """A_denoise of the module docstring, for one call of `shape` at up to `batch` images."""
    config, scale = sizes.denoiser_config, latent_scale(sizes.vae_config)
    h, w = shape.height // scale, shape.width // scale
    passes = 2 if shape.negative_pass else 1
    if base.denoiser == "transformer":
        latent_channels = int(sizes.vae_config.get("latent_channels", 16))
        in_channels = int(config.get("in_channels", latent_channels))
        patch = int(config.get("patch_size", 1) or 1)
        tokens = h * w * latent_channels // (in_channels * patch * patch) + shape.t5_tokens + CLIP_TOKENS
        width = int(config.get("num_attention_heads", 1)) * int(config.get("attention_head_dim", 64))
        return TRANSFORMER_TENSORS * passes * tokens * width * itemsize + fp8_linear_bytes
    rows = min(batch, shape.images) * passes
    channels = config.get("block_out_channels")
    width = int(channels[0]) if isinstance(channels, list) and channels else 320
    return UNET_TENSORS * rows * h * w * width * itemsize + fp8_linear_bytes


def decode_bytes(sizes: ModelSizes, shape: Shape, itemsize: int) -> int:
    channels = sizes.vae_config.get("block_out_channels")
    first = int(channels[0]) if isinstance(channels, list) and channels else 128
    return DECODE_TENSORS * first * shape.width * shape.height * itemsize


def text_bytes(base: Base, t5_tokens: int, itemsize: int) -> int:
    widest = 0
    for component, width in base.text_encoders.items():
        tokens = t5_tokens if base.encoder_names.get(component, "").startswith("T5") else CLIP_TOKENS
        widest = max(widest, tokens * width)
    return TEXT_TENSORS * widest * itemsize


def parts(
    sizes: ModelSizes,
    base: Base,
    calls: Sequence[Shape],
    *,
    dtype: str,
    fp8: bool,
    batch: int,
    lora_bytes: int,
    device_kind: str,
) -> Parts:
    """Every term of the plans' peaks for a model computing in `dtype`, its denoiser's Linear weights in float8
    with `fp8`."""
    itemsize = ITEMSIZE[dtype]
    denoisers = sizes.of_role("denoiser")
    dequantized = max((c.largest_linear for c in denoisers), default=0) * itemsize if fp8 else 0
    weights = component_bytes(sizes, base, dtype, fp8)
    vae_itemsize = ITEMSIZE[vae_dtype(base, dtype, sizes.vae_config)]
    return Parts(
        encoders=tuple(weights[c.component] for c in sizes.of_role("text_encoder")),
        denoiser=sum(weights[c.component] for c in denoisers),
        vae=sum(weights[c.component] for c in sizes.of_role("vae")),
        largest_module=max((c.module_bytes(dtype) for c in sizes.components), default=0),
        loras=lora_bytes,
        text=max((text_bytes(base, s.t5_tokens, itemsize) for s in calls), default=0),
        denoise=max((denoise_bytes(sizes, base, s, batch, itemsize, dequantized) for s in calls), default=0),
        decode=max((decode_bytes(sizes, s, vae_itemsize) for s in calls), default=0),
        reserve=RESERVE["cuda" if device_kind.startswith("cuda") else "cpu"],
    )


def vae_dtype(base: Base, dtype: str, vae_config: Mapping[str, object]) -> str:
    """What the VAE decodes in: diffusers' SDXL pipeline upcasts an fp16 VAE whose config asks for it
    (force_upcast, true unless said otherwise) to fp32 for the decode."""
    upcasts = base.pipeline_class in UPCASTING_PIPELINES and vae_config.get("force_upcast", True) is True
    return "fp32" if dtype == "fp16" and upcasts else dtype


def component_bytes(sizes: ModelSizes, base: Base, dtype: str, fp8: bool) -> dict[str, int]:
    """Each component's bytes on the device: the denoiser's Linear weights in one byte under fp8, the VAE in what it
    decodes in."""
    vae = vae_dtype(base, dtype, sizes.vae_config)
    return {
        c.component: c.device_bytes(vae if c.role == "vae" else dtype, fp8 and c.role == "denoiser")
        for c in sizes.components
    }


choose = choose_offload  # the one rule, shared with the workers (batchgen/engine_options.py)


def peaks_by_kind(spec: ModelSpec, jobs: Sequence[Job], options: EngineOptions) -> tuple:
    """Every plan's peak for each device kind: what ModelSpec.memory_peaks carries to the workers."""
    return tuple((kind, tuple(memory_plan(spec, jobs, options, None, kind).peaks.items())) for kind in ("cpu", "cuda"))


def lora_bytes(spec: ModelSpec, jobs: Iterable[Job]) -> int:
    """The sizes of the LoRA files the jobs use: each is read once and kept on the device."""
    names = {name for job in jobs for name in job.lora_state.loras}
    files = [spec.lora(name) for name in sorted(names)]
    return sum(os.stat(f.path).st_size for f in files if f is not None and f.path.is_file())


def memory_plan(
    spec: ModelSpec, jobs: Sequence[Job], options: EngineOptions, budget_bytes: int | None, device_kind: str
) -> MemoryPlan:
    """The plan for `spec` rendering `jobs` (its jobs: they size the largest batch) on a device of `device_kind`
    (cuda or cpu) with `budget_bytes` of memory (None: no limit)."""
    base = BY_NAME[spec.base]
    sizes = model_sizes(spec)
    fp8 = options.weights == "fp8"
    dtype = FP8_COMPUTE if fp8 else dtype_name(spec.dtype, options.dtype, device_kind, base)
    calls = shapes(jobs, base, sizes.denoiser_config)
    batch = planned_batch(options, device_kind)
    loras = lora_bytes(spec, jobs)
    common = dict(batch=batch, lora_bytes=loras, device_kind=device_kind)
    terms = parts(sizes, base, calls, dtype=dtype, fp8=fp8, **common)
    peaks = terms.peaks()
    fp8_peaks = peaks if fp8 else parts(sizes, base, calls, dtype=FP8_COMPUTE, fp8=True, **common).peaks()
    offload = choose(options.offload, peaks, budget_bytes)
    held = component_bytes(sizes, base, dtype, fp8)
    return MemoryPlan(
        model=spec.name,
        device_kind="cuda" if device_kind.startswith("cuda") else "cpu",
        dtype=dtype,
        weights=options.weights,
        components=tuple(ComponentBytes(c.component, c.role, held[c.component], c.note) for c in sizes.components),
        lora_bytes=loras,
        batch_size=max((min(batch, s.images) for s in calls), default=batch),
        activation_bytes=terms.denoise,
        decode_bytes=terms.decode,
        text_bytes=terms.text,
        reserve_bytes=terms.reserve,
        budget_bytes=budget_bytes,
        budget_source="" if budget_bytes is None else _source(options),
        requested=options.offload,
        offload=offload,
        peak_bytes=peaks[offload],
        fits=budget_bytes is None or peaks[offload] <= budget_bytes,
        peaks=peaks,
        fp8_peaks=fp8_peaks,
    )


def _source(options: EngineOptions) -> str:
    return "run.gpu_memory_gb" if options.gpu_memory_gb is not None else "the device's total"


def check_fits(plan: MemoryPlan) -> None:
    """Refuse a plan that cannot fit, in one line naming the model, the need, the memory and what would fit."""
    if plan.fits or plan.budget_bytes is None:
        return
    budget = plan.budget_bytes
    asked = f"run.offload={plan.requested}" if plan.requested != "auto" else "even run.offload=sequential"
    need = f"model {plan.model}: {asked} needs {gb(plan.peak_bytes)}, more than the {gb(budget)} planned for"
    raise BatchgenError(f"{need} ({plan.budget_source}); {_what_fits(plan)}")


def _what_fits(plan: MemoryPlan) -> str:
    budget = plan.budget_bytes or 0
    fits = next((p for p in PLANS if plan.peaks[p] <= budget), None)
    fp8 = next((p for p in PLANS if plan.fp8_peaks[p] <= budget), None) if plan.weights != "fp8" else None
    if fp8 is not None and (fits is None or PLANS.index(fp8) < PLANS.index(fits)):
        with_fp8 = f"run.weights=fp8 with run.offload={fp8}"
        return f"run.offload={fits} fits, or {with_fp8}" if fits else f"{with_fp8} fits"
    if fits is not None:
        return f"run.offload={fits} fits"
    return "render fewer images per call (sweep.batch_size) or smaller ones (sweep.width, sweep.height)"
