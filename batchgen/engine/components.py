"""Whole-file VAEs and text encoders (a model config's `vae:` and `text_encoders:`), built from the model's config
folder and loaded in place of the checkpoint's own components."""

from __future__ import annotations

import json
from typing import Any

import torch

from batchgen.assets.architecture import meta_component
from batchgen.assets.component_files import convert_component
from batchgen.assets.tensors import checkpoint_state_dict
from batchgen.spec import ModelSpec


def load_component_files(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """{component: model} for each whole file the spec names, in `dtype` (planning checked every key and shape)."""
    if not spec.components:
        return {}
    index = json.loads((spec.config_dir / "model_index.json").read_text())
    loaded: dict[str, Any] = {}
    for part in spec.components:
        library, class_name = index[part.component]
        model = meta_component(spec.config_dir, part.component, library, class_name)
        target = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        weights = convert_component(part.kind, checkpoint_state_dict(part.path), target)
        if library == "diffusers":
            model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
            loaded[part.component] = model.eval()
            continue
        import transformers  # transformers' own loader: its dtype rules (T5 keeps `wo` in fp32 under fp16) and ties

        config = transformers.AutoConfig.from_pretrained(str(spec.config_dir / part.component), local_files_only=True)
        cls = getattr(transformers, class_name)
        loaded[part.component] = cls.from_pretrained(None, config=config, state_dict=weights, dtype=dtype).eval()
    return loaded
