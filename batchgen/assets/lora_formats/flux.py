"""FLUX.1 LoRAs named after the original Black Forest Labs (BFL) modules, mapped to diffusers'
FluxTransformer2DModel, CLIPTextModel (``text_encoder``) and T5EncoderModel (``text_encoder_2``).

Layouts read:

* kohya / sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``; text encoders ``lora_te1_``
  (CLIP-L; ComfyUI's ``lora_te_``) and ``lora_te3_`` (T5; sd-scripts' current name, ``lora_te2_`` in early
  sd-scripts and OneTrainer files). Any LyCORIS suffix.
* BFL / ComfyUI / fal: ``[diffusion_model.|base_model.model.]double_blocks.0.img_attn.qkv.lora_A.weight`` (or
  lora_down/lora_up, alpha, LyCORIS suffixes); text encoders under ``text_encoders.clip_l.transformer.`` and
  ``text_encoders.t5xxl.transformer.``.
* XLabs: ``[diffusion_model.]double_blocks.0.processor.qkv_lora1.down.weight``, no alpha.

Prefixes: transformer modules by their BFL dotted name (``double_blocks.0.img_attn.qkv``, ``img_in``); text encoder
modules by kohya name with one root per encoder (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``,
``lora_te2_encoder_block_0_layer_0_SelfAttention_q``), since an underscored name needs the module list to become
a path. BFL fuses q, k and v (and, in single blocks, the MLP input) into one Linear where diffusers has one per
projection: `split` cuts such a group into one per part, ``<fused name>#<part>`` (``single_blocks.0.linear1#mlp``),
and reorders the final modulation's rows (``final_layer.adaLN_modulation.1#scale_shift``); only prefixes without
a fused or reordered module reach a module unsplit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from batchgen.assets.architecture import ModuleRef
from batchgen.assets.bases import BY_NAME
from batchgen.assets.lora_formats.fused import Layout, split_groups
from batchgen.assets.lora_layers import LAYER_SUFFIXES
from batchgen.assets.text_model import with_level

# BFL name inside double block i -> diffusers path inside transformer_blocks.{i}; "#q" is one part of a fused Linear.
_DOUBLE = {
    "img_attn.qkv#q": "attn.to_q",
    "img_attn.qkv#k": "attn.to_k",
    "img_attn.qkv#v": "attn.to_v",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_attn.qkv#q": "attn.add_q_proj",
    "txt_attn.qkv#k": "attn.add_k_proj",
    "txt_attn.qkv#v": "attn.add_v_proj",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "txt_mod.lin": "norm1_context.linear",
}
# Single block i -> single_transformer_blocks.{i}. linear1 is [q; k; v; MLP input] (diffusers' proj_mlp).
_SINGLE = {
    "linear1#q": "attn.to_q",
    "linear1#k": "attn.to_k",
    "linear1#v": "attn.to_v",
    "linear1#mlp": "proj_mlp",
    # XLabs' single-block LoRA adds to linear1's q/k/v rows only; no BFL file names this pseudo-module.
    "linear1.qkv#q": "attn.to_q",
    "linear1.qkv#k": "attn.to_k",
    "linear1.qkv#v": "attn.to_v",
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    # BFL's final modulation is [shift; scale], diffusers' norm_out.linear [scale; shift] (its single-file converter
    # swaps the base weight's halves), so a LoRA's output rows are swapped too; "#scale_shift" names that order.
    "final_layer.adaLN_modulation.1#scale_shift": "norm_out.linear",
}
BLOCKS = {"double_blocks": ("transformer_blocks", _DOUBLE), "single_blocks": ("single_transformer_blocks", _SINGLE)}
# A fused Linear's parts in the order its rows hold them.
FUSED = {
    "img_attn.qkv": ("q", "k", "v"),
    "txt_attn.qkv": ("q", "k", "v"),
    "linear1": ("q", "k", "v", "mlp"),
    "linear1.qkv": ("q", "k", "v"),
}
SHIFT_SCALE = "final_layer.adaLN_modulation.1"
# What messages say batchgen cuts apart or reorders.
_OVER_FUSED = "FLUX's fused qkv/linear1"
_OVER_SWAPPED = "the shift/scale halves of FLUX's final modulation"

# File module names, BFL-dotted, per block kind ("" for top level), and spelled with "_" as kohya writes them.
_NAMES = {kind: {name.split("#")[0] for name in table} - {"linear1.qkv"} for kind, (_, table) in BLOCKS.items()}
_NAMES[""] = {name.split("#")[0] for name in TOP}
_SPELLED = {
    sep: {kind: {name.replace(".", sep): name for name in names} for kind, names in _NAMES.items()} for sep in "._"
}
_BLOCK = {sep: re.compile(rf"^(double_blocks|single_blocks)[{sep}](\d+)[{sep}](.+)$") for sep in "._"}
_BFL_ROOTS = ("diffusion_model.", "base_model.model.")  # ComfyUI / ai-toolkit, fal's PEFT-trained files
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\."
    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight$"
)
# XLabs' processors add a LoRA beside a BFL module: 1 is the image stream, 2 the text stream.
_XLABS_NAMES = {
    "double_blocks": {
        "qkv_lora1": "img_attn.qkv",
        "qkv_lora2": "txt_attn.qkv",
        "proj_lora1": "img_attn.proj",
        "proj_lora2": "txt_attn.proj",
    },
    "single_blocks": {"qkv_lora": "linear1.qkv", "proj_lora": "linear2"},
}
# kohya roots (FLUX.1's record) -> the one root a prefix uses: its component's first (sd-scripts writes lora_te3_
# for T5, others lora_te2_).
_KOHYA_ROOTS = BY_NAME["flux"].kohya_text_encoder_prefixes
_OWN_ROOT = {c: next(r for r, owner in _KOHYA_ROOTS.items() if owner == c) for c in _KOHYA_ROOTS.values()}
_TE_COMPONENTS = {root: component for component, root in _OWN_ROOT.items()}
_TE_ROOTS = {root: _OWN_ROOT[component] for root, component in _KOHYA_ROOTS.items()}
_CLIP_ROOT, _T5_ROOT = _OWN_ROOT["text_encoder"], _OWN_ROOT["text_encoder_2"]
_COMFY_TE_ROOTS = {"text_encoders.clip_l.transformer.": _CLIP_ROOT, "text_encoders.t5xxl.transformer.": _T5_ROOT}
# lora_A/lora_B (PEFT) name kohya's lora_down/lora_up; the other suffixes are the layer types' own.
_SUFFIXES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", **{s: s for s in LAYER_SUFFIXES}}


def recognises(keys: Iterable[object]) -> bool:
    """Whether any key names a FLUX double or single block module (kohya, BFL or XLabs spelling). Top-level names
    alone do not say: SD3's MMDiT also has a final_layer."""
    for key in keys:
        parsed = parse_key(key) if isinstance(key, str) else None
        if parsed and parsed[0].startswith(("double_blocks.", "single_blocks.")):
            return True
    return False


