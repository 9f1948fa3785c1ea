"""Prompt features: A1111 <lora:...> tags in prompts (planner and a render), and sweep.prompts_file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batchgen.axes import state_labels
from batchgen.errors import BatchgenError
from batchgen.plan import PromptRow, build_plan, read_prompts_file, split_lora_tags, used_assets
from batchgen.spec import LoraWeight
from tests.test_plan import MODELS, _sweep


def test_lora_tags_are_taken_out_of_the_text_in_a1111_order() -> None:
    text, loras = split_lora_tags("a castle <lora:ink:0.5>, at night <lora:grain:0.3:0.7> <lora:hatch>", "p")
    assert text == "a castle, at night"
    # A1111: the first number is the text encoder's weight, the second the unet's; no number is 1.
    assert loras == (LoraWeight("grain", 0.7, 0.3), LoraWeight("hatch", 1.0, 1.0), LoraWeight("ink", 0.5, 0.5))
    assert split_lora_tags("x <lora:ink:unet=0.2:te=0.9>", "p") == ("x", (LoraWeight("ink", 0.2, 0.9),))
    assert split_lora_tags("no tags <alf>", "p") == ("no tags <alf>", ())


def test_a_tagged_prompt_is_the_same_job_as_the_stack() -> None:
    tagged = build_plan(
        _sweep(models=["sd1"], prompts=["a castle at night <lora:ink:0.5>"], stacks={}, slots={}), MODELS
    )
    stacked = build_plan(
        _sweep(models=["sd1"], prompts=["a castle at night"], stacks={"ink": {"ink": 0.5}}, slots={}), MODELS
    )
    assert list(tagged.table["job_id"]) == list(stacked.table["job_id"])
    row = tagged.table.iloc[0]
    assert (row["prompt"], row["loras"], row["stack"]) == ("a castle at night", "ink:0.5", "none")
    assert set(state_labels(tagged.table.to_dict("records"))) == {"none + <lora:ink:0.5>"}  # beside the name
    assert row["prompt_template"] == "a castle at night <lora:ink:0.5>"
    assert tagged.jobs[0].prompt == "a castle at night" and tagged.jobs[0].loras == (LoraWeight("ink", 0.5, 0.5),)


def test_tags_combine_with_stacks_and_slots() -> None:
    sweep = _sweep(
        models=["sd1"],
        prompts=["a castle in {style}"],
        slots={"style": ["ink drawing <lora:grain:0.2>", "oil"]},
        stacks={"none": {}, "ink_grain": {"ink": 0.8, "grain": 0.6}},
        seeds=[1],
    )
    plan = build_plan(sweep, MODELS)
    assert sorted(zip(plan.table["prompt"], plan.table["loras"], strict=True)) == [
        ("a castle in ink drawing", "grain:0.2"),
        ("a castle in ink drawing", "grain:0.8;ink:0.8"),  # the stack's 0.6 plus the tag's 0.2
        ("a castle in oil", ""),
        ("a castle in oil", "grain:0.6;ink:0.8"),
    ]
    same = build_plan(
        replace(sweep, slots={"style": ["ink drawing"]}, stacks={"s": {"ink": 0.8, "grain": 0.8}}), MODELS
    )
    assert same.table["job_id"].iloc[0] in set(plan.table["job_id"])
    assert used_assets(sweep)[0] == {"ink", "grain"}


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        (
            "a <lora:inky:0.5>",
            "",
            "sweep.prompts[0]: <lora:inky> is not found for any model (did you mean 'ink'?); LoRAs found: grain, ink",
        ),
        (
            "a <lora:ink:lots>",
            "",
            "sweep.prompts[0]: <lora:ink:lots> has a weight that is not a number; write <lora:ink:0.8>",
        ),
        (
            "a <lora:ink:12>",
            "",
            "sweep.prompts[0]: <lora:ink:12>: weight 12 is outside [-10, 10]; LoRA weights are "
            "usually between -2 and 2",
        ),
        (
            "a <lora:ink:1:1:1>",
            "",
            "sweep.prompts[0]: <lora:ink:1:1:1> has parameters batchgen does not read; write "
            "<lora:ink:w>, <lora:ink:te=w:unet=w> or <lora:ink:w:lbw=PRESET>",
        ),
        (
            "a <lora:ink:1> <lora:ink:2>",
            "",
            "sweep.prompts[0]: LoRA 'ink' is tagged twice; keep one <lora:ink:...> tag",
        ),
        (
            "a",
            "blurry <lora:ink:1>",
            "sweep.negative_prompt: <lora:...> tags work in prompts only (a negative prompt "
            "does not choose weights); move the tag to the prompt or a stack",
        ),
    ],
)
def test_bad_tags_are_errors(prompt: str, negative: str, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        build_plan(_sweep(prompts=[prompt], negative_prompt=negative, slots={}), MODELS)
    assert str(e.value) == message


def test_a_tagged_prompt_renders_the_stacked_image(run_cli, tmp_path: Path) -> None:
    conf = tmp_path / "conf" / "sweep"
    conf.mkdir(parents=True)
    for name, prompt, stacks in (
        ("tag", "a castle at night <lora:ink:0.8>", "{}"),
        ("stack", "a castle at night", "{ink: {ink: 0.8}}"),
    ):
        (conf / f"{name}.yaml").write_text(
            "# @package _global_\ndefaults:\n  - /model@models.tiny_sd1: tiny_sd1\n"
            f"sweep:\n  name: {name}\n  prompts: ['{prompt}']\n  stacks: {stacks}\n"
            "  seeds: [1]\n  steps: 2\n  width: 64\n  height: 64\n  references: false\n"
        )
        code, _, err = run_cli("--config-dir", str(tmp_path / "conf"), f"+sweep={name}")
        assert code == 0, err
    tag = pd.read_csv(tmp_path / "runs/tag/manifest.csv", keep_default_na=False)
    stack = pd.read_csv(tmp_path / "runs/stack/manifest.csv", keep_default_na=False)
    assert len(tag) == len(stack) == 1
    assert (tag["loras"][0], tag["prompt"][0], tag["status"][0]) == ("ink:0.8", "a castle at night", "ok")
    assert tag["job_id"][0] == stack["job_id"][0]
    # The PNGs' JSON chunks name the stack and template; the pixels are the same.
    pixels = [
        np.asarray(Image.open(tmp_path / "runs" / n / "images" / f"{tag['job_id'][0]}.png")) for n in ("tag", "stack")
    ]
    assert np.array_equal(*pixels)


# --- sweep.prompts_file -------------------------------------------------------------------------------------------


def test_prompts_from_a_txt_file_follow_the_sweep_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a castle at night\n\n  a portrait of <alf> <lora:ink:0.5>  \n")
    rows = read_prompts_file(str(tmp_path / "p.txt"))
    assert rows == [PromptRow("a castle at night"), PromptRow("a portrait of <alf> <lora:ink:0.5>")]
    sweep = _sweep(models=["sd1"], prompts=["a dog"], slots={}, stacks={}, seeds=[1, 2])
    plan = build_plan(sweep, MODELS, rows)
    assert list(plan.table["prompt"]) == ["a dog"] * 2 + ["a castle at night"] * 2 + ["a portrait of <alf>"] * 2
    assert list(plan.table["loras"]) == [""] * 4 + ["ink:0.5"] * 2
    assert used_assets(sweep, rows) == ({"ink"}, {"alf"})


def test_csv_rows_are_zipped_not_multiplied(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        "prompt,negative_prompt,seed\n"
        'a castle at night,blurry,7\n"a portrait of <alf>, smiling",,\na dog,"cartoon, <cartoona>",3\n'
    )
    rows = read_prompts_file(str(tmp_path / "p.csv"))
    assert rows == [
        PromptRow("a castle at night", "blurry", 7),
        PromptRow("a portrait of <alf>, smiling", "", None),
        PromptRow("a dog", "cartoon, <cartoona>", 3),
    ]
    plan = build_plan(_sweep(models=["sd1"], prompts=[], slots={}, stacks={}, seeds=[1, 2]), MODELS, rows)
    got = list(zip(plan.table["prompt"], plan.table["negative_prompt"], plan.table["seed"], strict=True))
    assert got == [
        ("a castle at night", "blurry", 7),
        ("a portrait of <alf>, smiling", "", 1),  # no seed in the row: the sweep's seeds
        ("a portrait of <alf>, smiling", "", 2),
        ("a dog", "cartoon, <cartoona>", 3),
    ]
    assert list(plan.table["embeddings"]) == ["", "alf", "alf", "cartoona"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "text\nx\n", "sweep.prompts_file: {f} has no 'prompt' column (columns: text)"),
        (
            "p.csv",
            "prompt,cfg\nx,7\n",
            "sweep.prompts_file: {f} has column 'cfg', which batchgen does not read; use "
            "prompt, negative_prompt, seed",
        ),
        ("p.csv", "prompt,seed\nx,-1\n", "sweep.prompts_file: {f} line 2: seed '-1' is not an integer >= 0"),
        ("p.csv", "prompt,seed\n,4\n", "sweep.prompts_file: {f} line 2 has no prompt; fill it in or delete the row"),
        ("p.txt", "\n\n", "sweep.prompts_file: {f} holds no prompt; write one per line (or per CSV row)"),
        ("p.json", "[]", "sweep.prompts_file: {f} is neither .txt nor .csv; rename it or convert it"),
    ],
)
def test_bad_prompts_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(BatchgenError) as e:
        read_prompts_file(str(tmp_path / name))
    assert str(e.value) == message.format(f=tmp_path / name)


def test_prompts_file_in_a_dry_run(run_cli, tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,seed\na castle at night,5\na portrait of <alf>,6\n")
    code, out, err = run_cli(
        "+sweep=styles",
        "sweep.models=[tiny_sd1]",
        "sweep.prompts=[]",
        f"+sweep.prompts_file={tmp_path}/p.csv",
        "--dry-run",
    )
    assert code == 0, err
    # 2 rows x 6 stack states, each row with its own seed (the sweep's two seeds do not multiply them)
    assert "jobs: 12 to render in total" in out and "  seed            2\n" in out
    code, _, err = run_cli("+sweep=styles", f"+sweep.prompts_file={tmp_path}/none.txt", "--dry-run")
    assert (code, err.strip()) == (
        2,
        f"batchgen: error: sweep.prompts_file: {tmp_path}/none.txt is not a file; give a .txt (one prompt per "
        "line) or a .csv",
    )
