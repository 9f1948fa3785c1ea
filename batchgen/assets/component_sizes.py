"""How big each pipeline component of a model is, read from its weight files' safetensors headers: no torch, no data.

Memory planning (batchgen/plan/memory.py) sizes a model before any weight loads. Per component the base record
names (its denoiser, each text encoder of `Base.text_encoders` the model has, the VAE) this counts the parameters
of the file or files diffusers would load:

* a diffusers folder: `<component>/diffusion_pytorch_model.safetensors` or `model.safetensors`, the `variant`'s
  files first (`...fp16.safetensors`, as diffusers names them), a sharded `*.safetensors.index.json` through its
  weight map;
* a single file: the UNet bases' A1111/ComfyUI file split by key prefixes (`model.diffusion_model.`,
  `first_stage_model.`, `cond_stage_model.` / `conditioner.embedders.N.`); an SD3 or FLUX.1 file's transformer as
  its converter reads it, the rest from the `config:` folder;
* a whole-file VAE or text encoder a model config names (ModelSpec.components), read as its converter reads it.

A component with no safetensors (a `.bin`, a pickled single file) is sized by its files' size instead, which the
estimate says (`ComponentSize.note`). Bytes on the device are parameters times the compute dtype's size; under
`run.weights=fp8` the denoiser's Linear weights (its 2-D `.weight` tensors) count one byte each, and transformers
keeps T5's `wo` projections in fp32 under fp16.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import Base
from batchgen.assets.component_files import component_keys
from batchgen.assets.safetensors_header import FLOAT_DTYPES, TensorInfo, read_header
from batchgen.assets.single_file import UNET_PREFIX
from batchgen.errors import BatchgenError
from batchgen.spec import ModelSpec

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names
_PICKLE_STEMS = ("diffusion_pytorch_model", "pytorch_model")
_VAE_PREFIX = "first_stage_model."
_EMBEDDERS = re.compile(r"conditioner\.embedders\.(\d+)\.")  # SDXL's text encoders, in the pipeline's order
_ENCODER_PREFIX = "cond_stage_model."  # SD1/SD2's one text encoder
# transformers loads these in fp32 when asked for fp16 (T5's _keep_in_fp32_modules): they cost 4 bytes there.
_FP32_UNDER_FP16 = {"T5EncoderModel": re.compile(r"\.wo\.weight$")}


@dataclass(frozen=True)
class ComponentSize:
    """One pipeline component's parameters, as its weight files declare them."""

    component: str  # the pipeline's name: unet, transformer, text_encoder, text_encoder_2, vae
    role: str  # denoiser | text_encoder | vae
    params: int = 0
    linear_params: int = 0  # in 2-D `.weight` tensors: the Linear weights fp8 stores in one byte each
    largest_module: int = 0  # parameters of its largest module, the unit sequential offload moves
    largest_linear: int = 0  # of its largest Linear weight: fp8 dequantizes one at a time into the compute dtype
    fp32_params: int = 0  # kept in fp32 under fp16 (T5's wo)
    file_bytes: int = 0  # where no header was read: the files' size stands for the component's bytes
    note: str = ""  # how the size was had, where not from safetensors headers

    def device_bytes(self, dtype: str, fp8_linears: bool = False) -> int:
        """Bytes the component holds on the device computing in `dtype` (fp16, bf16, fp32); `fp8_linears`: its
        Linear weights stored in float8."""
        if self.note:
            return self.file_bytes
        itemsize = ITEMSIZE[dtype]
        size = self.params * itemsize
        if fp8_linears:
            size -= self.linear_params * (itemsize - 1)
        if dtype == "fp16":
            size += self.fp32_params * (4 - itemsize)
        return size

    def module_bytes(self, dtype: str) -> int:
        return self.file_bytes if self.note else self.largest_module * ITEMSIZE[dtype]


@dataclass(frozen=True)
class ModelSizes:
    """A model's components, in the pipeline's order (denoiser, text encoders, VAE), and the two configs the
    activation estimate reads."""

    components: tuple[ComponentSize, ...]
    denoiser_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]

    def of_role(self, role: str) -> tuple[ComponentSize, ...]:
        return tuple(c for c in self.components if c.role == role)


def model_sizes(spec: ModelSpec) -> ModelSizes:
    """Every component's size for a resolved model (resolution checked its files exist and fit the base)."""
    base = BY_NAME[spec.base]
    index = _json(spec.config_dir / "model_index.json")
    classes = {name: entry[1] for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2}
    rules = {component: _FP32_UNDER_FP16.get(classes.get(component) or "") for component, _ in _roles(base)}
    whole = {part.component: part for part in spec.components}
    single = _single_file(spec, base, rules) if spec.single_file is not None else {}
    sizes = []
    for component, role in _roles(base):
        if component in whole:
            sizes.append(_whole_file(component, role, whole[component].path, whole[component].kind, rules[component]))
        elif component in single:
            sizes.append(single[component])
        else:
            folder = spec.config_dir if spec.single_file is not None else spec.checkpoint
            if component in classes and (folder / component).is_dir():
                sizes.append(_folder(component, role, folder / component, spec.variant, rules[component]))
            # else: a text encoder the folder may leave out (SD3's T5)
    return ModelSizes(
        tuple(sizes),
        _json(spec.config_dir / base.denoiser / "config.json"),
        _json(spec.config_dir / "vae" / "config.json"),
    )


def _roles(base: Base) -> list[tuple[str, str]]:
    return [(base.denoiser, "denoiser"), *((c, "text_encoder") for c in base.text_encoders), ("vae", "vae")]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BatchgenError(f"{path}: cannot be read as JSON ({e}); the model's memory is planned from it") from None
    return value if isinstance(value, dict) else {}


