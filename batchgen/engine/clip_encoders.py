"""The CLIP text encoders of a UNet pipeline (SD1/SD2: one; SDXL: two), as the plain and A1111 encoders use them.

A text is cut into A1111's chunks here, once for both syntaxes: per tokenizer, 75 tokens at most each (a BREAK
closes one early, even an empty one, as A1111 does), each wrapped in the start and end tokens and padded to 77;
every token carries its piece's weight (start, end and padding weigh 1). Cut flat at 75, without A1111's comma
backtrack. The encoders then read, per chunk, the layer diffusers reads for the pipeline: SD1/SD2 the last one,
normed; SDXL the penultimate of both encoders, not normed, pooled from the second; a clip skip (A1111's count) that
many layers further back, normed as the last one is for SD1/SD2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchgen.assets import text_model
from batchgen.assets.bases import Base
from batchgen.assets.bases.record import tokenizer_of
from batchgen.engine.conditioning import Encoded
from batchgen.prompt_syntax.a1111 import BREAK


@dataclass(frozen=True)
class Chunks:
    """One text's chunks per encoder: `ids[e][c]` the 77 token ids of chunk c for encoder e, `weights` alike."""

    ids: tuple[list[list[int]], ...]
    weights: tuple[list[list[float]], ...]

    @property
    def count(self) -> int:
        """How many chunks the first tokenizer makes (the one a truncation warning speaks of)."""
        return len(self.ids[0])

    def first(self) -> Chunks:
        """The first chunk only: what the encoder reads under run.truncate_prompts."""
        return Chunks(tuple(c[:1] for c in self.ids), tuple(w[:1] for w in self.weights))


class ClipEncoders:
    """The base's text encoders (its record's text_encoders, in order), each with its tokenizer, read at the layer
    the record names."""

    def __init__(self, pipe, base: Base) -> None:
        self.pipe = pipe
        self.components = tuple(base.text_encoders)
        self.pairs: list[tuple[object, torch.nn.Module]] = [
            (getattr(pipe, tokenizer_of(c)), getattr(pipe, c)) for c in self.components
        ]
        self.penultimate = base.clip_layer == "penultimate"
        self.pooled_encoder = base.pooled_encoder

    @property
    def device(self) -> torch.device:
        # diffusers' _execution_device walks every module for offload hooks (5 ms a call on a tiny model);
        # batchgen never offloads, so the text encoder's device is where encoding runs.
        return self.pipe.text_encoder.device

    def token_ids(self, text: str, tokenizer) -> list[int]:
        """The text's tokens without start and end, a multi-vector TI's trigger expanded to its extra tokens."""
        if hasattr(self.pipe, "maybe_convert_prompt"):
            text = self.pipe.maybe_convert_prompt(text, tokenizer)
        return tokenizer(text, truncation=False, add_special_tokens=False).input_ids

    def chunks(self, pieces: Sequence[tuple[str, float]]) -> Chunks:
        """Weighted pieces (BREAK among them) cut into chunks per tokenizer, each piece tokenized on its own, its
        weight on every token it makes (every vector of a TI). A plain text is one piece of weight 1."""
        ids_out, weights_out = [], []
        for tokenizer, _ in self.pairs:
            size = tokenizer.model_max_length - 2
            cut: list[tuple[list[int], list[float]]] = []
            ids: list[int] = []
            weights: list[float] = []
            for text, weight in pieces:
                if (text, weight) == BREAK:
                    cut.append((ids, weights))
                    ids, weights = [], []
                    continue
                for token in self.token_ids(text, tokenizer):
                    if len(ids) == size:
                        cut.append((ids, weights))
                        ids, weights = [], []
                    ids.append(token)
                    weights.append(weight)
            if ids or not cut:
                cut.append((ids, weights))
            pad = tokenizer.pad_token_id
            ids_out.append(
                [[tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (size - len(c)) for c, _ in cut]
            )
            weights_out.append([[1.0, *w, 1.0] + [1.0] * (size - len(w)) for _, w in cut])
        return Chunks(tuple(ids_out), tuple(weights_out))

    @torch.inference_mode()
    def hidden_states(self, chunks: Chunks, clip_skip: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Per encoder, the chunks' hidden states [chunks, 77, width] at the layer diffusers reads for this
        pipeline; and SDXL's pooled output [1, width], the first chunk's."""
        # inference_mode also matters for memory: a cached tensor with autograd history would keep every
        # text-encoder activation of its prompt alive.
        device = self.device
        states, pooled = [], None
        for component, (_, encoder), ids in zip(self.components, self.pairs, chunks.ids, strict=True):
            tensor = torch.tensor(ids, device=device)
            wanted = self.penultimate or clip_skip > 1
            if component == self.pooled_encoder:
                # The projection would see one row per chunk, and a matrix product rounds by its row count: it
                # runs here on the first chunk's row alone, as a text of one chunk gives it to diffusers.
                output = encoder.text_model(tensor, output_hidden_states=wanted)
                pooled = encoder.text_projection(output.pooler_output[0:1])
            else:
                output = encoder(tensor, output_hidden_states=wanted)
            if self.penultimate:
                states.append(output.hidden_states[-(clip_skip + 1)])
            elif clip_skip > 1:
                # The last layer's output is normed inside the encoder; an earlier one gets the same norm here.
                norm = text_model.inner(encoder).final_layer_norm
                states.append(norm(output.hidden_states[-clip_skip]))
            else:
                states.append(output[0])
        return states, pooled

    @torch.inference_mode()
    def joined(self, states: list[torch.Tensor], pooled: torch.Tensor | None) -> Encoded:
        """Each encoder's chunks laid end to end, the encoders side by side on the last dim, as diffusers does."""
        hidden = torch.cat([s.reshape(1, -1, s.shape[-1]) for s in states], dim=-1)
        return Encoded(hidden.to(self.pipe.text_encoder.dtype), pooled)

    @torch.inference_mode()
    def encode_short(self, text: str, clip_skip: int) -> Encoded:
        """A text of one chunk through diffusers' own encode_prompt, in its own call: on some CPUs (Intel with AMX)
        a text's rows round differently beside other texts in one matrix product, so encoding texts together
        would make a prompt depend on its neighbours."""
        skip = clip_skip - 1 or None  # diffusers counts layers skipped past its default; A1111 counts from 1
        if self.pooled_encoder:  # SDXL's encode_prompt: keywords, and a pooled output back
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=[text], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                clip_skip=skip,
            )  # fmt: skip
            return Encoded(hidden, pooled)
        hidden, _ = self.pipe.encode_prompt([text], self.device, 1, False, clip_skip=skip)
        return Encoded(hidden, None)
