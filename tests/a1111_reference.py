"""A test-only A1111 prompt reader, written from A1111's published algorithm (modules/prompt_parser.py,
sd_hijack_clip.py, sd_emphasis.py) and imported by no batchgen code: the oracle the a1111 prompt syntax is checked
against. It feeds embeddings to plain diffusers, or drives its own denoise loop where diffusers has no argument for
what A1111 does (prompt editing, separate cond/uncond passes).

Kept as batchgen reads prompts where batchgen chose to differ from A1111, and said so in README: chunks are cut
flat at 75 tokens (no comma backtrack), and the emphasis mean is one text's, not the batch's.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def attention(text: str) -> list[tuple[str, float]]:
    """(piece, weight) as A1111's parse_prompt_attention gives them; ("BREAK", -1.0) where BREAK closes a chunk."""
    out: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for item in out[start:]:
            item[1] *= by

    for m in _TOKENS.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            out.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(out))
        elif token == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", token)):
                if i:
                    out.append(["BREAK", -1.0])
                out.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    out = out or [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def _pairs(pipe) -> list[tuple[object, torch.nn.Module]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _chunks(pipe, tokenizer, pieces: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
    """A1111's tokenize_line without the comma backtrack: 75-token chunks, BREAK closes one, each padded and
    wrapped in start and end tokens; every token carries its piece's weight, start/end/padding weigh 1."""
    chunks, ids, weights = [], [], []
    for text, weight in pieces:
        if text == "BREAK" and weight == -1.0:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer(pipe.maybe_convert_prompt(text, tokenizer), add_special_tokens=False).input_ids:
            if len(ids) == 75:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    pad = tokenizer.pad_token_id
    return [
        (
            [tokenizer.bos_token_id, *c, tokenizer.eos_token_id] + [pad] * (75 - len(c)),
            [1.0, *w, 1.0] + [1.0] * (75 - len(w)),
        )
        for c, w in chunks
    ]


@torch.no_grad()
def encode(pipe, text: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One text as A1111 conditions on it: hidden states [1, 77 * chunks, width] and SDXL's pooled [1, 1280]."""
    xl = getattr(pipe, "text_encoder_2", None) is not None
    pieces = attention(text)
    hidden, pooled = [], None
    for tokenizer, encoder in _pairs(pipe):
        zs = []
        for n, (ids, weights) in enumerate(_chunks(pipe, tokenizer, pieces)):
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
            if xl:
                z = out.hidden_states[-(clip_skip + 1)]
                if n == 0 and encoder is pipe.text_encoder_2:
                    pooled = out[0]
            elif clip_skip > 1:
                norm = getattr(encoder, "text_model", encoder).final_layer_norm
                z = norm(out.hidden_states[-clip_skip])
            else:
                z = out[0]
            mean = z.mean()
            z = z * torch.tensor(weights)[None, :, None]
            zs.append(z * (mean / z.mean()))  # A1111's default emphasis: back to the original mean
        hidden.append(torch.cat(zs, dim=1))
    return torch.cat(hidden, dim=-1), pooled


def padded(pipe, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's "Pad prompt/negative prompt": the shorter gets the empty text's chunks appended."""
    empty, _ = encode(pipe, "")
    while a.shape[1] < b.shape[1]:
        a = torch.cat([a, empty], dim=1)
    while b.shape[1] < a.shape[1]:
        b = torch.cat([b, empty], dim=1)
    return a, b


def pipeline_kwargs(pipe, prompt: str, negative: str, clip_skip: int = 1) -> dict:
    """Embeddings for a plain diffusers pipeline call, prompt and negative padded to one length."""
    (cond, pooled), (uncond, negative_pooled) = encode(pipe, prompt, clip_skip), encode(pipe, negative, clip_skip)
    cond, uncond = padded(pipe, cond, uncond)
    out = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    if pooled is not None:
        out |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return out


def schedule(phases: list[tuple[int, str]], step: int) -> str:
    """A1111's reconstruct_cond_batch: the first entry whose end step is at or after this 0-based step."""
    return next(text for end, text in phases if step <= end)


@torch.no_grad()
def sd1_loop(
    pipe,
    prompt: list[tuple[int, str]],
    negative: list[tuple[int, str]],
    steps: int,
    seed: int,
    guidance: float,
    size: int = 64,
) -> np.ndarray:
    """An SD1 denoise loop written out: the conditioning of each side picked per step from its schedule, and cond
    and uncond run through the UNet separately when their lengths differ (A1111's default), together otherwise."""
    pipe.scheduler.set_timesteps(steps)
    shape = (1, pipe.unet.config.in_channels, size // 8, size // 8)
    latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latents = latents * pipe.scheduler.init_noise_sigma
    cache: dict[str, torch.Tensor] = {}

    def embeds(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = encode(pipe, text)[0]
        return cache[text]

    for i, t in enumerate(pipe.scheduler.timesteps):
        cond, uncond = embeds(schedule(prompt, i)), embeds(schedule(negative, i))
        x = pipe.scheduler.scale_model_input(latents, t)
        if cond.shape == uncond.shape:
            both = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            noise_uncond, noise_cond = both.chunk(2)
        else:
            noise_uncond = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            noise_cond = pipe.unet(x, t, encoder_hidden_states=cond).sample
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = pipe.scheduler.step(noise, t, latents).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    pixels = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()[0]
    return (pixels * 255).round().astype(np.int16)
