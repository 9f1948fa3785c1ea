"""SD3 / SD3.5 LoRAs named after the original (SGM / Stability) MMDiT modules, mapped to diffusers'
SD3Transformer2DModel, the two CLIPTextModelWithProjection (``text_encoder``, ``text_encoder_2``) and
T5EncoderModel (``text_encoder_3``).

Layouts read:

* kohya / sd-scripts: ``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``, the embedders and final layer
  (``lora_unet_context_embedder``, ``lora_unet_final_layer_linear``); text encoders ``lora_te1_`` (CLIP-L),
  ``lora_te2_`` (CLIP-G) and ``lora_te3_`` (T5). Any LyCORIS suffix.
* SGM / ComfyUI: ``[diffusion_model.]joint_blocks.0.x_block.attn.qkv.lora_A.weight`` (or lora_down/lora_up, alpha,
  LyCORIS suffixes); text encoders under ``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.``
  and ``text_encoders.t5xxl.transformer.``.

Prefixes: transformer modules by their SGM dotted name (``joint_blocks.0.context_block.mlp.fc1``,
``x_embedder.proj``); text encoder modules by kohya name (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``),
since an underscored name needs the module list to become a path. SGM fuses q, k and v into one Linear per stream
(``x_block.attn.qkv``, SD3.5-medium's second image attention ``x_block.attn2.qkv``, ``context_block.attn.qkv``):
`split` cuts such a group into one per part (``joint_blocks.0.x_block.attn.qkv#q``). The final layer's modulation
and the last block's (its context stream is "pre only": a modulation and q/k/v, no output or MLP) hold [shift;
scale] where diffusers' AdaLayerNormContinuous holds [scale; shift], as its single-file converter swaps them:
`split` swaps a LoRA's rows too (``final_layer.adaLN_modulation.1#scale_shift``); which block is last is the
model's to say, so a prefix maps only in the spelling that fits its block.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from batchgen.assets.architecture import ModuleRef
from batchgen.assets.bases import BY_NAME
from batchgen.assets.lora_formats.fused import Layout, split_groups
from batchgen.assets.lora_layers import LAYER_SUFFIXES
from batchgen.assets.text_model import kohya_spelling

# SGM name inside joint block i -> diffusers path inside transformer_blocks.{i}; "#q" is one part of a fused Linear.
JOINT = {
    "x_block.attn.qkv#q": "attn.to_q",
    "x_block.attn.qkv#k": "attn.to_k",
    "x_block.attn.qkv#v": "attn.to_v",
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn2.qkv#q": "attn2.to_q",  # SD3.5-medium's dual-attention blocks
    "x_block.attn2.qkv#k": "attn2.to_k",
    "x_block.attn2.qkv#v": "attn2.to_v",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.attn.qkv#q": "attn.add_q_proj",
    "context_block.attn.qkv#k": "attn.add_k_proj",
    "context_block.attn.qkv#v": "attn.add_v_proj",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
    # A full block's context modulation is in diffusers' order; the last block's, [shift; scale], once swapped.
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.adaLN_modulation.1#scale_shift": "norm1_context.linear",
}
TOP = {
    "x_embedder.proj": "pos_embed.proj",  # the patch embedding, a Conv2d
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1#scale_shift": "norm_out.linear",  # [shift; scale] in SGM, as FLUX's
}
# A fused Linear's parts in the order its rows hold them.
FUSED = {
    "x_block.attn.qkv": ("q", "k", "v"),
    "x_block.attn2.qkv": ("q", "k", "v"),
    "context_block.attn.qkv": ("q", "k", "v"),
}
_FINAL_MODULATION = "final_layer.adaLN_modulation.1"
CONTEXT_MODULATION = "context_block.adaLN_modulation.1"
# What messages say batchgen cuts apart or reorders.
_OVER_FUSED = "SD3's fused qkv"
_OVER_SWAPPED = "the shift/scale halves of SD3's final modulations"

# File module names, SGM-dotted, in a block and at top level, and spelled with "_" as kohya writes them.
_NAMES = {"joint_blocks": {name.split("#")[0] for name in JOINT}, "": {name.split("#")[0] for name in TOP}}
_SPELLED = {
    sep: {kind: {name.replace(".", sep): name for name in names} for kind, names in _NAMES.items()} for sep in "._"
}
_BLOCK = {sep: re.compile(rf"^joint_blocks[{sep}](\d+)[{sep}](.+)$") for sep in "._"}
_SGM_ROOT = "diffusion_model."  # ComfyUI's; bare SGM names are read too
# kohya roots, and the component each names (SD3's record).
_TE_COMPONENTS = BY_NAME["sd-3"].kohya_text_encoder_prefixes
_ROOT_OF = {component: root for root, component in _TE_COMPONENTS.items()}
_COMFY_TE_ROOTS = {
    "text_encoders.clip_l.transformer.": _ROOT_OF["text_encoder"],
    "text_encoders.clip_g.transformer.": _ROOT_OF["text_encoder_2"],
    "text_encoders.t5xxl.transformer.": _ROOT_OF["text_encoder_3"],
}
_CLIPS = ("text_encoder", "text_encoder_2")
# lora_A/lora_B (PEFT) name kohya's lora_down/lora_up; the other suffixes are the layer types' own.
_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", **{s: s for s in LAYER_SUFFIXES}}


def recognises(keys: Iterable[object]) -> bool:
    """Whether any key names a module of an MMDiT joint block (kohya or SGM spelling). Top-level names alone do not
    say: FLUX has a final_layer too."""
    for key in keys:
        parsed = parse_key(key) if isinstance(key, str) else None
        if parsed and parsed[0].startswith("joint_blocks."):
            return True
    return False


def layout_of(key: str) -> str:
    """The layout a key of this family is written in, by the name its trainers go by (--list)."""
    return "kohya" if key.startswith(("lora_unet_", *_TE_COMPONENTS)) else "SGM/ComfyUI"


def parse_key(key: str) -> tuple[str, str] | None:
    """(module prefix, layer suffix), or None for a key that is no SD3 LoRA tensor."""
    name, suffix = next(((key[: -len(s) - 1], n) for s, n in _SUFFIXES.items() if key.endswith("." + s)), ("", ""))
    if not suffix:
        return None
    if name.startswith("lora_unet_"):  # kohya: the module path in one word
        prefix = _sgm_name(name.removeprefix("lora_unet_"), "_")
        return (prefix, suffix) if prefix else None
    if name.startswith(tuple(_TE_COMPONENTS)):
        return name, suffix
    for comfy, root in _COMFY_TE_ROOTS.items():
        if name.startswith(comfy):
            return root + name.removeprefix(comfy).replace(".", "_"), suffix
    prefix = _sgm_name(name.removeprefix(_SGM_ROOT), ".")
    return (prefix, suffix) if prefix else None


def _sgm_name(body: str, sep: str) -> str | None:
    """The SGM dotted name of a module spelled with `sep` between its parts, None for a name SD3 has not."""
    block = _BLOCK[sep].match(body)
    if block:
        index, rest = block.groups()
        name = _SPELLED[sep]["joint_blocks"].get(rest)
        return f"joint_blocks.{index}.{name}" if name else None
    return _SPELLED[sep][""].get(body)


def _diffusers_path(prefix: str) -> str | None:
    """The transformer module a split SGM prefix names; None for a fused one (its parts name modules) and for the
    final modulation in SGM's row order."""
    block = _BLOCK["."].match(prefix)
    if block:
        index, rest = block.groups()
        return f"transformer_blocks.{index}.{JOINT[rest]}" if rest in JOINT else None
    return TOP.get(prefix)