def layout_of(key: str) -> str:
    """The layout a key of this family is written in, by the name its trainers go by (--list)."""
    if _XLABS.match(key):
        return "XLabs"
    return "kohya" if key.startswith(("lora_unet_", *_TE_ROOTS)) else "BFL/ComfyUI"


def parse_key(key: str) -> tuple[str, str] | None:
    """(module prefix, layer suffix), or None for a key that is no FLUX LoRA tensor."""
    xlabs = _XLABS.match(key)
    if xlabs:
        kind, index, name, side = xlabs.groups()
        return f"{kind}.{index}.{_XLABS_NAMES[kind][name]}", f"lora_{side}.weight"
    name, suffix = next(((key[: -len(s) - 1], n) for s, n in _SUFFIXES.items() if key.endswith("." + s)), ("", ""))
    if not suffix:
        return None
    if name.startswith("lora_unet_"):  # kohya: the module path in one word
        prefix = _bfl_name(name.removeprefix("lora_unet_"), "_")
        return (prefix, suffix) if prefix else None
    root = next((r for r in _TE_ROOTS if name.startswith(r)), None)
    if root:
        return _TE_ROOTS[root] + name.removeprefix(root), suffix
    for comfy, root in _COMFY_TE_ROOTS.items():
        if name.startswith(comfy):
            path = name.removeprefix(comfy)
            if root == _CLIP_ROOT:
                path = with_level(path)  # kohya spells CLIP paths with text_model, whatever transformers does
            return root + path.replace(".", "_"), suffix
    prefix = _bfl_name(next((name.removeprefix(r) for r in _BFL_ROOTS if name.startswith(r)), name), ".")
    return (prefix, suffix) if prefix else None


