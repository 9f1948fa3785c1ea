"""Plain-diffusers reference operations shared by the oracle tests: what a user without batchgen would write."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def render_row(pipe, row) -> object:
    """A manifest row rendered by the pipeline itself, with the row's own CPU generator."""
    return pipe(
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        width=int(row["width"]),
        height=int(row["height"]),
        generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
    ).images[0]


def load_embedding(pipe, path: Path, token: str) -> None:
    """diffusers' documented way: SDXL files carry clip_l and clip_g for the two encoders."""
    if hasattr(pipe, "text_encoder_2"):
        tensors = load_file(path)
        pipe.load_textual_inversion(
            tensors["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            tensors["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        pipe.load_textual_inversion(str(path), token=token)