def pre_only(transformer: Mapping[str, tuple[int, ...]], index: str) -> bool:
    """Whether the model's joint block `index` is its last, whose context stream only feeds the joint attention;
    `transformer` holds the model's modules by path."""
    block = f"transformer_blocks.{index}"
    return f"{block}.norm1_context.linear" in transformer and f"{block}.ff_context.net.0.proj" not in transformer


def component_of(prefix: str) -> tuple[str, bool] | None:
    """(component, numbers two text encoders) of a prefix, split or not."""
    for root, component in _TE_COMPONENTS.items():
        if prefix.startswith(root):
            return component, True  # sd-scripts numbers SD3's encoders, as SDXL's pair
    name = prefix.split("#")[0]
    if _BLOCK["."].match(name) or name in _NAMES[""]:
        return "transformer", False
    return None


def locator(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], unet_config: Mapping[str, Any] | None
) -> Callable[[str], ModuleRef | None]:
    """The module a prefix names (fused ones and the swapped modulations only once split), None when the model has
    no such module."""
    found: dict[str, ModuleRef] = {}
    for root, component in _TE_COMPONENTS.items():
        for path in modules.get(component, {}):
            # kohya spells CLIP paths with text_model, whether or not transformers' class has that level
            spelled = kohya_spelling(path) if component in _CLIPS else path
            found[root + spelled.replace(".", "_")] = ModuleRef(component, path)
    transformer = modules.get("transformer", {})

    def locate(prefix: str) -> ModuleRef | None:
        if prefix in found:
            return found[prefix]
        block = _BLOCK["."].match(prefix)
        if block and block[2].split("#")[0] == CONTEXT_MODULATION:
            if block[2].endswith("#scale_shift") != pre_only(transformer, block[1]):
                return None  # a full block's modulation swapped, or the last block's not
        path = _diffusers_path(prefix)
        return ModuleRef("transformer", path) if path in transformer else None

    return locate


def split(
    groups: Mapping[str, Mapping[str, Any]], modules: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> dict[str, dict[str, Any]]:
    """The groups with each fused qkv cut into diffusers' projections and the final layer's and last block's
    modulations in diffusers' row order (fused.split_groups)."""
    shapes = modules.get("transformer", {})

    def reordered(prefix: str) -> bool:
        block = _BLOCK["."].match(prefix)
        last = block is not None and block[2] == CONTEXT_MODULATION and pre_only(shapes, block[1])
        return prefix == _FINAL_MODULATION or last

    layout = Layout(
        fused_parts=lambda prefix: FUSED.get(block[2]) if (block := _BLOCK["."].match(prefix)) else None,
        reordered=reordered,
        path_of=_diffusers_path,
        over_fused=_OVER_FUSED,
        over_swapped=_OVER_SWAPPED,
    )
    return split_groups(groups, shapes, layout)
