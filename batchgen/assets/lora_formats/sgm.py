"""The original Stability (SGM / CompVis) names of a diffusers UNet's modules, derived from its config.

kohya trains SDXL on its own UNet, whose module paths follow this layout (``input_blocks.4.1...``), not diffusers'
(``down_blocks.1.attentions.0...``); other trainers use it for SD1 too. SGM numbers the UNet's parts in build order:
input_blocks[0] is conv_in, then per level one input block per resnet (slot 0 the resnet, slot 1 its transformer)
and, on all but the last level, one holding the downsampler (slot 0, conv "op"); middle_block is resnet,
transformer, resnet; output_blocks has one block per up resnet, the level's last also holding the upsampler after
the resnet and transformer (slot 1 or 2, conv "conv").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# {diffusers path prefix: (SGM path prefix, renames of the modules below it or None to keep them)}
SgmTable = dict[str, tuple[str, Mapping[str, str] | None]]

# SGM names of a diffusers ResnetBlock2D's Linear/Conv modules.
RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# SGM names of the modules outside the block lists.
_SGM_FIXED: SgmTable = {
    "conv_in": ("input_blocks.0.0", None),
    "time_embedding.linear_1": ("time_embed.0", None),
    "time_embedding.linear_2": ("time_embed.2", None),
    "add_embedding.linear_1": ("label_emb.0.0", None),
    "add_embedding.linear_2": ("label_emb.0.2", None),
    "conv_out": ("out.2", None),
}


def sgm_table(config: Mapping[str, Any]) -> SgmTable:
    """The SGM prefix of every diffusers block prefix of a UNet with this config."""
    return {**_SGM_FIXED, **_down_blocks(config), **_mid_block(config), **_up_blocks(config)}


def to_sgm(path: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    """The SGM path of a diffusers module path, or None for modules SGM names differently or not at all."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        sgm_prefix, renames = entry
        rest = ".".join(parts[cut:])
        if renames is not None:
            renamed = renames.get(rest)
            if renamed is None:
                return None
            rest = renamed
        return f"{sgm_prefix}.{rest}" if rest else sgm_prefix
    return None


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttnDownBlock2D, AttnUpBlock2D, UNetMidBlock2DCrossAttn, ...


def _layers_per_block(config: Mapping[str, Any], count: int) -> list[int]:
    layers = config.get("layers_per_block", 2)
    return [int(layers)] * count if isinstance(layers, int) else [int(n) for n in layers]


def _down_blocks(config: Mapping[str, Any]) -> SgmTable:
    types = list(config["down_block_types"])
    table: SgmTable = {}
    index = 1  # input_blocks.0 is conv_in
    for block, (block_type, layers) in enumerate(zip(types, _layers_per_block(config, len(types)), strict=True)):
        for layer in range(layers):
            table[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", RESNET_TO_SGM)
            if _has_attention(block_type):
                table[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", None)
            index += 1
        if block < len(types) - 1:
            table[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", None)
            index += 1
    return table


def _mid_block(config: Mapping[str, Any]) -> SgmTable:
    block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if block_type is None:
        return {}
    if not _has_attention(block_type):
        return {f"mid_block.resnets.{i}": (f"middle_block.{i}", RESNET_TO_SGM) for i in range(2)}
    return {
        "mid_block.resnets.0": ("middle_block.0", RESNET_TO_SGM),
        "mid_block.attentions.0": ("middle_block.1", None),
        "mid_block.resnets.1": ("middle_block.2", RESNET_TO_SGM),
    }


def _up_blocks(config: Mapping[str, Any]) -> SgmTable:
    types = list(config["up_block_types"])
    # Up blocks mirror the down blocks and have one resnet more, for the skip from each down block's downsampler.
    per_block = list(reversed(_layers_per_block(config, len(types))))
    table: SgmTable = {}
    index = 0
    for block, (block_type, layers) in enumerate(zip(types, per_block, strict=True)):
        attention = _has_attention(block_type)
        for layer in range(layers + 1):
            table[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", RESNET_TO_SGM)
            if attention:
                table[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", None)
            index += 1
        if block < len(types) - 1:
            slot = 2 if attention else 1
            table[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", None)
    return table