def _bfl_name(body: str, sep: str) -> str | None:
    """The BFL dotted name of a module spelled with `sep` between its parts, None for a name FLUX has not."""
    block = _BLOCK[sep].match(body)
    if block:
        kind, index, rest = block.groups()
        name = _SPELLED[sep][kind].get(rest)
        return f"{kind}.{index}.{name}" if name else None
    return _SPELLED[sep][""].get(body)


def _diffusers_path(prefix: str) -> str | None:
    """The transformer module a split BFL prefix names; None for a fused one (its parts name modules) and for the
    final modulation in BFL's row order."""
    block = _BLOCK["."].match(prefix)
    if block:
        kind, index, rest = block.groups()
        root, table = BLOCKS[kind]
        return f"{root}.{index}.{table[rest]}" if rest in table else None
    return TOP.get(prefix)


def component_of(prefix: str) -> tuple[str, bool] | None:
    """(component, numbers two text encoders) of a prefix, split or not; FLUX's encoders are no SDXL pair."""
    for root, component in _TE_COMPONENTS.items():
        if prefix.startswith(root):
            return component, False
    name = prefix.split("#")[0]
    if _BLOCK["."].match(name) or name in _NAMES[""]:
        return "transformer", False
    return None


def locator(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], unet_config: Mapping[str, Any] | None
) -> Callable[[str], ModuleRef | None]:
    """The module a prefix names (fused ones and the final modulation only once split), None when the model has no
    such module."""
    found: dict[str, ModuleRef] = {}
    for path in modules.get("text_encoder", {}):
        spelled = with_level(path)
        found[_CLIP_ROOT + spelled.replace(".", "_")] = ModuleRef("text_encoder", path)
    for path in modules.get("text_encoder_2", {}):
        found[_T5_ROOT + path.replace(".", "_")] = ModuleRef("text_encoder_2", path)
    transformer = modules.get("transformer", {})

    def locate(prefix: str) -> ModuleRef | None:
        if prefix in found:
            return found[prefix]
        path = _diffusers_path(prefix)
        return ModuleRef("transformer", path) if path in transformer else None

    return locate


def split(
    groups: Mapping[str, Mapping[str, Any]], modules: Mapping[str, Mapping[str, tuple[int, ...]]]
) -> dict[str, dict[str, Any]]:
    """The groups with BFL's fused q/k/v and linear1 cut into diffusers' projections and the final modulation's
    halves in diffusers' order (fused.split_groups)."""
    shapes = modules.get("transformer", {})
    layout = Layout(
        fused_parts=lambda prefix: FUSED.get(block[3]) if (block := _BLOCK["."].match(prefix)) else None,
        reordered=lambda prefix: prefix == SHIFT_SCALE,
        path_of=_diffusers_path,
        over_fused=_OVER_FUSED,
        over_swapped=_OVER_SWAPPED,
    )
    return split_groups(groups, shapes, layout)
