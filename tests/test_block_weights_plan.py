"""Block weights in planning: config and tag forms, axes, job_id by effective weights, labels, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from batchgen.axes import state_labels
from batchgen.errors import BatchgenError
from batchgen.plan import build_plan
from batchgen.spec import LoraFile, ModelSpec
from tests.test_plan import _sweep

# An attention-only LoRA: the blocks a kohya SD1 LoRA without conv layers has keys in.
ATTENTION = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
XL_ATTENTION = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
MODELS = {
    "sd1": ModelSpec(
        "sd1",
        "sd-1",
        Path("/m/sd1"),
        "c1" * 32,
        loras=(LoraFile("ink", Path("/l/ink.st"), "a" * 64, blocks=ATTENTION),),
    ),
    "xl": ModelSpec(
        "xl",
        "sdxl",
        Path("/m/xl"),
        "c2" * 32,
        loras=(LoraFile("ink", Path("/l/xl.st"), "f" * 64, blocks=XL_ATTENTION),),
    ),
}
ONE = {"models": ["sd1"], "prompts": ["a castle"], "slots": {}, "seeds": [1]}


def _plan(stacks: dict, **changes):
    return build_plan(_sweep(**{**ONE, "stacks": stacks, **changes}), MODELS)


def _ids(stacks: dict, **changes) -> list[str]:
    return list(_plan(stacks, **changes).table["job_id"])


def test_presets_vectors_and_weights_are_axes() -> None:
    plan = _plan(
        {"s": {"ink": {"weight": [0.5, 1.0], "blocks": ["ALL", "OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"]}}}
    )
    assert list(plan.table["loras"]) == [
        "ink:0.5:lbw=ALL",
        "ink:0.5:lbw=OUTD",
        "ink:0.5:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        "ink:1:lbw=ALL",
        "ink:1:lbw=OUTD",
        "ink:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    ]
    assert set(plan.table["stack"]) == {"s"}
    assert state_labels(plan.table.to_dict("records"))[:2] == ["s: ink 0.5 lbw=ALL", "s: ink 0.5 lbw=OUTD"]
    ids = list(plan.table["job_id"])
    # OUTD and its vector are one job; ALL on an attention-only LoRA is the LoRA without block weights.
    assert ids[1] == ids[2] and ids[4] == ids[5] and len(set(ids)) == 4
    assert ids[3] == _ids({"s": {"ink": 1.0}})[0] and ids[0] == _ids({"s": {"ink": 0.5}})[0]
    assert plan.jobs[0].loras[0].blocks[:3] == (1.0, 0.0, 1.0)  # BASE, IN00 (not in a 17-vector: 0), IN01


def test_a_tag_carries_block_weights_as_the_extension_writes_them() -> None:
    tagged = _ids({"none": {}}, prompts=["a castle <lora:ink:0.8:lbw=OUTD>"])
    assert tagged == _ids({"s": {"ink": {"weight": 0.8, "blocks": "OUTD"}}})
    vector = _ids({"none": {}}, prompts=["a castle <lora:ink:0.8:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>"])
    assert vector == tagged


def test_user_presets_and_a_base_of_its_own_length() -> None:
    mine = "1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0"
    assert _ids({"s": {"ink": {"blocks": "MINE"}}}, block_presets={"MINE": mine}) == _ids(
        {"s": {"ink": {"blocks": mine}}}
    )
    # On SDXL, a 12-vector; a preset applies there too, by block id.
    xl = _plan({"s": {"ink": {"blocks": ["OUTD", "1,0,0,0,0,0,1,1,1,1,1,1"]}}}, models=["xl"])
    assert len(xl.jobs) == 2 and xl.table["loras"][1] == "ink:1:lbw=1,0,0,0,0,0,1,1,1,1,1,1"


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("OUTDD", "did you mean 'OUTD'?"),
        ("1,0,1", "3 block weights"),
        ("1,0,x,0,0,0,0,0,1,1,1,1,0,0,0,0,0", "block weight 3 (IN02) is 'x', not a number"),
    ],
)
def test_bad_block_weights_name_the_key(blocks: str, message: str) -> None:
    with pytest.raises(BatchgenError) as e:
        _plan({"s": {"ink": {"blocks": blocks}}})
    assert str(e.value).startswith("sweep.stacks.s.ink.blocks") and message in str(e.value)


def test_a_vector_for_one_base_is_refused_for_the_other() -> None:
    with pytest.raises(BatchgenError) as e:
        _plan({"s": {"ink": {"blocks": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"}}}, models=["sd1", "xl"])
    assert str(e.value).startswith("sweep.stacks.s.ink.blocks: 17 block weights for sdxl")


def test_weight_and_unet_split_are_one_or_the_other() -> None:
    with pytest.raises(BatchgenError, match="give weight or unet"):
        _plan({"s": {"ink": {"weight": 1.0, "unet": 1.0, "text_encoder": 0.5, "blocks": "ALL"}}})
    split = _plan({"s": {"ink": {"unet": 1.0, "text_encoder": 0.5, "blocks": "OUTD"}}})
    assert split.table["loras"][0] == "ink:1/0.5:lbw=OUTD"


def test_the_blocks_axis_is_a_grid_axis(tmp_path: Path) -> None:
    from batchgen.axes import blocks_label
    from batchgen.report.grids import build_grids

    def grid(x: str):
        return dataclasses.replace(_sweep().grid, x=x, y="seed")

    plan = _plan({"s": {"ink": {"blocks": ["ALL", "OUTD"]}}}, seeds=[1, 2], grid=grid("blocks:ink"))
    # Each job has its own cell: a column per vector, labelled as the grid labels it, a row per seed.
    cells = [(blocks_label(c, "ink"), s) for c, s in zip(plan.table["loras"], plan.table["seed"], strict=True)]
    assert cells == [("ink ALL", 1), ("ink ALL", 2), ("ink OUTD", 1), ("ink OUTD", 2)]
    # Nothing else varies, so the model's jobs make one grid (its cells are placeholders until rendered).
    assert build_grids(plan.table, tmp_path, "blocks:ink", "seed", []) == [tmp_path / "grids" / "sd1.png"]
    with pytest.raises(BatchgenError) as e:
        _plan({"s": {"ink": {"blocks": ["ALL", "OUTD"]}}}, grid=grid("blocks:inc"))
    assert str(e.value).startswith("sweep.grid.x: unknown axis 'blocks:inc' (did you mean 'blocks:ink'?)")


FLUX = ModelSpec(
    "fx",
    "flux",
    Path("/m/fx"),
    "c3" * 32,
    loras=(LoraFile("ink", Path("/l/fx.st"), "e" * 64, blocks=("CLIP", "D00")),),
)
FLUX_ZERO_S = ",".join(["1"] * 22 + ["0"] * 38 + ["1"])  # every single block 0: this LoRA has none


def _flux_ids(blocks: list[str] | None) -> list[str]:
    entry = {"blocks": blocks} if blocks else 1.0
    sweep = _sweep(**{**ONE, "models": ["fx"], "stacks": {"s": {"ink": entry}}})
    return list(build_plan(sweep, {"fx": FLUX}).table["job_id"])


def test_flux_blocks_plan_by_the_blocks_its_file_has() -> None:
    plain = _flux_ids(None)
    # FLUXALL, and zeros on blocks the file has no layers in, are the plain LoRA's job; D00 at 0.5 is another.
    assert _flux_ids(["FLUXALL", FLUX_ZERO_S]) == plain * 2
    half = ",".join(["1"] * 3 + ["0.5"] + ["1"] * 57)
    assert len(set(_flux_ids([half]) + plain)) == 2


def test_an_sd_preset_on_flux_says_which_presets_flux_has() -> None:
    with pytest.raises(BatchgenError) as e:
        build_plan(_sweep(**{**ONE, "models": ["fx"], "stacks": {"s": {"ink": {"blocks": "OUTD"}}}}), {"fx": FLUX})
    assert str(e.value) == (
        "sweep.stacks.s.ink.blocks: preset 'OUTD' is for sd-1, sd-2, sdxl, not flux; presets for flux: FLUXALL"
    )
