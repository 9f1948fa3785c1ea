"""Find LoRA files (a LoRA's name is its file stem, looked up per model root) and inspect them:
format, layer types, rank, base, and whether every key maps to a module of the model."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchgen.assets.files import asset_files
from batchgen.assets.hashing import HashCache
from batchgen.assets.safetensors_header import check_float_dtypes, read_header
from batchgen.errors import BatchgenError
from batchgen.spec import LoraFile, Refused

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
_LAYER_KINDS = (  # the suffix that identifies each layer type, in the order they are reported
    ("dora_scale", "dora"),
    ("hada_w1_a", "loha"),
    ("lokr_w1", "lokr"),
    ("lokr_w1_a", "lokr"),
    ("lora_down.weight", "lora"),
    ("diff", "full"),
)


@dataclass(frozen=True)
class Shape:
    """Stands in for a tensor where only its shape is needed (safetensors headers, meta tensors)."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """A model's LoRA-patchable modules, read from its configs without loading weights."""

    base: str
    modules: dict[str, dict[str, tuple[int, ...]]]  # component -> module path -> weight shape
    unet_config: dict[str, Any]


def find_loras(sources: list[Path], where: str) -> tuple[tuple[LoraFile, ...], tuple[Refused, ...]]:
    found: dict[str, LoraFile] = {}
    files, unreadable = asset_files(sources, LORA_SUFFIXES, where)
    refused = tuple(Refused("lora", path.stem, path, reason, fatal=True) for path, reason in unreadable)
    for file in files:
        if file.stem in found:
            raise BatchgenError(
                f"{where}: two LoRAs are named '{file.stem}': {found[file.stem].path} and {file}; rename one of them"
            )
        found[file.stem] = LoraFile(name=file.stem, path=file)
    return tuple(found.values()), refused


