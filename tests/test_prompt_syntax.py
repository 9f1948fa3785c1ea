"""batchgen.prompt_syntax: A1111's prompt syntax read exactly as the webui reads it, and the per-syntax API."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchgen.errors import BatchgenError
from batchgen.prompt_syntax import SYNTAXES, Phase, a1111, check, id_part, phases, plain_text

# --- attention: the webui's parse_prompt_attention doctests (identical in the old and the current prompt_parser.py)
A1111_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

MORE_ATTENTION = [
    ("", [("", 1.0)]),
    ("[x]", [("x", 0.9090909090909091)]),
    ("((x))", [("x", 1.2100000000000002)]),
    ("[[x]]", [("x", 0.8264462809917354)]),
    ("(x:1.0)", [("x", 1.0)]),
    ("(x: 1.2 )", [("x", 1.2)]),  # the current webui allows spaces around the weight
    ("(x:-1)", [("x", -1.0)]),
    ("((x:2))", [("x", 2.2)]),
    ("[(x:2)]", [("x", 1.8181818181818181)]),
    ("(<alf>:0.7)", [("<alf>", 0.7)]),
    ("a <lora:x:0.5> b", [("a <lora:x:0.5> b", 1.0)]),  # no bracket around it: colons are text
    (r"(a \(b\):1.3)", [("a (b)", 1.3)]),
    (r"(a\\:1.2)", [("a\\", 1.2)]),
    (r"a\\b", [("a\\b", 1.0)]),
    (r"a\b", [("ab", 1.0)]),  # a lone backslash is dropped by the webui
    ("a ) b ] c", [("a ) b ] c", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),
    ("[a", [("a", 0.9090909090909091)]),
    ("(a:1.2", [("a:1.2", 1.1)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("(a [b", [("a ", 1.1), ("b", 1.0)]),  # unclosed "(" scale first, then "[": 1.1 * (1/1.1) == 1.0
    ("a (b) (c) d", [("a ", 1.0), ("b", 1.1), (" ", 1.0), ("c", 1.1), (" d", 1.0)]),
    # BREAK: word-bounded, the whitespace around it eaten, the text on either side kept (even when empty)
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("aBREAK b, BREAKS, break", [("aBREAK b, BREAKS, break", 1.0)]),
    ("(a) BREAK (b)", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # scaled with the bracket, as in the webui
]


@pytest.mark.parametrize(("text", "expected"), A1111_ATTENTION + MORE_ATTENTION)
def test_attention(text: str, expected: list) -> None:
    assert a1111.attention(text) == expected


def test_a_weight_that_is_no_number_is_refused() -> None:
    with pytest.raises(BatchgenError) as e:
        a1111.attention("(x:1.2.3)")
    assert str(e.value) == "prompt weight ':1.2.3)' is not a number; write e.g. (word:1.2)"


# --- schedules: the webui's get_learned_conditioning_prompt_schedules doctests at 10 steps, both versions
A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # The webui's doctest says [(5, 'a  c'), (10, 'a {b|d{ c')]: true before alternation made '|' special, stale
    # since (its doctests are not run). Its grammar cannot parse this now, so the prompt stays unscheduled.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]

MORE_SCHEDULES = [
    ("[a:b:0.5]", [(5, "a"), (10, "b")]),
    ("[a:b:5]", [(5, "a"), (10, "b")]),
    ("[a:b:1.0]", [(10, "a")]),  # a fraction of 1.0 is every step
    ("[a:b:0]", [(10, "b")]),  # a boundary below 1 adds no entry: 'to' from the first step
    ("[a:b:0.05]", [(10, "b")]),  # int(0.5) == 0
    ("[a:b:30]", [(10, "a")]),  # capped at the steps
    ("[a:b:1e3]", [(10, "a")]),  # lark's SIGNED_NUMBER: no '.', so a step number
    ("[a:b:2.5e-1]", [(2, "a"), (10, "b")]),  # with '.': a fraction
    ("[a:b: 4 ]", [(4, "a"), (10, "b")]),
    ("[a::3] c", [(3, "a c"), (10, " c")]),
    ("[a:b:-3]", [(10, "b")]),  # the webui's reading; check() refuses it
    ("[word:x]", [(10, "[word:x]")]),  # bracketed text, weighted later
    ("(x [a:b:5])", [(5, "(x a)"), (10, "(x b)")]),
    ("[(a:1.2):(b:0.8):2]", [(2, "(a:1.2)"), (10, "(b:0.8)")]),
    ("[a|b|c]", [(s, "abc"[(s - 1) % 3]) for s in range(1, 11)]),
    ("a BREAK [b:c:5]", [(5, "a BREAK b"), (10, "a BREAK c")]),
    ("a | b [c:d:5]", [(10, "a | b [c:d:5]")]),  # '|' outside brackets: unparseable, unscheduled
    (r"a \[b:c:5\]", [(10, r"a \[b:c:5\]")]),
    ("a (b:1.2) c", [(10, "a (b:1.2) c")]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_SCHEDULES + MORE_SCHEDULES)
def test_schedules(text: str, expected: list) -> None:
    assert a1111.schedules(text, 10) == expected


def test_schedule_fractions_scale_with_steps() -> None:
    assert a1111.schedules("[a:b:0.25]", 20) == [(5, "a"), (20, "b")]
    assert a1111.schedules("[a:b:0.25]", 30) == [(7, "a"), (30, "b")]  # int(7.5)


def test_the_doc_example_at_100_steps() -> None:
    # The example at the top of the webui's prompt_parser.py (the current version's '[: in background:0.25]').
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert a1111.schedules(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


# --- phases / plain_text / id_part
def test_phases_a1111_parse_each_entry_and_merge_equal_ones() -> None:
    assert phases("a [b:c:0.5] (d)", "a1111", 10) == (
        Phase(5, (("a b ", 1.0), ("d", 1.1))),
        Phase(10, (("a c ", 1.0), ("d", 1.1))),
    )
    # (x:1.0) until step 3, then x: the same fragments, so one phase ending at the later step
    assert phases("[(x:1.0):x:3]", "a1111", 10) == (Phase(10, (("x", 1.0),)),)
    assert phases("[a|(b:1.1)]", "a1111", 3) == (
        Phase(1, (("a", 1.0),)),
        Phase(2, (("b", 1.1),)),
        Phase(3, (("a", 1.0),)),
    )
    assert phases("a BREAK b", "a1111", 20) == (Phase(20, (("a", 1.0), ("BREAK", -1.0), ("b", 1.0))),)


@pytest.mark.parametrize("syntax", ["plain", "compel"])
def test_phases_plain_and_compel_pass_the_text_whole(syntax: str) -> None:
    assert phases("a (b:1.5) [c:d:3] BREAK e", syntax, 20) == (Phase(20, (("a (b:1.5) [c:d:3] BREAK e", 1.0),)),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a cat", "a photo of a cat"),
        ("(x:1.0)", "x"),
        ("a (b:1) c", "a b c"),
        (r"\(x\)", "(x)"),
        ("[a:b:30]", "a"),
        ("[a:b:0]", "b"),
        ("(x)", None),
        ("a BREAK b", None),
        ("[a:b:10]", None),
        ("[a|b]", None),
        ("", ""),
    ],
)
def test_plain_text_a1111(text: str, expected: str | None) -> None:
    assert plain_text(text, "a1111", 20) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo of a cat", "a photo of a cat"),
        ("a cat, sitting", "a cat, sitting"),
        ("a (cat)", None),
        ("a cat++", None),
        ("a cat-", None),
        ('("a", "b").blend(1, 1)', None),
        ("[a]", None),
        (r"a\b", None),
    ],
)
def test_plain_text_compel(text: str, expected: str | None) -> None:
    assert plain_text(text, "compel", 20) == expected


def test_plain_text_plain_is_the_text() -> None:
    assert plain_text("a (b:1.5) BREAK", "plain", 20) == "a (b:1.5) BREAK"


def test_id_part() -> None:
    for syntax in SYNTAXES:
        assert id_part("a photo of a cat", syntax, 20) == "a photo of a cat"
    assert id_part("(x:1.0)", "a1111", 20) == id_part("x", "a1111", 20) == "x"
    assert id_part("a (b:1.5) [c:d:0.5]", "a1111", 20) == {
        "syntax": "a1111",
        "phases": [[10, [["a ", 1.0], ["b", 1.5], [" c", 1.0]]], [20, [["a ", 1.0], ["b", 1.5], [" d", 1.0]]]],
    }
    assert id_part("a BREAK b", "a1111", 20) == {
        "syntax": "a1111",
        "phases": [[20, [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]]],
    }
    assert id_part("a cat++", "compel", 20) == {"syntax": "compel", "text": "a cat++"}
    assert id_part("a (b:1.5)", "plain", 20) == "a (b:1.5)"


def test_an_unknown_syntax_is_refused() -> None:
    for call in (
        lambda: phases("x", "sdnext", 20),
        lambda: plain_text("x", "sdnext", 20),
        lambda: check("x", "sdnext", "w"),
    ):
        with pytest.raises(BatchgenError) as e:
            call()
        assert str(e.value) == "prompt syntax 'sdnext' is not one of a1111, compel, plain"


# --- check
WHERE = "sweep.prompts[2]"
EDIT_FIX = "needs a step number or a fraction of the steps after the last ':' (e.g. [from:to:10] or [from:to:0.5])"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a cat AND a dog",
            "AND (A1111's composable diffusion) is not supported; write the parts as one prompt, "
            "or as separate prompts",
        ),
        (
            "AND",
            "AND (A1111's composable diffusion) is not supported; write the parts as one prompt, "
            "or as separate prompts",
        ),
        (
            "a cat:1.5",
            "a trailing ':1.5' is A1111's composable-diffusion weight (it scales the guidance, not the "
            "words), which is not supported; write (words:1.5) to weight words",
        ),
        ("[a:b:-3]", f"prompt editing [a:b:-3] {EDIT_FIX}"),
        ("[a:-3]", f"prompt editing [a:-3] {EDIT_FIX}"),
        ("x [a:b:c] y", f"prompt editing [a:b:c] {EDIT_FIX}"),
        ("[a:b:x5]", f"prompt editing [a:b:x5] {EDIT_FIX}"),
        ("a[b:[c:d:x]:1]e", f"prompt editing [c:d:x] {EDIT_FIX}"),
        ("(x:1.2.3)", "prompt weight ':1.2.3)' is not a number; write e.g. (word:1.2)"),
    ],
)
def test_check_refuses(text: str, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        check(text, "a1111", WHERE)
    assert str(e.value) == f"{WHERE}: {message}"


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "ANDROID, band, and",
        "a (b:1.2) [c] [d:e:0.5] [f:3] [g::4] [h|i|] [word:x]",
        "[(a:2):3]",
        "a[b:[c:d:2]:1]e",
        "a [b: 3 ] c",
        r"\(x\) \[y\] \\",
        "(<alf>:0.7), <lora:x:0.5>",
        "a:1.5 b",
        "a BREAK b",
    ],
)
def test_check_accepts_without_warnings(text: str) -> None:
    assert check(text, "a1111", WHERE) == []


@pytest.mark.parametrize(
    ("text", "warnings"),
    [
        ("a (b", ["unbalanced '(' at character 2; read as A1111 does (the rest of the prompt is weighted 1.1)"]),
        ("a [b c", ["unbalanced '[' at character 2; read as A1111 does (the rest of the prompt is weighted 1/1.1)"]),
        ("a ) b", ["unbalanced ')' at character 2; read as A1111 does (kept as text)"]),
        ("x ] y", ["unbalanced ']' at character 2; read as A1111 does (kept as text)"]),
        ("x:1.2) y", ["unbalanced ')' at character 5; read as A1111 does (kept as text)"]),
        (
            "(a] [b",
            [
                "unbalanced '(' at character 0; read as A1111 does (the rest of the prompt is weighted 1.1)",
                "unbalanced ']' at character 2; read as A1111 does (kept as text)",
                "unbalanced '[' at character 4; read as A1111 does (the rest of the prompt is weighted 1/1.1)",
            ],
        ),
        (
            "(a BREAK b)",
            [
                "BREAK inside brackets is read by A1111 as the word 'BREAK', not as a chunk break; move it out of the "
                "brackets"
            ],
        ),
        (
            "a [b:c:3] | d",
            [
                "A1111's schedule grammar cannot read this prompt (unexpected '|' at character 10), so none of its "
                "[from:to:when] or [a|b] takes effect: the brackets only weight their text 1/1.1"
            ],
        ),
        (
            "a [b|c",
            [
                "unbalanced '[' at character 2; read as A1111 does (the rest of the prompt is weighted 1/1.1)",
                "A1111's schedule grammar cannot read this prompt (it ends inside a bracket), so none of its "
                "[from:to:when] or [a|b] takes effect: the brackets only weight their text 1/1.1",
            ],
        ),
    ],
)
def test_check_warns(text: str, warnings: list[str]) -> None:
    assert check(text, "a1111", WHERE) == [f"{WHERE}: {w}" for w in warnings]


@pytest.mark.parametrize("syntax", ["plain", "compel"])
def test_check_other_syntaxes_accept_everything(syntax: str) -> None:
    assert check("a AND b [a:b:-3] (c", syntax, WHERE) == []


def test_no_torch_import() -> None:
    code = "import batchgen.prompt_syntax, sys; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
