"""Text-encoder outputs cached per (prompt, negative prompt, text-encoder LoRA state, guidance on/off).

A sweep renders each prompt under many UNet-only changes (seeds, steps, UNet weights); encoding it once per
text-encoder state removes that work from every image but the first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from batchgen.spec import Job


@dataclass(frozen=True)
class Embeds:
    """One image's conditioning, shaped [1, tokens, width] (pooled: [1, width]) as diffusers returns it."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


def text_encoder_state(job: Job) -> tuple[tuple[str, float], ...]:
    # Over-keying is safe (a cache miss), under-keying is not: every non-zero text-encoder weight counts.
    return tuple((lw.name, lw.text_encoder) for lw in job.loras if lw.text_encoder != 0.0)


def uses_guidance(pipe, job: Job) -> bool:
    """The pipeline's own rule for classifier-free guidance, so cached embeddings match what it would compute."""
    return job.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


class PromptCache:
    def __init__(self, pipe, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, Embeds] = OrderedDict()
        self.misses = 0

    def get(self, job: Job) -> Embeds:
        guidance = uses_guidance(self.pipe, job)
        key = (job.prompt, job.negative_prompt, text_encoder_state(job), guidance)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        embeds = self._encode(job, guidance)
        self._entries[key] = embeds
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return embeds

    def clear(self) -> None:
        self._entries.clear()

    @torch.inference_mode()
    def _encode(self, job: Job, guidance: bool) -> Embeds:
        # inference_mode also matters for memory: a cached tensor with autograd history would keep every
        # text-encoder activation of its prompt alive.
        device = self.pipe._execution_device
        if hasattr(self.pipe, "text_encoder_2"):
            out = self.pipe.encode_prompt(
                prompt=job.prompt,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=job.negative_prompt,
            )
            return Embeds(out[0], out[1] if guidance else None, out[2], out[3] if guidance else None)
        prompt, negative = self.pipe.encode_prompt(job.prompt, device, 1, guidance, job.negative_prompt)
        return Embeds(prompt, negative if guidance else None)


def batch_kwargs(batch: list[Embeds]) -> dict[str, torch.Tensor]:
    """Stack per-image embeddings into the pipeline's *_embeds arguments."""
    kwargs = {"prompt_embeds": torch.cat([e.prompt for e in batch])}
    if batch[0].negative is not None:
        kwargs["negative_prompt_embeds"] = torch.cat([e.negative for e in batch])
    if batch[0].pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.cat([e.pooled for e in batch])
        if batch[0].negative_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([e.negative_pooled for e in batch])
    return kwargs
