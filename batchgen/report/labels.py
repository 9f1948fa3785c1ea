"""A table's LoRA states and prompts as grids label them (`batchgen.axes`), so that grids, index.html, diff and
check name a job alike, for a run's own table and for a manifest read back, old ones included."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from batchgen.axes import prompt_tags, state_labels, without_trigger_words
from batchgen.columns import MANIFEST_COLUMNS, PNG_STACK


def stack_labels(table: pd.DataFrame, on_grid: Sequence[str] = ()) -> pd.Series:
    """The label of each row's stack state; `on_grid`: the axes and title keys of its grid, which the label does
    not repeat."""
    labels = state_labels(table.to_dict("records"), _slots(table), on_grid)
    return pd.Series(labels, index=table.index, dtype=object)


def prompt_labels(table: pd.DataFrame) -> pd.Series:
    """Each row's prompt as written: without the LoRA trigger words batchgen put before it (so that it is one row
    across stacks with and without them), with the `<lora:...>` tags it was written with at its end."""
    slots = _slots(table)
    labels = []
    for row in table.to_dict("records"):
        prompt = without_trigger_words(_text(row.get("prompt")), _text(row.get("lora_triggers")))
        labels.append(" ".join([prompt, *prompt_tags(row, slots)]))
    return pd.Series(labels, index=table.index, dtype=object)


def _slots(table: pd.DataFrame) -> list[str]:
    # A manifest's columns beyond its fixed ones are its prompt slots, whose values may hold <lora:...> tags.
    return [c for c in table.columns if c not in MANIFEST_COLUMNS and c != PNG_STACK]


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
