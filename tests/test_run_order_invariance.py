"""A job's pixels never depend on what else its run renders: every job of a random sweep, rendered inside the whole
run, equals the same job rendered alone in a fresh run directory.

The sweeps are drawn over the settings table (each setting takes its default or the value off its default that
tests/test_settings.py gives every setting, so a new setting is drawn here without editing this file), over LoRA
stacks (plain, split and block weights with the text encoder's BASE block varied, weight lists, a glob matching two
files, one LoRA in several stacks), over prompts with TI strengths, attention weights and prompt editing, and over
batch sizes. A job's "alone" sweep is rebuilt from its manifest row alone: its model, prompt, LoRAs and the value
of every axis setting, so the comparison also checks that the lone job gets the same job_id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from batchgen.settings import SETTINGS
from tests.test_settings import OFF_DEFAULT

MODEL = "tiny_sd1"
SD1_SHORT = 17  # the LoRA Block Weight extension's SD1 vector: BASE, then 16 UNet blocks
# Values kept small for speed; every other setting draws from the table (its default and its test value).
CHEAP: dict[str, list[Any]] = {"steps": [2, 3], "width": [64, 72], "height": [64]}
PROMPTS = (
    "a castle at night",
    "a portrait of <alf>, (<cartoona>:0.7) style",  # a TI at a strength
    "a [castle:tower:0.5] at (dusk:1.3)",  # prompt editing and attention weights
)
# Few names, so that stacks share LoRAs; `p*` is a glob over pastel and peft_sketch.
LORA_NAMES = ("ink", "grain", "hatch", "p*")
TOLERANCE = 1  # of 255
MAX_JOBS = 8


def _pool(setting) -> list[Any]:
    if setting.name in CHEAP:
        return CHEAP[setting.name]
    values = [OFF_DEFAULT[setting.name][0]]
    if setting.value_default is not None:
        values.insert(0, setting.value_default)
    return values


@st.composite
def _lora_entry(draw) -> Any:
    weight = draw(st.sampled_from([0.5, 1.0]))
    kind = draw(st.sampled_from(["plain", "list", "split", "blocks", "block list"]))
    if kind == "plain":
        return weight
    if kind == "list":
        return [0.5, 1.0]
    if kind == "split":
        return {"unet": weight, "text_encoder": draw(st.sampled_from([0.0, 0.5, 1.0]))}
    vectors = [
        ",".join(str(v) for v in [draw(st.sampled_from([0.0, 0.5, 1.0]))] + draw(_unet_blocks()))
        for _ in range(2 if kind == "block list" else 1)
    ]
    return {"weight": weight, "blocks": vectors if kind == "block list" else vectors[0]}


def _unet_blocks():
    return st.lists(st.sampled_from([0.0, 1.0]), min_size=SD1_SHORT - 1, max_size=SD1_SHORT - 1)


@st.composite
def sweeps(draw) -> dict[str, Any]:
    stacks: dict[str, Any] = {}
    for i in range(draw(st.integers(1, 2))):
        names = draw(st.lists(st.sampled_from(LORA_NAMES), min_size=0 if i == 0 else 1, max_size=2, unique=True))
        stacks[f"s{i}"] = {name: draw(_lora_entry()) for name in names}
    sweep: dict[str, Any] = {
        "prompts": draw(st.lists(st.sampled_from(PROMPTS), min_size=1, max_size=2, unique=True)),
        "stacks": stacks,
        "references": False,
        "batch_size": draw(st.sampled_from([1, 2, "auto"])),
    }
    run: dict[str, Any] = {}
    # One axis setting takes two values, the others one each: every setting is drawn, the sweep stays small.
    varied = draw(st.sampled_from([s.name for s in SETTINGS if s.axis]))
    for setting in SETTINGS:
        pool = _pool(setting)
        if setting.axis:
            size = min(2, len(pool)) if setting.name == varied else 1
            value = draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size, unique=True))
        else:
            value = draw(st.sampled_from(pool))
        (sweep if setting.section == "sweep" else run)[setting.field] = value
    assume(_count(sweep) <= MAX_JOBS)
    return {"sweep": sweep, "run": run}


def _count(sweep: dict[str, Any]) -> int:
    """Jobs the sweep plans (an upper bound: equal jobs are rendered once)."""
    states = 0
    for stack in sweep["stacks"].values():
        product = 1
        for name, entry in stack.items():
            product *= 2 if "*" in name else 1
            product *= len(entry) if isinstance(entry, list) else 1
            product *= len(entry["blocks"]) if isinstance(entry, dict) and isinstance(entry.get("blocks"), list) else 1
        states += product
    values = [len(v) for s in SETTINGS if s.axis and isinstance(v := sweep.get(s.field), list)]
    return states * len(sweep["prompts"]) * int(np.prod(values))


# The bug that motivated the test: a block vector whose BASE (text encoder) weight is 0, rendered after a stack of
# the same LoRA at full weight, took that stack's prompt encodings.
_BUG = {
    "sweep": {
        "prompts": [PROMPTS[0]],
        "stacks": {"full": {"ink": 1.0}, "no_te": {"ink": {"weight": 1.0, "blocks": "0" + ",1" * (SD1_SHORT - 1)}}},
        "references": False,
        "batch_size": 1,
        "seeds": [1],
        "steps": 2,
        "width": 64,
        "height": 64,
    },
    "run": {},
}


@pytest.mark.slow
# No shrinking: every step renders whole sweeps; a failure prints its sweep, which reproduces it as it is.
@settings(
    max_examples=3,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@example(config=_BUG)
@given(config=sweeps())
def test_every_job_renders_alone_as_it_renders_inside_its_run(config: dict[str, Any], run_cli) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        whole = _render(run_cli, root / "whole", config)
        assert len(whole) <= MAX_JOBS
        for row in whole.itertuples():
            alone_dir = root / f"alone-{row.job_id}"
            alone = _render(run_cli, alone_dir, _alone(config, row._asdict()))
            assert list(alone["job_id"]) == [row.job_id], f"{row.loras}: the lone job got another job_id"
            ours = _pixels(root / "whole" / row.image)
            lone = _pixels(alone_dir / alone["image"].iloc[0])
            worst = int(np.abs(ours - lone).max())
            assert worst <= TOLERANCE, f"job {row.job_id} ({row.loras}, {row.prompt!r}) differs by {worst}/255 alone"


def _render(run_cli, out: Path, config: dict[str, Any]) -> pd.DataFrame:
    conf = out.parent / f"conf-{out.name}"
    (conf / "sweep").mkdir(parents=True)
    sweep = {"name": "prop", "models": [MODEL], **config["sweep"]}
    document = {"defaults": [{f"/model@models.{MODEL}": MODEL}], "sweep": sweep, "run": {**config["run"]}}
    text = "# @package _global_\n" + yaml.safe_dump(document, sort_keys=False)
    (conf / "sweep" / "prop.yaml").write_text(text)
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=prop", f"run.out_dir={out}")
    assert code == 0, f"{err}\n{text}"
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(table["status"]) == {"ok"}, table[["status", "error"]]
    return table


def _alone(config: dict[str, Any], row: dict[str, str]) -> dict[str, Any]:
    """The sweep of this one job, from its manifest row: the run's scalar settings, the row's axis values."""
    sweep = {**config["sweep"], "prompts": [row["prompt_template"]], "stacks": {"only": _stack(row["loras"])}}
    run = dict(config["run"])
    for setting in SETTINGS:
        if not setting.axis:
            continue
        assert setting.column_after is not None, f"axis setting {setting.name} has no manifest column to rebuild from"
        (sweep if setting.section == "sweep" else run)[setting.field] = [setting.read(row[setting.name])]
    return {"sweep": sweep, "run": run}


def _stack(cell: str) -> dict[str, Any]:
    """A `loras` cell (`ink:0.5/1:lbw=0,1,...;grain:1`) as a stack of the config."""
    stack: dict[str, Any] = {}
    for entry in filter(None, cell.split(";")):
        weights, _, blocks = entry.partition(":lbw=")
        name, _, weight = weights.partition(":")
        unet, _, te = weight.partition("/")
        value: dict[str, Any] = {"unet": float(unet), "text_encoder": float(te or unet)}
        if blocks:
            value["blocks"] = blocks
        stack[name] = value
    return stack


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
