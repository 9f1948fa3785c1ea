"""Render jobs in one process: each model loaded once, its TIs registered once, each LoRA file read once.

Consecutive jobs that share model, LoRA state, steps, guidance, size and scheduler render in one pipeline call,
each image with its own generator, and the few layers whose rounding depends on the batch run per image
(engine/rows.py), so an image never depends on the batch it landed in.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import Base
from batchgen.engine.conditioning import Conditioning, negative_pass
from batchgen.engine.conditioning_cache import text_encoder_state
from batchgen.engine.fp8 import compute_dtype
from batchgen.engine.mmdit import TRANSFORMER_CALL_ARGUMENT, PipelinePrompts, isolate_images
from batchgen.engine.passes import UNET_CALL_ARGUMENT, pipeline_inputs, wrap_unet
from batchgen.engine.pipeline import LoraStacks, SchedulerSwitch, load_pipeline, register_embeddings, resolve_dtype
from batchgen.engine.placement import Placement
from batchgen.engine.prompts import PromptCache
from batchgen.engine_options import DTYPES, EngineOptions, choose_offload
from batchgen.metrics import NONFINITE, degenerate
from batchgen.settings import batch_values
from batchgen.spec import Job, LoraState, ModelSpec, RenderResult

_DTYPE_NAMES = {getattr(torch, attribute): name for name, attribute in DTYPES.items() if attribute}
# On CPU a batch mostly saves per-call overhead (the tiny model renders 4 images in 1.9x the time of one); past
# 4 the gain flattens while latency per result grows.
CPU_BATCH = 4


@dataclass
class _Loaded:
    name: str
    pipe: object
    loras: LoraStacks
    scheduler: SchedulerSwitch
    prompts: PromptCache | PipelinePrompts
    decode_clock: _Clock
    placement: Placement
    guided: Callable[[Job], bool]  # whether the job's pipeline call runs a negative-prompt pass
    call_argument: str  # the pipeline argument that carries a call's DenoiserCall to the wrapped denoiser


@dataclass
class _Clock:
    """What the wrapped VAE decode saw in a pipeline call: its seconds and, per image, whether the latents it
    was handed were finite (NaN or inf there come from denoising, never from the VAE)."""

    seconds: float = 0.0
    finite: list[bool] = field(default_factory=list)


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share one pipeline call: same model, LoRA state and batch-splitting settings."""
    return (job.model, job.lora_state, *batch_values(job))


