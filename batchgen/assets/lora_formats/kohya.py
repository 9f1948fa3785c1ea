"""kohya / LyCORIS keys (sd-scripts, A1111, ComfyUI): ``<module name>.<tensor suffix>``.

The module name is a root naming the component followed by the module path with ``.`` written as ``_``; UNet paths
may be diffusers' or the original SGM layout's (sgm.py). Text encoder paths are spelled ``text_model_...`` whatever
the installed transformers calls the module. The suffix is the layer type's own (lora_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from batchgen.assets.architecture import COMPONENTS, ModuleRef
from batchgen.assets.bases import BASES
from batchgen.assets.lora_formats.sgm import sgm_table, to_sgm
from batchgen.assets.lora_layers import LAYER_SUFFIXES
from batchgen.assets.text_model import kohya_spelling

# Module-name root -> (component, whether the name numbers the text encoders as one of two, as only SDXL's do):
# the UNet bases' text-encoder prefixes as their records declare them.
ROOTS: Mapping[str, tuple[str, bool]] = {
    "lora_unet_": ("unet", False),
    **{
        prefix: (component, len(base.text_encoders) >= 2)
        for base in BASES
        if base.denoiser == "unet"
        for prefix, component in base.kohya_text_encoder_prefixes.items()
    },
}
# The names each component's modules may have: its roots without their trailing "_".
_NAME_ROOTS = {c: tuple(root[:-1] for root, (owner, _) in ROOTS.items() if owner == c) for c in COMPONENTS}


def recognises(keys: Iterable[object]) -> bool:
    """Whether a state dict's keys are kohya's: any key starting with one of its roots says so."""
    roots = tuple(ROOTS)
    return any(isinstance(key, str) and key.startswith(roots) for key in keys)


def layout_of(key: str) -> str:
    """The layout a key of this family is written in (--list): kohya's, with diffusers' or SGM's UNet paths."""
    return "kohya"


def parse_key(key: str) -> tuple[str, str] | None:
    """(module name, layer suffix), or None for a key that is no kohya LoRA tensor."""
    prefix, _, suffix = key.partition(".")
    if prefix.startswith("lora_") and suffix in LAYER_SUFFIXES:
        return prefix, suffix
    return None


def component_of(prefix: str) -> tuple[str, bool] | None:
    """(component, numbers two text encoders) of a module name, None when its root is none of kohya's."""
    return next((value for root, value in ROOTS.items() if prefix.startswith(root)), None)


def kohya_names(
    component: str, module_paths: Iterable[str], unet_config: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """{kohya module name: module path} for one component.

    UNet modules get ``lora_unet_`` + the diffusers path and, given the UNet's config, also the SGM-layout name.
    Text encoder modules are named in the ``text_model_`` spelling: ``lora_te_``/``lora_te1_`` for text_encoder,
    ``lora_te2_`` for text_encoder_2.
    """
    if component not in _NAME_ROOTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    names: dict[str, str] = {}
    if component == "unet":
        sgm = sgm_table(unet_config) if unet_config is not None else {}
        for path in module_paths:
            names[_name("lora_unet", path)] = path
            sgm_path = to_sgm(path, sgm)
            if sgm_path is not None:
                names[_name("lora_unet", sgm_path)] = path
        return names
    for path in module_paths:
        spelled = kohya_spelling(path)
        for root in _NAME_ROOTS[component]:
            names[_name(root, spelled)] = path
    return names


def locator(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], unet_config: Mapping[str, Any] | None
) -> Callable[[str], ModuleRef | None]:
    """The module a kohya module name names, for every module of a model."""
    found: dict[str, ModuleRef] = {}
    for component in COMPONENTS:
        if component not in modules:
            continue
        config = unet_config if component == "unet" else None
        for name, path in kohya_names(component, modules[component], config).items():
            found[name] = ModuleRef(component, path)
    return found.get


def _name(root: str, path: str) -> str:
    return f"{root}_{path.replace('.', '_')}"
