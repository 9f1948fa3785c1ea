"""A checkpoint's patchable modules and their shapes, from its config files, on the meta device: no weights load.

LoRA keys are checked against these before any model is loaded, so a wrong file fails in seconds, not after a load.
"""

from __future__ import annotations

import json
from pathlib import Path

from batchgen.assets.loras import Architecture
from batchgen.errors import BatchgenError

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def model_architecture(checkpoint: Path, base: str) -> Architecture:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    from batchgen.assets.lora_keys import module_shapes

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
