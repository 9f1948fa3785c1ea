"""Command-line keys checked against the schema before Hydra composes them.

Hydra accepts `+sweep.seed=3` (an appended key the schema then ignores) and answers `sweep.seed=3` with advice to
append. Appending is meant only under mappings the user fills (stacks, slots, models, LoRA triggers, block
presets, the executor's own keys); anywhere else a key not in the schema is a typo, named with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from batchgen.config.schema import Config
from batchgen.errors import BatchgenError

# Top-level names that are config groups: `+sweep=styles`, `executor=ray`, `model@models.x=...` select files.
GROUPS = ("sweep", "executor", "model")


def check_override_key(key: str, line: str) -> None:
    """`key` (without +/~) of the override `line`: exit 2 naming the first part the schema does not have."""
    if "@" in key or key.startswith("hydra.") or key in GROUPS:
        return
    node: Any = Config
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(node, _UserKeys):  # models.NAME: any name, then that model's fields
            walked.append(part)
            node = node.value
            continue
        fields = _fields(node)
        if fields is None:  # a mapping or Any: keys below are the user's own
            return
        if part not in fields:
            where = ".".join(walked) or "the config"
            close = difflib.get_close_matches(part, sorted(fields), n=1, cutoff=0.6)
            advice = f"did you mean '{close[0]}'?" if close else f"its keys are {', '.join(fields)}"
            raise BatchgenError(f"override '{line}': {where} has no key '{part}'; {advice}")
        walked.append(part)
        node = _mapped(fields[part])


def _fields(node: Any) -> dict[str, Any] | None:
    if dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(node)
        return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(node)}
    return None


def _mapped(annotation: Any) -> Any:
    """The type a key's value has; for dict[str, X] with X a dataclass, the X under each user key."""
    origin = typing.get_origin(annotation)
    if origin is dict:
        value = typing.get_args(annotation)[1]
        return _UserKeys(value) if dataclasses.is_dataclass(value) else dict
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else Any
    return annotation


@dataclasses.dataclass(frozen=True)
class _UserKeys:
    """`models.NAME`: any NAME, then the fields of the value's dataclass."""

    value: Any
