"""A checkpoint's patchable modules and their shapes, from its config files, on the meta device: no weights load.

LoRA keys are checked against these before any model is loaded, so a wrong file fails in seconds, not after a load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.errors import BatchgenError

if TYPE_CHECKING:
    import torch

# The pipeline components a LoRA patches.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModuleRef:
    """A Linear or Conv2d module of one pipeline component, by its ``named_modules()`` path."""

    component: str
    path: str


@dataclass(frozen=True)
class Architecture:
    """A model's LoRA-patchable modules, read from its configs without loading weights."""

    base: str
    modules: dict[str, dict[str, tuple[int, ...]]]  # component -> module path -> weight shape
    unet_config: dict[str, Any]


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{path: weight shape} of every nn.Linear and nn.Conv2d (works on the meta device)."""
    import torch  # lazy: importing this module (for --dry-run's checks) must not pay for torch

    return {
        path: tuple(module.weight.shape)
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def model_architecture(checkpoint: Path, base: str) -> Architecture:
    # lazy: only a sweep that uses LoRAs pays for torch, diffusers and transformers
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not checkpoint.is_dir():
        raise BatchgenError(f"{checkpoint}: LoRAs need a diffusers folder checkpoint to map their keys")
    unet_config = json.loads((checkpoint / "unet" / "config.json").read_text())
    index = json.loads((checkpoint / "model_index.json").read_text())
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    with torch.device("meta"):
        modules["unet"] = module_shapes(UNet2DConditionModel.from_config(unet_config))
        for component in _TEXT_ENCODERS:
            folder = checkpoint / component
            if not isinstance(index.get(component), list) or not (folder / "config.json").is_file():
                continue
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
            projected = index[component][1] == "CLIPTextModelWithProjection"
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            modules[component] = module_shapes(cls(config))
    return Architecture(base=base, modules=modules, unet_config=unet_config)
