"""A FLUX.1 transformer in Black Forest Labs' layout (the BFL release file, ComfyUI's model.diffusion_model.*,
fp8/bf16 repacks) as diffusers' FluxTransformer2DModel state dict: its fused q/k/v and single-block linear1 cut
into diffusers' projections, the final modulation's halves swapped, the norms renamed.

diffusers' own converter cuts linear1 at FLUX.1's full width (3072), so it cannot read a smaller transformer; this
one sizes every cut from the target model's own shapes. Values are views of the file's tensors (no copies), and
shape-only stand-ins go through too, so planning checks a file's keys and shapes from its header alone. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batchgen.assets.lora_formats.flux import BLOCKS, FUSED, SHIFT_SCALE, TOP
from batchgen.assets.lora_formats.fused import halves_swapped, rows

# The roots a transformer's keys may sit under: ComfyUI's whole-model files, ai-toolkit's, BFL's (none).
_ROOTS = ("model.diffusion_model.", "diffusion_model.")
# RMS norms of the attention's q and k: BFL module inside a block -> diffusers path inside it.
_NORMS = {
    "double_blocks": {
        "img_attn.norm.query_norm": "attn.norm_q",
        "img_attn.norm.key_norm": "attn.norm_k",
        "txt_attn.norm.query_norm": "attn.norm_added_q",
        "txt_attn.norm.key_norm": "attn.norm_added_k",
    },
    "single_blocks": {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"},
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def transformer_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's tensors of a whole-model or transformer-only file, with their root taken off; keys of
    other parts (ComfyUI's vae., text_encoders.) are left out."""
    root = next((r for r in _ROOTS if any(k.startswith(r + "double_blocks.") for k in state)), "")
    return {
        key[len(root) :]: value
        for key, value in state.items()
        if key.startswith(root) and (_BLOCK.match(key[len(root) :]) or _top(key[len(root) :].rsplit(".", 1)[0]))
    }


def convert_flux_checkpoint(state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """{diffusers key: tensor} for a BFL-layout transformer (`transformer_keys` output); `target` is the diffusers
    model's {key: shape}. Raises ValueError naming the first keys that map nowhere, or the diffusers keys the file
    does not give."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        converted = _convert(module, param, value, target)
        if converted is None:
            unknown.append(key)
        else:
            out.update(converted)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are no FLUX.1 transformer weight, e.g. {', '.join(unknown[:3])}")
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"the file lacks {len(missing)} weights of the transformer, e.g. {', '.join(missing[:3])}")
    wrong = [k for k, v in out.items() if k not in target or tuple(v.shape) != tuple(target[k])]
    if wrong:
        key = wrong[0]
        got = list(out[key].shape)
        raise ValueError(f"{key} has shape {got}, the model's config wants {list(target.get(key, ()))}")
    return out


def _convert(module: str, param: str, value: Any, target: Mapping[str, tuple[int, ...]]) -> dict[str, Any] | None:
    block = _BLOCK.match(module)
    if block is None:
        name = _top(module)
        if name is None:
            return None
        if module == SHIFT_SCALE:  # [shift; scale] in BFL, [scale; shift] in diffusers
            return {f"{name}.{param}": halves_swapped(value)}
        return {f"{name}.{param}": value}
    kind, index, rest = block.groups()
    root, table = BLOCKS[kind]
    inside = f"{root}.{index}"
    if rest in _NORMS[kind] and param == "scale":
        return {f"{inside}.{_NORMS[kind][rest]}.weight": value}
    if rest in table:
        return {f"{inside}.{table[rest]}.{param}": value}
    parts = FUSED.get(rest)
    if parts is None or rest == "linear1.qkv":
        return None
    names = [f"{inside}.{table[f'{rest}#{part}']}.{param}" for part in parts]
    if any(name not in target for name in names):
        return None
    out, start = {}, 0
    for name in names:
        size = target[name][0]
        out[name] = rows(value, start, start + size, 0)
        start += size
    return out if start == tuple(value.shape)[0] else None


def _top(module: str) -> str | None:
    return TOP.get(module) or TOP.get(f"{module}#scale_shift")
