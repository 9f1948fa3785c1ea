"""Diffusers state dicts back to the original (CompVis / SGM) single-file layout, for tests only.

The inverse of diffusers' single-file converters (loaders/single_file_utils.py): tests save a tiny pipeline as an
A1111-style file, or build full-size key sets on the meta device, and check batchgen reads them back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from batchgen.assets.lora_formats.sgm import sgm_table, to_sgm

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    table = {
        prefix: (sgm, _RESNET if renames is not None else None) for prefix, (sgm, renames) in sgm_table(config).items()
    }
    table["conv_norm_out"] = ("out.0", None)
    out = {}
    for key, tensor in state.items():
        module, name = key.rsplit(".", 1)
        sgm = to_sgm(module, table)
        assert sgm is not None, f"no SGM name for {key}"
        out[f"model.diffusion_model.{sgm}.{name}"] = tensor
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], up_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: f"decoder.up.{up_blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in _VAE_ATTENTION.items():
                new = new.replace(f"attn_1.{old}.", f"attn_1.{ldm}.")
            if tensor.dim() == 2:
                tensor = tensor[:, :, None, None]  # the original uses 1x1 convolutions
        out[f"first_stage_model.{new}"] = tensor
    return out


def clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v for k, v in state.items()}


def open_clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_embedding.weight":
            out[f"{prefix}positional_embedding"] = tensor
        elif key == "embeddings.token_embedding.weight":
            out[f"{prefix}token_embedding.weight"] = tensor
        elif key.startswith("final_layer_norm."):
            out[f"{prefix}ln_final.{key.split('.')[-1]}"] = tensor
        elif key == "text_projection.weight":
            out[f"{prefix}text_projection"] = tensor.T.contiguous()
        else:
            match = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
            assert match, f"no open_clip name for {key}"
            layer, module, name = match.groups()
            base = f"{prefix}transformer.resblocks.{layer}."
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{base}attn.in_proj_{name}", {})[module[-6]] = tensor
            else:
                out[f"{base}{_OPEN_CLIP_LAYER[module]}.{name}"] = tensor
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """A whole SD1 or SDXL pipeline's weights under the names an A1111/ComfyUI checkpoint uses."""
    out = unet_to_original(pipe.unet.state_dict(), pipe.unet.config)
    out |= vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.up_block_types))
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        out |= open_clip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    else:
        out |= clip_to_original(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
    return {k: v.detach().contiguous() for k, v in out.items()}
