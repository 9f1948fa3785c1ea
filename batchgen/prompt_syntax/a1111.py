"""AUTOMATIC1111 webui's prompt syntax, read exactly as the webui reads it (modules/prompt_parser.py, current version).

Two stages, as in the webui: `schedules` resolves prompt editing (`[from:to:when]`) and alternation (`[a|b]`) into one
text per step range, then `attention` turns each of those texts into (text, weight) pieces. Weights are computed in
the webui's order of multiplication so the floats come out bit-identical (1.1 * 1.1 * 1.3 == 1.5730000000000004).
"""

from __future__ import annotations

import functools
import re

from batchgen.errors import BatchgenError

ROUND = 1.1
SQUARE = 1 / 1.1
BREAK = ("BREAK", -1.0)

# One alternative per token kind, tried in this order (the order decides, e.g. `\\` before `\`, and `:w)` before `:`).
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]             # escaped bracket or backslash: the character itself
    | \\                     # a lone backslash (dropped, as the webui does)
    | [(\[]                  # opener
    | :\s*([+-]?[.\d]+)\s*\) # ':weight)' closes a round bracket with that weight
    | [)\]]                  # closer
    | [^\\()\[\]:]+          # plain text
    | :                      # a colon that is not a weight: text
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_AND = re.compile(r"\bAND\b")
# The webui splits every positive prompt on AND, then strips a trailing ':number' off each part as that part's
# composable-diffusion weight; this finds such a weight at the end of the whole prompt.
_TRAILING_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")
# lark's common.SIGNED_NUMBER, the `when` of a scheduled edit.
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")


