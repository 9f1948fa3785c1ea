"""Whole-file VAEs and text encoders, as ComfyUI keeps them (models/vae, models/text_encoders or models/clip), read
into the diffusers component a model's config describes: a model config's `vae:` and `text_encoders:`.

Layouts read:

* VAE: the original CompVis/LDM names (``encoder.down.0.block.0.conv1.weight``, attention as 1x1 convolutions
  ``decoder.mid.attn_1.q.weight``): SD1/SD2/SDXL VAE files (vae-ft-mse-840000, sdxl_vae), FLUX.1's
  ae.safetensors, SD3's VAE, also under ``first_stage_model.`` or ``vae.`` (a whole checkpoint's VAE); and
  diffusers' own names (``encoder.down_blocks.0.resnets.0.conv1.weight``).
* CLIP (CLIP-L, CLIP-G): transformers' names (``text_model.encoder.layers.0.self_attn.q_proj.weight``, with or
  without the ``text_model.`` level, ``text_projection.weight``) under any root (``text_encoders.clip_l.
  transformer.``, ``cond_stage_model.transformer.``); a whole CLIPModel's vision tower is left out.
* T5: transformers' names (``encoder.block.0.layer.0.SelfAttention.q.weight``, ``shared.weight``) under any root
  (``text_encoders.t5xxl.transformer.``); a whole T5's decoder is left out.

Only names and shapes are read here (tensors, or shape stand-ins from a header), so planning checks a file before
anything loads; values come back as views of the file's tensors. No torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batchgen.assets.text_model import LEVEL, without_level

# The diffusers / transformers class a model_index.json names for a component -> the kind of file it reads.
KIND_OF_CLASS = {
    "AutoencoderKL": "vae",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "T5EncoderModel": "t5",
}
KIND_NAMES = {"vae": "a VAE", "clip": "a CLIP text encoder", "t5": "a T5 text encoder"}

_VAE_ROOTS = ("first_stage_model.", "vae.")
_LDM_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_LDM_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_BLOCK = re.compile(r"(down|up)\.(\d+)\.(?:block\.(\d+)\.(\w+)|(downsample|upsample)\.conv)")
_LDM_MID = re.compile(r"mid\.(?:block_([12])\.(\w+)|attn_1\.(\w+))")
# Kept by the original training code beside the VAE (its discriminator), never part of the model.
_VAE_IGNORED = ("loss.",)
_CLIP_IGNORED = ("vision_model.", "visual_projection.", "logit_scale", "embeddings.position_ids")
_T5_IGNORED = ("decoder.", "lm_head.")
_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_T5_TIED = {"shared.weight": "encoder.embed_tokens.weight", "encoder.embed_tokens.weight": "shared.weight"}


def convert_component(kind: str, state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """{model key: tensor} for a file of `kind` (vae, clip, t5); `target` is the configured component's {key: shape}.
    Raises ValueError naming the first keys that map nowhere, the weights the file lacks, or a shape that differs."""
    convert = {"vae": _convert_vae, "clip": _convert_clip, "t5": _convert_t5}[kind]
    out, unknown = convert(state, target)
    what = KIND_NAMES[kind].removeprefix("a ")
    # A shape says most about a file of another model (another base's VAE has other latent channels), so first.
    for key, value in out.items():
        if tuple(value.shape) != tuple(target[key]):
            raise ValueError(f"{key} has shape {list(value.shape)}, the model's config wants {list(target[key])}")
    if unknown:
        raise ValueError(f"{len(unknown)} keys are no {what} weight, e.g. {', '.join(unknown[:3])}")
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"the file lacks {len(missing)} weights of the {what}, e.g. {', '.join(missing[:3])}")
    return out


def component_keys(kind: str, keys: list[str]) -> list[str]:
    """The keys of a file that its `kind` converter reads as the component (the same roots and left-out parts as
    below), each weight once: memory planning counts a whole file's component from its header with them."""
    if kind == "vae":
        root = next((r for r in _VAE_ROOTS if any(k.startswith((r + "encoder.", r + "decoder.")) for k in keys)), "")
        return [k for k in keys if k.startswith(root) and (root or not k.startswith(_VAE_IGNORED))]
    if kind == "clip":
        anchor = "embeddings.token_embedding.weight"
        root = next((k[: -len(anchor)].removesuffix(LEVEL) for k in keys if k.endswith(anchor)), "")
        return [k for k in keys if k.startswith(root) and not without_level(k[len(root) :]).startswith(_CLIP_IGNORED)]
    root = next((k[: -len(_T5_ANCHOR)] for k in keys if k.endswith(_T5_ANCHOR)), "")
    body = {k: k[len(root) :] for k in keys if k.startswith(root) and not k[len(root) :].startswith(_T5_IGNORED)}
    saved = set(body.values())
    # The token embedding is one weight however many names a file saves it under.
    return [k for k, b in body.items() if not (b in _T5_TIED and _T5_TIED[b] in saved and b != "shared.weight")]


