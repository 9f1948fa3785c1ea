"""LoRA names with glob characters: the training epochs of one LoRA, found per model, in training order.

kohya's trainer saves `name-000004.safetensors`, `name-000008.safetensors`, ... and the final `name.safetensors`;
a stack entry `name-*` stands for all of them. Pure: fnmatch on the names a model's LoRA folders hold.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from batchgen.spec import LoraFile

GLOB_CHARS = frozenset("*?[")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last number in a name


def is_glob(name: str) -> bool:
    return any(c in GLOB_CHARS for c in name)


def final_name(pattern: str) -> str:
    """The un-suffixed final file a pattern's epochs lead to: `mylora-*` -> `mylora`."""
    cut = min(i for i, c in enumerate(pattern) if c in GLOB_CHARS)
    return pattern[:cut].rstrip("-_. ")


def matching(pattern: str, names: Iterable[str]) -> list[str]:
    """Names the pattern matches (case-sensitively, as the files are named), plus its final file."""
    final = final_name(pattern)
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or (final and n == final)]


def epoch_order(files: Iterable[LoraFile]) -> list[LoraFile]:
    """Training order: kohya's ss_epoch, then ss_steps, then the last number in the name, then the name; a file
    that lacks one sorts after those that have it."""

    def key(f: LoraFile) -> tuple:
        number = _NUMBER.search(f.name)
        parts = (f.epoch, f.steps, int(number.group(1)) if number else None)
        return (*((p is None, p or 0) for p in parts), f.name)

    return sorted(files, key=key)


def epoch_label(f: LoraFile, pattern: str) -> str:
    """`mylora e4 (760 steps)` from the file's metadata; the file name where it has none."""
    name = final_name(pattern) or f.name
    if f.epoch is None and f.steps is None:
        return f.name
    epoch = f" e{f.epoch}" if f.epoch is not None else ""
    steps = f" ({f.steps} steps)" if f.steps is not None else ""
    return f"{name}{epoch}{steps}"
