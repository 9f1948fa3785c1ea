"""Plain-diffusers reference operations shared by the oracle tests: what a user without batchgen would write."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def render_row(pipe, row) -> object:
    """A manifest row rendered by the pipeline itself, with the row's own CPU generator."""
    texts = {"prompt": row["prompt"], "negative_prompt": row["negative_prompt"]}
    skip = int(row.get("clip_skip") or 1) - 1  # the manifest counts as A1111 does, from 1; diffusers from 0
    if skip:
        texts = clip_skipped_embeds(pipe, row["prompt"], row["negative_prompt"], skip)
    return pipe(
        **texts,
        num_inference_steps=int(row["steps"]),
        guidance_scale=float(row["guidance_scale"]),
        width=int(row["width"]),
        height=int(row["height"]),
        generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
    ).images[0]


def render_with_adapters(pipe, row, denoiser: str, files) -> object:
    """`render_row` with the row's LoRAs loaded as diffusers adapters at their weights (`unet/text` weights as
    batchgen writes them), unloaded after; `files(name)` is what load_lora_weights reads for a LoRA."""
    names, weights = [], []
    for entry in filter(None, row["loras"].split(";")):
        name, weight = entry.split(":")
        unet, _, te = weight.partition("/")
        names.append(name)
        text = float(te or unet)
        weights.append({denoiser: float(unet), "text_encoder": text, "text_encoder_2": text})
        pipe.load_lora_weights(files(name), adapter_name=name)
    if names:
        parts = pipe.get_list_adapters()
        weights = [{k: v for k, v in w.items() if n in parts.get(k, [])} for n, w in zip(names, weights, strict=True)]
        pipe.set_adapters(names, adapter_weights=weights)
    image = render_row(pipe, row)
    if names:
        pipe.unload_lora_weights()
    return image


def clip_skipped_embeds(pipe, prompt: str, negative: str, skip: int) -> dict:
    """diffusers 0.42 applies clip_skip to the prompt only, the negative keeps the last layer (its PRs #13796 and
    #13973 to change that were closed); A1111 skips layers for both. So both texts go through diffusers' own
    encode_prompt as prompts, and the pipeline gets the embeddings."""
    xl = getattr(pipe, "text_encoder_2", None) is not None
    out = {}
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        with clip_skip_alias(pipe):
            if xl:
                hidden, _, pooled, _ = pipe.encode_prompt(
                    prompt=[text], device="cpu", do_classifier_free_guidance=False, clip_skip=skip
                )
                out[name.replace("prompt", "pooled_prompt_embeds")] = pooled
            else:
                hidden, _ = pipe.encode_prompt([text], "cpu", 1, False, clip_skip=skip)
        out[f"{name}_embeds"] = hidden
    return out


@contextlib.contextmanager
def clip_skip_alias(pipe):
    """diffusers 0.42's SD1/SD2 encode_prompt(clip_skip=...) reads `text_encoder.text_model.final_layer_norm`, a
    module transformers 5 moved to the encoder's top level. Aliasing it (outside nn.Module's registry, so the
    state dict sees no cycle) lets diffusers' own code run as the reference; only for the call, because
    diffusers' LoRA loader reads the same attribute to choose key prefixes."""
    encoder = pipe.text_encoder
    alias = not hasattr(encoder, "text_model")
    if alias:
        object.__setattr__(encoder, "text_model", encoder)
    try:
        yield
    finally:
        if alias:
            del encoder.__dict__["text_model"]


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


SAME_WEIGHTS_STEPS = 2  # 0-255: the most a pixel may move when only where the weights sit in memory differs
SAME_WEIGHTS_SHARE = 0.01


def assert_same_weights_render_alike(got, expected, what: str) -> None:
    """Two renders of bit-identical weights loaded from different files: equal but for rare 1/255 steps.

    Bitwise equality is proved on the weights themselves; the pixels may still differ because on some CPUs (seen
    on AMD EPYC with AVX-512) oneDNN's GEMM rounds differently with the operands' address alignment, and
    safetensors maps each tensor at its own file offset.
    """
    import numpy as np

    a, b = (np.asarray(x.convert("RGB"), dtype=np.int16) for x in (got, expected))
    gap = np.abs(a - b)
    assert gap.max() <= SAME_WEIGHTS_STEPS, f"{what}: a pixel moved {gap.max()}/255"
    assert (gap > 0).mean() <= SAME_WEIGHTS_SHARE, f"{what}: {(gap > 0).mean():.2%} of the pixels differ"
