"""batchgen.cells: every structured manifest cell read back as it was written, and written as it was before the
codec existed.

The `_before_*` functions are the code each cell was written and read with on main at b699c15, before the one
codec (issue 34): spec.LoraWeight.label, axes.lora_entries / stack_label, plan.stacks.StackState.png_label,
engine.png's tag weights, engine.writer's timings, runner's and report.summary's timings readers, manifest._cell.
For every drawn input the codec gives the same text, so no manifest, PNG or label changes.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen import cells
from batchgen.cells import LoraEntry
from batchgen.columns import COLUMNS
from batchgen.spec import STAGES, LoraWeight, format_number

# --- the code before the codec (main at b699c15) ---------------------------------------------------------------------


def _before_label(lw: LoraWeight) -> str:
    if lw.unet == lw.text_encoder:
        text = f"{lw.name}:{format_number(lw.unet)}"
    else:
        text = f"{lw.name}:{format_number(lw.unet)}/{format_number(lw.text_encoder)}"
    return f"{text}:lbw={lw.blocks_spec}" if lw.blocks_spec else text


def _before_lora_entries(loras_cell: str) -> list[tuple[str, str, str]]:
    out = []
    for entry in (loras_cell or "").split(";"):
        if ":" in entry:
            entry, _, blocks = entry.partition(":lbw=")
            name, weight = entry.split(":", 1)
            out.append((name, weight, blocks))
    return out


def _before_stack_label(loras_cell: str, without=(), without_blocks=()) -> str:
    skip, plain = set(without), set(without_blocks)
    parts = [
        f"{lora} {weight}" + (f" lbw={blocks}" if blocks and lora not in plain else "")
        for lora, weight, blocks in _before_lora_entries(loras_cell)
        if lora not in skip
    ]
    return " + ".join(parts) if parts else "none"


def _before_png_label(loras: list[LoraWeight], globbed: dict[str, str]) -> str:
    return _before_stack_label(
        ";".join(_before_label(dataclasses.replace(lw, name=globbed.get(lw.name, lw.name))) for lw in loras)
    )


def _before_tags(loras_cell: str) -> str:
    def weight_text(weight: str) -> str:
        weight, lbw, blocks = weight.partition(":lbw=")
        if "/" in weight:
            unet, te = weight.split("/", 1)
            weight = f"te={te}:unet={unet}"
        return f"{weight}{lbw}{blocks}"

    loras = [entry.split(":", 1) for entry in loras_cell.split(";") if entry]
    return "".join(f" <lora:{name}:{weight_text(weight)}>" for name, weight in loras)


def _before_timings(timings: dict[str, float]) -> str:
    stages = [stage for stage in STAGES if stage in timings]
    return ";".join(f"{stage}={timings[stage]:.4f}" for stage in stages)


def _before_runner_totals(cell: str) -> dict[str, float]:
    totals = dict.fromkeys(STAGES, 0.0)
    for part in filter(None, (cell or "").split(";")):
        stage, seconds = part.split("=")
        totals[stage] += float(seconds)
    return totals


def _before_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(value)
    return str(value)


# --- what a sweep can put in a cell ----------------------------------------------------------------------------------

# LoRA names are file stems: anything but the cell's separators (and no leading/trailing blank, as names are typed).
names = st.text(st.characters(blacklist_characters=":;<>\n", blacklist_categories=("Cs",)), min_size=1, max_size=12)
weights = st.floats(-10, 10, allow_nan=False) | st.sampled_from([0.0, 1.0, 0.5, -0.25, 1e-07, 0.1 + 0.2])
presets = st.sampled_from(["OUTD", "ALL", "INS", "MIDD", "FLUXALL"])
vectors = st.lists(st.sampled_from([0.0, 1.0, 0.5, 0.25]), min_size=1, max_size=17).map(
    lambda v: ",".join(format_number(x) for x in v)
)
blocks = st.just("") | presets | vectors


@st.composite
def lora_weights(draw: st.DrawFn) -> list[LoraWeight]:
    chosen = draw(st.lists(names, max_size=4, unique=True))
    out = []
    for name in sorted(chosen):
        unet = draw(weights)
        te = draw(st.just(unet) | weights)
        out.append(LoraWeight(name, unet, te, draw(blocks)))
    return out


# --- loras -----------------------------------------------------------------------------------------------------------


@given(lora_weights())
def test_a_loras_cell_reads_back_as_written(loras: list[LoraWeight]) -> None:
    cell = cells.format_loras(loras)
    assert cell == ";".join(_before_label(lw) for lw in loras)  # the manifest text is what it was
    entries = cells.parse_loras(cell)
    assert [(e.name, e.blocks) for e in entries] == [(lw.name, lw.blocks_spec) for lw in loras]
    for entry, lw in zip(entries, loras, strict=True):
        split = lw.unet != lw.text_encoder
        assert entry.weights == ((lw.unet, lw.text_encoder) if split else (lw.unet,))
        assert float(entry.unet_weight) == lw.unet
        assert (float(entry.te_weight) if entry.te_weight else lw.unet) == lw.text_encoder
    assert entries == tuple(LoraEntry.of(lw) for lw in loras)
    assert cells.format_loras(entries) == cell
    assert [(e.name, e.weight, e.blocks) for e in entries] == _before_lora_entries(cell)


@given(lora_weights())
def test_the_png_tags_read_the_cell_as_before(loras: list[LoraWeight]) -> None:
    from batchgen.engine.png import _a1111_weight

    cell = cells.format_loras(loras)
    tags = "".join(f" <lora:{e.name}:{_a1111_weight(e)}>" for e in cells.parse_loras(cell))
    assert tags == _before_tags(cell)


def test_a_loras_cell_of_every_kind() -> None:
    loras = [LoraWeight("grain", 0.6, 0.6), LoraWeight("ink", 0.5, 0.25, "OUTD"), LoraWeight("x", 1.0, 1.0, "1,0,1")]
    cell = cells.format_loras(loras)
    assert cell == "grain:0.6;ink:0.5/0.25:lbw=OUTD;x:1:lbw=1,0,1"
    assert cells.parse_loras(cell) == (
        LoraEntry("grain", "0.6"),
        LoraEntry("ink", "0.5/0.25", "OUTD"),
        LoraEntry("x", "1", "1,0,1"),
    )
    assert cells.parse_loras("") == cells.parse_loras(float("nan")) == cells.parse_loras(None) == ()
    assert cells.lora_names(["ink:0.5;grain:1", "", float("nan"), "hatch:0.7"]) == ["grain", "hatch", "ink"]


# --- stack labels ----------------------------------------------------------------------------------------------------


@given(lora_weights(), st.data())
def test_a_stack_label_is_the_same_from_the_plan_and_from_the_manifest(loras: list[LoraWeight], data) -> None:
    """The plan labels a stack from its LoRAs (the PNG chunk's `stack`), the report from the `loras` cell read back
    (grids, old manifests whose `stack` held the label): one label, as before."""
    cell = cells.format_loras(loras)
    entries = tuple(LoraEntry.of(lw) for lw in loras)
    assert cells.stack_label(entries) == cells.stack_label(cell) == _before_stack_label(cell)
    chosen = [lw.name for lw in loras]
    without = data.draw(st.lists(st.sampled_from(chosen), unique=True) if chosen else st.just([]))
    plain = data.draw(st.lists(st.sampled_from(chosen), unique=True) if chosen else st.just([]))
    assert cells.stack_label(cell, without, plain) == _before_stack_label(cell, without, plain)
    globbed = (
        {name: f"{name[:1]}*" for name in data.draw(st.lists(st.sampled_from(chosen), unique=True))} if chosen else {}
    )
    renamed = tuple(dataclasses.replace(LoraEntry.of(lw), name=globbed.get(lw.name, lw.name)) for lw in loras)
    assert cells.stack_label(renamed) == _before_png_label(loras, globbed)


def test_stack_labels_of_every_kind() -> None:
    cell = "grain:0.6;ink:0.8/0.4:lbw=OUTD"
    assert cells.stack_label(cell) == "grain 0.6 + ink 0.8/0.4 lbw=OUTD"
    assert cells.stack_label(cell, ["grain"]) == "ink 0.8/0.4 lbw=OUTD"
    assert cells.stack_label(cell, (), ["ink"]) == "grain 0.6 + ink 0.8/0.4"
    assert cells.stack_label(cell, ["grain", "ink"]) == cells.stack_label("") == "none"
    assert cells.lora_label("ink", "0.5", "OUTD") == "ink 0.5 lbw=OUTD"
    assert cells.lora_label("", "0.5", "OUTD") == "0.5 lbw=OUTD"
    assert cells.lora_label("ink", "", "OUTD") == "ink lbw=OUTD"
    assert cells.absent_label("ink") == "no ink"


# --- embeddings, lora_triggers ---------------------------------------------------------------------------------------


@given(st.lists(names, unique=True, max_size=4))
def test_an_embeddings_cell_reads_back(triggers: list[str]) -> None:
    cell = cells.format_names(triggers)
    assert cell == ";".join(triggers)
    assert cells.parse_names(cell) == tuple(triggers)


@given(st.lists(st.tuples(names, st.text(st.characters(blacklist_characters=";"), max_size=20)), max_size=4))
def test_a_lora_triggers_cell_reads_back(pairs: list[tuple[str, str]]) -> None:
    cell = cells.format_triggers(pairs)
    assert cell == ";".join(f"{name}:{words}" for name, words in pairs)
    assert cells.parse_triggers(cell) == tuple(pairs)
    # what the prompt axis strips again (axes.without_trigger_words read it so before)
    assert [w for _, w in cells.parse_triggers(cell)] == [e.split(":", 1)[1] for e in cell.split(";") if ":" in e]


# --- timings ---------------------------------------------------------------------------------------------------------


seconds = st.floats(0, 1e4, allow_nan=False)


@given(st.dictionaries(st.sampled_from([*STAGES, "other"]), seconds))
def test_a_timings_cell_reads_back(timings: dict[str, float]) -> None:
    cell = cells.format_timings(timings)
    assert cell == _before_timings(timings)  # stages in render order, 4 decimals, unknown stages left out
    read = cells.parse_timings(cell)
    assert list(read) == [stage for stage in STAGES if stage in timings]
    assert read == {stage: float(f"{timings[stage]:.4f}") for stage in read}
    assert cells.format_timings(read) == cell
    # The runner's stage totals, as it added them before.
    totals = dict.fromkeys(STAGES, 0.0)
    for stage, value in read.items():
        totals[stage] += value
    assert totals == _before_runner_totals(cell)


def test_a_hand_edited_timings_cell_keeps_what_reads() -> None:
    # report.summary skipped what did not read before; the runner only ever reads cells the writer made.
    assert cells.parse_timings("load=1.5;garbage;encode=x;later=2") == {"load": 1.5, "later": 2.0}
    assert cells.in_stage_order({"later": 2.0, "write": 1.0, "load": 0.5}) == {"load": 0.5, "write": 1.0, "later": 2.0}
    assert cells.parse_timings(float("nan")) == cells.parse_timings("") == {}


# --- degenerate ------------------------------------------------------------------------------------------------------


@given(st.lists(st.sampled_from(["flat", "clipped", "nonfinite"]), unique=True))
def test_a_degenerate_cell_reads_back(reasons: list[str]) -> None:
    cell = cells.format_degenerate(reasons)
    assert cell == (";".join(reasons) or "no")
    assert cells.parse_degenerate(cell) == tuple(reasons)
    assert cells.is_degenerate(cell) == bool(reasons) == (cell not in ("", "no"))
    assert not cells.is_degenerate("") and cells.parse_degenerate("") == ()  # not measured


# --- any value as a cell; every column's codec -----------------------------------------------------------------------


@given(st.none() | st.floats() | st.integers() | st.booleans() | st.text())
def test_a_value_becomes_the_cell_it_became_before(value: object) -> None:
    assert cells.format_value(value) == _before_cell(value)


def test_every_column_has_a_codec_tested_here() -> None:
    tested = {"text", "loras", "names", "triggers", "timings", "degenerate"}
    assert {c.codec.name for c in COLUMNS if c.setting is None} <= tested


@pytest.mark.parametrize("column", [c for c in COLUMNS if c.setting is not None], ids=lambda c: c.name)
def test_a_setting_cell_reads_back_as_its_value(column) -> None:
    from tests.test_settings import OFF_DEFAULT

    setting = column.setting
    for value in (setting.value_default, OFF_DEFAULT[setting.name][0]):
        assert column.codec.parse(column.codec.format(value)) == value
    assert column.codec.parse("") == setting.value_default  # an older manifest's empty cell
