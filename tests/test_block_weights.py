"""LoRA Block Weight vectors and block mapping, checked against the extension's own tables and, for the mapping, on
full-size SD1, SD2 and SDXL UNets and the FLUX.1-dev transformer built on the meta device (no memory) from
batchgen's shipped configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from batchgen.assets.bases.record import SHIPPED_CONFIGS
from batchgen.assets.block_weights import (
    BLOCK_IDS,
    FLUX_PRESETS,
    PRESETS,
    block_of,
    long_ids,
    module_weight,
    parse_blocks,
)
from batchgen.assets.lora_formats import group_by_module, map_to_modules
from batchgen.assets.lora_formats.sgm import sgm_table, to_sgm
from batchgen.assets.loras import Shape
from batchgen.errors import BatchgenError
from tests.test_flux_lora_keys import bfl_modules

WHERE = "loras[0].blocks"

# --- the extension's tables, as scripts/lora_block_weight.py writes them ---------------------------------------------
# fmt: off
EXT_BLOCKID26 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10",
                 "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08",
                 "OUT09", "OUT10", "OUT11"]
EXT_BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
                 "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
EXT_BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
EXT_BLOCKID20 = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00",
                 "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08"]
# fmt: on
EXT_BLOCKIDFLUX = ["CLIP", "T5", "IN"] + [f"D{x:002}" for x in range(19)] + [f"S{x:002}" for x in range(38)] + ["OUT"]  # noqa: E501
# DEF_WEIGHT_PRESET, less FLUXALL (61 ones: Flux only).
EXT_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""
# ratiodealer's block strings: a module takes the block of the last one its A1111 key contains; 26 and 27 are BASE.
EXT_BLOCKS = [
    "encoder",
    *[f"diffusion_model_input_blocks_{n}_" for n in range(12)],
    "diffusion_model_middle_block_",
    *[f"diffusion_model_output_blocks_{n}_" for n in range(12)],
    "embedders",
    "transformer_resblocks",
]


def ext_preset_table() -> dict[str, tuple[float, ...]]:
    return {
        line.split(":")[0]: tuple(float(v) for v in line.split(":")[1].split(",")) for line in EXT_PRESETS.splitlines()
    }


def ext_to26(ratios: list[float], ids: list[str]) -> list[float]:
    """The extension's to26: each ratio to its id's slot of the 26, others 0."""
    out = [0.0] * 26
    for ratio, block in zip(ratios, ids, strict=True):
        out[EXT_BLOCKID26.index(block)] = ratio
    return out


def ext_block(a1111_key: str) -> str | None:
    """ratiodealer's pick for one A1111 module key; None where it leaves ratio 1 ("not picked")."""
    picked = None
    for i, block in enumerate(EXT_BLOCKS):
        if block in a1111_key:
            picked = EXT_BLOCKID26[0 if i >= 26 else i]
    return picked


# --- ids and presets -------------------------------------------------------------------------------------------------


def test_block_ids_are_the_extensions() -> None:
    assert BLOCK_IDS == {
        "sd-1": {17: tuple(EXT_BLOCKID17), 26: tuple(EXT_BLOCKID26)},
        "sd-2": {17: tuple(EXT_BLOCKID17), 26: tuple(EXT_BLOCKID26)},
        "sdxl": {12: tuple(EXT_BLOCKID12), 20: tuple(EXT_BLOCKID20)},
        "flux": {61: tuple(EXT_BLOCKIDFLUX)},
    }
    assert long_ids("sd-1") == tuple(EXT_BLOCKID26)
    assert long_ids("sdxl") == tuple(EXT_BLOCKID20)
    assert long_ids("flux") == tuple(EXT_BLOCKIDFLUX)


def test_presets_are_the_extensions() -> None:
    assert PRESETS == ext_preset_table()
    assert list(PRESETS) == list(ext_preset_table())  # same order: messages list them as the extension does
    assert FLUX_PRESETS == {"FLUXALL": (1,) * 61}  # f"FLUXALL:{','.join(['1']*61)}"


def test_flux_vectors() -> None:
    assert parse_blocks("FLUXALL", "flux", WHERE) == (1.0,) * 61
    values = [n / 8 for n in range(61)]
    assert parse_blocks(values, "flux", WHERE) == tuple(values)
    assert parse_blocks(",".join(str(v) for v in values), "flux", WHERE) == tuple(values)
    assert parse_blocks("MINE", "flux", WHERE, {"MINE": [0.5] * 61}) == (0.5,) * 61


