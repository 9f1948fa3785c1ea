"""The settings table reaches every consumer: config schema, planner axes, job_id, Job, manifest, batch key,
render order, grid axes, diff and the PNG parameters. Each check plans real sweeps that differ in one setting."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from omegaconf import OmegaConf

from batchgen.axes import BASE_AXES, check_grid
from batchgen.columns import DIFF_COLUMNS, EMPTY_CELLS, MANIFEST_COLUMNS
from batchgen.config import RunConfig, SweepConfig
from batchgen.engine.png import a1111_parameters
from batchgen.engine.worker import batch_key
from batchgen.errors import BatchgenError
from batchgen.plan import Plan, build_plan
from batchgen.settings import SETTINGS, JobId, Setting
from batchgen.spec import Job, LoraState
from tests.test_plan import MODELS, _sweep

# Per setting: a value off its default, and what the PNG parameters then say (None: nothing there changes).
OFF_DEFAULT: dict[str, tuple[Any, str | None]] = {
    "seed": (2, "Seed: 2"),
    "steps": (9, "Steps: 9"),
    "guidance_scale": (5.0, "CFG scale: 5.0"),
    "width": (72, "Size: 72x64"),
    "height": (72, "Size: 64x72"),
    "scheduler": ("euler", "Sampler: Euler"),
    "clip_skip": (2, "Clip skip: 2"),
    "truncate_prompts": (True, None),
    "prompt_syntax": ("plain", None),
    "pad_prompts": (True, "Pad conds: True"),
    "max_sequence_length": (77, None),
}
# job_ids the planner gave before the settings table (main at 3a41902): the base sweep, then one setting changed.
BASE_ID = "5e216825c598e6fe"
IDS_BEFORE = {
    "seed": "9e662d412cfd36bc",
    "steps": "7d89a7c6d911a547",
    "guidance_scale": "745d695fc140b0f2",
    "width": "651374f19e796d4f",
    "height": "3480703c3d56360f",
    "scheduler": "259851e415f270d0",
    "clip_skip": "26f1076bf82285c1",
    "truncate_prompts": "51030f006afd1ce8",
    # Hashed through their effect, which a one-chunk prompt without syntax does not feel: the id stays.
    "prompt_syntax": BASE_ID,
    "pad_prompts": BASE_ID,
    "max_sequence_length": BASE_ID,  # SD1 has no T5 (tests/test_mmdit_plan.py: a FLUX.1 job's id changes)
}
BASE = {"models": ["sd1"], "prompts": ["a castle at night"], "slots": {}, "stacks": {}, "seeds": [1]}
BY_NAME = {s.name: s for s in SETTINGS}


def _plan(setting: Setting | None = None, value: Any = None) -> Plan:
    """The base sweep (one job, no LoRA, no TI), with one setting set to `value` (a list: an axis)."""
    sweep, run = _sweep(**BASE), RunConfig()
    if setting is not None:
        if setting.section == "sweep":
            sweep = dataclasses.replace(sweep, **{setting.field: value})
        else:
            run = dataclasses.replace(run, **{setting.field: value})
    return build_plan(sweep, MODELS, (), run)


def _parameters(plan: Plan) -> list[str]:
    """The `key: value` pairs of the job's PNG parameters line."""
    return a1111_parameters(plan.table.iloc[0].to_dict(), MODELS["sd1"]).split("\n")[-1].split(", ")


