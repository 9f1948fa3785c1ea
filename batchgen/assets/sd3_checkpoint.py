"""An SD3 / SD3.5 MMDiT in Stability's (SGM) layout (the release files, ComfyUI's model.diffusion_model.*, the
transformer alone) as diffusers' SD3Transformer2DModel state dict: each stream's fused q/k/v cut into diffusers'
projections, the final layer's and the last block's context modulation halves swapped, the norms renamed.

The names come from the SD3 LoRA tables (lora_formats/sd3.py), which map the same SGM modules; the cuts are sized
from the target model's own shapes, as flux_checkpoint.py's are, and which block is the last ("pre only": its
context stream has no output or MLP) is the target's to say. Values are views of the file's tensors (no copies),
and shape-only stand-ins go through too, so planning checks a file's keys and shapes from its header alone. No
torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batchgen.assets.lora_formats.fused import halves_swapped, rows
from batchgen.assets.lora_formats.sd3 import CONTEXT_MODULATION, FUSED, JOINT, TOP, pre_only

# The roots a transformer's keys may sit under: ComfyUI's and SGM's whole-model files, others' (none).
_ROOTS = ("model.diffusion_model.", "diffusion_model.")
# The MMDiT's own top-level names; a whole-model file's first_stage_model., text_encoders., conditioner. are not.
_MODULES = ("joint_blocks", "x_embedder", "pos_embed", "context_embedder", "t_embedder", "y_embedder", "final_layer")
# SGM's position table is a tensor of the model itself, diffusers' a buffer of the patch embedding.
_POS_EMBED = ("pos_embed", "pos_embed.pos_embed")
# The attentions' q/k norms (SD3.5's qk_norm): SGM module inside a joint block -> diffusers path inside it.
_NORMS = {
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.ln_q": "attn2.norm_q",  # SD3.5-medium's second image attention
    "x_block.attn2.ln_k": "attn2.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
}
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")


def transformer_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer's tensors of a whole-model or transformer-only file, with their root taken off; keys of
    other parts (first_stage_model., text_encoders., conditioner.) are left out."""
    root = next((r for r in _ROOTS if any(k.startswith(r + "joint_blocks.") for k in state)), "")
    return {
        key[len(root) :]: value
        for key, value in state.items()
        if key.startswith(root) and key[len(root) :].split(".", 1)[0] in _MODULES
    }


def convert_sd3_checkpoint(state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """{diffusers key: tensor} for an SGM-layout MMDiT (`transformer_keys` output); `target` is the diffusers
    model's {key: shape}. Raises ValueError naming the first keys that map to no weight of the target, the target's
    keys the file does not give, or a weight whose shape is not the target's."""
    modules = {key.rpartition(".")[0]: shape for key, shape in target.items()}
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        converted = _convert(key, value, target, modules)
        if converted is None or any(name not in target for name in converted):
            unknown.append(key)
        else:
            out.update(converted)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are no SD3/SD3.5 transformer weight of this config, e.g. {', '.join(unknown[:3])}"
        )
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"the file lacks {len(missing)} weights of the transformer, e.g. {', '.join(missing[:3])}")
    wrong = [k for k, v in out.items() if tuple(v.shape) != tuple(target[k])]
    if wrong:
        key = wrong[0]
        raise ValueError(f"{key} has shape {list(out[key].shape)}, the model's config wants {list(target[key])}")
    return out


def _convert(
    key: str, value: Any, target: Mapping[str, tuple[int, ...]], modules: Mapping[str, tuple[int, ...]]
) -> dict[str, Any] | None:
    """The diffusers tensors one file tensor gives ({} for none the target keeps), None for a key SD3 has not."""
    if key == _POS_EMBED[0]:
        # A config without pos_embed_max_size computes the table at each call instead of keeping it: nothing to load.
        return {_POS_EMBED[1]: value} if _POS_EMBED[1] in target else {}
    module, _, param = key.rpartition(".")
    block = _BLOCK.match(module)
    if block is None:
        if module in TOP:
            return {f"{TOP[module]}.{param}": value}
        swapped = TOP.get(f"{module}#scale_shift")  # the final layer's [shift; scale]
        return {f"{swapped}.{param}": halves_swapped(value)} if swapped else None
    index, rest = block.groups()
    inside = f"transformer_blocks.{index}"
    if rest in _NORMS:
        return {f"{inside}.{_NORMS[rest]}.{param}": value}
    if rest == CONTEXT_MODULATION and pre_only(modules, index):  # the last block's, [shift; scale] too
        return {f"{inside}.{JOINT[f'{rest}#scale_shift']}.{param}": halves_swapped(value)}
    if rest in JOINT:
        return {f"{inside}.{JOINT[rest]}.{param}": value}
    parts = FUSED.get(rest)
    if parts is None:
        return None
    names = [f"{inside}.{JOINT[f'{rest}#{part}']}.{param}" for part in parts]
    if any(name not in target for name in names):
        return None
    count = tuple(value.shape)[0]
    sizes = [target[name][0] for name in names]
    if sum(sizes) != count:
        if count % len(parts):
            return None
        sizes = [count // len(parts)] * len(parts)  # equal thirds, as SGM stacks them: the shape check names the part
    out, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        out[name] = rows(value, start, start + size, 0)
        start += size
    return out
