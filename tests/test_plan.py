"""The planner: pure expansion, content-addressed job ids, and validation messages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from batchgen.axes import state_labels
from batchgen.cells import format_loras
from batchgen.config import GridConfig, SweepConfig
from batchgen.errors import BatchgenError
from batchgen.plan import build_plan
from batchgen.spec import EmbeddingFile, LoraFile, ModelSpec


def _spec(name: str, ckpt: str, loras: dict[str, str], tis: dict[str, str], base: str = "sd-1") -> ModelSpec:
    return ModelSpec(
        name=name,
        base=base,
        checkpoint=Path(f"/m/{name}"),
        checkpoint_sha256=ckpt,
        embeddings=tuple(EmbeddingFile(t, Path(f"/e/{t}.pt"), h) for t, h in tis.items()),
        loras=tuple(LoraFile(n, Path(f"/l/{n}.safetensors"), h) for n, h in loras.items()),
    )


MODELS = {
    "sd1": _spec("sd1", "c1" * 32, {"ink": "a" * 64, "grain": "b" * 64}, {"alf": "d" * 64, "cartoona": "e" * 64}),
    "xl": _spec("xl", "c2" * 32, {"ink": "f" * 64, "grain": "0" * 64}, {"alf": "1" * 64}, base="sdxl"),
}


def _sweep(**changes) -> SweepConfig:
    sweep = SweepConfig(
        name="styles",
        models=["sd1", "xl"],
        prompts=["a portrait of <alf> in {style}", "a castle at night"],
        slots={"style": ["<cartoona> style", "ink drawing"]},
        negative_prompt="blurry",
        stacks={"none": {}, "ink": {"ink": [0.5, 1.0]}, "ink_grain": {"ink": 0.8, "grain": 0.6}},
        seeds=[1, 2],
        steps=8,
        guidance_scale=7.5,
        width=64,
        height=64,
        max_sequence_length=0,  # given like the rest: these models have no configs on disk to hold their own
        references=False,  # the reference jobs have tests of their own (test_references.py)
    )
    return replace(sweep, **changes)


def test_styles_counts_and_order() -> None:
    plan = build_plan(_sweep(), MODELS)
    # 2 models x (1 + 2 + 1) stack states x (2 + 1) prompts x 2 seeds
    assert len(plan.table) == 48
    assert plan.axis_counts() == {
        "model": 2,
        "stack": 4,
        "prompt": 3,
        "style": 2,
        "seed": 2,
        "steps": 1,
        "guidance_scale": 1,
        "width": 1,
        "height": 1,
        "scheduler": 1,
        "clip_skip": 1,
        "prompt_syntax": 1,
        "max_sequence_length": 1,
    }
    # model outermost, then LoRA state: each model's rows are contiguous, each stack's rows too
    assert list(plan.table["model"].drop_duplicates()) == ["sd1", "xl"]
    first_model = plan.table[plan.table["model"] == "sd1"]
    assert list(first_model["stack"].drop_duplicates()) == ["none", "ink", "ink_grain"]  # the sweep's keys
    labels = state_labels(first_model.to_dict("records"), plan.slots)
    assert list(dict.fromkeys(labels)) == ["none", "ink 0.5", "ink 1", "ink_grain"]
    assert first_model["loras"].ne(first_model["loras"].shift()).sum() == 4


def test_slot_multiplies_only_prompts_using_it() -> None:
    plan = build_plan(_sweep(models=["sd1"], stacks={}, seeds=[1]), MODELS)
    assert list(plan.table["prompt"]) == [
        "a portrait of <alf> in <cartoona> style",
        "a portrait of <alf> in ink drawing",
        "a castle at night",
    ]
    assert list(plan.table["style"].fillna("")) == ["<cartoona> style", "ink drawing", ""]
    assert list(plan.table["embeddings"]) == ["alf;cartoona", "alf", ""]


def test_a_slot_no_prompt_uses_is_a_warning_naming_it() -> None:
    slots = {"style": ["<cartoona> style", "ink drawing"], "mood": ["calm"], "light": ["dusk", "noon"]}
    plan = build_plan(_sweep(models=["sd1"], stacks={}, seeds=[1], slots=slots), MODELS)
    assert plan.warnings == [
        f"sweep.slots.{name}: no prompt contains {{{name}}}, so its values are never rendered; put {{{name}}} in a "
        f"prompt, or remove the slot (~sweep.slots.{name} on the command line)"
        for name in ("mood", "light")
    ]
    assert len(plan.table) == 3  # the unused slots multiply nothing
    assert build_plan(_sweep(models=["sd1"], stacks={}, seeds=[1]), MODELS).warnings == []
    typo = build_plan(_sweep(models=["sd1"], stacks={}, seeds=[1], slots={**slots, "stlye": ["x"]}), MODELS)
    assert typo.warnings[-1].startswith("sweep.slots.stlye: no prompt contains {stlye} (did you mean 'style'?), ")


def test_weight_axis_from_override_list() -> None:
    plan = build_plan(_sweep(stacks={"none": {}, "ink": {"ink": [0.4, 0.6, 0.8]}}), MODELS)
    assert len(plan.table) == 2 * 4 * 3 * 2
    assert set(plan.table["loras"]) == {"", "ink:0.4", "ink:0.6", "ink:0.8"}


def test_trigger_missing_for_one_model_is_skipped_with_reason() -> None:
    plan = build_plan(_sweep(), MODELS)
    skipped = plan.table[plan.table["status"] == "skipped"]
    # <cartoona> exists only for sd1: on xl, one prompt variant x 4 stacks x 2 seeds
    assert len(skipped) == 8
    assert set(skipped["model"]) == {"xl"}
    assert set(skipped["error"]) == {"embedding <cartoona> not found for model xl"}
    assert len(plan.jobs) == 40
    assert not any(j.prompt.count("<cartoona>") and j.model == "xl" for j in plan.jobs)


def test_lora_missing_for_one_model_is_skipped() -> None:
    models = {**MODELS, "xl": replace(MODELS["xl"], loras=(LoraFile("ink", Path("/l/ink"), "f" * 64),))}
    plan = build_plan(_sweep(prompts=["a castle"], slots={}), models)
    skipped = plan.table[plan.table["status"] == "skipped"]
    assert set(skipped["error"]) == {"LoRA 'grain' not found for model xl"}
    assert set(skipped["stack"]) == {"ink_grain"}


def test_job_ids_unique_and_stable_across_order_and_names() -> None:
    plan = build_plan(_sweep(), MODELS)
    ids = plan.table["job_id"]
    assert ids.is_unique and ids.str.fullmatch(r"[0-9a-f]{16}").all()
    again = build_plan(_sweep(), MODELS)
    assert list(again.table["job_id"]) == list(ids)

    reordered = _sweep(
        models=["xl", "sd1"],
        prompts=list(reversed(_sweep().prompts)),
        stacks={"ink_grain": {"grain": 0.6, "ink": 0.8}, "ink": {"ink": [1.0, 0.5]}, "none": {}},
        seeds=[2, 1],
    )
    assert set(build_plan(reordered, MODELS).table["job_id"]) == set(ids)

    # Same files under other names (model, LoRA, stack) give the same ids; the prompt text is content.
    loras = tuple(replace(f, name=f"x{f.name}") for f in MODELS["sd1"].loras)
    renamed_models = {"base": replace(MODELS["sd1"], name="base", loras=loras)}
    renamed = _sweep(models=["base"], stacks={"s": {"xink": 0.5}})
    original = _sweep(models=["sd1"], stacks={"t": {"ink": 0.5}})
    assert list(build_plan(renamed, renamed_models).table["job_id"]) == list(
        build_plan(original, MODELS).table["job_id"]
    )


def test_job_id_changes_with_what_changes_pixels() -> None:
    base = build_plan(_sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[1]), MODELS).table["job_id"][0]
    variants = [
        _sweep(models=["sd1"], stacks={"s": {"ink": 0.6}}, seeds=[1]),
        _sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[2]),
        _sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[1], steps=9),
        _sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[1], guidance_scale=7.0),
        _sweep(models=["sd1"], stacks={"s": {"ink": {"unet": 0.5, "text_encoder": 0.0}}}, seeds=[1]),
        _sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[1], scheduler="euler"),
    ]
    for sweep in variants:
        assert build_plan(sweep, MODELS).table["job_id"][0] != base
    changed_file = {"sd1": replace(MODELS["sd1"], loras=(LoraFile("ink", Path("/l/ink"), "9" * 64),))}
    assert (
        build_plan(_sweep(models=["sd1"], stacks={"s": {"ink": 0.5}}, seeds=[1]), changed_file).table["job_id"][0]
        != base
    )


def test_split_weight_notation() -> None:
    plan = build_plan(
        _sweep(models=["sd1"], prompts=["x"], slots={}, stacks={"s": {"ink": {"unet": 0.5, "text_encoder": 1.0}}}),
        MODELS,
    )
    assert set(plan.table["loras"]) == {"ink:0.5/1"}
    assert plan.jobs[0].loras[0].unet == 0.5 and plan.jobs[0].loras[0].text_encoder == 1.0


def test_duplicate_combinations_render_once() -> None:
    plan = build_plan(_sweep(models=["sd1"], stacks={"a": {"ink": 0.5}, "b": {"ink": 0.5}}), MODELS)
    assert len(plan.table) == 2 * 3 * 2
    assert len(plan.jobs) == 3 * 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"models": ["sd2"]}, "sweep.models: unknown model 'sd2' (did you mean 'sd1'?); the sweep selects sd1, xl"),
        (
            {"stacks": {"s": {"inkk": 1.0}}},
            "sweep.stacks.s: LoRA 'inkk' is not found for any model (did you mean 'ink'?); LoRAs found: grain, ink",
        ),
        (
            {"prompts": ["a <alff> cat"], "slots": {}},
            "sweep.prompts[0]: embedding <alff> is not found for any model (did you mean <alf>?); "
            "triggers found: <alf>, <cartoona>",
        ),
        (
            {"stacks": {"s": {"ink": "strong"}}},
            "sweep.stacks.s.ink: weight 'strong' is not a number; write a number, a list of numbers, "
            "{unet: w, text_encoder: w} or {weight: w, blocks: PRESET}",
        ),
        ({"stacks": {"s": {"ink": []}}}, "sweep.stacks.s.ink is empty; give at least one value"),
        ({"seeds": []}, "sweep.seeds is empty; give at least one value"),
        ({"prompts": []}, "sweep.prompts is empty; give at least one prompt"),
        ({"slots": {"style": []}}, "sweep.slots.style is empty; give at least one value or remove the slot"),
        ({"prompts": ["a {mood} cat"], "slots": {"style": ["x"]}}, "sweep.prompts[0]: slot {mood} is not defined"),
        ({"width": 100}, "sweep.width: 100 is not a multiple of 8; use 96 or 104"),
        ({"steps": 0}, "sweep.steps: '0' is not an integer >= 1"),
        ({"guidance_scale": "high"}, "sweep.guidance_scale: 'high' is not a number"),
        ({"scheduler": "eular"}, "sweep.scheduler: unknown scheduler 'eular' (did you mean 'euler'?)"),
        ({"grid": GridConfig(x="stak", y="prompt")}, "sweep.grid.x: unknown axis 'stak' (did you mean 'stack'?)"),
        ({"grid": GridConfig(x="seed", y="seed")}, "sweep.grid: x and y are both 'seed'; choose two different axes"),
        ({"batch_size": 0}, "sweep.batch_size: '0' is neither 'auto' nor a positive integer"),
    ],
)
def test_bad_sweeps_name_the_key_and_the_fix(changes: dict, message: str) -> None:
    with pytest.raises(BatchgenError) as caught:
        build_plan(_sweep(**changes), MODELS)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_planner_imports_no_torch() -> None:
    code = "import sys, batchgen.plan, batchgen.assets.models, batchgen.report; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_render_order_chains_lora_states_by_fewest_changes() -> None:
    stacks = {
        "a": {"ink": [0.5, 1.0]},
        "b": {"grain": 0.6},
        "none": {},
        "c": {"ink": 0.5, "grain": 0.6},
        "d": {"ink": 1.0, "grain": 0.6},
    }
    plan = build_plan(_sweep(models=["sd1"], prompts=["x"], slots={}, stacks=stacks, seeds=[1, 2]), MODELS)
    order = list(dict.fromkeys(format_loras(j.loras) for j in plan.jobs))
    # starts from no LoRA, then every step changes exactly one LoRA's weight
    assert order == ["", "ink:0.5", "ink:1", "grain:0.6;ink:1", "grain:0.6", "grain:0.6;ink:0.5"]
    assert len(plan.jobs) == 12
    # jobs of one state stay together so they can share pipeline calls
    states = [j.loras for j in plan.jobs]
    assert sum(1 for i in range(1, len(states)) if states[i] != states[i - 1]) == 5


def test_an_unknown_trigger_names_the_prompt_as_written_not_its_slot_variant() -> None:
    sweep = _sweep(prompts=["a {style}", "b <alfx>"], slots={"style": ["x", "y", "z"]})
    with pytest.raises(BatchgenError) as e:
        build_plan(sweep, MODELS)
    assert str(e.value) == (
        "sweep.prompts[1]: embedding <alfx> is not found for any model (did you mean <alf>?); triggers found: "
        "<alf>, <cartoona>"
    )
