"""LoRA trigger words (configured, or from the file's metadata) and clip_skip: planning, the engine, PNGs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchgen.assets.loras import trigger_words
from batchgen.errors import BatchgenError
from batchgen.plan import build_plan, used_assets
from tests.confs import SMALL, write_conf
from tests.test_plan import MODELS, _sweep

WITH_METADATA = {
    **MODELS,
    "sd1": replace(
        MODELS["sd1"],
        loras=tuple(replace(f, trigger="inkstyle" if f.name == "ink" else "") for f in MODELS["sd1"].loras),
    ),
}


def _one(**changes):
    settings = {"models": ["sd1"], "prompts": ["a castle"], "slots": {}, "seeds": [1], "stacks": {}, **changes}
    return build_plan(_sweep(**settings), WITH_METADATA)


def test_configured_trigger_words_go_before_the_prompt_and_into_the_manifest() -> None:
    plan = _one(
        stacks={"none": {}, "ink": {"ink": 0.5}, "both": {"ink": 0.8, "grain": 0.6}},
        lora_triggers={"ink": "ink drawing", "grain": "film grain"},
    )
    rows = plan.table.set_index("stack")
    assert rows.loc["none", "prompt"] == "a castle" and rows.loc["none", "lora_triggers"] == ""
    assert rows.loc["ink", "prompt"] == "ink drawing, a castle"
    assert rows.loc["ink", "lora_triggers"] == "ink:ink drawing"
    # In the stack's order (by name), each trigger once.
    assert rows.loc["both", "prompt"] == "film grain, ink drawing, a castle"
    assert rows.loc["both", "lora_triggers"] == "grain:film grain;ink:ink drawing"
    assert rows.loc["both", "prompt_template"] == "a castle"
    # The prompt changed, so the pixels do: another job than the same stack without trigger words.
    plain = _one(stacks={"ink": {"ink": 0.5}})
    assert plain.table["prompt"][0] == "a castle"
    assert plain.table["job_id"][0] != rows.loc["ink", "job_id"]
    assert sorted(j.prompt for j in plan.jobs) == [
        "a castle",
        "film grain, ink drawing, a castle",
        "ink drawing, a castle",
    ]


def test_metadata_triggers_only_when_asked_and_config_wins() -> None:
    stacks = {"ink": {"ink": 1.0}}
    assert _one(stacks=stacks).table["prompt"][0] == "a castle"
    assert _one(stacks=stacks, add_lora_triggers=True).table["prompt"][0] == "inkstyle, a castle"
    assert _one(stacks=stacks, add_lora_triggers=True).table["lora_triggers"][0] == "ink:inkstyle"
    assert _one(stacks=stacks, add_lora_triggers=True, lora_triggers={"ink": "ink art"}).table["prompt"][0] == (
        "ink art, a castle"
    )
    # "" turns one LoRA's metadata trigger off.
    assert _one(stacks=stacks, add_lora_triggers=True, lora_triggers={"ink": ""}).table["prompt"][0] == "a castle"


def test_a_trigger_already_in_the_prompt_is_not_repeated() -> None:
    plan = build_plan(
        _sweep(
            models=["sd1"],
            prompts=["an Ink Drawing of a castle", "a pink drawing"],
            slots={},
            seeds=[1],
            stacks={"ink": {"ink": 1.0}},
            lora_triggers={"ink": "ink drawing"},
        ),
        MODELS,
    )
    assert list(plan.table["prompt"]) == ["an Ink Drawing of a castle", "ink drawing, a pink drawing"]
    assert list(plan.table["lora_triggers"]) == ["", "ink:ink drawing"]
    same = _one(stacks={"both": {"ink": 1.0, "grain": 1.0}}, lora_triggers={"ink": "ink", "grain": "Ink"})
    assert (same.table["prompt"][0], same.table["lora_triggers"][0]) == ("Ink, a castle", "grain:Ink")


def test_inline_tagged_loras_get_their_triggers_too() -> None:
    plan = _one(prompts=["a castle <lora:ink:0.5>"], stacks={}, lora_triggers={"ink": "ink drawing"})
    assert (plan.table["prompt"][0], plan.table["loras"][0]) == ("ink drawing, a castle", "ink:0.5")


def test_a_trigger_with_a_ti_token_uses_the_embedding() -> None:
    plan = _one(stacks={"ink": {"ink": 1.0}}, lora_triggers={"ink": "<cartoona> style"})
    assert (plan.table["prompt"][0], plan.table["embeddings"][0]) == ("<cartoona> style, a castle", "cartoona")
    sweep = _sweep(stacks={"ink": {"ink": 1.0}}, lora_triggers={"ink": "<cartoona> style"})
    assert "cartoona" in used_assets(sweep)[1]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"lora_triggers": {"inky": "ink drawing"}},
            "sweep.lora_triggers.inky: LoRA 'inky' is in no stack or prompt of this sweep (did you mean 'ink'?); "
            "LoRAs used: ink",
        ),
        (
            {"lora_triggers": {"ink": "<lora:grain:1>"}},
            "sweep.lora_triggers.ink: a <lora:...> tag is not a trigger word; put the LoRA in a stack",
        ),
        (
            {"lora_triggers": {"ink": "<alfred> style"}},
            "sweep.lora_triggers.ink: embedding <alfred> is not found for any model (did you mean <alf>?)",
        ),
        (
            {"clip_skip": 0},
            "sweep.clip_skip: '0' is not an integer >= 1",
        ),
        (
            {"clip_skip": [2, 13]},
            "sweep.clip_skip: 13 skips more layers than SD's text encoders have; use 1 to 12 (A1111's count: 1 is "
            "no skip, 2 is the usual for anime models)",
        ),
    ],
)
def test_bad_trigger_and_clip_skip_settings(changes: dict, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        _one(stacks={"ink": {"ink": 1.0}}, **changes)
    assert str(e.value) == message


def test_metadata_trigger_rules() -> None:
    frequency = {"10_ohwx": {"1girl": 3, "ohwx": 5, "smile": 5}, "5_extra": {"ohwx": 2}}
    assert trigger_words({"ss_tag_frequency": json.dumps(frequency)}) == "ohwx"  # 7 beats 3 and 5
    tie = {"a": {"first": 2, "second": 2}}
    assert trigger_words({"ss_tag_frequency": json.dumps(tie)}) == "first"  # the captions' order breaks ties
    spec = {"modelspec.trigger_phrase": " sks dog ", "ss_tag_frequency": json.dumps(frequency)}
    assert trigger_words(spec) == "sks dog"
    assert trigger_words({}) == "" and trigger_words({"ss_tag_frequency": "not json"}) == ""


def test_clip_skip_is_an_axis_and_enters_the_job_id_only_past_1() -> None:
    plan = _one(clip_skip=[1, 2])
    assert list(plan.table["clip_skip"]) == [1, 2]
    assert plan.axis_counts()["clip_skip"] == 2
    assert [j.clip_skip for j in plan.jobs] == [1, 2]
    default = _one()
    assert default.table["job_id"][0] == plan.table["job_id"][0]  # 1 is the default: the id from before the option
    assert len(set(plan.table["job_id"])) == 2


# --- rendered: the images equal plain diffusers given the same prompt and clip skip ------------------------------


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sdxl"])
def test_triggers_and_clip_skip_render_what_diffusers_renders(run_cli, tmp_path: Path, tiny_cache, model) -> None:
    from PIL import Image

    from tests.test_oracle import MAX_PIXEL_DIFF, _reference_image, _reference_pipeline

    body = "  prompts: ['a castle at night']\n  stacks: {ink: {ink: 0.8}}\n  lora_triggers: {ink: ink drawing}\n"
    body += "  references: false\n"  # the LoRA jobs only: each against diffusers
    write_conf(tmp_path / "conf", "t", body + "  clip_skip: [1, 2]\n" + SMALL, {model: None})
    code, _, err = run_cli("--config-dir", str(tmp_path / "conf"), "+sweep=t")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    table = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False).set_index("clip_skip")
    assert list(table.index) == ["1", "2"] and set(table["status"]) == {"ok"}
    assert set(table["prompt"]) == {"ink drawing, a castle at night"}
    assert set(table["lora_triggers"]) == {"ink:ink drawing"}
    pipe, root = _reference_pipeline(model, tiny_cache)
    ours = {k: np.asarray(Image.open(run / table.loc[k, "image"]).convert("RGB"), dtype=np.int16) for k in "12"}
    diffs = {}
    for skip in "12":
        theirs = _reference_image(pipe, root, table.loc[skip].to_dict() | {"clip_skip": skip})
        diffs[skip] = int(np.abs(ours[skip] - theirs).max())
    assert max(diffs.values()) <= MAX_PIXEL_DIFF, diffs
    assert int(np.abs(ours["1"] - ours["2"]).max()) > 10  # the skipped layer changes the image
    parameters = Image.open(run / table.loc["2", "image"]).text["parameters"]
    assert parameters.startswith("ink drawing, a castle at night <lora:ink:0.8>\n")
    assert ", Clip skip: 2, " in parameters
    assert "Clip skip" not in Image.open(run / table.loc["1", "image"]).text["parameters"]


def test_metadata_triggers_are_read_listed_and_added(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    frequency = {"10_inkystyle": {"inkystyle": 6, "castle": 2}}
    save_file(load_file(source), folder / "ink.safetensors", {"ss_tag_frequency": json.dumps(frequency)})
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    body = "  prompts: ['a castle']\n  stacks: {ink: {ink: 1.0}}\n  add_lora_triggers: true\n  references: false\n"
    body += SMALL
    write_conf(tmp_path / "conf", "t", body, {"mine": f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n"})
    code, out, err = run_cli("--config-dir", str(tmp_path / "conf"), "+sweep=t", "--list")
    assert code == 0, err
    assert f"{folder / 'ink.safetensors'}  trigger: inkystyle  tags: inkystyle, castle" in out
    code, out, err = run_cli("--config-dir", str(tmp_path / "conf"), "+sweep=t")
    assert code == 0, err
    row = pd.read_csv(tmp_path / "runs/t/manifest.csv", dtype=str, keep_default_na=False).iloc[0]
    assert (row["status"], row["prompt"], row["lora_triggers"]) == ("ok", "inkystyle, a castle", "ink:inkystyle")


def test_the_prompt_axis_reads_the_prompt_without_trigger_words() -> None:
    from batchgen.axes import without_trigger_words
    from batchgen.report.grids import grid_axes

    plan = _one(stacks={"none": {}, "ink": {"ink": 0.5}}, lora_triggers=TRIGGERS)
    table = plan.table.astype(str)
    assert list(table["prompt"]) == ["a castle", "ink drawing, a castle"]
    # One prompt across both stacks, not one per encoded text: a grid of them has one row.
    assert grid_axes(table, []) == ["stack"]
    two = _one(stacks={"none": {}, "ink": {"ink": 0.5}}, prompts=["a castle", "a ship"], lora_triggers=TRIGGERS)
    assert grid_axes(two.table.astype(str), []) == ["stack", "prompt"]
    assert without_trigger_words("ink drawing, a castle", "ink:ink drawing") == "a castle"
    assert without_trigger_words("film, ink, a castle", "grain:film;ink:ink") == "a castle"
    assert without_trigger_words("a castle", "") == "a castle"
    assert without_trigger_words("edited by hand", "ink:ink drawing") == "edited by hand"


TRIGGERS = {"ink": "ink drawing"}


def test_diff_by_settings_reads_a_manifest_from_before_clip_skip_as_1() -> None:
    from batchgen.report.diff import _key

    row = {"model": "m", "prompt": "a castle", "seed": "1", "steps": "2", "scheduler": "default"}
    assert _key(pd.Series(row), "settings") == _key(pd.Series({**row, "clip_skip": "1"}), "settings")
    assert _key(pd.Series(row), "settings") != _key(pd.Series({**row, "clip_skip": "2"}), "settings")