def file_kinds(keys: list[str]) -> list[str]:
    """What a file holds, by its names alone: vae, clip, t5 (a ComfyUI whole-model file holds all three)."""
    anchors = {
        "vae": ("encoder.conv_in.weight", "decoder.conv_out.weight"),
        "clip": ("embeddings.token_embedding.weight",),
        "t5": (_T5_ANCHOR,),
    }
    return [kind for kind, ends in anchors.items() if any(key.endswith(ends) for key in keys)]


def _convert_vae(state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    root = next((r for r in _VAE_ROOTS if any(k.startswith((r + "encoder.", r + "decoder.")) for k in state)), "")
    keys = {key[len(root) :]: key for key in state if key.startswith(root)}
    diffusers_names = any(".down_blocks." in key or ".up_blocks." in key for key in keys)
    up_blocks = 1 + max((int(k.split(".")[2]) for k in target if k.startswith("decoder.up_blocks.")), default=-1)
    out, unknown = {}, []
    for body, key in keys.items():
        if not root and body.startswith(_VAE_IGNORED):
            continue
        module, _, param = body.rpartition(".")
        name = module if diffusers_names else _vae_module(module, up_blocks)
        new = f"{name}.{param}" if name else None
        if new is None or new not in target:
            unknown.append(key)
            continue
        value = state[key]
        # The original attention projections are 1x1 convolutions, diffusers' are Linears.
        wanted = tuple(target[new])
        out[new] = _reshaped(value, wanted) if len(wanted) == 2 and tuple(value.shape) == (*wanted, 1, 1) else value
    return out, unknown


def _vae_module(module: str, up_blocks: int) -> str | None:
    """The diffusers path of an original VAE module (``decoder.up.3.block.0.conv1``), None for a name it has not."""
    if module in ("quant_conv", "post_quant_conv"):
        return module
    side, _, rest = module.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest in _LDM_TOP:
        return f"{side}.{_LDM_TOP[rest]}"
    block = _LDM_BLOCK.fullmatch(rest)
    if block:
        direction, index, layer, name, sampler = block.groups()
        # The original numbers its decoder's levels from the lowest resolution up, diffusers from the top down.
        number = int(index) if direction == "down" else up_blocks - 1 - int(index)
        inside = f"{side}.{direction}_blocks.{number}"
        if sampler:
            return f"{inside}.{sampler}rs.0.conv"  # downsamplers / upsamplers
        return f"{inside}.resnets.{layer}.{_LDM_RESNET[name]}" if name in _LDM_RESNET else None
    mid = _LDM_MID.fullmatch(rest)
    if mid:
        resnet, name, attention = mid.groups()
        if resnet:
            return f"{side}.mid_block.resnets.{int(resnet) - 1}.{_LDM_RESNET[name]}" if name in _LDM_RESNET else None
        return f"{side}.mid_block.attentions.0.{_LDM_ATTENTION[attention]}" if attention in _LDM_ATTENTION else None
    return None


def _convert_clip(state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    anchor = "embeddings.token_embedding.weight"
    roots = {key[: -len(anchor)].removesuffix(LEVEL) for key in state if key.endswith(anchor)}
    if len(roots) > 1:
        raise ValueError(f"the file holds {len(roots)} CLIP text encoders (under {', '.join(sorted(roots))})")
    root = next(iter(roots), "")
    # transformers 5 dropped CLIPTextModel's text_model level (not CLIPTextModelWithProjection's): names are
    # compared without it, whichever way the file or the model spells them.
    wanted = {without_level(key): key for key in target}
    out, unknown = {}, []
    for key in state:
        if not key.startswith(root):
            continue  # another part of a whole checkpoint
        body = without_level(key[len(root) :])
        if body in wanted:
            out[wanted[body]] = state[key]
        elif not (body.startswith(_CLIP_IGNORED) or body == "text_projection.weight"):
            unknown.append(key)  # a projection the model has not (CLIPTextModel) is left out, as transformers does
    return out, unknown


def _convert_t5(state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    roots = {key[: -len(_T5_ANCHOR)] for key in state if key.endswith(_T5_ANCHOR)}
    if len(roots) > 1:
        raise ValueError(f"the file holds {len(roots)} T5 encoders (under {', '.join(sorted(roots))})")
    root = next(iter(roots), "")
    out, unknown = {}, []
    for key in state:
        if not key.startswith(root):
            continue
        body = key[len(root) :]
        if body in target:
            out[body] = state[key]
        elif not body.startswith(_T5_IGNORED):
            unknown.append(key)
    for key, tied in _T5_TIED.items():  # the token embedding is saved once, under either name
        if key in target and key not in out and tied in out:
            out[key] = out[tied]
    return out, unknown


def _reshaped(value: Any, shape: tuple[int, ...]) -> Any:
    """A view of a tensor in `shape`, or a stand-in of the same class with it."""
    return value.reshape(shape) if hasattr(value, "reshape") else type(value)(shape)
