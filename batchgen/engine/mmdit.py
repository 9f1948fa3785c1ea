"""SD3 and FLUX in the engine: their prompts encoded by the pipeline itself, cached, and their transformer run
image by image.

These pipelines condition on T5 as well as CLIP and take no A1111 chunks, weights or clip skip (planning refuses
those for them), so batchgen calls the pipeline's own encode_prompt, one text at a time as a batch of one
computes it, and caches the result per (text, text-encoder LoRA state) as engine/prompts.py does for CLIP.

A transformer's matrix products see a few hundred rows per image, but its timestep, guidance and pooled-text
embeddings see one; rather than find every such layer, the whole forward runs on each image's rows alone (its
guidance pair under SD3's classifier-free guidance), exactly as a batch of one runs it. A batch then saves the
pipeline's per-call work and never changes pixels.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from batchgen.assets.bases import Base
from batchgen.engine.prompts import Conditioning, Embeds, text_encoder_state
from batchgen.engine.rows import BatchShape, by_image
from batchgen.spec import Job, LoraState

# The transformer arguments that carry one row per image (per guidance half); the rest (FLUX's position ids,
# attention kwargs) are shared by the batch.
_PER_ROW = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def guided(base: Base, job: Job) -> bool:
    """Whether the pipeline runs a negative pass: SD3 as diffusers does (guidance_scale > 1); FLUX.1's guidance
    is distilled into the transformer, so never (the pipeline's true_cfg_scale stays at its default, 1)."""
    return base.guidance == "cfg" and job.guidance_scale > 1


class PipelinePrompts:
    """Conditioning for a pipeline that encodes its own prompts, cached per text and text-encoder LoRA state."""

    def __init__(self, pipe, base: Base, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.base = base
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.misses = 0  # texts encoded
        self.rounds = 0  # batches that had texts to encode
        self._state: LoraState | None = None

    def embeds(self, batch: list[Job]) -> list[Conditioning]:
        states = {text_encoder_state(job) for job in batch}
        if len(states) != 1:
            raise RuntimeError("a batch spans text-encoder states; batches must be cut by batch_key")
        state = states.pop()
        if state != self._state:
            # Jobs come grouped by LoRA stack: drop the encodings of states left behind, keep the pristine one.
            for key in [key for key in self._entries if key[1] not in (state, LoraState())]:
                del self._entries[key]
            self._state = state
        lengths = {job.max_sequence_length for job in batch}
        if len(lengths) != 1:
            raise RuntimeError("a batch mixes max_sequence_length; batches must be cut by batch_key")
        length = lengths.pop()
        sides = [[job.prompt, job.negative_prompt] if guided(self.base, job) else [job.prompt] for job in batch]
        missing = [
            t for t in dict.fromkeys(t for texts in sides for t in texts) if (t, state, length) not in self._entries
        ]
        for text in missing:
            self._entries[(text, state, length)] = self._encode(text, length)
        if missing:
            self.misses += len(missing)
            self.rounds += 1
        out = []
        for job, texts in zip(batch, sides, strict=True):
            encoded = [self._entries[(t, state, length)] for t in texts]
            for t in texts:
                self._entries.move_to_end((t, state, length))
            (prompt, pooled), *negative = encoded
            embeds = Embeds(prompt, negative[0][0] if negative else None, pooled, negative[0][1] if negative else None)
            out.append(Conditioning(((job.steps, embeds),)))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return out

    @torch.inference_mode()
    def _encode(self, text: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
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
            return prompt, pooled
        prompt, _, pooled, _ = self.pipe.encode_prompt(**common, prompt_3=None, do_classifier_free_guidance=False)
        return prompt, pooled


def isolate_images(transformer: torch.nn.Module, shape: BatchShape) -> None:
    """Wrap the transformer's forward in place so that each image's rows run alone (module paths and weights are
    untouched: LoRA keys and the patcher see the same model)."""
    forward = transformer.forward

    def run(*args, **kwargs):
        n = shape.images
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
