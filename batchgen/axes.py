"""Grid axis names (`sweep.grid.x/y/z`): which exist, how they are checked, and how a weight axis reads a row.

Shared by the planner, which rejects a bad axis before anything renders, and the report, which draws the grids
from a manifest; no pandas, PIL or torch here so both can import it cheaply.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence

from batchgen.errors import BatchgenError
from batchgen.settings import GRID_AXES

# `epoch`: the file a LoRA glob matched (manifest column of that name). Then the prompt slots and weight:LORA.
BASE_AXES = ("model", "stack", "prompt", *GRID_AXES, "epoch")
WEIGHT_PREFIX = "weight:"  # `weight:ink`: the weight of LoRA `ink` across every stack that has it
BLOCKS_PREFIX = "blocks:"  # `blocks:ink`: the block weights (LoRA Block Weight preset or vector) of LoRA `ink`
LBW = ":lbw="  # how a `loras` cell entry carries block weights: `ink:0.8:lbw=OUTD`
_COUNT = {2: "two", 3: "three"}


def weight_lora(axis: str | None) -> str | None:
    """`ink` for the axis `weight:ink`, else None."""
    if axis and axis.startswith(WEIGHT_PREFIX):
        return axis[len(WEIGHT_PREFIX) :]
    return None


def blocks_lora(axis: str | None) -> str | None:
    """`ink` for the axis `blocks:ink`, else None."""
    if axis and axis.startswith(BLOCKS_PREFIX):
        return axis[len(BLOCKS_PREFIX) :]
    return None


def lora_names(loras_cells: Iterable[str]) -> list[str]:
    """Sorted LoRA names in manifest `loras` cells (`ink:0.5;grain:0.6`)."""
    names = set()
    for cell in loras_cells:
        for entry in (cell or "").split(";"):
            if entry:
                names.add(entry.split(":", 1)[0])
    return sorted(names)


def with_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """A prompt with LoRA trigger words before it (the text the encoder reads)."""
    return ", ".join([*words, prompt])


def without_trigger_words(prompt: str, lora_triggers: str) -> str:
    """The prompt as written, from a manifest row's `prompt` and `lora_triggers` (`ink:ink drawing;...`): on the
    prompt axis, the same prompt under stacks with and without trigger words is one row of a grid."""
    words = [entry.split(":", 1)[1] for entry in (lora_triggers or "").split(";") if ":" in entry]
    prefix = with_trigger_words("", words)
    return prompt[len(prefix) :] if words and prompt.startswith(prefix) else prompt


def choices(slots: Sequence[str], loras: Sequence[str]) -> list[str]:
    return [
        *BASE_AXES,
        *(s for s in slots if s not in BASE_AXES),
        *(f"{WEIGHT_PREFIX}{name}" for name in sorted(loras)),
        *(f"{BLOCKS_PREFIX}{name}" for name in sorted(loras)),
    ]


def check_grid(x: str, y: str, z: str | None, slots: Sequence[str], loras: Sequence[str]) -> None:
    """Raise a one-line BatchgenError naming the key when an axis is unknown or two axes are the same."""
    axes = choices(slots, loras)
    given = {"x": x, "y": y, "z": z or None}
    for key, value in given.items():
        if value is None and key == "z":
            continue
        if value not in axes:
            close = difflib.get_close_matches(str(value), axes, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BatchgenError(f"sweep.grid.{key}: unknown axis '{value}'{hint}; choose one of: {', '.join(axes)}")
    named = [(key, value) for key, value in given.items() if value]
    for i, (key, value) in enumerate(named):
        for other, other_value in named[i + 1 :]:
            if value == other_value:
                raise BatchgenError(
                    f"sweep.grid: {key} and {other} are both '{value}'; choose {_COUNT[len(named)]} different axes"
                )


def title(axis: str) -> str:
    """How an axis is named on a grid: `ink weight` for `weight:ink`, `ink blocks` for `blocks:ink`, else the
    axis itself."""
    if (name := weight_lora(axis)) is not None:
        return f"{name} weight"
    if (name := blocks_lora(axis)) is not None:
        return f"{name} blocks"
    return axis


def lora_entries(loras_cell: str) -> list[tuple[str, str, str]]:
    """(name, weight, block weights) per entry of a `loras` cell."""
    out = []
    for entry in (loras_cell or "").split(";"):
        if ":" in entry:
            entry, _, blocks = entry.partition(LBW)
            name, weight = entry.split(":", 1)
            out.append((name, weight, blocks))
    return out


def _pairs(loras_cell: str) -> list[tuple[str, str]]:
    return [(name, weight) for name, weight, _ in lora_entries(loras_cell)]


def weight_label(loras_cell: str, name: str) -> str:
    """`ink 0.5` when the row's stack has LoRA `ink`, `no ink` when it does not."""
    for lora, weight in _pairs(loras_cell):
        if lora == name:
            return f"{name} {weight}"
    return f"no {name}"


def blocks_label(loras_cell: str, name: str) -> str:
    """`ink OUTD` (its preset or vector), `ink` without block weights, `no ink` when the stack lacks it."""
    for lora, _, blocks in lora_entries(loras_cell):
        if lora == name:
            return f"{name} {blocks}" if blocks else name
    return f"no {name}"


def weight_sort_key(label: str) -> tuple[int, float, str]:
    """`no ink` first, then by weight (the unet weight of a split `unet/te` weight), then as text."""
    if label.startswith("no "):
        return (0, 0.0, label)
    value = label.rsplit(" ", 1)[-1]
    try:
        return (1, float(value.split("/", 1)[0]), label)
    except ValueError:
        return (2, 0.0, label)


def stack_label(loras_cell: str, without: Iterable[str] = (), without_blocks: Iterable[str] = ()) -> str:
    """The planner's stack label (`ink 0.5 + grain 0.6`, `none`) from a `loras` cell, leaving out some LoRAs
    (their weight is on an axis) and some LoRAs' block weights (those are on an axis)."""
    skip, plain = set(without), set(without_blocks)
    parts = [
        f"{lora} {weight}" + (f" lbw={blocks}" if blocks and lora not in plain else "")
        for lora, weight, blocks in lora_entries(loras_cell)
        if lora not in skip
    ]
    return " + ".join(parts) if parts else "none"


def check_max_megapixels(value: object) -> float:
    """The grid size guard as a float; a one-line BatchgenError when it is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BatchgenError(f"report.max_grid_megapixels: {value!r} is not a positive number of megapixels; try 64")
    return float(value)
