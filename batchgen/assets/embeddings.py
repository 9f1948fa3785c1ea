"""Find textual-inversion files, name their triggers, and read their format, vector count and base."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from batchgen.assets.bases import embedding_base
from batchgen.assets.files import asset_files
from batchgen.assets.hashing import HashCache
from batchgen.assets.safetensors_header import read_header
from batchgen.errors import BatchgenError
from batchgen.spec import EmbeddingFile, Refused

TI_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
# InvokeAI's trigger grammar; the planner finds triggers in prompts with the same pattern.
TRIGGER_PATTERN = re.compile(r"<([a-zA-Z0-9., _-]+)>")
_TRIGGER_NAME = re.compile(r"[a-zA-Z0-9., _-]+")
# Trainers write these names for every embedding, so the folder is the only thing that tells them apart.
GENERIC_STEMS = frozenset({"learned_embeds", "embedding", "embeddings"})
VECTOR_KEYS = frozenset({"clip_l", "clip_g", "emb_params"})


def trigger_for(path: Path, named: dict[str, str] | None = None) -> str:
    """The config may name a file's trigger; otherwise its stem, or its folder for generic stems."""
    if named and path.name in named:
        return named[path.name].strip("<>")
    stem = path.stem
    return path.parent.name if stem in GENERIC_STEMS else stem


def find_embeddings(
    sources: list[Path], where: str, named: dict[str, str] | None = None
) -> tuple[tuple[EmbeddingFile, ...], tuple[Refused, ...]]:
    """Every TI file in `sources` (files or folders, searched recursively), keyed by a unique trigger."""
    found: dict[str, EmbeddingFile] = {}
    files, unreadable = asset_files(sources, TI_SUFFIXES, where)
    refused = [Refused("embedding", trigger_for(p, named), p, reason, fatal=True) for p, reason in unreadable]
    for file in files:
        trigger = trigger_for(file, named)
        if not _TRIGGER_NAME.fullmatch(trigger):
            reason = f"trigger <{trigger}> has characters outside [a-zA-Z0-9., _-]; rename the file"
            refused.append(Refused("embedding", trigger, file, reason))
            continue
        if trigger in found:
            raise BatchgenError(
                f"{where}: two embeddings claim the trigger <{trigger}>: {found[trigger].path} and {file}; "
                "rename one of them or name its trigger in the model config"
            )
        found[trigger] = EmbeddingFile(trigger=trigger, path=file)
    return tuple(found.values()), tuple(refused)


def inspect_embedding(ti: EmbeddingFile, hashes: HashCache) -> EmbeddingFile:
    """Hash the file and read its format, vector count and base from the vector widths."""
    shapes = _shapes(ti.path, hashes)
    fmt, widths, vectors = _layout(shapes, ti.path)
    base = embedding_base(widths, ti.path)

    def vectors_only(key: str) -> bool:
        return key in VECTOR_KEYS or key.startswith("string_to_param.") or len(shapes) == 1

    def check(path: Path) -> None:
        from batchgen.assets.tensors import check_values  # torch: reads every value, once per file version

        check_values(path, "embedding vectors", vectors_only)

    hashes.checked(ti.path, "values", check)
    return replace(ti, sha256=hashes.file_sha256(ti.path), format=fmt, vectors=vectors, base=base)


def _shapes(path: Path, hashes: HashCache) -> dict[str, tuple[int, ...]]:
    if path.suffix.lower() == ".safetensors":
        return {k: v.shape for k, v in read_header(path).tensors.items()}
    # torch reads a pickle's shapes once per file version; the hash cache remembers them
    return {k: tuple(v) for k, v in hashes.memo(path, "shapes", _pickle_shapes).items()}


def _pickle_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from batchgen.assets.tensors import read_state_dict, unwrap_state_dict  # torch, only for pickled files

    state = unwrap_state_dict(read_state_dict(path))
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        if key == "string_to_param" and isinstance(value, dict):
            shapes.update({f"string_to_param.{k}": tuple(v.shape) for k, v in value.items() if hasattr(v, "shape")})
        elif hasattr(value, "shape"):
            shapes[key] = tuple(value.shape)
    return shapes


def _layout(shapes: dict[str, tuple[int, ...]], path: Path) -> tuple[str, list[int], int]:
    """(format, vector widths per encoder, vector count) for every TI layout in use."""
    fmt, keys = _layout_keys(shapes, path)
    for key in keys:
        shape = shapes[key]
        if len(shape) not in (1, 2) or 0 in shape:
            raise BatchgenError(f"{path}: tensor {key} has shape {list(shape)}; embedding vectors are [n, width]")
    if fmt == "sdxl" and shapes[keys[0]][:-1] != shapes[keys[1]][:-1]:
        raise BatchgenError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    shape = shapes[keys[0]]
    return fmt, [shapes[key][-1] for key in keys], shape[0] if len(shape) == 2 else 1


def _layout_keys(shapes: dict[str, tuple[int, ...]], path: Path) -> tuple[str, list[str]]:
    if "clip_l" in shapes and "clip_g" in shapes:
        return "sdxl", ["clip_l", "clip_g"]
    params = [k for k in shapes if k.startswith("string_to_param.")]
    if len(params) == 1:
        return "a1111", params
    if "emb_params" in shapes:
        return "emb_params", ["emb_params"]
    if len(shapes) == 1:
        return "diffusers", list(shapes)
    keys = ", ".join(list(shapes)[:5]) or "none"
    raise BatchgenError(
        f"{path}: not a textual inversion (tensors: {keys}); "
        "expected string_to_param, emb_params, clip_l/clip_g or a single {token: tensor}"
    )
