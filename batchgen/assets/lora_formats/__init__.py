"""Map the tensor keys of a LoRA file to modules of a diffusers pipeline: one converter per key family.

* flux.py: FLUX.1 files named after Black Forest Labs' modules (kohya ``lora_unet_double_blocks_``, BFL/ComfyUI
  ``diffusion_model.double_blocks.``, XLabs processors), their fused projections split onto diffusers' own.
* sd3.py: SD3/SD3.5 files named after the original SGM MMDiT modules (kohya ``lora_unet_joint_blocks_``, SGM/ComfyUI
  ``diffusion_model.joint_blocks.``), their fused q/k/v split likewise; fused.py holds the row surgery both share.
* kohya.py: kohya / LyCORIS names (``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``), UNet paths in
  diffusers' or the original SGM layout (sgm.py).
* peft.py: diffusers / PEFT names (``unet.<path>.lora_A.weight``, older ``lora.down.weight`` and
  attention-processor names), alpha from diffusers' adapter metadata.

A file is grouped by module (``group_by_module``), each group a {layer suffix: tensor} dict that a layer type in
lora_layers.py reads; ``map_to_modules`` then finds each group's module. Only tensor shapes are read, so tensors on
the meta device, or any object with a ``shape``, work as well.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from batchgen.assets.architecture import ModuleRef
from batchgen.assets.bases import LayerEvidence
from batchgen.assets.lora_formats import flux, kohya, peft, sd3
from batchgen.assets.lora_layers import delta_dims

# The key families, asked in this order whether a file's keys are theirs (FLUX's and SD3's kohya names start as SD's
# do, so they ask first); PEFT takes whatever is left. Each module has recognises(keys), parse_key(key),
# locator(modules, unet_config) and component_of(prefix), and may have split(groups, modules) for groups that patch
# several modules at once, and layout_of(key), the layout a key is written in by the name its trainers go by.
FORMATS: dict[str, ModuleType] = {"flux": flux, "sd3": sd3, "kohya": kohya, "peft": peft}


def detect_format(keys: list[object]) -> str:
    return next(name for name, family in FORMATS.items() if family.recognises(keys))


def file_layout(keys: list[object], fmt: str) -> str:
    """The layouts a file's keys are written in (`kohya`, `BFL/ComfyUI`, ...), joined with " + " for a mixed file."""
    layout_of = FORMATS[fmt].layout_of
    return " + ".join(sorted({layout_of(key) for key in keys if isinstance(key, str)}))


def group_by_module(
    state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """(format, {file module prefix: {layer suffix: tensor}}); format is a key of FORMATS.

    kohya prefixes are the file's module names (``lora_unet_...``); peft prefixes are ``<component>.<path>`` with
    ``base_model.model.`` and attention-processor naming removed, and get an ``alpha`` per module from diffusers'
    adapter metadata. Raises ValueError naming the first keys it cannot parse.
    """
    keys = list(state_dict)
    fmt = detect_format(keys)
    parse = FORMATS[fmt].parse_key
    groups: dict[str, dict[str, Any]] = {}
    unparsed: list[str] = []
    for key in keys:
        parsed = parse(key) if isinstance(key, str) else None
        if parsed is None:
            unparsed.append(str(key))
            continue
        prefix, suffix = parsed
        tensors = groups.setdefault(prefix, {})
        if suffix in tensors:
            raise ValueError(f"two keys give {suffix} of module {prefix}, the second is {key}")
        tensors[suffix] = state_dict[key]
    if unparsed:
        raise ValueError(
            f"{len(unparsed)} of {len(keys)} keys are not LoRA tensors in a known layout ({fmt} detected), "
            f"e.g. {', '.join(unparsed[:5])}"
        )
    if fmt == "peft" and metadata:
        peft.add_alphas(groups, metadata)  # the one family that keeps alpha outside the tensors
    return fmt, groups


def map_to_modules(
    groups: Mapping[str, Mapping[str, Any]],
    fmt: str,
    modules: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Mapping[str, Any] | None,
) -> tuple[dict[ModuleRef, dict[str, Any]], list[str]]:
    """({ModuleRef: suffix dict}, unmapped file prefixes).

    ``modules`` is {component: {module path: weight shape}} of the model's Linear and Conv2d modules. A prefix is
    unmapped when it names no module or its tensors cannot make a delta of the module's shape. Raises ValueError
    when two prefixes name the same module (say a diffusers and an SGM name), which no trainer writes.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA key format {fmt!r}; expected {' or '.join(FORMATS)}")
    family = FORMATS[fmt]
    if hasattr(family, "split"):
        groups = family.split(groups, modules)
    locate = family.locator(modules, unet_config)
    mapped: dict[ModuleRef, dict[str, Any]] = {}
    owners: dict[ModuleRef, str] = {}
    unmapped: list[str] = []
    for prefix, tensors in groups.items():
        ref = locate(prefix)
        if ref is None or not _fits(tensors, modules[ref.component][ref.path]):
            unmapped.append(prefix)
            continue
        if ref in mapped:
            raise ValueError(f"{owners[ref]} and {prefix} both patch {ref.component} module {ref.path}")
        mapped[ref] = dict(tensors)
        owners[ref] = prefix
    return mapped, unmapped


def layer_evidence(groups: Mapping[str, Mapping[str, Any]], fmt: str) -> Iterator[LayerEvidence]:
    """What each layer of a file says about its base (bases.lora_base weighs it): component, widths, names."""
    for prefix, tensors in groups.items():
        located = FORMATS[fmt].component_of(prefix)
        if located is None:
            continue
        component, two_text_encoders = located
        yield LayerEvidence(
            component=component,
            name=prefix.replace(".", "_"),
            in_width=delta_dims(tensors)[1] if tensors else None,
            two_text_encoders=two_text_encoders or component == "text_encoder_2",
        )


def _fits(tensors: Mapping[str, Any], weight_shape: tuple[int, ...]) -> bool:
    out_dim, in_flat = delta_dims(tensors)
    return out_dim in (None, weight_shape[0]) and in_flat in (None, math.prod(weight_shape[1:]))
