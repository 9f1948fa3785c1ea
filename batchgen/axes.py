"""Grid axis names (`sweep.grid.x/y/z`): which exist, how they are checked, and how a weight or stack axis reads a
row (the one place that decides what a LoRA state's label says; its words come from batchgen.cells).

Shared by the planner, which rejects a bad axis before anything renders, and the report, which draws the grids
from a manifest; no pandas, PIL or torch here so both can import it cheaply.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from batchgen.cells import (
    JOIN,
    LoraEntry,
    absent_label,
    cell_text,
    lora_label,
    parse_loras,
    parse_triggers,
    stack_label,
)
from batchgen.errors import BatchgenError
from batchgen.settings import GRID_AXES
from batchgen.spec import REFERENCE_STACK

# `epoch`: the file a LoRA glob matched (manifest column of that name). Then the prompt slots and weight:LORA.
BASE_AXES = ("model", "stack", "prompt", *GRID_AXES, "epoch")
WEIGHT_PREFIX = "weight:"  # `weight:ink`: the weight of LoRA `ink` across every stack that has it
BLOCKS_PREFIX = "blocks:"  # `blocks:ink`: the block weights (LoRA Block Weight preset or vector) of LoRA `ink`
# A1111's extra-network tag: <lora:name>, <lora:name:w>, <lora:name:te_w:unet_w>, <lora:name:te=w:unet=w>. The
# planner reads weights out of it; a stack's label shows it as written.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*)*)>")
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


def with_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """A prompt with LoRA trigger words before it (the text the encoder reads)."""
    return ", ".join([*words, prompt])


def without_trigger_words(prompt: str, lora_triggers: str) -> str:
    """The prompt as written, from a manifest row's `prompt` and `lora_triggers` (`ink:ink drawing;...`): on the
    prompt axis, the same prompt under stacks with and without trigger words is one row of a grid."""
    words = [words for _, words in parse_triggers(lora_triggers)]
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


def weight_label(loras_cell: str, name: str) -> str:
    """`ink 0.5` when the row's stack has LoRA `ink`, `no ink` when it does not."""
    for entry in parse_loras(loras_cell):
        if entry.name == name:
            return lora_label(name, entry.weight)
    return absent_label(name)


def blocks_label(loras_cell: str, name: str) -> str:
    """`ink OUTD` (its preset or vector), `ink` without block weights, `no ink` when the stack lacks it."""
    for entry in parse_loras(loras_cell):
        if entry.name == name:
            return lora_label(name, entry.blocks)  # the vector where a weight label has the weight: the title says it
    return absent_label(name)


def weight_sort_key(label: str) -> tuple[int, float, str]:
    """`no ink` first, then by weight (the unet weight of a split `unet/te` weight), then as text."""
    if label.startswith(absent_label("")):
        return (0, 0.0, label)
    value = label.rsplit(" ", 1)[-1]
    try:
        return (1, float(value.split("/", 1)[0]), label)
    except ValueError:
        return (2, 0.0, label)


def prompt_tags(row: Mapping[str, object], slots: Iterable[str]) -> tuple[str, ...]:
    """The `<lora:...>` tags a row's prompt was written with, as written: its template's, then its slot values'."""
    texts = [cell_text(row.get("prompt_template")), *(cell_text(row.get(s)) for s in slots)]
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
        stack, loras = cell_text(row.get("stack")), cell_text(row.get("loras"))
        # Tagged prompts apply more than their stack: its states there are told apart among themselves.
        group = (stack, prompt_tags(row, slots))
        state = (loras, cell_text(row.get("epoch")))
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
        label if label is not None else JOIN.join([heads[group][state], *(group[1] if tags else ())])
        for label, (group, state) in zip(fixed, keys, strict=True)
    ]


def _heads(
    stack: str, states: list[tuple[str, str]], weights: set[str], blocks: set[str], epoch_shown: bool
) -> dict[tuple[str, str], str]:
    """(loras, epoch) -> label, for the states of one stack: its key, plus what differs between its states."""
    if len(states) == 1:
        return {states[0]: stack}
    entries = [{e.name: e for e in parse_loras(loras)} for loras, _ in states]
    common = set.intersection(*(set(e) for e in entries))
    # A glob's files differ from one state to the next and its epoch names them (their weights follow it). Any
    # other LoRA that comes and goes (a stack changed between two runs into one folder) is `no NAME` where missing.
    globbed = any(epoch for _, epoch in states)
    names = sorted(common if globbed else set().union(*entries))
    show_weight = {n for n in names if n not in weights and len({_weight_of(e.get(n)) for e in entries}) > 1}
    show_blocks = {n for n in names if n not in blocks and len({_blocks_of(e.get(n)) for e in entries}) > 1}
    globs = [
        (
            epoch if not epoch_shown else "",
            JOIN.join(lora_label("", e[n].weight, e[n].blocks) for n in sorted(set(e) - common)),
        )
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
            heads[state] = JOIN.join(parts)  # `ink 0.5`, not `ink: ink 0.5`
        else:
            heads[state] = f"{stack}: {JOIN.join(parts)}"
    return heads


def _part(name: str, entry: LoraEntry | None, weight: bool, blocks: bool) -> str:
    """What a label says of one LoRA of a stack: only what varies (`ink 0.5`, `ink lbw=OUTD`), `no ink`."""
    if not (weight or blocks):
        return ""
    if entry is None:
        return absent_label(name)
    return lora_label(name, entry.weight if weight else "", entry.blocks if blocks else "")


def _weight_of(entry: LoraEntry | None) -> str:
    return entry.weight if entry is not None else ""


def _blocks_of(entry: LoraEntry | None) -> str:
    return entry.blocks if entry is not None else ""


def check_max_megapixels(value: object) -> float:
    """The grid size guard as a float; a one-line BatchgenError when it is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BatchgenError(f"report.max_grid_megapixels: {value!r} is not a positive number of megapixels; try 64")
    return float(value)
