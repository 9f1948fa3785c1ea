"""Text-encoder outputs cached per (text, text-encoder LoRA state), encoded a batch at a time.

A sweep renders each prompt under many UNet-only changes (seeds, steps, UNet weights); encoding it once per
text-encoder state removes that work from every image but the first. Prompts and negative prompts share one cache
(diffusers encodes both the same way), and every text a batch still needs goes through the encoders in one call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from batchgen.engine.rows import BatchShape, isolate_image_rows
from batchgen.spec import Job


@dataclass(frozen=True)
class Embeds:
    """One image's conditioning, shaped [1, tokens, width] (pooled: [1, width]) as diffusers returns it."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class _Encoded:
    hidden: torch.Tensor  # [1, tokens, width]
    pooled: torch.Tensor | None  # [1, width], SDXL only


def text_encoder_state(job: Job) -> tuple[tuple[str, float], ...]:
    # Over-keying is safe (a cache miss), under-keying is not: every non-zero text-encoder weight counts.
    return tuple((lw.name, lw.text_encoder) for lw in job.loras if lw.text_encoder != 0.0)


def uses_guidance(pipe, job: Job) -> bool:
    """The pipeline's own rule for classifier-free guidance, so cached embeddings match what it would compute."""
    return job.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None


def texts_of(pipe, job: Job) -> list[str]:
    return [job.prompt, job.negative_prompt] if uses_guidance(pipe, job) else [job.prompt]


class PromptCache:
    def __init__(self, pipe, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, _Encoded] = OrderedDict()
        self.misses = 0  # texts encoded
        self.calls = 0  # text-encoder calls
        self._shape = BatchShape()
        # The pooled projection sees one row per text: run it per text so a text encodes the same in any batch.
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None and hasattr(encoder, "text_projection"):
                isolate_image_rows(encoder, self._shape, suffixes=("text_projection",))

    def embeds(self, batch: list[Job]) -> list[Embeds]:
        """Each job's conditioning; the batch must share one text-encoder state (it shares its LoRA stack)."""
        states = {text_encoder_state(job) for job in batch}
        assert len(states) == 1, "a batch spans text-encoder states"
        state = states.pop()
        wanted = dict.fromkeys(text for job in batch for text in texts_of(self.pipe, job))
        missing = [text for text in wanted if (text, state) not in self._entries]
        if missing:
            for text, encoded in zip(missing, self._encode(missing), strict=True):
                self._entries[(text, state)] = encoded
            self.misses += len(missing)
            self.calls += 1
        out = []
        for job in batch:
            texts = texts_of(self.pipe, job)
            for text in texts:
                self._entries.move_to_end((text, state))
            cond = self._entries[(texts[0], state)]
            uncond = self._entries[(texts[1], state)] if len(texts) > 1 else None
            out.append(Embeds(cond.hidden, uncond and uncond.hidden, cond.pooled, uncond and uncond.pooled))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out

    def get(self, job: Job) -> Embeds:
        return self.embeds([job])[0]

    def clear(self) -> None:
        self._entries.clear()

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> list[_Encoded]:
        # inference_mode also matters for memory: a cached tensor with autograd history would keep every
        # text-encoder activation of its prompt alive.
        device = self.pipe._execution_device
        self._shape.images = len(texts)
        try:
            if hasattr(self.pipe, "text_encoder_2"):
                hidden, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            else:
                hidden, _ = self.pipe.encode_prompt(texts, device, 1, False)
                pooled = None
        finally:
            self._shape.images = 1
        return [
            _Encoded(hidden[i : i + 1], None if pooled is None else pooled[i : i + 1]) for i in range(len(texts))
        ]


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
