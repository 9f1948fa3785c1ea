"""A checkpoint's patchable modules and their shapes, from its config files, on the meta device: no weights load.

LoRA keys are checked against these before any model is loaded, so a wrong file fails in seconds, not after a load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.assets.bases import BASES, BY_NAME, DENOISERS
from batchgen.assets.module_table import clip_text_shapes, unet_shapes
from batchgen.errors import BatchgenError

if TYPE_CHECKING:
    import torch

# The pipeline components a LoRA patches: a denoiser (UNet, or the MMDiT of SD3/FLUX) and the text encoders.
COMPONENTS = (*DENOISERS, *dict.fromkeys(c for base in BASES for c in base.text_encoders))


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
    unet_config: dict[str, Any]  # the denoiser's config (a UNet's, or a transformer's)


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{path: weight shape} of every nn.Linear and nn.Conv2d (works on the meta device)."""
    import torch  # lazy: importing this module (for --dry-run's checks) must not pay for torch

    return {
        path: tuple(module.weight.shape)
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


def model_architecture(checkpoint: Path, base: str) -> Architecture:
    if not checkpoint.is_dir():
        raise BatchgenError(f"{checkpoint}: LoRAs need a diffusers folder checkpoint to map their keys")
    if (checkpoint / "transformer" / "config.json").is_file():
        return _transformer_architecture(checkpoint, base)
    unet_config = json.loads((checkpoint / "unet" / "config.json").read_text())
    index = json.loads((checkpoint / "model_index.json").read_text())
    encoders = {}
    for component in BY_NAME[base].text_encoders:
        folder = checkpoint / component
        if isinstance(index.get(component), list) and (folder / "config.json").is_file():
            encoders[component] = index[component][1] == "CLIPTextModelWithProjection"
    tables = {"unet": unet_shapes(unet_config)}
    for component, projected in encoders.items():
        config = json.loads((checkpoint / component / "config.json").read_text())
        tables[component] = clip_text_shapes(config, projected)
    if any(table is None for table in tables.values()):
        tables = _meta_shapes(checkpoint, unet_config, encoders)
    return Architecture(base=base, modules=tables, unet_config=unet_config)


def _meta_shapes(checkpoint: Path, unet_config: dict, encoders: dict[str, bool]) -> dict[str, dict]:
    """The modules built on the meta device, for a layout module_table does not know."""
    # lazy: only such a layout pays for torch, diffusers and transformers
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    with torch.device("meta"):
        modules["unet"] = module_shapes(UNet2DConditionModel.from_config(unet_config))
        for component, projected in encoders.items():
            config = AutoConfig.from_pretrained(str(checkpoint / component), local_files_only=True)
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            modules[component] = module_shapes(cls(config))
    return modules


def meta_denoiser(config: dict[str, Any], base: str) -> torch.nn.Module:
    """The base's denoiser as its config describes it, built on the meta device: every shape, no memory."""
    import diffusers  # lazy: only what builds a model pays for diffusers
    import torch

    cls = getattr(diffusers, config.get("_class_name") or BY_NAME[base].denoiser_class)
    with torch.device("meta"):
        return cls.from_config(config)


def meta_component(config_dir: Path, component: str, library: str, class_name: str) -> torch.nn.Module:
    """A pipeline component (a VAE, a text encoder) as its folder's config describes it, on the meta device."""
    import torch

    folder = config_dir / component
    with torch.device("meta"):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(str(folder)))
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return getattr(transformers, class_name)(config)


def _transformer_architecture(checkpoint: Path, base: str) -> Architecture:
    """An MMDiT pipeline's modules on the meta device: no plain-Python table covers them, so LoRAs for SD3 and FLUX
    pay for importing torch, diffusers and transformers at planning (a dry run without LoRAs does not)."""
    import torch
    import transformers

    index = json.loads((checkpoint / "model_index.json").read_text())
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    modules: dict[str, dict[str, tuple[int, ...]]] = {"transformer": module_shapes(meta_denoiser(config, base))}
    with torch.device("meta"):
        for component in BY_NAME[base].text_encoders:
            entry = index.get(component)
            if not (isinstance(entry, list) and entry[1] and (checkpoint / component / "config.json").is_file()):
                continue  # SD3 without T5: diffusers writes [null, null]
            text_config = transformers.AutoConfig.from_pretrained(str(checkpoint / component), local_files_only=True)
            modules[component] = module_shapes(getattr(transformers, entry[1])(text_config))
    return Architecture(base=base, modules=modules, unet_config=config)
