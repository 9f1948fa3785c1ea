"""SD3 and FLUX in the engine: their prompts encoded by the pipeline itself, cached, and their transformer run
image by image.

These pipelines condition on T5 as well as CLIP and take no A1111 chunks, weights or clip skip (planning refuses
those for them), so batchgen calls the pipeline's own encode_prompt, one text at a time as a batch of one
computes it, and caches the result in the conditioning cache the CLIP path uses (engine/conditioning_cache.py),
its mode the T5 length.

A transformer's matrix products see a few hundred rows per image, but its timestep, guidance and pooled-text
embeddings see one; rather than find every such layer, the whole forward runs on each image's rows alone (its
guidance pair under SD3's classifier-free guidance), exactly as a batch of one runs it. A batch then saves the
pipeline's per-call work and never changes pixels.
"""

from __future__ import annotations

import torch

from batchgen.assets.bases import Base
from batchgen.engine.conditioning import Conditioning, Embeds, Encoded, texts_of
from batchgen.engine.conditioning_cache import ConditioningCache
from batchgen.engine.denoiser_call import take_call
from batchgen.engine.rows import by_image
from batchgen.spec import Job

TRANSFORMER_CALL_ARGUMENT = "joint_attention_kwargs"  # what SD3 and FLUX.1 pipelines hand the transformer

# The transformer arguments that carry one row per image (per guidance half); the rest (FLUX's position ids,
# attention kwargs) are shared by the batch.
_PER_ROW = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


class PipelinePrompts:
    """Conditioning for a pipeline that encodes its own prompts, cached per text, text-encoder LoRA state and T5
    length."""

    def __init__(self, pipe, base: Base, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.base = base
        self.cache = ConditioningCache(max_entries)

    def embeds(self, batch: list[Job]) -> list[Conditioning]:
        lookup = self.cache.open(batch, lambda job: job.max_sequence_length, "max_sequence_length")
        sides = [texts_of(self.base, self.pipe, job) for job in batch]
        lookup.ensure(
            (text for texts in sides for text in texts),
            lambda texts: [self._encode(text, lookup.mode) for text in texts],
        )
        out = []
        for job, texts in zip(batch, sides, strict=True):
            prompt, *negative = (lookup[text] for text in texts)
            lookup.touch(texts)
            embeds = Embeds(
                prompt.hidden,
                negative[0].hidden if negative else None,
                prompt.pooled,
                negative[0].pooled if negative else None,
            )
            out.append(Conditioning(((job.steps, embeds),)))
        self.cache.trim()
        return out

    @torch.inference_mode()
    def _encode(self, text: str, length: int) -> Encoded:
        """(sequence [1, tokens, width], pooled [1, width]) as the pipeline computes them for this text; `length`
        0 keeps the pipeline's default max_sequence_length."""
        # batchgen never offloads, so the text encoder's device is where encoding runs (_execution_device walks
        # every module for offload hooks).
        common = {
            "prompt": text,
            "prompt_2": None,
            "device": self.pipe.text_encoder.device,
            "num_images_per_prompt": 1,
        }
        if length:
            common["max_sequence_length"] = length
        if self.base.guidance == "distilled":
            prompt, pooled, _ = self.pipe.encode_prompt(**common)
            return Encoded(prompt, pooled)
        prompt, _, pooled, _ = self.pipe.encode_prompt(**common, prompt_3=None, do_classifier_free_guidance=False)
        return Encoded(prompt, pooled)


def isolate_images(transformer: torch.nn.Module) -> None:
    """Wrap the transformer's forward in place so that each image's rows run alone (module paths and weights are
    untouched: LoRA keys and the patcher see the same model). The image count comes with each call, in its
    joint_attention_kwargs (engine/denoiser_call.py)."""
    forward = transformer.forward

    def run(*args, **kwargs):
        call, rest = take_call(kwargs.get(TRANSFORMER_CALL_ARGUMENT))
        if call is not None:
            kwargs = {**kwargs, TRANSFORMER_CALL_ARGUMENT: rest}
        n = 1 if call is None else call.images
        if n <= 1:
            return forward(*args, **kwargs)
        if args or kwargs.get("return_dict", True):
            raise RuntimeError("batchgen runs the transformer image by image; it expects diffusers' keyword call")
        hidden = kwargs["hidden_states"]
        rows = hidden.shape[0]

        def one(index: torch.Tensor) -> torch.Tensor:
            part = {k: (v[index] if k in _PER_ROW and _batched(v, rows) else v) for k, v in kwargs.items()}
            return forward(**part)[0]

        return (by_image(rows, n, hidden.device, one),)

    transformer.forward = run


def _batched(value, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