@pytest.mark.parametrize("name", list(ext_preset_table()))
@pytest.mark.parametrize("base", ["sd-1", "sd-2"])
def test_preset_resolves_to_extension_vector(name: str, base: str) -> None:
    expected = ext_to26(list(ext_preset_table()[name]), EXT_BLOCKID17)
    assert parse_blocks(name, base, WHERE) == tuple(expected)


@pytest.mark.parametrize("name", list(ext_preset_table()))
def test_preset_on_sdxl_applies_by_block_id(name: str) -> None:
    """The extension never checks the model: a 17-value preset spreads onto the 26 ids, and an SDXL key then picks
    its slot; so SDXL's 20 ids read the 26-vector at their own ids."""
    spread = ext_to26(list(ext_preset_table()[name]), EXT_BLOCKID17)
    assert parse_blocks(name, "sdxl", WHERE) == tuple(spread[EXT_BLOCKID26.index(b)] for b in EXT_BLOCKID20)


def test_preset_vectors_spelled_out() -> None:
    # fmt: off
    assert parse_blocks("ALL", "sd-1", WHERE) == (
        1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    assert parse_blocks("MIDD", "sd-1", WHERE) == (
        1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    # SDXL: OUT00-OUT02 (up_blocks.0, the 10-deep transformers) are not in the 17 ids, so even ALL gives them 0.
    assert parse_blocks("ALL", "sdxl", WHERE) == (1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1)
    assert parse_blocks("MIDD", "sdxl", WHERE) == (1, 0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0)
    # fmt: on


# --- vectors ---------------------------------------------------------------------------------------------------------


def test_17_expands_to_26() -> None:
    assert parse_blocks(list(range(1, 18)), "sd-1", WHERE) == (
        1, 0, 2, 3, 0, 4, 5, 0, 6, 7, 0, 0, 0, 8, 0, 0, 0, 9, 10, 11, 12, 13, 14, 15, 16, 17,
    )  # fmt: skip


def test_12_expands_to_20() -> None:
    assert parse_blocks(list(range(1, 13)), "sdxl", WHERE) == (
        1, 0, 0, 0, 0, 2, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0,
    )  # fmt: skip


@pytest.mark.parametrize(("base", "count"), [("sd-1", 26), ("sd-2", 26), ("sdxl", 20)])
def test_long_vector_kept(base: str, count: int) -> None:
    values = [n / 4 for n in range(count)]
    assert parse_blocks(values, base, WHERE) == tuple(values)
    assert parse_blocks(",".join(str(v) for v in values), base, WHERE) == tuple(values)


def test_text_as_the_extension_writes_it() -> None:
    text = " 1, 0 ,0.5,-1,  1e-1,2,0,0,0,0,0,0,1,1,1,1,1 "
    assert parse_blocks(text, "sd-1", WHERE) == (
        1, 0, 0, 0.5, 0, -1, 0.1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1,
    )  # fmt: skip


def test_user_presets() -> None:
    user = {"MINE": "1,1,0,0,0,0,0,0,0,0,0,0", "LISTED": [0.5] * 20, "ALL": [2] * 12}
    assert parse_blocks("MINE", "sdxl", WHERE, user) == (1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert parse_blocks(" LISTED ", "sdxl", WHERE, user) == (0.5,) * 20
    # The extension reads presets from the user's file, which replaces its defaults: a user ALL wins.
    assert parse_blocks("ALL", "sdxl", WHERE, user) == (2, 0, 0, 0, 0, 2, 2, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0)
    assert parse_blocks("NONE", "sdxl", WHERE, user) == (0,) * 20


# --- errors ----------------------------------------------------------------------------------------------------------

SD_IDS17 = ", ".join(EXT_BLOCKID17)
SD_COUNTS = f"give 17 ({SD_IDS17}) or 26 (BASE, IN00-IN11, M00, OUT00-OUT11)"
XL_COUNTS = (
    "give 12 (BASE, IN04, IN05, IN07, IN08, M00, OUT00, OUT01, OUT02, OUT03, OUT04, OUT05) "
    "or 20 (BASE, IN00-IN08, M00, OUT00-OUT08)"
)
UNKNOWN = f"{WHERE}: unknown block weight preset"
PRESET_LIST = "NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5"
FLUX_COUNTS = "give 61 (CLIP, T5, IN, D00-D18, S00-S37, OUT)"
SPECIAL = "the extension's random (R, U) and inherited (X) weights are not supported; give a number"
BAD = [
    ("1,1", "sd-1", None, f"{WHERE}: 2 block weights for sd-1; {SD_COUNTS}"),
    ("1", "sd-2", None, f"{WHERE}: 1 block weights for sd-2; {SD_COUNTS}"),
    ([1] * 18, "sd-1", None, f"{WHERE}: 18 block weights for sd-1; {SD_COUNTS}"),
    ([1] * 12, "sd-1", None, f"{WHERE}: 12 block weights for sd-1 (12 is the sdxl count); {SD_COUNTS}"),
    ([1] * 17, "sdxl", None, f"{WHERE}: 17 block weights for sdxl (17 is the sd-1/sd-2 count); {XL_COUNTS}"),
    ([1] * 26, "sdxl", None, f"{WHERE}: 26 block weights for sdxl (26 is the sd-1/sd-2 count); {XL_COUNTS}"),
    ("1,1,1,1,1,1,1,1,1,1,1,", "sdxl", None, f"{WHERE}: block weight 12 (OUT05) is '', not a number"),
    ("1,1,1,1,1,1,1,1,1,1,", "sdxl", None, f"{WHERE}: 11 block weights for sdxl; {XL_COUNTS}"),
    ("al", "sd-1", None, f"{UNKNOWN} 'al' (did you mean 'ALL'?); presets: {PRESET_LIST}"),
    ("midd", "sd-1", None, f"{UNKNOWN} 'midd' (did you mean 'MIDD'?); presets: {PRESET_LIST}"),
    ("OUTSS", "sd-1", None, f"{UNKNOWN} 'OUTSS' (did you mean 'OUTS'?); presets: {PRESET_LIST}"),
    ("face", "sd-1", None, f"{UNKNOWN} 'face'; presets: {PRESET_LIST}"),
    ("FACE", "sd-1", {"FACES": [1] * 17}, f"{UNKNOWN} 'FACE' (did you mean 'FACES'?); "
     f"presets: FACES, {PRESET_LIST}"),
    ("FLUXALL", "sd-1", None, f"{WHERE}: preset 'FLUXALL' is for flux, not sd-1; presets for sd-1: {PRESET_LIST}"),
    ("FLUXALL", "sdxl", {"MINE": [1] * 12}, f"{WHERE}: preset 'FLUXALL' is for flux, not sdxl; presets for sdxl: "
     f"MINE, {PRESET_LIST}"),
    ("ALL", "flux", None, f"{WHERE}: preset 'ALL' is for sd-1, sd-2, sdxl, not flux; presets for flux: FLUXALL"),
    ("ALLL", "flux", None, f"{UNKNOWN} 'ALLL'; presets: FLUXALL"),
    ("fluxall", "flux", None, f"{UNKNOWN} 'fluxall' (did you mean 'FLUXALL'?); presets: FLUXALL"),
    ([1] * 17, "flux", None, f"{WHERE}: 17 block weights for flux (17 is the sd-1/sd-2 count); {FLUX_COUNTS}"),
    ([1] * 26, "flux", None, f"{WHERE}: 26 block weights for flux (26 is the sd-1/sd-2 count); {FLUX_COUNTS}"),
    ([1] * 60, "flux", None, f"{WHERE}: 60 block weights for flux; {FLUX_COUNTS}"),
    ([1] * 61, "sd-1", None, f"{WHERE}: 61 block weights for sd-1 (61 is the flux count); {SD_COUNTS}"),
    ([1, 1, 1, "R", *[1] * 57], "flux", None, f"{WHERE}: block weight 4 (D00) is 'R': {SPECIAL}"),
    ([*[1] * 60, "x"], "flux", None, f"{WHERE}: block weight 61 (OUT) is 'x', not a number"),
    ("1,1,1,1,1,1,1,1,x,1,1,1", "sdxl", None, f"{WHERE}: block weight 9 (OUT02) is 'x', not a number"),
    ("1,1,1,1,1,1,1,1,,1,1,1", "sdxl", None, f"{WHERE}: block weight 9 (OUT02) is '', not a number"),
    ([1, 1, 1, True, *[1] * 8], "sdxl", None, f"{WHERE}: block weight 4 (IN07) is True, not a number"),
    ([1, None, *[1] * 15], "sd-1", None, f"{WHERE}: block weight 2 (IN01) is None, not a number"),
    ([1, "nan", *[1] * 15], "sd-1", None, f"{WHERE}: block weight 2 (IN01) is 'nan'; give a finite number"),
    ([1, float("inf"), *[1] * 10], "sdxl", None, f"{WHERE}: block weight 2 (IN04) is inf; give a finite number"),
    ("1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "sd-1", None, f"{WHERE}: block weight 2 (IN01) is 'R': {SPECIAL}"),
    ("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,U", "sd-1", None, f"{WHERE}: block weight 17 (OUT11) is 'U': {SPECIAL}"),
    ("X,1,1,1,1,1,1,1,1,1,1,1", "sdxl", None, f"{WHERE}: block weight 1 (BASE) is 'X': {SPECIAL}"),
    ("1,X+0.5,1,1,1,1,1,1,1,1,1,1", "sdxl", None, f"{WHERE}: block weight 2 (IN04) is 'X+0.5': {SPECIAL}"),
    ("MINE", "sd-1", {"MINE": "1,0,1"}, f"{WHERE}: preset 'MINE': 3 block weights for sd-1; {SD_COUNTS}"),
    ("MINE", "sdxl", {"MINE": [1, "R", *[1] * 10]},
     f"{WHERE}: preset 'MINE': block weight 2 (IN04) is 'R': {SPECIAL}"),
    ("1,1,1,1,1,1,1,1,1,1,1,x", "sdxl", None, f"{WHERE}: block weight 12 (OUT05) is 'x', not a number"),
    ("1,1,1,1,1,1,1,1,1,1,1,r", "sdxl", None, f"{WHERE}: block weight 12 (OUT05) is 'r', not a number"),
    (1.0, "sd-1", None, f"{WHERE}: blocks is float 1.0; give a preset name, comma-separated weights ('1,0,0,...') "
     "or a list of numbers"),
    ("ALL", "sd-3", None, f"{WHERE}: block weights are not defined for base 'sd-3'; the LoRA Block Weight extension "
     "has them for sd-1, sd-2, sdxl, flux only: remove blocks: from this LoRA"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "base", "user", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_errors(value: Any, base: str, user: dict[str, Any] | None, message: str) -> None:
    with pytest.raises(BatchgenError) as caught:
        parse_blocks(value, base, WHERE, user)
    assert str(caught.value) == message
    assert "\n" not in message


# --- module mapping on the real architectures ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(base: str, component: str) -> dict[str, Any]:
    return json.loads((SHIPPED_CONFIGS / base / component / "config.json").read_text())


@cache
def unet_layers(base: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    config = {k: v for k, v in _config(base, "unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    paths = tuple(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d))
    return dict(unet.config), paths


# Linear/Conv2d modules outside every block: ratiodealer picks none of their A1111 keys (time_embed_*, label_emb_*,
# out_2), so they keep the LoRA's weight.
OUTSIDE = {
    "sd-1": {"time_embedding.linear_1", "time_embedding.linear_2", "conv_out"},
    "sd-2": {"time_embedding.linear_1", "time_embedding.linear_2", "conv_out"},
    "sdxl": {
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
        "conv_out",
    },
}


@pytest.mark.parametrize("base", ["sd-1", "sd-2", "sdxl"])
def test_unet_modules_map_as_the_extension(base: str) -> None:
    config, paths = unet_layers(base)
    table = sgm_table(config)
    ours = {path: block_of("unet", path, base) for path in paths}
    # The extension's own rule, on each module's A1111 key (diffusion_model_ + its original-layout path).
    theirs = {path: ext_block("diffusion_model_" + to_sgm(path, table).replace(".", "_")) for path in paths}
    assert ours == theirs
    assert {path for path, block in ours.items() if block is None} == OUTSIDE[base]
    assert set(ours.values()) - {None} == set(long_ids(base)) - {"BASE"}  # every UNet block has modules


@pytest.mark.parametrize(
    ("base", "path", "block"),
    [
        ("sd-1", "conv_in", "IN00"),
        ("sd-1", "down_blocks.0.resnets.0.conv1", "IN01"),
        ("sd-1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01"),
        ("sd-1", "down_blocks.0.attentions.1.proj_out", "IN02"),
        ("sd-1", "down_blocks.0.downsamplers.0.conv", "IN03"),
        ("sd-1", "down_blocks.1.resnets.0.conv_shortcut", "IN04"),
        ("sd-1", "down_blocks.2.downsamplers.0.conv", "IN09"),
        ("sd-1", "down_blocks.3.resnets.1.time_emb_proj", "IN11"),
        ("sd-1", "mid_block.resnets.0.conv1", "M00"),
        ("sd-1", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "M00"),
        ("sd-1", "mid_block.resnets.1.conv2", "M00"),
        ("sd-1", "up_blocks.0.resnets.0.conv1", "OUT00"),
        ("sd-1", "up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("sd-1", "up_blocks.1.attentions.0.proj_in", "OUT03"),
        ("sd-1", "up_blocks.2.upsamplers.0.conv", "OUT08"),
        ("sd-1", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "OUT11"),
        ("sd-1", "time_embedding.linear_1", None),
        ("sd-1", "conv_out", None),
        ("sd-1", "conv_norm_out", None),
        ("sdxl", "conv_in", "IN00"),
        ("sdxl", "down_blocks.0.resnets.1.conv2", "IN02"),
        ("sdxl", "down_blocks.0.downsamplers.0.conv", "IN03"),
        ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v", "IN04"),
        ("sdxl", "down_blocks.1.downsamplers.0.conv", "IN06"),
        ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", "IN08"),
        ("sdxl", "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj", "M00"),
        ("sdxl", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "OUT00"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "OUT02"),
        ("sdxl", "up_blocks.1.attentions.2.proj_out", "OUT05"),
        ("sdxl", "up_blocks.2.resnets.2.conv1", "OUT08"),
        ("sdxl", "add_embedding.linear_2", None),
    ],
)
def test_block_of_known_modules(base: str, path: str, block: str | None) -> None:
    assert block_of("unet", path, base) == block


@pytest.mark.parametrize(
    ("base", "component", "projected"),
    [("sd-1", "text_encoder", False), ("sd-2", "text_encoder", False), ("sdxl", "text_encoder", False),
     ("sdxl", "text_encoder_2", True)],
)  # fmt: skip
def test_text_encoder_modules(base: str, component: str, projected: bool) -> None:
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**_config(base, component)))
    # transformers 5 names CLIPTextModel's modules without the text_model level, CLIPTextModelWithProjection's with.
    root = "text_model." if projected else ""
    blocks = {path: block_of(component, path, base) for path, _ in model.named_modules() if path}
    linears = [path for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * model.config.num_hidden_layers + projected
    assert all(blocks[p] == "BASE" for p in linears if p != "text_projection")
    assert all(block == "BASE" for path, block in blocks.items() if path.startswith(f"{root}encoder"))
    # Embeddings and the final norm have A1111 keys without "encoder" (transformer_text_model_embeddings_...): the
    # extension leaves them, and SDXL's projection, at the LoRA's weight.
    assert {p for p, b in blocks.items() if b is None} == {
        *(["text_model", "text_projection"] if projected else []),
        f"{root}embeddings",
        f"{root}embeddings.token_embedding",
        f"{root}embeddings.position_embedding",
        f"{root}final_layer_norm",
    }
    # Both spellings name the same module.
    assert block_of(component, "text_model.encoder.layers.0.mlp.fc1", base) == "BASE"
    assert block_of(component, "encoder.layers.0.mlp.fc1", base) == "BASE"
    assert ext_block("transformer_text_model_encoder_layers_0_self_attn_q_proj") == "BASE"
    assert ext_block("1_model_transformer_resblocks_0_attn_out_proj") == "BASE"
    assert ext_block("transformer_text_model_embeddings_token_embedding") is None


# --- FLUX.1 ---------------------------------------------------------------------------------------------------------


def ext_flux_block(key: str) -> str | None:
    """The extension's get_flux_blocks on one key (dots already underscores); None for its "Not Merge"."""
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    match = re.search(r"_(\d+)_", key)
    if "double_blocks" in key:
        return f"D{match.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{match.group(1).zfill(2)}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None


def test_flux_modules_map_as_the_extension() -> None:
    """Each BFL module of the full-size FLUX.1-dev transformer, reached through batchgen's LoRA key mapping (a fused
    qkv or linear1 reaches several diffusers modules), is in the block the extension gives its BFL name."""
    config = {k: v for k, v in _config("flux", "transformer").items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**config)
    linears = {n: tuple(m.weight.shape) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    state = {}
    for module, (out_dim, in_dim) in bfl_modules().items():  # FLUX.1-dev's, as BFL names and shapes them
        state[f"diffusion_model.{module}.lora_A.weight"] = Shape((4, in_dim))
        state[f"diffusion_model.{module}.lora_B.weight"] = Shape((out_dim, 4))
    fmt, groups = group_by_module(state)
    assert len(groups) == len(bfl_modules())
    seen: dict[str, str | None] = {}
    for key, tensors in groups.items():
        found, _ = map_to_modules({key: tensors}, fmt, {"transformer": linears}, None)
        assert found, key
        theirs = ext_flux_block(f"{key}.weight".replace(".", "_"))
        for ref in found:
            assert block_of("transformer", ref.path, "flux") == theirs, (key, ref.path)
            seen[ref.path] = theirs
    assert set(seen) == set(linears)  # every Linear of the transformer is some BFL module's
    assert set(seen.values()) == set(long_ids("flux")) - {"CLIP", "T5"}  # every transformer block has modules


def test_flux_text_encoders_are_clip_and_t5() -> None:
    assert ext_flux_block("clip_l_transformer_text_model_encoder_layers_0_mlp_fc1") == "CLIP"
    assert ext_flux_block("t5xxl_transformer_encoder_block_0_layer_0_SelfAttention_q") == "T5"
    assert block_of("text_encoder", "text_model.encoder.layers.0.mlp.fc1", "flux") == "CLIP"
    assert block_of("text_encoder", "final_layer_norm", "flux") == "CLIP"
    assert block_of("text_encoder_2", "encoder.block.23.layer.1.DenseReluDense.wo", "flux") == "T5"
    vector = parse_blocks([n / 4 for n in range(61)], "flux", WHERE)
    assert module_weight(vector, "flux", "text_encoder", "encoder.layers.3.self_attn.q_proj") == 0.0
    assert module_weight(vector, "flux", "text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") == 0.25
    assert module_weight(vector, "flux", "transformer", "x_embedder") == 0.5
    assert module_weight(vector, "flux", "transformer", "transformer_blocks.18.attn.to_add_out") == 21 / 4
    assert module_weight(vector, "flux", "transformer", "single_transformer_blocks.0.proj_mlp") == 22 / 4
    assert module_weight(vector, "flux", "transformer", "norm_out.linear") == 60 / 4


def test_module_weight() -> None:
    vector = tuple(float(n) for n in range(26))
    assert module_weight(vector, "sd-1", "text_encoder", "text_model.encoder.layers.3.mlp.fc1") == 0.0
    assert module_weight(vector, "sd-1", "unet", "down_blocks.0.downsamplers.0.conv") == 4.0
    assert module_weight(vector, "sd-1", "unet", "mid_block.attentions.0.proj_in") == 13.0
    assert module_weight(vector, "sd-1", "unet", "up_blocks.3.attentions.2.proj_out") == 25.0
    assert module_weight(vector, "sd-1", "unet", "time_embedding.linear_1") == 1.0
    assert module_weight(vector, "sd-1", "text_encoder", "text_model.final_layer_norm") == 1.0
    xl = parse_blocks("1,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.1,1.2", "sdxl", WHERE)
    assert module_weight(xl, "sdxl", "text_encoder_2", "text_model.encoder.layers.31.self_attn.k_proj") == 1.0
    assert module_weight(xl, "sdxl", "unet", "down_blocks.1.attentions.1.proj_in") == 0.2
    assert module_weight(xl, "sdxl", "unet", "up_blocks.0.attentions.0.proj_in") == 0.6
    assert module_weight(xl, "sdxl", "unet", "up_blocks.2.resnets.0.conv1") == 0.0  # not in the 12: 0
    assert module_weight(xl, "sdxl", "unet", "add_embedding.linear_1") == 1.0
    with pytest.raises(ValueError, match="a sdxl block vector has 20 weights, not 26"):
        module_weight(vector, "sdxl", "unet", "conv_in")
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        block_of("vae", "decoder.conv_in", "sd-1")


def test_no_torch_import() -> None:
    code = "import batchgen.assets.block_weights, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
