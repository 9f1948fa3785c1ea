"""Prompt syntax in planning: what job_id hashes of a prompt, the checks, and the pad_prompts rule for old ids."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from batchgen.errors import BatchgenError
from batchgen.plan import build_plan
from batchgen.prompt_syntax import id_part
from tests.test_plan import MODELS, _sweep

ONE = {"models": ["sd1"], "slots": {}, "stacks": {"none": {}}, "seeds": [1]}


def _id(prompt: str, **changes) -> str:
    plan = build_plan(_sweep(**ONE, prompts=[prompt], **changes), MODELS)
    assert len(plan.jobs) == 1
    return plan.jobs[0].job_id


def test_a_prompt_without_syntax_keeps_its_id_under_every_syntax() -> None:
    ids = {_id("a castle at night", prompt_syntax=s) for s in ("a1111", "compel", "plain")}
    assert len(ids) == 1


def test_weights_are_part_of_the_job() -> None:
    plain = _id("a castle at night")
    weighted = _id("a (castle:1.5) at night")
    assert weighted != plain
    assert _id("a (castle:1.5) at night", prompt_syntax="plain") not in (plain, weighted)
    # The id hashes the parse: a weight of 1 is no weight, and brackets that multiply alike are one job.
    assert _id("a (castle:1.0) at night") == plain
    assert _id("a (castle:1.1) at night") == _id("a (castle) at night") != weighted
    assert _id("a (castle) at night", prompt_syntax="compel") != _id("a (castle) at night")  # compel's own reading
    # An escaped bracket under a1111 is the literal bracket plain syntax reads: the same text, the same job.
    assert _id(r"a \(castle\) at night") == _id("a (castle) at night", prompt_syntax="plain")


def test_prompt_editing_ids_follow_the_steps() -> None:
    edit = "a [castle:forest:0.5] at night"
    assert _id(edit, steps=8) != _id(edit, steps=10)  # the switch lands on another step, in another image
    assert _id(edit) != _id("a castle at night") != _id("a forest at night")
    # A switch past the last step never happens: that prompt is the text before it.
    assert _id("a [castle:forest:30] at night", steps=8) == _id("a castle at night", steps=8)


def test_the_manifest_keeps_the_prompt_as_written_and_the_syntax() -> None:
    plan = build_plan(_sweep(**ONE, prompts=["a (castle:1.5) at night"], prompt_syntax=["a1111", "plain"]), MODELS)
    assert list(plan.table["prompt"]) == ["a (castle:1.5) at night"] * 2
    assert list(plan.table["prompt_syntax"]) == ["a1111", "plain"]
    assert list(plan.table["pad_prompts"]) == [False, False]
    assert plan.table["job_id"].nunique() == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"prompt_syntax": "invoke"},
            "sweep.prompt_syntax: unknown prompt syntax 'invoke'; choose one of: a1111, compel, plain",
        ),
        (
            {"prompts": ["a castle", "a castle AND a moat"]},
            "sweep.prompts[1]: AND (A1111's composable diffusion) is not supported; write the parts as one prompt, "
            "or as separate prompts",
        ),
        (
            {"negative_prompt": "blurry AND ugly"},
            "sweep.negative_prompt: AND (A1111's composable diffusion) is not supported; write the parts as one "
            "prompt, or as separate prompts",
        ),
        (
            {"prompts": ["a [castle:forest:soon]"]},
            "sweep.prompts[0]: prompt editing [castle:forest:soon] needs a step number or a fraction of the steps "
            "after the last ':' (e.g. [from:to:10] or [from:to:0.5])",
        ),
        (
            {"prompts": ["a [castle:forest:-2]"]},
            "sweep.prompts[0]: prompt editing [castle:forest:-2] needs a step number or a fraction of the steps "
            "after the last ':' (e.g. [from:to:10] or [from:to:0.5])",
        ),
    ],
)
def test_bad_syntax_names_the_prompt(changes: dict, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        build_plan(_sweep(**{**ONE, "prompts": ["a castle"], **changes}), MODELS)
    assert str(e.value) == message


def test_and_is_text_under_plain_syntax() -> None:
    assert _id("a castle AND a moat", prompt_syntax="plain") == _id("a castle AND a moat", prompt_syntax="compel")


def test_unbalanced_brackets_warn_and_render_as_a1111_reads_them() -> None:
    plan = build_plan(_sweep(**ONE, prompts=["a (castle at night"]), MODELS)
    assert [w for w in plan.warnings if w.startswith("sweep.prompts[0]: unbalanced '('")]
    # A1111 weights the rest of the prompt by 1.1, so it is the same job as the closed bracket.
    assert plan.jobs[0].job_id == _id("a (castle at night)")


def test_pad_prompts_changes_only_the_ids_whose_pixels_it_changes(tiny_cache: Path) -> None:
    """Before the setting, a prompt and a negative prompt of different chunk counts were padded; those jobs keep
    their ids under pad_prompts=true and get new ones under the default (separate passes), the rest keep theirs."""
    from batchgen.assets.tokens import ChunkCounter
    from batchgen.spec import ModelSpec

    folder = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    spec = ModelSpec("sd1", "sd-1", folder, "c1" * 32)
    models = {"sd1": spec}
    long = ", ".join(["a blue tower by the sea"] * 16)
    counter = ChunkCounter(spec)
    # 159 tokens with the tiny tokenizer (words it lacks fall back to byte pieces): 3 chunks of 75.
    assert counter.chunks(long) == 3 and counter.chunks("blurry") == 1
    assert counter.chunks("a castle at night, " * 5) == 1  # > 75 bytes, under 75 tokens

    def job_id(prompt: str, negative: str = "blurry", **changes) -> str:
        sweep = replace(_sweep(**ONE), models=["sd1"], prompts=[prompt], negative_prompt=negative, **changes)
        return build_plan(sweep, models).jobs[0].job_id

    padded, separate = job_id(long, pad_prompts=True), job_id(long)
    assert padded != separate
    assert job_id(long, negative=long) == job_id(long, negative=long, pad_prompts=True)  # equal counts
    assert job_id(long, guidance_scale=1.0) == job_id(long, guidance_scale=1.0, pad_prompts=True)  # no negative
    short = "a castle at night, " * 5
    assert job_id(short) == job_id(short, pad_prompts=True)
    # The old id: what the planner hashed before prompt syntax, unchanged by padding (the old behaviour).
    assert id_part(long, "a1111", 8) == long


def test_planner_checks_compel_against_the_base() -> None:
    with pytest.raises(BatchgenError, match="clip_skip"):
        build_plan(_sweep(**ONE, prompts=["a castle+"], prompt_syntax="compel", clip_skip=3), MODELS)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (
            'a castle.withLora("ink", 0.5)',
            "sweep.prompts[0]: batchgen does not apply compel's withLora(); choose LoRAs in sweep.stacks or with "
            "<lora:name:w> tags",
        ),
        (
            'a ("castle").swap("forest")',
            "sweep.prompts[0]: batchgen does not apply compel's .swap(); use prompt_syntax=a1111 and its prompt "
            "editing [from:to:when]",
        ),
    ],
)
def test_compel_features_batchgen_cannot_honour_are_refused_before_rendering(prompt: str, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        build_plan(_sweep(**ONE, prompts=[prompt], prompt_syntax="compel"), MODELS)
    assert str(e.value) == message
