"""A table's LoRA states and prompts as grids label them (`batchgen.axes`), so that grids, index.html, diff and
check name a job alike, for a run's own table and for a manifest read back, old ones included."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from batchgen.axes import prompt_tags, state_labels, without_trigger_words
from batchgen.cells import cell_text
from batchgen.columns import MANIFEST_COLUMNS, PNG_STACK

# The cells a label reads, besides the prompt slots.
_LABEL_CELLS = ("stack", "loras", "epoch", "prompt", "prompt_template", "lora_triggers")


def stack_labels(table: pd.DataFrame, on_grid: Sequence[str] = ()) -> pd.Series:
    """The label of each row's stack state; `on_grid`: the axes and title keys of its grid, which the label does
    not repeat."""
    records, codes = distinct_rows(table)
    labels = state_labels(records, slot_names(table), on_grid)
    return pd.Series([labels[code] for code in codes], index=table.index, dtype=object)


def prompt_labels(table: pd.DataFrame) -> pd.Series:
    """Each row's prompt as written: without the LoRA trigger words batchgen put before it (so that it is one row
    across stacks with and without them), with the `<lora:...>` tags it was written with at its end."""
    slots = slot_names(table)
    records, codes = distinct_rows(table)
    labels = []
    for row in records:
        prompt = without_trigger_words(_text(row.get("prompt")), _text(row.get("lora_triggers")))
        labels.append(" ".join([prompt, *prompt_tags(row, slots)]))
    return pd.Series([labels[code] for code in codes], index=table.index, dtype=object)


def distinct_rows(table: pd.DataFrame) -> tuple[list[dict[str, str]], list[int]]:
    """The table's distinct rows over the cells labels read (as text, which is all a label reads of a cell), and
    each row's index among them. A label depends on its row and on the set of the table's states, never on their
    order or count, so labelling each distinct row once gives every row's label: a sweep of 10,000 jobs has a
    few dozen."""
    columns = [c for c in (*_LABEL_CELLS, *slot_names(table)) if c in table.columns]
    cells = zip(*(table[c].tolist() for c in columns), strict=True) if columns else [()] * len(table)
    found: dict[tuple[str, ...], int] = {}
    records: list[dict[str, str]] = []
    codes = []
    for values in cells:
        key = tuple(cell_text(v) for v in values)
        code = found.get(key)
        if code is None:
            code = found[key] = len(records)
            records.append(dict(zip(columns, key, strict=True)))
        codes.append(code)
    return records, codes


def slot_names(table: pd.DataFrame) -> list[str]:
    # A manifest's columns beyond its fixed ones are its prompt slots, whose values may hold <lora:...> tags.
    return [c for c in table.columns if c not in MANIFEST_COLUMNS and c != PNG_STACK]


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