def test_every_setting_has_a_test_value() -> None:
    assert set(OFF_DEFAULT) == set(BY_NAME) == set(IDS_BEFORE)
    for name, (value, _) in OFF_DEFAULT.items():
        assert value != BY_NAME[name].value_default


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_config_field_with_the_tables_default(setting: Setting) -> None:
    section = OmegaConf.structured(SweepConfig(name="x") if setting.section == "sweep" else RunConfig())
    default = list(setting.default) if isinstance(setting.default, tuple) else setting.default
    assert OmegaConf.to_container(section)[setting.field] == default
    value, _ = OFF_DEFAULT[setting.name]
    # An override as a user writes it sets the value the planner reads.
    assert OmegaConf.merge(section, OmegaConf.from_dotlist([f"{setting.field}={value}"]))[setting.field] == value


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_job_field_carries_the_value(setting: Setting) -> None:
    fields = {f.name: f for f in dataclasses.fields(Job)}
    assert fields[setting.name].default == setting.value_default
    value, _ = OFF_DEFAULT[setting.name]
    assert getattr(Job("0" * 16, "m", "a castle", "", lora_state=LoraState()), setting.name) == setting.value_default
    assert getattr(_plan(setting, value).jobs[0], setting.name) == value


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_axis_and_manifest_column(setting: Setting) -> None:
    value, _ = OFF_DEFAULT[setting.name]
    if setting.axis:
        plan = _plan(setting, [setting.value_default, value])
        assert plan.axis_counts()[setting.name] == 2
        assert list(plan.table[setting.name]) == [setting.value_default, value]
        if setting.job_id is JobId.EFFECT:
            # The base prompt reads alike under both values: one job, as the id says.
            assert len(plan.jobs) == 1 and plan.table["job_id"].nunique() == 1
        else:
            assert sorted(getattr(j, setting.name) for j in plan.jobs) == sorted([setting.value_default, value])
    else:
        plan = _plan(setting, value)
        assert setting.name not in plan.axis_counts()
        with pytest.raises(BatchgenError, match=f"^{setting.key}: "):
            _plan(setting, [setting.value_default, value])
    if setting.column_after is None:
        assert setting.name not in MANIFEST_COLUMNS and setting.name not in plan.table.columns
    else:
        assert MANIFEST_COLUMNS.index(setting.name) == MANIFEST_COLUMNS.index(setting.column_after) + 1
        assert _plan(setting, value).table[setting.name][0] == value


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_job_id(setting: Setting) -> None:
    value, _ = OFF_DEFAULT[setting.name]
    assert _plan().jobs[0].job_id == BASE_ID
    assert _plan(setting, value).jobs[0].job_id == IDS_BEFORE[setting.name]
    assert (IDS_BEFORE[setting.name] == BASE_ID) == (setting.job_id is JobId.EFFECT)
    if setting.job_id is JobId.OFF_DEFAULT:
        # Written out at its default, the setting leaves the id of a sweep from before it as it was.
        assert _plan(setting, setting.value_default).jobs[0].job_id == BASE_ID


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_batch_key_and_render_order(setting: Setting) -> None:
    value, _ = OFF_DEFAULT[setting.name]
    assert (batch_key(_plan().jobs[0]) != batch_key(_plan(setting, value).jobs[0])) == setting.batch
    if setting.axis and setting.name != "seed" and setting.job_id is not JobId.EFFECT:
        # Seeds vary fastest in the table; the render order still keeps each batch key's jobs together.
        sweep = dataclasses.replace(_sweep(**BASE), seeds=[1, 2, 3], **{setting.field: [setting.value_default, value]})
        keys = [batch_key(j) for j in build_plan(sweep, MODELS).jobs]
        assert len(keys) == 6 and sum(a != b for a, b in itertools.pairwise(keys)) == 1


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_grid_axis(setting: Setting) -> None:
    assert (setting.name in BASE_AXES) == setting.grid
    if setting.grid:
        check_grid(setting.name, "prompt", None, [], [])
    else:
        with pytest.raises(BatchgenError, match=f"unknown axis '{setting.name}'"):
            check_grid(setting.name, "prompt", None, [], [])


def test_grid_axes_keep_their_order() -> None:
    assert BASE_AXES == (
        *("model", "stack", "prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler"),
        "clip_skip",
        "prompt_syntax",
        "max_sequence_length",
        "epoch",
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_diff_setting(setting: Setting) -> None:
    assert (setting.name in DIFF_COLUMNS) == setting.diff
    if setting.diff:
        assert setting.column_after is not None  # diff reads it from the manifest
    if setting.empty_cell is not None:
        # An old manifest's empty cell and the cell a new run writes at the default match in a diff.
        assert EMPTY_CELLS[setting.name] == setting.empty_cell == str(_plan().table[setting.name][0])
        assert setting.read("") == setting.value_default


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_png_parameter(setting: Setting) -> None:
    value, text = OFF_DEFAULT[setting.name]
    before, after = _parameters(_plan()), _parameters(_plan(setting, value))
    if text is None:
        assert setting.a1111 is None and after == before
        return
    assert text in after and text not in before
    if setting.a1111 is not None:
        assert text.startswith(f"{setting.a1111.key}: ")
        assert any(p.startswith(f"{setting.a1111.key}: ") for p in before) == (not setting.a1111.omit_at_default)


def test_png_parameters_keep_a1111s_order() -> None:
    clip_skip = BY_NAME["clip_skip"]
    assert ", ".join(_parameters(_plan(clip_skip, 2))) == (
        "Steps: 8, Sampler: default, CFG scale: 7.5, Seed: 1, Size: 64x64, Model hash: c1c1c1c1c1, Model: sd1, "
        "Clip skip: 2, Version: batchgen"
    )
