"""Config values -> checked Python values: the render settings (batchgen.settings), LoRA weights, batch size."""

from __future__ import annotations

from typing import Any

from batchgen.errors import BatchgenError
from batchgen.settings import SETTINGS, as_list, is_int, is_number
from batchgen.spec import format_number

MAX_WEIGHT = 10.0


def setting_values(sections: dict[str, Any]) -> dict[str, list[Any]]:
    """Each render setting's checked values, read from its config key (`sweep.seeds`); more than one: an axis."""
    return {s.name: s.check(getattr(sections[s.section], s.field), s.key) for s in SETTINGS}


def check_batch_size(value: Any) -> None:
    if value == "auto" or (is_int(value) and value >= 1):
        return
    raise BatchgenError(f"sweep.batch_size: '{value}' is neither 'auto' nor a positive integer")


def weights(value: Any, key: str) -> list[tuple[float, float]]:
    """(unet, text encoder) weights. A weight is a number or {unet: w, text_encoder: w}; a list of them is an axis."""
    out: list[tuple[float, float]] = []
    for v in as_list(value, key):
        if is_number(v):
            out.append((float(v), float(v)))
        elif isinstance(v, dict) and set(v) == {"unet", "text_encoder"} and all(is_number(x) for x in v.values()):
            out.append((float(v["unet"]), float(v["text_encoder"])))
        else:
            raise BatchgenError(
                f"{key}: weight '{v}' is not a number; write a number, a list of numbers, "
                "or {unet: w, text_encoder: w}"
            )
    for pair in out:
        for w in pair:
            if not -MAX_WEIGHT <= w <= MAX_WEIGHT:  # also refuses nan and inf
                raise BatchgenError(
                    f"{key}: weight {format_number(w)} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; LoRA weights are "
                    "usually between -2 and 2"
                )
    return out
