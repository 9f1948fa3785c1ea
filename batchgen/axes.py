"""Grid axis names (`sweep.grid.x/y/z`): which exist, how they are checked, and how a weight or stack axis reads a
row (the one place a LoRA state's label is built).

Shared by the planner, which rejects a bad axis before anything renders, and the report, which draws the grids
from a manifest; no pandas, PIL or torch here so both can import it cheaply.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from batchgen.errors import BatchgenError
from batchgen.settings import GRID_AXES
from batchgen.spec import REFERENCE_STACK

# `epoch`: the file a LoRA glob matched (manifest column of that name). Then the prompt slots and weight:LORA.
BASE_AXES = ("model", "stack", "prompt", *GRID_AXES, "epoch")
WEIGHT_PREFIX = "weight:"  # `weight:ink`: the weight of LoRA `ink` across every stack that has it
BLOCKS_PREFIX = "blocks:"  # `blocks:ink`: the block weights (LoRA Block Weight preset or vector) of LoRA `ink`
LBW = ":lbw="  # how a `loras` cell entry carries block weights: `ink:0.8:lbw=OUTD`
# A1111's extra-network tag: <lora:name>, <lora:name:w>, <lora:name:te_w:unet_w>, <lora:name:te=w:unet=w>. The
# planner reads weights out of it; a stack's label shows it as written.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*)*)>")
# A planner table column, never a manifest one: the stack as the PNG's JSON chunk names it, by its content
# (`stack_label`, a glob's files by the glob), as it did before the manifest's `stack` held the sweep's key; so
# a job's PNG bytes do not depend on what the sweep called its stack.
PNG_STACK = "_png_stack"
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


def prompt_tags(row: Mapping[str, object], slots: Iterable[str]) -> tuple[str, ...]:
    """The `<lora:...>` tags a row's prompt was written with, as written: its template's, then its slot values'."""
    texts = [_cell(row.get("prompt_template")), *(_cell(row.get(s)) for s in slots)]
    return tuple(m.group(0) for t in texts for m in LORA_TAG.finditer(t))


def state_labels(
    rows: Iterable[Mapping[str, object]], slots: Iterable[str] = (), on_grid: Iterable[str] = ()
) -> list[str]:
    """The label of each row's LoRA state on a grid, from manifest cells: `stack`, `loras`, `epoch`, and
    `prompt_template` with the row's slot values (where its `<lora:...>` tags are).

    A stack with one state is its key (`ink_grain`); one with several is its key plus what varies between them
    (`ink 0.5`, `ink_out: ink lbw=OUTD`, `epochs: mylora e4 (760 steps)`), less what the grid shows elsewhere
    (`on_grid`, its axes and title keys: `weight:ink`, `blocks:ink`, `epoch`). A prompt's tags follow as written
    (`none + <lora:ink:0.5>`) unless `prompt` is among them and says so itself, so a tagged LoRA never hides
    behind a stack's name. References are `(reference)`; a row whose `stack` is empty or its `loras` as text (a
    manifest from before it held the key) keeps that text.
    """
    shown = list(on_grid)
    weights = {n for a in shown if (n := weight_lora(a)) is not None}
    blocks = {n for a in shown if (n := blocks_lora(a)) is not None}
    slots = list(slots)
    fixed: list[str | None] = []  # the label, or None while it depends on the stack's other states
    keys: list[tuple[tuple[str, tuple[str, ...]], tuple[str, str]]] = []
    groups: dict[tuple[str, tuple[str, ...]], dict[tuple[str, str], None]] = {}
    for row in rows:
        stack, loras = _cell(row.get("stack")), _cell(row.get("loras"))
        # Tagged prompts apply more than their stack: its states there are told apart among themselves.
        group = (stack, prompt_tags(row, slots))
        state = (loras, _cell(row.get("epoch")))
        keys.append((group, state))
        if stack == REFERENCE_STACK:
            fixed.append(stack)  # no LoRA at all: its prompt's tags are not applied either
        elif not stack or stack == stack_label(loras):
            fixed.append(stack_label(loras, weights, blocks))
        else:
            fixed.append(None)
            groups.setdefault(group, {})[state] = None
    heads = {
        group: _heads(group[0], list(found), weights, blocks, "epoch" in shown) for group, found in groups.items()
    }
    tags = "prompt" not in shown
    return [
        label if label is not None else " + ".join([heads[group][state], *(group[1] if tags else ())])
        for label, (group, state) in zip(fixed, keys, strict=True)
    ]


def _heads(
    stack: str, states: list[tuple[str, str]], weights: set[str], blocks: set[str], epoch_shown: bool
) -> dict[tuple[str, str], str]:
    """(loras, epoch) -> label, for the states of one stack: its key, plus what differs between its states."""
    if len(states) == 1:
        return {states[0]: stack}
    entries = [{name: (weight, lbw) for name, weight, lbw in lora_entries(loras)} for loras, _ in states]
    common = set.intersection(*(set(e) for e in entries))
    # A glob's files differ from one state to the next and its epoch names them (their weights follow it). Any
    # other LoRA that comes and goes (a stack changed between two runs into one folder) is `no NAME` where missing.
    globbed = any(epoch for _, epoch in states)
    names = sorted(common if globbed else set().union(*entries))
    show_weight = {n for n in names if n not in weights and len({e.get(n, ("",))[0] for e in entries}) > 1}
    show_blocks = {n for n in names if n not in blocks and len({e.get(n, ("", ""))[1] for e in entries}) > 1}
    globs = [
        (epoch if not epoch_shown else "", " + ".join(_weight(*e[n]) for n in sorted(set(e) - common)))
        for (_, epoch), e in zip(states, entries, strict=True)
    ]
    show_glob = [len({g[i] for g in globs}) > 1 for i in range(2)] if globbed else [False, False]
    heads = {}
    for state, found, glob in zip(states, entries, globs, strict=True):
        parts = [_part(n, found.get(n), n in show_weight, n in show_blocks) for n in names]
        parts.append(" ".join(g for g, show in zip(glob, show_glob, strict=True) if show))
        parts = [p for p in parts if p]
        if not parts:
            heads[state] = stack
        elif parts[0].startswith(f"{stack} "):
            heads[state] = " + ".join(parts)  # `ink 0.5`, not `ink: ink 0.5`
        else:
            heads[state] = f"{stack}: {' + '.join(parts)}"
    return heads


def _part(name: str, entry: tuple[str, str] | None, weight: bool, blocks: bool) -> str:
    """What a label says of one LoRA of a stack: only what varies (`ink 0.5`, `ink lbw=OUTD`), `no ink`."""
    if not (weight or blocks):
        return ""
    if entry is None:
        return f"no {name}"
    text = f"{name} {entry[0]}" if weight else name
    return f"{text} lbw={entry[1]}" if blocks and entry[1] else text


def _weight(weight: str, lbw: str) -> str:
    return f"{weight} lbw={lbw}" if lbw else weight


def _cell(value: object) -> str:
    # Cells of a table read back with blanks, or a plan's slot that a prompt does not use (NaN): no text.
    return value if isinstance(value, str) else ""


def check_max_megapixels(value: object) -> float:
    """The grid size guard as a float; a one-line BatchgenError when it is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BatchgenError(f"report.max_grid_megapixels: {value!r} is not a positive number of megapixels; try 64")
    return float(value)