def batches(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
    """Consecutive runs of jobs with the same batch key, at most `size` long; order is kept."""
    current: list[Job] = []
    for job in jobs:
        if current and (batch_key(job) != batch_key(current[0]) or len(current) >= size):
            yield current
            current = []
        current.append(job)
    if current:
        yield current


class Renderer:
    """Holds at most one loaded model; jobs should arrive grouped by model, then by LoRA stack."""

    def __init__(
        self,
        models: dict[str, ModelSpec],
        options: EngineOptions | None = None,
        device: str = "cpu",
        name: str = "cpu0",
    ):
        options = options or EngineOptions()
        self.models = models
        self.device = device
        self.run_dtype = options.dtype  # a model's models.X.dtype overrides it
        self.dtype: torch.dtype | None = None  # the loaded model's, resolved per model in _model
        self.name = name
        self.batch_size = options.batch_size
        self.compile_unet = options.compile
        self.options = options
        self._loaded: _Loaded | None = None
        # The jobs of the current render() call, and those whose texts are encoded: a plan that encodes ahead
        # (engine/placement.py) encodes every pending job's texts while its encoders are on the device.
        self._pending: list[Job] = []
        self._encoded: set[str] = set()
        self._oom_cap: int | None = None  # the batch size that fitted after a CUDA out-of-memory error

    def render(self, jobs: Iterable[Job]) -> Iterator[RenderResult]:
        self._pending = list(jobs)
        for batch in batches(self._pending, self._batch_size()):
            yield from self._render_batch(batch)

    def update_models(self, models: dict[str, ModelSpec]) -> None:
        """A later plan's models (--watch renders each new file on the workers it started with). The loaded model
        stays: its LoRAs are read from the new spec (a file whose sha256 changed is read again, LoraStacks.use) and
        TIs added since are registered; a TI rewritten or gone, or any other change to the model, unloads it."""
        self.models = models
        loaded = self._loaded
        if loaded is None:
            return
        old, new = loaded.loras.spec, models.get(loaded.name)
        if new is None or _loads_as(old) != _loads_as(new) or not set(old.embeddings) <= {*new.embeddings}:
            self._loaded = None
            gc.collect()
            return
        register_embeddings(
            loaded.pipe, replace(new, embeddings=tuple(e for e in new.embeddings if e not in old.embeddings))
        )
        loaded.loras.spec = new

    def _render_batch(self, batch: list[Job]) -> Iterator[RenderResult]:
        started = time.perf_counter()
        stages: dict[str, float] = {}
        try:
            loaded = self._model(batch[0].model, stages)
            conds = self._conditioning(loaded, batch, stages)
            signatures = [c.signature for c in conds]
            if len(set(signatures)) > 1:
                # Long prompts come in 77-token chunks and edited ones switch at their own steps; one pipeline
                # call takes one length and one schedule only.
                for sig in dict.fromkeys(signatures):
                    yield from self._render_batch([j for j, s in zip(batch, signatures, strict=True) if s == sig])
                return
            mark = time.perf_counter()
            loaded.decode_clock.seconds = 0.0
            loaded.decode_clock.finite.clear()
            images = self._generate(loaded, batch, conds)
            stages["decode"] = loaded.decode_clock.seconds
            stages["denoise"] = time.perf_counter() - mark - stages["decode"]
        except torch.cuda.OutOfMemoryError as e:
            if len(batch) == 1:
                seconds, dtype = time.perf_counter() - started, self._recorded_dtype
                yield RenderResult(batch[0].job_id, None, seconds, self.name, _describe(e), {}, dtype=dtype)
                return
            # Halve and retry; later batches stay at the size that fitted.
            torch.cuda.empty_cache()
            half = len(batch) // 2
            self._oom_cap = half
            yield from self._render_batch(batch[:half])
            yield from self._render_batch(batch[half:])
            return
        except Exception as e:  # one bad batch must not end the sweep; the manifest records why
            share = (time.perf_counter() - started) / len(batch)
            for job in batch:
                yield RenderResult(job.job_id, None, share, self.name, _describe(e), {}, dtype=self._recorded_dtype)
            return
        share = {stage: seconds / len(batch) for stage, seconds in stages.items()}
        seconds, dtype = sum(share.values()), self._recorded_dtype
        finite = loaded.decode_clock.finite
        # A pipeline that decoded outside the wrapped decode leaves the check to the pixels (image_fault).
        finite = finite if len(finite) == len(batch) else [True] * len(batch)
        for job, pixels, latents_finite in zip(batch, images, finite, strict=True):
            if not latents_finite:
                fault = self._latent_fault(job.model)
                yield RenderResult(job.job_id, None, seconds, self.name, fault, dict(share), NONFINITE, dtype)
                continue
            fault = image_fault(pixels)
            if not fault:
                yield RenderResult(job.job_id, to_pil(pixels), seconds, self.name, "", dict(share), dtype=dtype)
                continue
            # A failed image is still measured: CI asks for no degenerate images as well as no failures.
            kind = NONFINITE if not np.isfinite(pixels).all() else degenerate(np.asarray(to_pil(pixels)))
            yield RenderResult(job.job_id, None, seconds, self.name, fault, dict(share), kind, dtype)

    @property
    def _dtype_name(self) -> str:
        """What the loaded model computes in, as run.dtype names it; empty before any model loaded."""
        return _DTYPE_NAMES.get(self.dtype, "") if self.dtype is not None else ""

    @property
    def _recorded_dtype(self) -> str:
        """The manifest's dtype cell: fp8 where the denoiser's Linear weights were stored in fp8 (computed in bf16),
        else the compute dtype."""
        return "fp8" if self.options.weights == "fp8" and self.dtype is not None else self._dtype_name

    def _latent_fault(self, model: str) -> str:
        spec = self.models[model]
        key = f"models.{model}.dtype" if spec.dtype is not None else "run.dtype"
        return latent_fault(self._dtype_name, BY_NAME[spec.base], key)

    def _conditioning(self, loaded: _Loaded, batch: list[Job], stages: dict[str, float]) -> list[Conditioning]:
        """The batch's LoRA state and scheduler in place and its texts encoded (stages: patch, encode). Under a
        plan that encodes ahead, the texts of every pending job of the model not encoded yet go first, grouped by
        text-encoder state, while the encoders hold the device; then the denoiser takes it back."""
        placement, loras, state = loaded.placement, loaded.loras, batch[0].lora_state
        stages["patch"] = stages["encode"] = 0.0
        if placement.swaps and any(job.job_id not in self._encoded for job in batch):
            mark = time.perf_counter()
            placement.to_phase("encode")
            todo = [j for j in self._pending if j.model == loaded.name and j.job_id not in self._encoded]
            todo += [j for j in batch if j.job_id not in self._encoded and j not in todo]
            for group in _by_text_encoder_state(todo):
                patch = time.perf_counter()
                loras.use_part(group[0].lora_state, placement.encoders)
                stages["patch"] += time.perf_counter() - patch
                for part in batches(group, 2**31):
                    loaded.prompts.embeds(part)
                self._encoded.update(j.job_id for j in group)
            stages["encode"] += time.perf_counter() - mark - stages["patch"]
        mark = time.perf_counter()
        placement.to_phase("denoise")
        if placement.swaps:
            loras.use_part(state, (placement.denoiser,))
        else:
            loras.use(state)
        loaded.scheduler.use(batch[0].scheduler)
        stages["patch"] += time.perf_counter() - mark
        mark = time.perf_counter()
        conds = loaded.prompts.embeds(batch)  # encoded ahead under a swapping plan: read from the cache
        stages["encode"] += time.perf_counter() - mark
        return conds

    def _batch_size(self) -> int:
        return min(self._oom_cap or 2**31, self._wanted_batch_size())

    def _wanted_batch_size(self) -> int:
        if isinstance(self.batch_size, int):
            return self.batch_size
        if not self.device.startswith("cuda"):
            return CPU_BATCH
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        # About 1.5 GiB of activations per 512x512 fp16 image with guidance leaves room for the VAE decode.
        return max(1, min(16, int(free // (1.5 * 2**30))))

    def _model(self, name: str, stages: dict[str, float]) -> _Loaded:
        if self._loaded is not None and self._loaded.name == name:
            return self._loaded
        mark = time.perf_counter()
        if self._loaded is not None:
            self._loaded = None
            gc.collect()  # release the previous model before the next one claims memory (a full pass: 0.2 s)
        spec = self.models[name]
        base = BY_NAME[spec.base]
        dtype = resolve_dtype(spec.dtype or self.run_dtype, base, self.device)
        self.dtype = compute_dtype(self.options.weights, dtype)  # fp8 weights compute in bf16 (engine/fp8.py)
        offload = self._offload(spec)
        # A plan that offloads loads on the CPU and moves what each phase needs (engine/placement.py).
        pipe = load_pipeline(spec, self.device if offload == "none" else "cpu", self.dtype, self.options.weights)
        placement = Placement(pipe, base, self.device, offload)
        register_embeddings(pipe, spec)
        # Before compile, so the compiled graph holds the per-image split.
        if base.denoiser == "transformer":
            isolate_images(pipe.transformer)
            prompts: PromptCache | PipelinePrompts = PipelinePrompts(pipe, base)
            call_argument = TRANSFORMER_CALL_ARGUMENT
        else:
            wrap_unet(pipe.unet)
            prompts = PromptCache(pipe, base)
            call_argument = UNET_CALL_ARGUMENT
            if self.device.startswith("cuda") and offload == "none":
                pipe.unet.to(memory_format=torch.channels_last)
        # The VAE's small convolutions round by batch too, so images decode one by one: an image's pixels must not
        # depend on its batch. Measured on W1 (64x64, 2 CPU cores): decode 0.5-0.6 s against 0.2-0.3 s batched.
        pipe.vae.enable_slicing()
        placement.settle()
        if placement.swaps:
            # Encoded ahead, every text a worker's jobs need stays until the model is unloaded.
            prompts.cache.retain_all()
        if self.compile_unet:
            # In place (nn.Module.compile): torch.compile's wrapper would prefix every module path with _orig_mod.,
            # and no LoRA would find its modules.
            getattr(pipe, base.denoiser).compile()
        clock = _Clock()
        _time_decode(pipe, clock)
        uses = functools.partial(negative_pass, base, pipe)
        loras = LoraStacks(pipe, spec, placement.lora_device)
        scheduler = SchedulerSwitch(pipe)
        self._encoded.clear()
        self._loaded = _Loaded(name, pipe, loras, scheduler, prompts, clock, placement, uses, call_argument)
        stages["load"] = time.perf_counter() - mark
        return self._loaded

    def _offload(self, spec: ModelSpec) -> str:
        """The model's offload plan: run.offload when it names one; for auto, the fastest whose peak, as planning
        estimated it (ModelSpec.memory_peaks, what the dry run prints), fits the memory planned for
        (run.gpu_memory_gb, else the device's total; on a CPU without it, `none`)."""
        if self.options.offload != "auto":
            return self.options.offload
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        peaks = dict(dict(spec.memory_peaks).get(kind, ()))
        if not peaks:
            return "none"  # a model planning did not size (a spec built by hand)
        budget = None
        if self.options.gpu_memory_gb is not None:
            budget = int(self.options.gpu_memory_gb * 2**30)
        elif kind == "cuda":
            budget = torch.cuda.get_device_properties(torch.device(self.device)).total_memory
        return choose_offload("auto", peaks, budget)

    @torch.inference_mode()
    def _generate(self, loaded: _Loaded, batch: list[Job], conds: list[Conditioning]):
        job, pipe = batch[0], loaded.pipe
        # One CPU generator per image: each image's noise depends only on its own seed, on any device.
        generators = [torch.Generator("cpu").manual_seed(j.seed) for j in batch]
        return self._call(pipe, job, generators, pipeline_inputs(conds, loaded.guided(job), loaded.call_argument))

    @staticmethod
    def _call(pipe, job: Job, generators, embeds: dict):
        result = pipe(
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            width=job.width,
            height=job.height,
            generator=generators,
            output_type="np",
            **embeds,
        )
        return result.images


def _loads_as(spec: ModelSpec) -> tuple:
    """What loading a model reads: a later plan's spec that differs only in its LoRA and TI files (and what is
    planned from them) keeps the loaded model."""
    return (
        spec.base,
        spec.checkpoint,
        spec.checkpoint_sha256,
        spec.single_file,
        spec.variant,
        spec.components,
        spec.dtype,
    )


def _by_text_encoder_state(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped by text-encoder LoRA state, in order of first appearance: one patch of the encoders each."""
    groups: dict[LoraState, list[Job]] = {}
    for job in jobs:
        groups.setdefault(text_encoder_state(job), []).append(job)
    return list(groups.values())


def latent_fault(dtype: str, base: Base, key: str) -> str:
    """Why a job whose latents held NaN or inf after denoising has no image, and the setting (`key`, the one that
    chose the dtype) that avoids it: bf16 where the base's releases compute in it (FLUX.1 and SD3 overflow fp16),
    else bf16's range or fp32's; in fp32 the model itself diverged."""
    cause = f"non-finite latents (NaN/inf) after denoising in {dtype}"
    if dtype == "fp16" and base.cuda_dtype == "bf16":
        return f"{cause}; {base.label} overflows fp16: use {key}=bf16"
    if dtype == "fp16":
        return f"{cause}; the model overflowed fp16: use {key}=bf16 or fp32"
    if dtype == "bf16":
        return f"{cause}; use {key}=fp32"
    return f"{cause}; the model or a LoRA diverged: try lower LoRA weights, more steps or another scheduler"


def image_fault(pixels: np.ndarray) -> str:
    """Why a decoded image is unusable, or "": NaN (an fp16 overflow, usually) or pure black (what NaN becomes
    once clamped, or a model that produced nothing)."""
    if np.isnan(pixels).any():
        return "NaN in the decoded image (the model overflowed; try run.dtype=fp32)"
    if not pixels.any():
        return "image is all black (the model produced no signal; try run.dtype=fp32 or another scheduler)"
    return ""


def to_pil(pixels: np.ndarray) -> Image.Image:
    # diffusers' own float-to-8-bit rule, so a PNG holds the pixels output_type="pil" would have given
    return Image.fromarray((pixels * 255).round().astype("uint8"))


def _time_decode(pipe, clock: _Clock) -> None:
    """Wrap the VAE's decode so its share of a pipeline call is measured without re-implementing the call."""
    decode = pipe.vae.decode

    def timed(latents, *args, **kwargs):
        clock.finite += torch.isfinite(latents).flatten(1).all(1).tolist()
        mark = time.perf_counter()
        try:
            return decode(latents, *args, **kwargs)
        finally:
            clock.seconds += time.perf_counter() - mark

    pipe.vae.decode = timed


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