def _weight(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        # The webui crashes on these (float('1.2.3')); refuse them instead.
        raise BatchgenError(f"prompt weight ':{token})' is not a number; write e.g. (word:1.2)") from None


def attention(text: str) -> list[tuple[str, float]]:
    """The webui's parse_prompt_attention: (text, weight) pieces, ("BREAK", -1.0) between 75-token chunks."""
    pieces: list[list] = []  # [text, weight], mutable so open brackets can scale what they cover
    rounds: list[int] = []  # index into pieces where each open '(' starts
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])  # a lone backslash comes out empty: the webui drops it
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            scale(rounds.pop(), _weight(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            # Stray closers, unmatched ':w)' and plain text alike; BREAK is found only here, so a BREAK inside
            # brackets gets scaled with them (the webui then reads it as the word, its weight no longer -1).
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    # Unclosed openers scale everything after them, innermost first, as the webui does.
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not pieces:
        return [("", 1.0)]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# The webui's schedule grammar, restated. The language must be exactly the webui's, and so must the parse lark's
# Earley parser picks when the grammar is ambiguous (stray brackets at the top level make it so), so the rules keep
# the webui's shape and order: anything else risks a different tree for prompts like '((a][:b:c [d:3]'.
_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
           | "(" prompt ":" prompt ")"
           | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@functools.cache
def _parser():
    import lark  # only prompts with schedule syntax pay for building the parser

    return lark.Lark(_GRAMMAR)


def _parse(text: str):
    """The parse tree, or the lark error that makes the webui leave the prompt unscheduled."""
    import lark

    try:
        return _parser().parse(text), None
    except lark.exceptions.LarkError as e:
        return None, e


def _boundary(number: str, steps: int) -> int:
    """A `when` as a step: with a '.' it is a fraction of the steps, else a step number; never past the last step."""
    value = float(number)
    return min(steps, int(value * steps if "." in number else value))


def _walk(tree, kind: str):
    """Every subtree named `kind`, chosen branch or not (the webui collects steps from all of them)."""
    for sub in tree.iter_subtrees():
        if sub.data == kind:
            yield sub


def _text_at(node, step: int, steps: int, out: list[str]) -> None:
    if node is None:
        return
    if isinstance(node, str):  # lark Token is a str
        out.append(str(node))
        return
    if node.data == "scheduled":
        before, after, _, number, _ = node.children
        _text_at(before if step <= _boundary(number, steps) else after, step, steps, out)
    elif node.data == "alternate":
        options = node.children
        _text_at(options[(step - 1) % len(options)], step, steps, out)
    else:
        for child in node.children:
            _text_at(child, step, steps, out)


@functools.lru_cache(maxsize=4096)
def _schedules(text: str, steps: int) -> tuple[tuple[int, str], ...]:
    # Without '[' and ':' or '|' no edit or alternation can occur and the parse would give back the text; skipping
    # it matters because the webui's Earley parse grows steeply with the number of brackets.
    maybe = "[" in text and (":" in text or "|" in text)
    tree, _ = _parse(text) if maybe else (None, None)
    if tree is None:  # nothing to schedule, or the grammar cannot read it: one text for every step
        return ((steps, text),)
    ends = {steps}
    for node in _walk(tree, "scheduled"):
        end = _boundary(node.children[3], steps)
        if end >= 1:
            ends.add(end)
    if any(True for _ in _walk(tree, "alternate")):
        ends.update(range(1, steps + 1))
    result = []
    for end in sorted(ends):
        out: list[str] = []
        _text_at(tree, end, steps, out)
        result.append((end, "".join(out)))
    return tuple(result)


def schedules(text: str, steps: int) -> list[tuple[int, str]]:
    """The webui's get_learned_conditioning_prompt_schedules for one prompt: (end_at_step, text) entries."""
    return list(_schedules(text, steps))


def _edits(text: str):
    """(inner text, top-level ':'-separated parts) of every [...] group, escapes skipped, nested groups included."""
    opens: list[int] = []
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if token == "[":
            opens.append(m.end())
        elif token == "]" and opens:
            start = opens.pop()
            inner = text[start : m.start()]
            yield inner, _top_level_parts(inner)


def _top_level_parts(inner: str) -> list[str]:
    parts, depth, last = [], 0, 0
    for m in _TOKEN.finditer(inner):
        token = m.group(0)
        if token in ("(", "["):
            depth += 1
        elif token in (")", "]") or m.group(1) is not None:
            depth = max(0, depth - 1)
        elif token == ":" and depth == 0:
            parts.append(inner[last : m.start()])
            last = m.end()
    parts.append(inner[last:])
    return parts


def _brackets(text: str) -> list[tuple[int, str, str]]:
    """(position, character, effect) of every bracket the attention stage reads as unbalanced."""
    found = []
    open_at: dict[str, list[int]] = {"(": [], "[": []}
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if token in open_at:
            open_at[token].append(m.start())
        elif token in (")", "]") or m.group(1) is not None:
            stack = open_at["[" if token == "]" else "("]
            if stack:
                stack.pop()
            else:
                at = m.end() - 1
                found.append((at, text[at], "kept as text"))
    for ch, factor in (("(", "1.1"), ("[", "1/1.1")):
        found += [(at, ch, f"the rest of the prompt is weighted {factor}") for at in open_at[ch]]
    return sorted(found)


def check(text: str, where: str) -> list[str]:
    """Raise BatchgenError for what batchgen refuses; return one warning line per probable mistake."""
    if _AND.search(text):
        raise BatchgenError(
            f"{where}: AND (A1111's composable diffusion) is not supported; write the parts as one prompt, "
            "or as separate prompts"
        )
    trailing = _TRAILING_WEIGHT.search(text)
    if trailing:
        raise BatchgenError(
            f"{where}: a trailing ':{trailing.group(1)}' is A1111's composable-diffusion weight (it scales the "
            f"guidance, not the words), which is not supported; write (words:{trailing.group(1)}) to weight words"
        )
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            _weight_or_fail(m.group(1), where)
    for inner, parts in _edits(text):
        when = parts[-1].strip()
        number = _NUMBER.fullmatch(when)
        negative = number is not None and float(when) < 0
        # Two parts with a non-number is bracketed text to the webui ('[word:x]' = 'word:x' weighted 1/1.1).
        if negative or (len(parts) >= 3 and number is None):
            raise BatchgenError(
                f"{where}: prompt editing [{inner}] needs a step number or a fraction of the steps after the last "
                "':' (e.g. [from:to:10] or [from:to:0.5])"
            )
    warnings = [
        f"{where}: unbalanced '{ch}' at character {at}; read as A1111 does ({effect})"
        for at, ch, effect in _brackets(text)
    ]
    if any(t == BREAK[0] and w != BREAK[1] for t, w in attention(text)):
        warnings.append(
            f"{where}: BREAK inside brackets is read by A1111 as the word 'BREAK', not as a chunk break; "
            "move it out of the brackets"
        )
    if "[" in text and (":" in text or "|" in text):
        _, error = _parse(text)
        if error is not None:
            warnings.append(
                f"{where}: A1111's schedule grammar cannot read this prompt{_error_place(error)}, so none of its "
                "[from:to:when] or [a|b] takes effect: the brackets only weight their text 1/1.1"
            )
    return warnings


def _weight_or_fail(token: str, where: str) -> None:
    try:
        _weight(token)
    except BatchgenError as e:
        raise BatchgenError(f"{where}: {e}") from None


def _error_place(error) -> str:
    column = getattr(error, "pos_in_stream", None)
    char = getattr(error, "char", None)
    if column is None or column < 0:  # lark's UnexpectedEOF
        return " (it ends inside a bracket)"
    return f" (unexpected {char!r} at character {column})" if char is not None else f" (at character {column})"
