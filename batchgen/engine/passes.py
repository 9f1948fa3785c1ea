"""How a batch's conditioning reaches the UNet: the pipeline's *_embeds arguments for the first step, a step-end
callback that switches them where a prompt-editing schedule says, and separate UNet passes for the prompt and the
negative prompt when their lengths differ.

A1111 by default (its "Pad prompt/negative prompt" off) runs cond and uncond through the model separately when
one has more 75-token chunks than the other. diffusers stacks both into one call and insists on equal shapes, so
the shorter side is zero-filled for the pipeline's checks and the UNet's forward, wrapped once per model, cuts the
call in two, each half reading only its own tokens. Each half is a smaller batch of whole images, which the
per-image layers (engine/rows.py) already keep bit-identical to a batch of one. The lengths and the image count
reach the wrapped forward with the pipeline call itself (engine/denoiser_call.py).
"""

from __future__ import annotations

from typing import Any

import torch

from batchgen.engine.conditioning import Conditioning, Embeds
from batchgen.engine.denoiser_call import DenoiserCall, attention_kwargs, take_call
from batchgen.engine.rows import UNET_PER_IMAGE, UNET_PER_IMAGE_OPTIONAL, isolate_image_rows

UNET_CALL_ARGUMENT = "cross_attention_kwargs"  # what SD pipelines hand the UNet's forward on every step


def wrap_unet(unet: torch.nn.Module) -> None:
    """Wrap the UNet in place (module paths and weights untouched): under a batchgen call its per-image layers
    split the call's images, and with lengths set a guidance batch [uncond x n, cond x n] runs as two calls, each
    with its rows' own token length."""
    rows = isolate_image_rows(unet, UNET_PER_IMAGE, optional=UNET_PER_IMAGE_OPTIONAL)
    forward = unet.forward

    def run(sample: torch.Tensor, timestep, *args, **kwargs):
        call, kwargs = _taken(kwargs)
        if call is None:
            return forward(sample, timestep, *args, **kwargs)
        if call.lengths is None:
            return rows.holding(call.images, lambda: forward(sample, timestep, *args, **kwargs))
        if args or kwargs.get("return_dict", True):
            raise RuntimeError("separate UNet passes expect diffusers' keyword call with return_dict=False")
        return rows.holding(call.images, lambda: _two_passes(forward, call.lengths, sample, timestep, kwargs))

    unet.forward = run


def _taken(kwargs: dict[str, Any]) -> tuple[DenoiserCall | None, dict[str, Any]]:
    if UNET_CALL_ARGUMENT not in kwargs:
        return None, kwargs
    call, rest = take_call(kwargs[UNET_CALL_ARGUMENT])
    return call, {**kwargs, UNET_CALL_ARGUMENT: rest}


def _two_passes(forward, lengths: tuple[int, int], sample: torch.Tensor, timestep, kwargs: dict[str, Any]):
    n = sample.shape[0] // 2
    outputs = []
    for rows, length in ((slice(0, n), lengths[0]), (slice(n, 2 * n), lengths[1])):
        part = {key: _rows(value, rows, 2 * n) for key, value in kwargs.items()}
        part["encoder_hidden_states"] = kwargs["encoder_hidden_states"][rows, :length]
        outputs.append(forward(sample[rows], _rows(timestep, rows, 2 * n), **part)[0])
    return (torch.cat(outputs),)


def _rows(value, rows: slice, batch: int):
    """A per-row argument's rows (added conditions, a per-row timestep); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    return value


def pipeline_inputs(conds: list[Conditioning], guidance: bool, call_argument: str) -> dict[str, Any]:
    """The pipeline's keyword arguments for the batch's conditioning: the embeds for step 0, the call's
    `DenoiserCall` in `call_argument` (the attention kwargs the pipeline hands its denoiser) and, for a schedule,
    the step-end callback that switches the embeds and the call's lengths. The batch shares one signature
    (engine/worker.py cuts batches by it)."""
    call = DenoiserCall(images=len(conds), lengths=_lengths(conds[0].first, guidance))
    kwargs: dict[str, Any] = {**_stacked([c.first for c in conds]), call_argument: attention_kwargs(call)}
    if len(conds[0].phases) == 1:
        return kwargs
    steps = conds[0].phases[-1][0]

    def switch(pipe, i: int, t, tensors: dict) -> dict:
        # The loop runs once per timestep; a second-order scheduler has about two per step.
        now, after = (_step(j, steps, len(pipe.scheduler.timesteps)) for j in (i, i + 1))
        current, following = conds[0].at(now), conds[0].at(after)
        call.lengths = _lengths(following, guidance)
        if following is current:
            return {}
        stacked = _stacked([c.at(after) for c in conds])
        out = {"prompt_embeds": _guided(stacked, "prompt_embeds", guidance)}
        if "pooled_prompt_embeds" in stacked:
            out["add_text_embeds"] = _guided(stacked, "pooled_prompt_embeds", guidance)
        return out

    kwargs["callback_on_step_end"] = switch
    return kwargs


def _step(iteration: int, steps: int, timesteps: int) -> int:
    return iteration * steps // max(timesteps, 1)


def _guided(stacked: dict[str, torch.Tensor], name: str, guidance: bool) -> torch.Tensor:
    """What the pipeline's loop holds for `name`: [uncond, cond] stacked under guidance, as it builds it."""
    if not guidance:
        return stacked[name]
    return torch.cat([stacked[f"negative_{name}"], stacked[name]])


def _lengths(embeds: Embeds, guidance: bool) -> tuple[int, int] | None:
    if not guidance or embeds.negative is None or embeds.negative.shape[1] == embeds.prompt.shape[1]:
        return None
    return embeds.negative.shape[1], embeds.prompt.shape[1]


def _stacked(batch: list[Embeds]) -> dict[str, torch.Tensor]:
    """Per-image embeddings stacked into the pipeline's *_embeds arguments; a shorter side is zero-filled to the
    longer (the split UNet forward never reads the fill)."""
    prompt = torch.cat([e.prompt for e in batch])
    kwargs = {"prompt_embeds": prompt}
    if batch[0].negative is not None:
        negative = torch.cat([e.negative for e in batch])
        width = max(prompt.shape[1], negative.shape[1])
        kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = _fill(prompt, width), _fill(negative, width)
    if batch[0].pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.cat([e.pooled for e in batch])
        if batch[0].negative_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = torch.cat([e.negative_pooled for e in batch])
    return kwargs


def _fill(tensor: torch.Tensor, length: int) -> torch.Tensor:
    if tensor.shape[1] == length:
        return tensor
    fill = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], tensor.shape[2])
    return torch.cat([tensor, fill], dim=1)
