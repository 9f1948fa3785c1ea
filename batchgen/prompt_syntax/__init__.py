"""Prompt syntaxes: how a prompt's text becomes what the text encoder conditions on, per sampler step.

Pure text processing (no torch): the planner uses it for job ids and config checks, the engine for encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchgen.errors import BatchgenError
from batchgen.prompt_syntax import a1111

SYNTAXES = ("a1111", "compel", "plain")

# Any of these may be compel syntax (weights, +/-, quoted blends, escapes; .blend( and .and( contain '(').
_COMPEL_CHARS = frozenset('()[]+-"\\')


@dataclass(frozen=True)
class Phase:
    until: int  # A1111's end_at_step: this phase conditions every 0-based sampler step index <= until
    fragments: tuple[tuple[str, float], ...]  # (text, weight); ("BREAK", -1.0) ends a 75-token chunk


def _known(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise BatchgenError(f"prompt syntax {syntax!r} is not one of {', '.join(SYNTAXES)}")


def phases(text: str, syntax: str, steps: int) -> tuple[Phase, ...]:
    """The prompt's conditioning per step range; compel and plain text pass through whole (compel parses later)."""
    _known(syntax)
    if syntax != "a1111":
        return (Phase(steps, ((text, 1.0),)),)
    result: list[Phase] = []
    for until, scheduled in a1111.schedules(text, steps):
        fragments = tuple(a1111.attention(scheduled))
        if result and result[-1].fragments == fragments:
            result[-1] = Phase(until, fragments)  # same conditioning: one phase, ending at the later step
        else:
            result.append(Phase(until, fragments))
    return tuple(result)


def plain_text(text: str, syntax: str, steps: int) -> str | None:
    """The text a plain encoder reads when the prompt needs no weights, BREAK or schedule, else None."""
    _known(syntax)
    if syntax == "plain":
        return text
    if syntax == "compel":
        return None if _COMPEL_CHARS.intersection(text) or ".blend(" in text or ".and(" in text else text
    only = phases(text, syntax, steps)
    if len(only) == 1 and len(only[0].fragments) == 1 and only[0].fragments[0][1] == 1.0:
        return only[0].fragments[0][0]
    return None


def id_part(text: str, syntax: str, steps: int) -> str | dict:
    """What a job id hashes for this text: the plain text when there is one (so ids without syntax never change)."""
    plain = plain_text(text, syntax, steps)
    if plain is not None:
        return plain
    if syntax == "compel":
        return {"syntax": "compel", "text": text}
    return {
        "syntax": "a1111",
        "phases": [[p.until, [[t, w] for t, w in p.fragments]] for p in phases(text, syntax, steps)],
    }


def check(text: str, syntax: str, where: str) -> list[str]:
    """Raise BatchgenError for input batchgen refuses under this syntax; return warnings for probable mistakes."""
    _known(syntax)
    return a1111.check(text, where) if syntax == "a1111" else []