def count(
    component: str, role: str, tensors: Mapping[str, TensorInfo], fp32: re.Pattern | None = None
) -> ComponentSize:
    """A component's size from its tensors' shapes (floating point ones: integer buffers are not weights)."""
    params = linear = largest_linear = kept = 0
    modules: dict[str, int] = {}
    for key, info in tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            continue
        n = math.prod(info.shape)
        params += n
        module = key.rpartition(".")[0]
        modules[module] = modules.get(module, 0) + n
        if key.endswith(".weight") and len(info.shape) == 2:
            linear += n
            largest_linear = max(largest_linear, n)
        if fp32 is not None and fp32.search(key):
            kept += n
    return ComponentSize(
        component,
        role,
        params=params,
        linear_params=linear,
        largest_module=max(modules.values(), default=0),
        largest_linear=largest_linear,
        fp32_params=kept,
    )


def _by_size(component: str, role: str, files: list[Path]) -> ComponentSize:
    names = ", ".join(sorted({p.suffix for p in files}))
    total = sum(p.stat().st_size for p in files)
    return ComponentSize(component, role, file_bytes=total, note=f"{component} sized by its file size ({names})")


def _variant_name(name: str, variant: str | None) -> str:
    """diffusers' _add_variant: the variant goes before the last dot-part (model.fp16.safetensors,
    model.safetensors.index.fp16.json)."""
    if variant is None:
        return name
    *head, last = name.split(".")
    return ".".join([*head, variant, last])


def _folder(component: str, role: str, folder: Path, variant: str | None, fp32: re.Pattern | None) -> ComponentSize:
    """A diffusers-layout component folder, loaded as diffusers would: the variant's files when it has them."""
    variants = [variant, None] if variant else [None]
    for wanted in variants:
        for stem in _STEMS:
            single = folder / _variant_name(f"{stem}.safetensors", wanted)
            if single.is_file():
                return count(component, role, read_header(single).tensors, fp32)
            index = folder / _variant_name(f"{stem}.safetensors.index.json", wanted)
            if index.is_file():
                return count(component, role, _sharded(index), fp32)
    for wanted in variants:
        for stem in _PICKLE_STEMS:
            single = folder / _variant_name(f"{stem}.bin", wanted)
            if single.is_file():
                return _by_size(component, role, [single])
            index = folder / _variant_name(f"{stem}.bin.index.json", wanted)
            if index.is_file():
                return _by_size(component, role, [folder / name for name in _shard_names(index)])
    return ComponentSize(component, role, note=f"{component} has no weights in {folder}; counted as 0")


def _shard_names(index: Path) -> list[str]:
    weight_map = _json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise BatchgenError(f"{index}: no weight_map; re-download the model's index file")
    return sorted(set(map(str, weight_map.values())))


def _sharded(index: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name in _shard_names(index):
        shard = index.parent / name
        if not shard.is_file():
            raise BatchgenError(f"{index} names {name}, which is missing; download every shard")
        tensors.update(read_header(shard).tensors)
    return tensors


def _whole_file(component: str, role: str, path: Path, kind: str, fp32: re.Pattern | None) -> ComponentSize:
    """A whole-file VAE or text encoder (`vae:`, `text_encoders:`), counted as its converter reads it."""
    if path.suffix.lower() != ".safetensors":
        return _by_size(component, role, [path])
    tensors = read_header(path).tensors
    return count(component, role, {k: tensors[k] for k in component_keys(kind, list(tensors))}, fp32)


def _single_file(spec: ModelSpec, base: Base, rules: Mapping[str, re.Pattern | None]) -> dict[str, ComponentSize]:
    """The components a single file supplies: an SD3 or FLUX.1 file its transformer (as its converter reads it),
    a UNet base's file every component, split by key prefix. A pickled file is sized whole, as the denoiser, its
    other parts counted 0 with a note."""
    path = Path(spec.checkpoint)
    roles = dict(_roles(base))
    if path.suffix.lower() != ".safetensors":
        sizes = {base.denoiser: _by_size(base.denoiser, "denoiser", [path])}
        if base.denoiser == "unet":
            inside = f"counted with the {base.denoiser} ({path.name} is a pickle, sized by its file size)"
            sizes |= {c: ComponentSize(c, roles[c], note=f"{c} {inside}") for c in roles if c != base.denoiser}
        return sizes
    tensors = read_header(path).tensors
    if base.denoiser == "transformer":
        module = importlib.import_module(base.single_file_converter.split(":")[0])
        # Given each key as its own value, transformer_keys maps the converter's names to the file's keys.
        keys = module.transformer_keys({key: key for key in tensors})
        chosen = {key: tensors[key] for key in keys.values()}
        return {base.denoiser: count(base.denoiser, "denoiser", chosen, rules[base.denoiser])}
    encoders = list(base.text_encoders)
    groups: dict[str, dict[str, TensorInfo]] = {component: {} for component in roles}
    for key, info in tensors.items():
        if key.startswith(UNET_PREFIX):
            groups[base.denoiser][key] = info
        elif key.startswith(_VAE_PREFIX):
            groups["vae"][key] = info
        elif (match := _EMBEDDERS.match(key)) and int(match[1]) < len(encoders):
            groups[encoders[int(match[1])]][key] = info
        elif key.startswith(_ENCODER_PREFIX):
            groups[encoders[0]][key] = info
    return {c: count(c, roles[c], group, rules[c]) for c, group in groups.items()}
