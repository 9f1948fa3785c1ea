"""The text of every manifest cell that holds more than one value, written and read back here only: `loras` (and
the stack labels made from it), `embeddings`, `lora_triggers`, `timings` and `degenerate` (and the join of `epoch`);
plus how any value becomes a cell.

The planner writes these cells, the engine's writer and PNG parameters read and write them, the runner and the
report read them back, from manifests of any age. Pure: no pandas, PIL or torch. A cell of a table read back may
be blank or NaN: every reader takes any value and reads a non-string as an empty cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from batchgen.spec import STAGES, format_number

SEP = ";"  # between the entries of a list cell
LBW = ":lbw="  # how a `loras` entry carries block weights, as the LoRA Block Weight extension's tag writes them
NO_LORAS = "none"  # the stack label of a state without LoRAs
JOIN = " + "  # between the parts of a label, and the files of an `epoch` cell
NOT_DEGENERATE = "no"


def cell_text(cell: object) -> str:
    # Cells of a table read back with blanks, or a plan's slot that a prompt does not use (NaN): no text.
    return cell if isinstance(cell, str) else ""


def format_value(value: Any) -> str:
    """Any cell as the manifest writes it: a float as repr (`7.5`, `1.0`), nothing for None or NaN (a slot that a
    prompt does not use is NaN in the plan's table; written as "nan" it became a slot value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(value)
    return str(value)


# --- loras: `name:weight` entries joined by `;`, sorted by name; a split weight `name:unet/te`; `:lbw=OUTD` ----------


class _Weighted(Protocol):
    """A LoRA with its weights (batchgen.spec.LoraWeight)."""

    name: str
    unet: float
    text_encoder: float
    blocks_spec: str


@dataclass(frozen=True)
class LoraEntry:
    """One entry of a `loras` cell, its weights and block weights as the cell writes them (labels show that text)."""

    name: str
    weight: str  # `0.5`, or `unet/te` for a split weight
    blocks: str = ""  # the block weights' preset or vector (`OUTD`, `1,0,0,...`); "" for none

    @classmethod
    def of(cls, lora: _Weighted) -> LoraEntry:
        weight = format_number(lora.unet)
        if lora.unet != lora.text_encoder:
            weight = f"{weight}/{format_number(lora.text_encoder)}"
        return cls(lora.name, weight, lora.blocks_spec)

    @property
    def text(self) -> str:
        entry = f"{self.name}:{self.weight}"
        return f"{entry}{LBW}{self.blocks}" if self.blocks else entry

    @property
    def unet_weight(self) -> str:
        return self.weight.partition("/")[0]

    @property
    def te_weight(self) -> str:
        """The text encoder's weight of a split weight; "" when it is the UNet's."""
        return self.weight.partition("/")[2]

    @property
    def weights(self) -> tuple[float, ...]:
        """Every weight the entry gives: (w,) or (unet, te)."""
        return tuple(float(w) for w in self.weight.split("/"))


def format_loras(loras: Iterable[_Weighted | LoraEntry]) -> str:
    return SEP.join((lora if isinstance(lora, LoraEntry) else LoraEntry.of(lora)).text for lora in loras)


def parse_loras(cell: object) -> tuple[LoraEntry, ...]:
    out = []
    for entry in cell_text(cell).split(SEP):
        if ":" in entry:
            entry, _, blocks = entry.partition(LBW)
            name, weight = entry.split(":", 1)
            out.append(LoraEntry(name, weight, blocks))
    return tuple(out)


def lora_names(cells: Iterable[object]) -> list[str]:
    """Sorted LoRA names in `loras` cells."""
    return sorted({entry.name for cell in cells for entry in parse_loras(cell)})


# --- stack labels: a LoRA state in words (`ink 0.5 + grain 0.6 lbw=OUTD`, `none`) ------------------------------------


def lora_label(name: str, weight: str = "", blocks: str = "") -> str:
    """What a label says of one LoRA: `ink 0.5`, `ink 0.5 lbw=OUTD`, `ink lbw=OUTD`, `ink`; with no name, the
    weight alone (`0.5 lbw=OUTD`)."""
    words = " ".join(part for part in (name, weight) if part)
    return f"{words} lbw={blocks}" if blocks else words


def absent_label(name: str) -> str:
    return f"no {name}"


def stack_label(loras: object, without: Iterable[str] = (), without_blocks: Iterable[str] = ()) -> str:
    """A LoRA state by its content (`ink 0.5 + grain 0.6`, `none`), from a `loras` cell or its entries, leaving out
    some LoRAs (their weight is on a grid axis) and some LoRAs' block weights (those are on an axis). What the
    PNG's JSON chunk names a stack, and what the manifest's `stack` held before it held the sweep's key."""
    entries = loras if isinstance(loras, tuple | list) else parse_loras(loras)
    skip, plain = set(without), set(without_blocks)
    parts = [
        lora_label(entry.name, entry.weight, "" if entry.name in plain else entry.blocks)
        for entry in entries
        if entry.name not in skip
    ]
    return JOIN.join(parts) if parts else NO_LORAS


# --- embeddings: the triggers a job uses, joined by `;` --------------------------------------------------------------


def format_names(names: Iterable[str]) -> str:
    return SEP.join(names)


def parse_names(cell: object) -> tuple[str, ...]:
    return tuple(name for name in cell_text(cell).split(SEP) if name)


# --- lora_triggers: `name:words` pairs joined by `;`: what was put before the prompt for the job's LoRAs -------------


def format_triggers(pairs: Iterable[tuple[str, str]]) -> str:
    return SEP.join(f"{name}:{words}" for name, words in pairs)


def parse_triggers(cell: object) -> tuple[tuple[str, str], ...]:
    pairs = []
    for entry in cell_text(cell).split(SEP):
        if ":" in entry:
            name, words = entry.split(":", 1)
            pairs.append((name, words))
    return tuple(pairs)


# --- timings: seconds per render stage, `load=0.1234;patch=...`, in the order a render passes them -------------------


def format_timings(timings: Mapping[str, float]) -> str:
    return SEP.join(f"{stage}={timings[stage]:.4f}" for stage in STAGES if stage in timings)


def parse_timings(cell: object) -> dict[str, float]:
    """Stage -> seconds; a part that does not read as `stage=seconds` (a hand-edited cell) is left out."""
    out: dict[str, float] = {}
    for part in filter(None, cell_text(cell).split(SEP)):
        stage, _, seconds = part.partition("=")
        try:
            out[stage] = float(seconds)
        except ValueError:
            continue
    return out


def in_stage_order(totals: Mapping[str, float]) -> dict[str, float]:
    """Per-stage figures in render order, stages batchgen no longer has after them by name."""
    return {stage: totals[stage] for stage in (*STAGES, *sorted(set(totals) - set(STAGES))) if stage in totals}


# --- degenerate: `no`, or why the image is unusable (`flat;clipped`); empty while not measured -----------------------


def format_degenerate(reasons: Iterable[str]) -> str:
    return SEP.join(reasons) or NOT_DEGENERATE


def parse_degenerate(cell: object) -> tuple[str, ...]:
    """The reasons; none for an image that is fine or not measured."""
    return () if cell_text(cell) == NOT_DEGENERATE else parse_names(cell)


def is_degenerate(cell: object) -> bool:
    """Measured and found unusable."""
    return cell_text(cell) not in ("", NOT_DEGENERATE)


# --- codecs: how each kind of cell is written and read (batchgen.columns names one per column) -----------------------


@dataclass(frozen=True)
class Codec:
    name: str
    format: Callable[[Any], str]
    parse: Callable[[object], Any]


TEXT = Codec("text", format_value, cell_text)  # a plain cell: text, or a number as format_value writes it
LORAS = Codec("loras", format_loras, parse_loras)
NAMES = Codec("names", format_names, parse_names)
TRIGGERS = Codec("triggers", format_triggers, parse_triggers)
TIMINGS = Codec("timings", format_timings, parse_timings)
DEGENERATE = Codec("degenerate", format_degenerate, parse_degenerate)