def lora_shapes(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """({key: Shape}, metadata) from a safetensors header, or from a weights-only unpickled file."""
    if path.suffix.lower() == ".safetensors":
        header = read_header(path)
        check_float_dtypes(header, path, "LoRA weights")
        return {k: Shape(v.shape) for k, v in header.tensors.items()}, header.metadata
    from batchgen.assets.tensors import read_state_dict  # torch, only for pickled files

    state = read_state_dict(path)
    return {k: Shape(tuple(v.shape)) for k, v in state.items() if hasattr(v, "shape")}, {}


def inspect_lora(lora: LoraFile, arch: Architecture, hashes: HashCache) -> tuple[LoraFile, dict, str]:
    """(the LoRA with format/base/rank filled, {ModuleRef: suffix shapes}, why it cannot be used or "").

    A broken file or a key that maps to no module raises BatchgenError; another base is a reason, not an error,
    because the same name may be a good file for another model.
    """
    from batchgen.assets.lora_keys import detect_base, group_by_module, map_to_modules

    shapes, metadata = lora_shapes(lora.path)
    try:
        fmt, groups = group_by_module(shapes, metadata)
    except ValueError as e:
        raise BatchgenError(f"{lora.path}: {e}") from None
    _check_ranks(groups, lora.path)
    base = detect_base(groups, fmt)
    info = replace(
        lora,
        sha256=hashes.file_sha256(lora.path),
        format="+".join([fmt, *_layer_kinds(groups)]),
        base=base,
        rank=_rank(groups),
        tags=_top_tags(metadata),
        trigger=trigger_words(metadata),
    )
    if base is not None and base != arch.base:
        return info, {}, f"LoRA '{lora.name}' is {base}, model is {arch.base}"
    mapped, unmapped = map_to_modules(groups, fmt, arch.modules, arch.unet_config)
    if unmapped:
        raise BatchgenError(
            f"{lora.path}: {len(unmapped)} of {len(groups)} layers map to no module of this {arch.base} model, "
            f"e.g. {', '.join(sorted(unmapped)[:3])}; is it for another model?"
        )

    # Reads every value (torch), so the verdict is cached per file version.
    hashes.checked(lora.path, "content", lambda path: read_lora_layers(path, arch.modules, arch.unet_config))
    counts = Counter(ref.component for ref in mapped)
    return replace(info, modules=tuple(sorted(counts.items()))), mapped, ""


# The fewest dimensions each layer tensor can have (conv factors have 4); alpha is one number.
_MIN_DIMS = {
    "lora_down.weight": 2,
    "lora_up.weight": 2,
    "lora_mid.weight": 4,
    "hada_t1": 4,
    "hada_t2": 4,
    "lokr_t2": 4,
    "diff": 2,
    "diff_b": 1,
    "dora_scale": 1,
}


def _check_ranks(groups: dict[str, dict[str, Any]], path: Path) -> None:
    """Shapes that cannot be a layer at all, before anything computes dimensions from them."""
    for prefix, tensors in groups.items():
        for suffix, value in tensors.items():
            shape = tuple(value.shape)
            if suffix == "alpha":
                if math.prod(shape) != 1:
                    raise BatchgenError(f"{path}: {prefix}.alpha has shape {list(shape)}; alpha must be one number")
                continue
            need = _MIN_DIMS.get(suffix, 2)
            if len(shape) < need or 0 in shape:
                raise BatchgenError(
                    f"{path}: {prefix}.{suffix} has shape {list(shape)}; a layer needs at least {need} non-empty "
                    "dimensions there (the file is damaged or not a LoRA)"
                )


def read_lora_layers(path: Path, shapes: dict[str, dict[str, tuple[int, ...]]], unet_config: dict) -> dict:
    """{ModuleRef: layer} for a LoRA file against a model's module shapes (real or from meta modules), its values
    checked (float, finite); every problem is a BatchgenError naming the file and the module, so inspection catches
    what rendering would hit."""
    from batchgen.assets.lora_keys import group_by_module, map_to_modules
    from batchgen.assets.lora_layers import layer_from_tensors
    from batchgen.assets.tensors import check_tensors, flat_tensors, read_state_dict

    state = read_state_dict(path)
    check_tensors(flat_tensors(state), path, "LoRA weights")  # one read serves the value checks and the layers
    metadata = read_header(path).metadata if path.suffix.lower() == ".safetensors" else {}
    try:
        fmt, groups = group_by_module(state, metadata)
    except ValueError as e:
        raise BatchgenError(f"{path}: {e}") from None
    mapped, unmapped = map_to_modules(groups, fmt, shapes, unet_config)
    if unmapped:
        raise BatchgenError(f"{path}: layers map to no module of this model, e.g. {', '.join(sorted(unmapped)[:3])}")
    layers = {}
    for ref, tensors in mapped.items():
        try:
            layer = layer_from_tensors(dict(tensors))
            problem = layer.shape_error(shapes[ref.component][ref.path])
        except (ValueError, IndexError, RuntimeError, TypeError) as e:  # factors that do not form a layer
            problem = " ".join(str(e).split()) or type(e).__name__
        if problem:
            raise BatchgenError(f"{path}: {ref.component}.{ref.path}: {problem}; the file is damaged or not a LoRA")
        layers[ref] = layer
    return layers


def _layer_kinds(groups: dict[str, dict[str, Any]]) -> list[str]:
    kinds: list[str] = []
    for suffix, kind in _LAYER_KINDS:
        if kind not in kinds and any(suffix in g for g in groups.values()):
            kinds.append(kind)
    if "dora" in kinds and "lora" in kinds:
        kinds.remove("lora")
    return kinds


def _rank(groups: dict[str, dict[str, Any]]) -> int | None:
    ranks = [g[key].shape[0] for g in groups.values() for key in ("lora_down.weight", "hada_w1_b") if key in g] + [
        g["lokr_w2_b"].shape[0] for g in groups.values() if "lokr_w2_b" in g
    ]
    return max(ranks) if ranks else None


def trigger_words(metadata: dict[str, str]) -> str:
    """A LoRA's trigger words as its trainer recorded them: the model spec's trigger phrase, else the most
    frequent caption tag (kohya's ss_tag_frequency; a trigger word is in every caption, so it leads). Ties keep the
    metadata's order, which is the captions' order."""
    phrase = str(metadata.get("modelspec.trigger_phrase", "")).strip()
    return phrase or _top_tags(metadata, count=1)


def _top_tags(metadata: dict[str, str], count: int = 5) -> str:
    """The most frequent training tags kohya records in ss_tag_frequency ({dataset: {tag: n}})."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
        totals: Counter[str] = Counter()
        for tags in frequency.values():
            totals.update({str(tag).strip(): int(n) for tag, n in tags.items()})
    except (ValueError, AttributeError, TypeError):
        return ""
    return ", ".join(tag for tag, _ in totals.most_common(count))
