"""The tiny SD3 and FLUX models' LoRAs, one file per layout trainers write for them.

tiny_flux: ``ink`` kohya (sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv``, fused q/k/v and single-block
``linear1``, CLIP-L ``lora_te1_``), ``grain`` diffusers/PEFT (``transformer.`` and ``text_encoder.``, alpha in
the adapter metadata), ``pastel`` BFL/ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``)
and ``sketch`` XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``, no alpha).
tiny_sd3: ``ink``, ``grain`` (with CLIP-L and CLIP-G layers) and ``pastel``, all diffusers/PEFT.

The fused layouts are written from diffusers' modules: a BFL Linear is its parts' rows stacked in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.assets.bases import BY_NAME
from batchgen.assets.text_model import with_level
from batchgen.tiny.loras import _LORA_STRENGTH, _layer_tensors, _save_safetensors
from batchgen.tiny.noise import seeded_generator

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# BFL module -> the diffusers modules (inside its block) whose rows it stacks.
_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
}
_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
}
# XLabs trains the attention of double blocks only: its processor's names for the BFL modules.
_XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
          "txt_attn.proj": "proj_lora2"}  # fmt: skip
_TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# (stem, rank, alpha)
_FLUX_LORAS = {"ink": (4, 2.0), "grain": (8, 4.0), "pastel": (2, 2.0), "sketch": (4, 4.0)}
_SD3_LORAS = {"ink": (4, 2.0), "grain": (8, 4.0), "pastel": (2, 1.0)}
# The root of CLIP-L's kohya names in the FLUX.1 record (the first it declares for text_encoder).
_CLIP_ROOT = next(r for r, c in BY_NAME["flux"].kohya_text_encoder_prefixes.items() if c == "text_encoder")


def write_transformer_loras(pipe: DiffusionPipeline, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "tiny_flux":
        bfl = _bfl_shapes(pipe.transformer)
        _save(folder / "ink", _kohya(bfl, pipe, name), {"ss_network_module": "networks.lora_flux"})
        _save(folder / "grain", *_peft(pipe, name, "grain", _FLUX_LORAS["grain"], ("transformer", "text_encoder")))
        _save(folder / "pastel", _bfl(bfl, name), {})
        _save(folder / "sketch", _xlabs(bfl, name), {})
        return
    for stem, spec in _SD3_LORAS.items():
        components = ("transformer", "text_encoder", "text_encoder_2") if stem == "grain" else ("transformer",)
        _save(folder / stem, *_peft(pipe, name, stem, spec, components))


def _save(stem: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    _save_safetensors(tensors, stem.with_suffix(".safetensors"), {"format": "pt", **metadata})


def _bfl_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{BFL dotted name: (out, in)} of the modules the tiny transformer has, fused ones as their parts stacked."""
    modules = dict(transformer.named_modules())
    shapes: dict[str, tuple[int, int]] = {}
    for kind, root, table in (("double_blocks", "transformer_blocks", _DOUBLE),
                              ("single_blocks", "single_transformer_blocks", _SINGLE)):  # fmt: skip
        for index in range(len(getattr(transformer, root))):
            for bfl, parts in table.items():
                weights = [modules[f"{root}.{index}.{part}"].weight for part in parts]
                shapes[f"{kind}.{index}.{bfl}"] = (sum(w.shape[0] for w in weights), weights[0].shape[1])
    return shapes


def _factors(name: str, stem: str, module: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    rank, alpha = (_FLUX_LORAS if name == "tiny_flux" else _SD3_LORAS)[stem]
    return _layer_tensors("lora", shape, rank, alpha, _LORA_STRENGTH, seeded_generator(name, stem, module))


def _kohya(bfl: dict[str, tuple[int, int]], pipe: DiffusionPipeline, name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, shape in bfl.items():
        layer = "lora_unet_" + module.replace(".", "_")
        tensors |= {f"{layer}.{s}": t for s, t in _factors(name, "ink", module, shape).items()}
    for path, linear in pipe.text_encoder.named_modules():
        if path.endswith(_TEXT_TARGETS):
            spelled = with_level(path)  # kohya names it whatever transformers does
            layer = _CLIP_ROOT + spelled.replace(".", "_")
            factors = _factors(name, "ink", f"te1.{path}", tuple(linear.weight.shape))
            tensors |= {f"{layer}.{s}": t for s, t in factors.items()}
    return tensors


def _bfl(bfl: dict[str, tuple[int, int]], name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, shape in bfl.items():
        factors = _factors(name, "pastel", module, shape)
        tensors[f"diffusion_model.{module}.lora_A.weight"] = factors["lora_down.weight"]
        tensors[f"diffusion_model.{module}.lora_B.weight"] = factors["lora_up.weight"]
        tensors[f"diffusion_model.{module}.alpha"] = factors["alpha"]
    return tensors


def _xlabs(bfl: dict[str, tuple[int, int]], name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for module, shape in bfl.items():
        kind, index, rest = module.split(".", 2)
        if kind != "double_blocks" or rest not in _XLABS:
            continue
        factors = _factors(name, "sketch", module, shape)
        # XLabs stores no alpha and applies the factors unscaled: alpha == rank, so the factors carry it.
        rank, alpha = _FLUX_LORAS["sketch"]
        prefix = f"double_blocks.{index}.processor.{_XLABS[rest]}"
        tensors[f"{prefix}.down.weight"] = factors["lora_down.weight"]
        tensors[f"{prefix}.up.weight"] = factors["lora_up.weight"] * (alpha / rank)
    return tensors


def _peft(
    pipe: DiffusionPipeline, name: str, stem: str, spec: tuple[int, float], components: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' save_lora_weights layout: ``<component>.<module path>.lora_A.weight``, alpha in the metadata."""
    rank, alpha = spec
    tensors = {}
    for component in components:
        targets = _TRANSFORMER_TARGETS if component == "transformer" else _TEXT_TARGETS
        for path, module in getattr(pipe, component).named_modules():
            if not path.endswith(tuple(f".{t}" for t in targets)):
                continue
            factors = _factors(name, stem, f"{component}.{path}", tuple(module.weight.shape))
            tensors[f"{component}.{path}.lora_A.weight"] = factors["lora_down.weight"]
            tensors[f"{component}.{path}.lora_B.weight"] = factors["lora_up.weight"]
    config: dict[str, object] = {}
    for component in components:
        targets = _TRANSFORMER_TARGETS if component == "transformer" else _TEXT_TARGETS
        config |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha}
        config[f"{component}.target_modules"] = sorted(targets)
    return tensors, {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
