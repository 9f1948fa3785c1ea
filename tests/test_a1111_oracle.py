"""Oracle for sweep.prompt_syntax=a1111: batchgen's images against tests/a1111_reference.py (A1111's algorithm,
written independently of batchgen's parser and encoder) feeding a plain diffusers pipeline, or its own denoise loop
for prompt editing and separate cond/uncond passes. Images within 2/255."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests import a1111_reference as ref
from tests.reference import load_embedding

MAX_PIXEL_DIFF = 2
LONG = ", ".join(["a (red:1.2) castle on a [green] hill"] * 9)  # over 75 tokens: two chunks and more
NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.lycoris", "~sweep.stacks.peft")
PROMPTS = [
    "a (castle:1.5) at night",
    "a ((castle)) at [night]",
    r"a \(castle\) at night",
    "a portrait of (<alf>:0.7), (ink:1.3)",
    "a castle BREAK at (night:1.2)",
    LONG,
]


def _pipe(tiny_cache: Path, model: str):
    from diffusers import DiffusionPipeline

    root = next(tiny_cache.glob(f"*/{model}"))
    pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for path in sorted((root / "embedding").iterdir()):
        load_embedding(pipe, path, f"<{path.stem}>")
    return pipe


def _run(run_cli, tmp_path: Path, name: str, prompts: list[str], *overrides: str) -> pd.DataFrame:
    quoted = ", ".join(f"'{p}'" for p in prompts)
    code, _, err = run_cli(
        "+sweep=styles", "sweep.seeds=[3]", "sweep.steps=4", "sweep.slots={}", f"sweep.prompts=[{quoted}]",
        *NO_LORAS, *overrides, f"run.out_dir=runs/{name}",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(tmp_path / "runs" / name / "manifest.csv", keep_default_na=False)
    assert set(table["status"]) == {"ok"} and sorted(table["prompt"].unique()) == sorted(set(prompts))
    return table


def _ours(tmp_path: Path, name: str, row: pd.Series) -> np.ndarray:
    return np.asarray(Image.open(tmp_path / "runs" / name / row["image"]), dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sdxl"])
def test_weights_nesting_escapes_a_ti_break_and_a_long_prompt(run_cli, tmp_path, tiny_cache, model) -> None:
    table = _run(run_cli, tmp_path, "pad", PROMPTS, f"sweep.models=[{model}]", "sweep.pad_prompts=true")
    pipe = _pipe(tiny_cache, model)
    for _, row in table.iterrows():
        theirs = pipe(
            **ref.pipeline_kwargs(pipe, row["prompt"], row["negative_prompt"]),
            num_inference_steps=4,
            guidance_scale=float(row["guidance_scale"]),
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]
        diff = np.abs(_ours(tmp_path, "pad", row) - np.asarray(theirs, dtype=np.int16)).max()
        assert diff <= MAX_PIXEL_DIFF, (row["prompt"], diff)


@pytest.mark.slow
def test_clip_skip_with_weights(run_cli, tmp_path, tiny_cache) -> None:
    table = _run(run_cli, tmp_path, "skip", PROMPTS[:2], "sweep.models=[tiny_sd1]", "sweep.clip_skip=2")
    pipe = _pipe(tiny_cache, "tiny_sd1")
    for _, row in table.iterrows():
        cond, _ = ref.encode(pipe, row["prompt"], clip_skip=2)
        uncond, _ = ref.encode(pipe, row["negative_prompt"], clip_skip=2)
        theirs = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            num_inference_steps=4,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]
        diff = np.abs(_ours(tmp_path, "skip", row) - np.asarray(theirs, dtype=np.int16)).max()
        assert diff <= MAX_PIXEL_DIFF, (row["prompt"], diff)


def test_the_hand_loop_is_the_pipeline(tiny_cache) -> None:
    pipe = _pipe(tiny_cache, "tiny_sd1")
    ours = ref.sd1_loop(pipe, [(4, "a castle")], [(4, "blurry")], steps=4, seed=3, guidance=7.5)
    theirs = pipe(
        **ref.pipeline_kwargs(pipe, "a castle", "blurry"),
        num_inference_steps=4,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= MAX_PIXEL_DIFF


@pytest.mark.slow
def test_prompt_editing_alternation_and_separate_passes(run_cli, tmp_path, tiny_cache) -> None:
    prompts = [
        "a [castle:forest:0.5] at night",
        "a [castle|forest] at night",
        LONG,
        "a [castle:(forest:1.3):3]",
        "[a castle at night:<alf>:1]",
    ]
    table = _run(run_cli, tmp_path, "edit", prompts, "sweep.models=[tiny_sd1]", "sweep.batch_size=4")
    # The schedules as A1111 computes them for 4 steps, written out by hand.
    alternating = [
        (1, "a castle at night"),
        (2, "a forest at night"),
        (3, "a castle at night"),
        (4, "a forest at night"),
    ]
    schedules = {
        prompts[0]: [(2, "a castle at night"), (4, "a forest at night")],
        prompts[1]: alternating,
        prompts[2]: [(4, LONG)],  # two chunks against a one-chunk negative: separate passes
        prompts[3]: [(3, "a castle"), (4, "a (forest:1.3)")],
        prompts[4]: [(1, "a castle at night"), (4, "<alf>")],
    }
    pipe = _pipe(tiny_cache, "tiny_sd1")
    for _, row in table.iterrows():
        negative = [(4, row["negative_prompt"])]
        theirs = ref.sd1_loop(pipe, schedules[row["prompt"]], negative, steps=4, seed=3, guidance=7.5)
        diff = np.abs(_ours(tmp_path, "edit", row) - theirs).max()
        assert diff <= MAX_PIXEL_DIFF, (row["prompt"], diff)
    # The edited image is neither text's alone (the first text for steps 0-1, the TI for steps 2-3).
    row = table.loc[table["prompt"] == prompts[4]].iloc[0]
    edited = _ours(tmp_path, "edit", row)
    for text in ("a castle at night", "<alf>"):
        alone = ref.sd1_loop(pipe, [(4, text)], [(4, row["negative_prompt"])], steps=4, seed=3, guidance=7.5)
        assert np.abs(edited - alone).max() > 8 * MAX_PIXEL_DIFF, text


def test_the_reference_parser_reads_a1111s_examples() -> None:
    assert ref.attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]
    assert ref.attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert ref.attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
