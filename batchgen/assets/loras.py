"""Find LoRA files (a LoRA's name is its file stem, looked up per model root) and inspect them:
format, layer types, rank, base, and whether every key maps to a module of the model."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from batchgen.assets.architecture import Architecture
from batchgen.assets.bases import BY_NAME, decided, listing, lora_bases
from batchgen.assets.block_weights import BLOCK_IDS, block_of
from batchgen.assets.files import asset_files
from batchgen.assets.hashing import HashCache
from batchgen.assets.safetensors_header import check_float_dtypes, read_header
from batchgen.errors import BatchgenError
from batchgen.spec import LoraFile, Refused

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class Shape:
    """Stands in for a tensor where only its shape is needed (safetensors headers, meta tensors)."""

    shape: tuple[int, ...]


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


def lora_shapes(path: Path, hashes: HashCache | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """({key: Shape}, metadata) from a safetensors header, or from a weights-only unpickled file (its shapes
    remembered in `hashes`, so torch reads each pickle version once)."""
    if path.suffix.lower() == ".safetensors":
        header = read_header(path)
        check_float_dtypes(header, path, "LoRA weights")
        return {k: Shape(v.shape) for k, v in header.tensors.items()}, header.metadata
    shapes = hashes.memo(path, "shapes", _pickle_shapes) if hashes else _pickle_shapes(path)
    return {k: Shape(tuple(v)) for k, v in shapes.items()}, {}


def _pickle_shapes(path: Path) -> dict[str, list[int]]:
    from batchgen.assets.tensors import read_state_dict  # torch, only for pickled files

    return {k: list(v.shape) for k, v in read_state_dict(path).items() if hasattr(v, "shape")}


def inspect_lora(lora: LoraFile, arch: Architecture, hashes: HashCache) -> tuple[LoraFile, dict | None]:
    """(the LoRA with format/base/rank filled, {ModuleRef: suffix shapes}, or None when it is for another base).

    A broken file or a key that maps to no module raises BatchgenError; another base is not an error, because the
    same name may be a good file for another model: its keys are then left unmapped.
    """
    # lazy: the key formats and layer types import torch, which only a sweep that uses LoRAs pays for
    from batchgen.assets.lora_formats import file_layout, group_by_module, layer_evidence, map_to_modules

    shapes, metadata = lora_shapes(lora.path, hashes)
    try:
        fmt, groups = group_by_module(shapes, metadata)
    except ValueError as e:
        raise BatchgenError(f"{lora.path}: {e}") from None
    if not groups:
        # An empty file would render every job as the no-LoRA image under the LoRA's name.
        raise BatchgenError(f"{lora.path}: holds no LoRA tensors (an empty file?); re-save it or remove it")
    _check_ranks(groups, lora.path)
    allowed = lora_bases(layer_evidence(groups, fmt))
    base = decided(allowed)
    info = replace(
        lora,
        sha256=hashes.file_sha256(lora.path),
        format="+".join([fmt, *_layer_kinds(groups)]),
        layout=file_layout(list(shapes), fmt),
        layer_types=_layer_types(groups),
        base=base,
        rank=_rank(groups),
        tags=_top_tags(metadata),
        trigger=trigger_words(metadata),
        epoch=_count(metadata.get("ss_epoch")),
        steps=_count(metadata.get("ss_steps")),
    )
    if base is not None and base != arch.base:
        return info, None
    if allowed and arch.base not in allowed:  # undecided among other bases (SD3 or FLUX, on an SDXL model)
        return replace(info, base=listing(sorted(allowed))), None
    mapped, unmapped = map_to_modules(groups, fmt, arch.modules, arch.unet_config)
    mmdit = BY_NAME[arch.base].denoiser == "transformer"
    if unmapped and mmdit and len(allowed) > 1 and len(unmapped) == len(groups):
        # Undecided by its names (SD3's MMDiT blocks are named as FLUX's double blocks are) and no layer fits this
        # model: it is the other base's, so its jobs are skipped here as any other base's LoRA's are.
        return replace(info, base=listing(sorted(allowed - {arch.base}))), None
    if unmapped:
        raise BatchgenError(
            f"{lora.path}: {len(unmapped)} of {len(groups)} layers map to no module of this {arch.base} model, "
            f"e.g. {', '.join(sorted(unmapped)[:3])}; is it for another model?"
        )

    # Reads every value (torch), so the verdict is cached per file version.
    hashes.checked(lora.path, "content", lambda path: read_lora_layers(path, arch.modules, arch.unet_config))
    counts = Counter(ref.component for ref in mapped)
    per_component: dict[str, set[str]] = {component: set() for component in counts}
    if arch.base in BLOCK_IDS:
        for ref in mapped:
            block = block_of(ref.component, ref.path, arch.base)
            if block:
                per_component[ref.component].add(block)
    info = replace(
        info,
        modules=tuple(sorted(counts.items())),
        blocks=tuple(sorted(set().union(*per_component.values()))),
        component_blocks=tuple((c, tuple(sorted(b))) for c, b in sorted(per_component.items())),
    )
    return info, mapped


def _check_ranks(groups: dict[str, dict[str, Any]], path: Path) -> None:
    """Shapes that cannot be a layer at all, before anything computes dimensions from them."""
    from batchgen.assets.lora_layers import min_dims  # lazy: torch, as in inspect_lora

    for prefix, tensors in groups.items():
        for suffix, value in tensors.items():
            shape = tuple(value.shape)
            if suffix == "alpha":
                if math.prod(shape) != 1:
                    raise BatchgenError(f"{path}: {prefix}.alpha has shape {list(shape)}; alpha must be one number")
                continue
            need = min_dims(suffix)
            if len(shape) < need or 0 in shape:
                raise BatchgenError(
                    f"{path}: {prefix}.{suffix} has shape {list(shape)}; a layer needs at least {need} non-empty "
                    "dimensions there (the file is damaged or not a LoRA)"
                )


def read_lora_layers(path: Path, shapes: dict[str, dict[str, tuple[int, ...]]], unet_config: dict) -> dict:
    """{ModuleRef: layer} for a LoRA file against a model's module shapes (real or from meta modules), its values
    checked (float, finite); every problem is a BatchgenError naming the file and the module, so inspection catches
    what rendering would hit."""
    # lazy: torch, as in inspect_lora
    from batchgen.assets.lora_formats import group_by_module, map_to_modules
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
    from batchgen.assets.lora_layers import REPORTED_KINDS, layer_kinds  # lazy: torch, as in inspect_lora

    found = {kind for tensors in groups.values() for kind in layer_kinds(tensors)}
    # DoRA over plain LoRA layers is reported as dora alone; over LoHa or LoKr it names both.
    if "dora" in found:
        found.discard("lora")
    return [kind for kind in REPORTED_KINDS if kind in found]


def _layer_types(groups: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The file's layer types by LyCORIS's names (LoRA, LoCon, LoHa, LoKr, DoRA, full), for --list."""
    from batchgen.assets.lora_layers import REPORTED_KINDS, layer_kinds, spans_kernel  # lazy: torch, as above

    found: set[str] = set()
    for tensors in groups.values():
        kinds = layer_kinds(tensors)
        found.update("locon" if kind == "lora" and spans_kernel(tensors) else kind for kind in kinds)
    # A LoCon file's linear layers are plain LoRA ones, and DoRA over LoRA layers is DoRA: each named once.
    if found & {"locon", "dora"}:
        found.discard("lora")
    return tuple(name for kind, name in REPORTED_KINDS.items() if kind in found)


def _rank(groups: dict[str, dict[str, Any]]) -> int | None:
    from batchgen.assets.lora_layers import rank_of  # lazy: torch, as in inspect_lora

    ranks = [rank for rank in map(rank_of, groups.values()) if rank is not None]
    return max(ranks) if ranks else None


def _count(value: object) -> int | None:
    """A kohya metadata count (stored as text); None when absent or not a whole number."""
    try:
        return int(str(value).strip())
    except ValueError:
        return None


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
