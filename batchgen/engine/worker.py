"""Render jobs in one process: each model loaded once, its TIs registered once, each LoRA file read once."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from batchgen.engine.pipeline import LoraStacks, SchedulerSwitch, load_pipeline, register_embeddings, resolve_dtype
from batchgen.spec import Job, ModelSpec, RenderResult


@dataclass
class _Loaded:
    name: str
    pipe: object
    loras: LoraStacks
    scheduler: SchedulerSwitch


class Renderer:
    """Holds at most one loaded model; jobs should arrive grouped by model, then by LoRA stack."""

    def __init__(self, models: dict[str, ModelSpec], device: str = "cpu", dtype: str = "auto", name: str = "cpu0"):
        self.models = models
        self.device = device
        self.dtype = resolve_dtype(dtype, device)
        self.name = name
        self._loaded: _Loaded | None = None
        self.load_count: dict[str, int] = {}

    def render(self, jobs: Iterable[Job]) -> Iterator[RenderResult]:
        for job in jobs:
            started = time.perf_counter()
            timings: dict[str, float] = {}
            try:
                loaded = self._model(job.model, timings)
                mark = time.perf_counter()
                loaded.loras.use(job.loras)
                loaded.scheduler.use(job.scheduler)
                timings["patch"] = time.perf_counter() - mark
                mark = time.perf_counter()
                image = self._generate(loaded.pipe, job)
                timings["denoise"] = time.perf_counter() - mark
            except Exception as e:  # one bad job must not end the sweep; the manifest records why
                yield RenderResult(job.job_id, None, time.perf_counter() - started, self.name, _describe(e), timings)
                continue
            yield RenderResult(job.job_id, image, time.perf_counter() - started, self.name, "", timings)

    def _model(self, name: str, timings: dict[str, float]) -> _Loaded:
        if self._loaded is not None and self._loaded.name == name:
            return self._loaded
        mark = time.perf_counter()
        self._loaded = None
        gc.collect()  # release the previous model before the next one claims memory
        spec = self.models[name]
        pipe = load_pipeline(spec, self.device, self.dtype)
        register_embeddings(pipe, spec)
        self._loaded = _Loaded(name, pipe, LoraStacks(pipe, spec), SchedulerSwitch(pipe))
        self.load_count[name] = self.load_count.get(name, 0) + 1
        timings["load"] = time.perf_counter() - mark
        return self._loaded

    @torch.inference_mode()
    def _generate(self, pipe, job: Job):
        # One CPU generator per image: the image depends only on its own seed, on any device.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        result = pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance_scale,
            width=job.width,
            height=job.height,
            generator=generator,
            output_type="pil",
        )
        return result.images[0]


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
