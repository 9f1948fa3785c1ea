"""What batchgen's wrapped denoiser forward needs to know about the pipeline call it runs in, carried by that call.

diffusers' SD pipelines hand their `cross_attention_kwargs` argument to the UNet's forward on every step, and the
SD3 and FLUX.1 pipelines their `joint_attention_kwargs` to the transformer's, as given. batchgen puts a
`DenoiserCall` there under `KEY`; the forwards it wraps (engine/passes.py, engine/mmdit.py) take it out before
diffusers' own forward sees the rest, so no call state lives on a module or in the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEY = "batchgen_call"


@dataclass
class DenoiserCall:
    """One pipeline call: how many images it renders, and this step's (uncond, cond) token lengths when they
    differ (separate UNet passes); the schedule's step-end callback sets the lengths for the next step."""

    images: int
    lengths: tuple[int, int] | None = None


def attention_kwargs(call: DenoiserCall) -> dict[str, Any]:
    """The pipeline argument that carries `call` to the denoiser."""
    return {KEY: call}


def take_call(kwargs: dict[str, Any] | None) -> tuple[DenoiserCall | None, dict[str, Any] | None]:
    """(the call, the attention kwargs diffusers' forward gets): without batchgen's entry, None when nothing else
    is left (what the pipeline passes when its caller gives none)."""
    if not kwargs or KEY not in kwargs:
        return None, kwargs
    rest = {key: value for key, value in kwargs.items() if key != KEY}
    return kwargs[KEY], rest or None
