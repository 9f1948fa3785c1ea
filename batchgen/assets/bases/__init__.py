"""The SD versions ("bases") batchgen renders: one module per base declares its record (record.Base), BASES lists
them, and the functions here tell from a checkpoint, a textual inversion or a LoRA which base it is for. No torch:
only names and widths are read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from batchgen.assets.bases import flux, sd1, sd2, sd3, sdxl
from batchgen.assets.bases.record import Base
from batchgen.assets.safetensors_header import Header
from batchgen.errors import BatchgenError

# The registry: one module per base, in the order messages list them.
BASES: tuple[Base, ...] = (sd1.BASE, sd2.BASE, sdxl.BASE, sd3.BASE, flux.BASE)
SD1, SDXL = sd1.BASE, sdxl.BASE
BASE_NAMES: tuple[str, ...] = tuple(base.name for base in BASES)
BY_NAME: Mapping[str, Base] = {base.name: base for base in BASES}
# The components that denoise, one per base kind; a LoRA's weight for them is its `unet` weight.
DENOISERS: tuple[str, ...] = tuple(dict.fromkeys(base.denoiser for base in BASES))


def pipeline_base(index: Mapping[str, object]) -> str | None:
    """The base whose pipeline class a diffusers folder's model_index.json names; None when no base, or more than
    one, has that class (SD1 and SD2 share StableDiffusionPipeline: their UNet config tells them apart)."""
    owners = [base.name for base in BASES if base.pipeline_class == index.get("_class_name")]
    return owners[0] if len(owners) == 1 else None


# Single files of the MMDiT bases, by their transformer's block names (BFL/ComfyUI FLUX.1 layouts, SGM's SD3).
_MMDIT_CHECKPOINT = (
    ("flux", re.compile(r"(?:^|\.)(?:double_blocks|single_blocks)\.\d+\.")),
    ("sd-3", re.compile(r"(?:^|\.)joint_blocks\.\d+\.")),
)


def mmdit_checkpoint_base(keys: Iterable[object]) -> str | None:
    """The base of a single-file SD3 or FLUX.1 checkpoint (whole or transformer only), else None."""
    names = [key for key in keys if isinstance(key, str)]
    return next((base for base, pattern in _MMDIT_CHECKPOINT if any(pattern.search(n) for n in names)), None)


def listing(words: Iterable[str]) -> str:
    """'a, b or c', as messages list the bases."""
    words = list(words)
    return " or ".join([", ".join(words[:-1]), words[-1]]) if len(words) > 1 else "".join(words)


# --- checkpoints ---------------------------------------------------------------------------------------------------

_CROSS_ATTENTION_KEY = re.compile(r"model\.diffusion_model\..*\.attn2\.to_k\.weight")


def cross_attention_base(width: object) -> str | None:
    """The base whose UNet cross-attention reads this width (a diffusers config's cross_attention_dim)."""
    return next((base.name for base in BASES if width is not None and base.cross_attention_width == width), None)


def checkpoint_base(header: Header) -> tuple[str | None, int | None]:
    """(base, cross-attention width) of a single-file checkpoint from its UNet's cross-attention key width;
    (None, width) when the width is no base's, (None, None) when the file has no such key."""
    for key, info in header.tensors.items():
        if _CROSS_ATTENTION_KEY.fullmatch(key) and len(info.shape) == 2:
            width = info.shape[1]
            return cross_attention_base(width), width
    return None, None


def unet_config_base(unet_config: Mapping[str, object]) -> tuple[str | None, object]:
    """(base, cross-attention width) from a diffusers UNet config."""
    width = unet_config.get("cross_attention_dim")
    return (cross_attention_base(width) if isinstance(width, int) else None), width


# --- textual inversions --------------------------------------------------------------------------------------------


def embedding_base(widths: list[int], path: Path) -> str:
    """The base whose text encoders a TI's vectors fit (one width per encoder); BatchgenError for any other."""
    for base in BASES:
        if tuple(widths) == base.embedding_widths:
            return base.name
    if len(widths) == 2:
        (paired,) = (base for base in BASES if len(base.embedding_widths) == 2)
        expected = " and ".join(map(str, paired.embedding_widths))
        raise BatchgenError(f"{path}: clip_l/clip_g widths {widths} are not {paired.label}'s {expected}")
    single = ", ".join(f"{base.embedding_widths[0]} {base.name}" for base in BASES if len(base.embedding_widths) == 1)
    raise BatchgenError(f"{path}: vector width {widths[0]} matches no SD version ({single})")


# --- LoRAs ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerEvidence:
    """What one LoRA layer says about the model it was trained on (lora_formats reads it off the keys)."""

    component: str  # unet, text_encoder or text_encoder_2
    name: str  # the file's module name, "." written as "_"
    in_width: int | None  # what the layer reads: input width times kernel size
    two_text_encoders: bool  # the key names a second text encoder, or numbers the first as one of two


# What cross-attention keys/values read is the text embedding's width; what a text encoder's attention and first
# MLP layer read is its hidden width (fc2 reads the MLP width instead).
_CROSS_ATTENTION_INPUTS = ("attn2_to_k", "attn2_to_v")
_TEXT_HIDDEN_INPUTS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def lora_base(layers: Iterable[LayerEvidence]) -> str | None:
    """The base from the widths a LoRA's layers read; None if they don't decide or don't agree.

    A 768-wide text encoder alone fits SD1 and SDXL's first encoder; it reads as SD1, since an SDXL LoRA that
    trains the text encoder trains both.
    """
    return decided(lora_bases(layers))


def lora_bases(layers: Iterable[LayerEvidence]) -> frozenset[str]:
    """The bases a LoRA's layers allow: a transformer's layers say SD3 or FLUX, anything else a UNet base (their
    text encoders overlap); names and widths narrow that down. Empty when the layers disagree."""
    layers = list(layers)
    transformer = any(layer.component == "transformer" for layer in layers)
    candidates = {base.name for base in BASES if (base.denoiser == "transformer") == transformer}
    for allowed in _allowed_bases(layers):
        candidates &= allowed
    return frozenset(candidates)


def decided(candidates: frozenset[str]) -> str | None:
    """The one base of a set lora_bases gave, None when it holds none or several (SD1 and SDXL: SD1)."""
    if len(candidates) == 1:
        return next(iter(candidates))
    return SD1.name if candidates == {SD1.name, SDXL.name} else None


def _allowed_bases(layers: Iterable[LayerEvidence]) -> Iterable[set[str]]:
    """For each fact a layer states about the base, the set of bases it allows."""
    for layer in layers:
        owners = {base.name for base in BASES if any(_names_block(layer.name, b) for b in base.lora_block_names)}
        if owners:
            yield owners
        if layer.two_text_encoders:
            yield {base.name for base in BASES if len(base.text_encoders) >= 2}
        if layer.in_width is None:
            continue
        if layer.component == "transformer":
            continue  # its widths are the model's size, not its base's
        if layer.component == "unet" and layer.name.endswith(_CROSS_ATTENTION_INPUTS):
            yield {base.name for base in BASES if base.cross_attention_width == layer.in_width}
        elif layer.component != "unet" and layer.name.endswith(_TEXT_HIDDEN_INPUTS):
            yield {base.name for base in BASES if base.text_encoders.get(layer.component) == layer.in_width}


def _names_block(name: str, block: str) -> bool:
    return name.startswith(f"{block}_") or f"_{block}_" in name
