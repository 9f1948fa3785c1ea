"""A1111-weighted texts on the CLIP path: one phase of a prompt-editing schedule, as weighted pieces.

The pieces are cut into chunks with their weights (engine/clip_encoders.py), each chunk's hidden states are
multiplied per token by the weights and rescaled to their original mean (A1111's default emphasis), per text and
per encoder. With run.truncate_prompts only the first chunk is read, with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from batchgen.engine.clip_encoders import ClipEncoders
from batchgen.engine.conditioning import Encoded
from batchgen.library_log import warn


def encode_weighted(
    encoders: ClipEncoders, fragments: Sequence[tuple[str, float]], truncate: bool, clip_skip: int
) -> Encoded:
    chunks = encoders.chunks(fragments)
    if truncate and chunks.count > 1:
        warn(
            f"prompt '{''.join(t for t, _ in fragments)[:60]}...' is {chunks.count} chunks; the encoder reads the "
            "first (run.truncate_prompts=true)"
        )
        chunks = chunks.first()
    states, pooled = encoders.hidden_states(chunks, clip_skip)
    with torch.inference_mode():
        weighted = [
            emphasis(s, torch.tensor(w, device=s.device, dtype=s.dtype))
            for s, w in zip(states, chunks.weights, strict=True)
        ]
    return encoders.joined(weighted, pooled)


def emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's default emphasis, chunk by chunk ([chunks, 77, width] by [chunks, 77]): every token's hidden
    state times its weight, then the chunk scaled back to its original mean (A1111 takes that mean over the whole
    batch; here it is one text's chunk, so an image never depends on what it was batched with)."""
    out = []
    for z, w in zip(states, weights, strict=True):
        original = z.mean()
        z = z * w[:, None].expand(z.shape)
        out.append(z * (original / z.mean()))
    return torch.stack(out)
