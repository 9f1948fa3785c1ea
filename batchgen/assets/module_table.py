"""The Linear and Conv2d weight shapes of a UNet2DConditionModel and a CLIP text model, computed from their config
files in plain Python.

Building the modules on the meta device gives the same table but costs importing torch, diffusers and transformers
(about five seconds), which a dry run must not pay. The rules below follow how diffusers and transformers lay those
classes out for the configs SD1, SD2 and SDXL checkpoints use; a config outside them returns None, and the caller
builds the modules instead. Tests compare every table with the meta-device build.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from batchgen.assets.text_model import LEVEL

Shapes = dict[str, tuple[int, ...]]

_DOWN = {"DownBlock2D", "CrossAttnDownBlock2D"}
_UP = {"UpBlock2D", "CrossAttnUpBlock2D"}
# Keys whose non-default values change the module layout in ways this table does not follow.
_DEFAULTS: dict[str, Any] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "resnet_time_scale_shift": "default",
    "attention_type": "default",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "reverse_transformer_layers_per_block": None,
    "mid_block_only_cross_attention": None,
    "resnet_out_scale_factor": 1.0,
}


def unet_shapes(config: dict[str, Any]) -> Shapes | None:
    """{module path: weight shape} as UNet2DConditionModel(**config) would have them, or None for a layout this
    table does not cover."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel" or not _plain(config):
        return None
    down_types, up_types = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    if not set(down_types) <= _DOWN or not set(up_types) <= _UP or len(down_types) != len(up_types):
        return None
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", None):
        return None
    if config.get("addition_embed_type") not in (None, "text_time"):
        return None
    cross = config.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        return None
    n = len(down_types)
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    # diffusers reads num_attention_heads from attention_head_dim when it is not given (a naming slip it keeps).
    heads = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n)
    layers = _per_block(config.get("layers_per_block", 2), n)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    linear = bool(config.get("use_linear_projection", False))
    temb = channels[0] * 4
    shapes: Shapes = {}
    add = shapes.__setitem__

    add("conv_in", (channels[0], config.get("in_channels", 4), 3, 3))
    add("time_embedding.linear_1", (temb, channels[0]))
    add("time_embedding.linear_2", (temb, temb))
    if config.get("addition_embed_type") == "text_time":
        add("add_embedding.linear_1", (temb, config["projection_class_embeddings_input_dim"]))
        add("add_embedding.linear_2", (temb, temb))

    out = channels[0]
    for i, kind in enumerate(down_types):
        inp, out = out, channels[i]
        prefix = f"down_blocks.{i}"
        if kind == "CrossAttnDownBlock2D":
            for j in range(layers[i]):
                _transformer(shapes, f"{prefix}.attentions.{j}", out, heads[i], depth[i], cross, linear)
        for j in range(layers[i]):
            _resnet(shapes, f"{prefix}.resnets.{j}", inp if j == 0 else out, out, temb)
        if i < n - 1:
            add(f"{prefix}.downsamplers.0.conv", (out, out, 3, 3))

    # Each block registers its attentions before its resnets, and named_modules() walks them in that order.
    mid = channels[-1]
    _transformer(shapes, "mid_block.attentions.0", mid, heads[-1], depth[-1], cross, linear)
    _resnet(shapes, "mid_block.resnets.0", mid, mid, temb)
    _resnet(shapes, "mid_block.resnets.1", mid, mid, temb)

    rev_channels, rev_heads, rev_layers, rev_depth = (list(reversed(x)) for x in (channels, heads, layers, depth))
    out = rev_channels[0]
    for i, kind in enumerate(up_types):
        prev, out = out, rev_channels[i]
        inp = rev_channels[min(i + 1, n - 1)]
        prefix = f"up_blocks.{i}"
        count = rev_layers[i] + 1
        if kind == "CrossAttnUpBlock2D":
            for j in range(count):
                _transformer(shapes, f"{prefix}.attentions.{j}", out, rev_heads[i], rev_depth[i], cross, linear)
        for j in range(count):
            skip = inp if j == count - 1 else out
            _resnet(shapes, f"{prefix}.resnets.{j}", (prev if j == 0 else out) + skip, out, temb)
        if i < n - 1:
            add(f"{prefix}.upsamplers.0.conv", (out, out, 3, 3))

    add("conv_out", (config.get("out_channels", 4), channels[0], 3, 3))
    return _in_module_order(shapes)


def clip_text_shapes(config: dict[str, Any], projected: bool) -> Shapes | None:
    """{module path: weight shape} of transformers' CLIPTextModel (or CLIPTextModelWithProjection) for a
    config.json, or None where the config is not a CLIP text model's."""
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        return None
    # transformers' CLIPTextConfig defaults, for keys a config.json leaves out.
    hidden = config.get("hidden_size", 512)
    inner = config.get("intermediate_size", 2048)
    # transformers 5 dropped CLIPTextModel's text_model level, not CLIPTextModelWithProjection's.
    root = LEVEL if projected or _transformers_major() < 5 else ""
    shapes: Shapes = {}
    for i in range(config.get("num_hidden_layers", 12)):
        layer = f"{root}encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}"] = (hidden, hidden)
        shapes[f"{layer}.mlp.fc1"] = (inner, hidden)
        shapes[f"{layer}.mlp.fc2"] = (hidden, inner)
    if projected:
        shapes["text_projection"] = (config.get("projection_dim", 512), hidden)
    return shapes


def _transformers_major() -> int:
    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 5


def _plain(config: dict[str, Any]) -> bool:
    return all(config.get(key, default) == default for key, default in _DEFAULTS.items())


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def _resnet(shapes: Shapes, prefix: str, inp: int, out: int, temb: int) -> None:
    shapes[f"{prefix}.conv1"] = (out, inp, 3, 3)
    shapes[f"{prefix}.time_emb_proj"] = (out, temb)
    shapes[f"{prefix}.conv2"] = (out, out, 3, 3)
    if inp != out:
        shapes[f"{prefix}.conv_shortcut"] = (out, inp, 1, 1)


def _transformer(shapes: Shapes, prefix: str, channels: int, heads: int, depth: int, cross: int, linear: bool) -> None:
    inner = heads * (channels // heads)
    shapes[f"{prefix}.proj_in"] = (inner, channels) if linear else (inner, channels, 1, 1)
    for k in range(depth):
        block = f"{prefix}.transformer_blocks.{k}"
        for attn, context in (("attn1", inner), ("attn2", cross)):
            shapes[f"{block}.{attn}.to_q"] = (inner, inner)
            shapes[f"{block}.{attn}.to_k"] = (inner, context)
            shapes[f"{block}.{attn}.to_v"] = (inner, context)
            shapes[f"{block}.{attn}.to_out.0"] = (inner, inner)
        shapes[f"{block}.ff.net.0.proj"] = (inner * 8, inner)
        shapes[f"{block}.ff.net.2"] = (inner, inner * 4)
    shapes[f"{prefix}.proj_out"] = (channels, inner) if linear else (channels, inner, 1, 1)


_TOP_ORDER = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "up_blocks", "mid_block", "conv_out")


def _in_module_order(shapes: Shapes) -> Shapes:
    """The order named_modules() walks: UNet2DConditionModel registers up_blocks before mid_block."""
    rank = {name: i for i, name in enumerate(_TOP_ORDER)}
    return dict(sorted(shapes.items(), key=lambda item: rank[item[0].split(".")[0]]))
