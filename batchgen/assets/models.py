"""Resolve model configs to ModelSpecs: paths checked, assets found, everything hashed. No torch."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from batchgen.assets.architecture import model_architecture
from batchgen.assets.bases import (
    BASE_NAMES,
    BASES,
    BY_NAME,
    checkpoint_base,
    listing,
    mmdit_checkpoint_base,
    pipeline_base,
    unet_config_base,
)
from batchgen.assets.bases.record import tokenizer_of
from batchgen.assets.embeddings import find_embeddings, inspect_embedding, trigger_for
from batchgen.assets.epochs import is_glob, matching
from batchgen.assets.hashing import HashCache
from batchgen.assets.loras import find_loras, inspect_lora
from batchgen.assets.safetensors_header import Header, read_header
from batchgen.assets.single_file import check_component_file, check_single_file
from batchgen.engine_options import DTYPES
from batchgen.errors import BatchgenError
from batchgen.spec import ComponentFile, ModelSpec, Refused, SingleFile

_TRANSFORMER_BASES = frozenset(b.name for b in BASES if b.denoiser == "transformer")
# .bin is left out: in a diffusers folder it is one component's weights, never a whole model.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# A whole-file VAE or text encoder: transformers' own pickles are .bin.
COMPONENT_SUFFIXES = (*SINGLE_FILE_SUFFIXES, ".bin")


@dataclass(frozen=True)
class ModelSource:
    """Where one model's files are, as a model config names them (the fields of config's ModelConfig); assets sits
    below config, so it takes these values rather than the config type."""

    base: str
    checkpoint: str
    root: str | None = None
    embeddings: Sequence[str] = ()
    loras: Sequence[str] = ()
    builtin: str | None = None
    triggers: Mapping[str, str] = field(default_factory=dict)
    variant: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    prediction_type: str | None = None
    vae: str | None = None
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    dtype: str | None = None


def resolve_model(name: str, cfg: ModelSource, hashes: HashCache, builtin_root: Callable[[str], Path]) -> ModelSpec:
    """`builtin_root` builds an embedded model on first use and returns its root."""
    where = f"models.{name}"
    if cfg.base not in BASE_NAMES:
        raise BatchgenError(f"{where}.base: '{cfg.base}' is not one of {', '.join(BASE_NAMES)}")
    root = _root(cfg, builtin_root, where, cfg.base)
    checkpoint = _inside(cfg.checkpoint, root / "main" if root else None, root, f"{where}.checkpoint")
    if not checkpoint.exists():
        raise BatchgenError(f"{where}.checkpoint: {checkpoint} does not exist; fix the path in model/{name}.yaml")
    if checkpoint.is_dir() and not (checkpoint / "model_index.json").is_file():
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} is a folder without model_index.json, not a diffusers pipeline"
        )
    named = _component_paths(cfg, root, where)
    single = _check_single_file(checkpoint, cfg, frozenset(named), where) if checkpoint.is_file() else None
    if single is not None and BY_NAME[cfg.base].pipeline_encodes_prompts:
        _check_text_encoders(single.config_dir, cfg.base, f"{where}.config")
    if single is None and (cfg.config or cfg.tokenizer or cfg.prediction_type):
        key = "config" if cfg.config else "tokenizer" if cfg.tokenizer else "prediction_type"
        raise BatchgenError(f"{where}.{key}: only single-file checkpoints take it; a diffusers folder has its own")
    _check_base(checkpoint, cfg.base, where)
    if checkpoint.is_dir():
        _check_text_encoders(checkpoint, cfg.base, f"{where}.checkpoint")
    if cfg.variant is not None:
        _check_variant(checkpoint, cfg.variant, where)
    config_dir = single.config_dir if single is not None else checkpoint
    components = _checked_components(named, config_dir, cfg.base, hashes)
    embedding_dirs = [_inside(p, root, root, f"{where}.embeddings") for p in cfg.embeddings]
    embedding_dirs = embedding_dirs or _default_dir(root, "embedding")
    lora_dirs = [_inside(p, root, root, f"{where}.loras") for p in cfg.loras] or _default_dir(root, "lora")
    embeddings, refused = find_embeddings(embedding_dirs, f"{where}.embeddings", dict(cfg.triggers))
    loras, unreadable = find_loras(lora_dirs, f"{where}.loras")
    refused = (*refused, *unreadable)
    return ModelSpec(
        name=name,
        base=cfg.base,
        checkpoint=checkpoint,
        checkpoint_sha256=_component_hash(_variant_hash(hashes.sha256(checkpoint), cfg.variant), components),
        embeddings=embeddings,
        loras=loras,
        refused=refused,
        discovered=tuple([("embedding", e.trigger) for e in embeddings] + [("lora", f.name) for f in loras]),
        listed_triggers=tuple(trigger_for(p, dict(cfg.triggers)) for p in embedding_dirs if p.is_file()),
        single_file=single,
        models_root=Path(cfg.root).expanduser() if cfg.root else None,
        variant=cfg.variant,
        lora_dirs=tuple(lora_dirs),
        components=components,
        dtype=_dtype(cfg.dtype, where),
        embedding_dirs=tuple(embedding_dirs),
    )


def _dtype(name: str | None, where: str) -> str | None:
    if name is not None and name not in DTYPES:
        *others, last = DTYPES
        raise BatchgenError(f"{where}.dtype: {name!r} is not a dtype; use {', '.join(others)} or {last}, or null")
    return name


def _component_paths(cfg: ModelSource, root: Path | None, where: str) -> dict[str, tuple[Path, str]]:
    """{component: (file, config key)} of the whole-file VAE and text encoders the config names, each a file of a
    component the base has; whether it fits the component is checked once the config folder is known."""
    record = BY_NAME[cfg.base]
    named = [("vae", cfg.vae, f"{where}.vae")] if cfg.vae else []
    named += [(c, file, f"{where}.text_encoders.{c}") for c, file in cfg.text_encoders.items()]
    found = {}
    for component, text, key in named:
        if component != "vae" and component not in record.text_encoders:
            names = record.encoder_names
            encoders = listing(f"{c} ({names[c]})" if c in names else c for c in record.text_encoders)
            raise BatchgenError(f"{key}: {record.label} has no {component}; name {encoders}")
        path = _inside(str(text), root, root, key)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise BatchgenError(f"{key}: {path} {what}; give the {component} file (.safetensors)")
        if path.suffix.lower() not in COMPONENT_SUFFIXES:
            endings = ", ".join(COMPONENT_SUFFIXES)
            raise BatchgenError(f"{key}: {path} is not a weights file batchgen reads; give one ending in {endings}")
        found[component] = (path, key)
    return found


def _checked_components(
    named: dict[str, tuple[Path, str]], config_dir: Path, base: str, hashes: HashCache
) -> tuple[ComponentFile, ...]:
    """Each named file read against the component config it replaces (its header only), then hashed."""
    found = []
    for component, (path, key) in named.items():
        kind = check_component_file(component, path, _single_file_header(path), config_dir, base, key)
        found.append(ComponentFile(component, path, kind, hashes.sha256(path)))
    return tuple(found)


def _component_hash(sha256: str, components: tuple[ComponentFile, ...]) -> str:
    """A model with whole-file components renders with their weights: its jobs hash them. Without any, the
    checkpoint's hash is unchanged, and so are the ids of every job that names none."""
    if not components:
        return sha256
    parts = "".join(f":{c.component}={c.sha256}" for c in sorted(components, key=lambda c: c.component))
    return hashlib.sha256(f"{sha256}{parts}".encode()).hexdigest()


def _check_variant(checkpoint: Path, variant: str, where: str) -> None:
    if checkpoint.is_file():
        raise BatchgenError(f"{where}.variant: only diffusers folders take it; a single file holds one set of weights")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", variant):
        raise BatchgenError(f"{where}.variant: '{variant}' is not a variant name; write one such as fp16")
    suffixes = (f".{variant}.safetensors", f".{variant}.bin")
    weights = [p for p in checkpoint.glob("*/*") if p.name.endswith(suffixes) or f".{variant}-" in p.name]
    if not weights:
        raise BatchgenError(
            f"{where}.variant: {checkpoint} has no '{variant}' weights (no */*.{variant}.safetensors); remove variant "
            "or add those files"
        )


def _variant_hash(sha256: str, variant: str | None) -> str:
    """A folder's tree hash covers every variant's files; the one loaded must still give its own job ids."""
    if variant is None:
        return sha256
    return hashlib.sha256(f"{sha256}:variant={variant}".encode()).hexdigest()


def scan_checkpoints(models_root: Path) -> list[tuple[str, str, Path]]:
    """(layout, base or '?', path) of every checkpoint in a root's main/ folder, or in each <base>/main/ of an
    InvokeAI models folder; for --list, so nothing is loaded and unreadable entries say so."""
    per_base = [models_root / base / "main" for base in BASE_NAMES]
    mains = [models_root / "main"] if (models_root / "main").is_dir() else per_base
    found = []
    for main in mains:
        if not main.is_dir():
            continue
        for entry in sorted(main.iterdir()):
            if entry.is_dir() and (entry / "model_index.json").is_file():
                found.append(("diffusers", _folder_base(entry) or "?", entry))
            elif entry.is_file() and entry.suffix.lower() in SINGLE_FILE_SUFFIXES:
                try:
                    header = _single_file_header(entry)
                    base = checkpoint_base(header)[0] or mmdit_checkpoint_base(header.tensors)
                except BatchgenError:
                    base = None
                found.append(("single file", base or "?", entry))
    return found


def _folder_base(checkpoint: Path) -> str | None:
    try:
        return _index_base(checkpoint) or _config_base(checkpoint / "unet" / "config.json")[0]
    except (OSError, ValueError):
        return None


def denoiser_variant(config_dir: Path, base: str) -> str | None:
    """The release of an SD3/FLUX.1 model (dev or schnell, 3.5 large...) from its transformer config, for --list."""
    record = BY_NAME[base]
    try:
        config = json.loads((config_dir / record.denoiser / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return record.variant(config) if isinstance(config, dict) else None


def _index_base(checkpoint: Path) -> str | None:
    """The base a folder's pipeline class names, when only one base has it; ValueError for invalid JSON."""
    index = json.loads((checkpoint / "model_index.json").read_text())
    return pipeline_base(index) if isinstance(index, dict) else None


def _config_base(config: Path) -> tuple[str | None, object]:
    """(base, cross-attention width) from a diffusers UNet config; OSError or ValueError when unreadable."""
    return unet_config_base(json.loads(config.read_text()))


def inspect_assets(
    spec: ModelSpec, loras: set[str] | None, triggers: set[str] | None, hashes: HashCache
) -> tuple[ModelSpec, dict[str, dict]]:
    """Hash and read the assets a sweep uses (None: all of them, for --list); drop the ones this model cannot use.

    Returns the spec holding only usable, inspected assets, plus each usable LoRA's module map. A broken file the
    sweep uses is an error; a broken file it does not use, or one of another base, is listed as refused.
    """
    refused = list(spec.refused)
    embeddings = []
    for ti in spec.embeddings:
        if triggers is not None and ti.trigger not in triggers:
            continue
        try:
            ti = inspect_embedding(ti, hashes)
        except BatchgenError as e:
            if triggers is not None:
                raise
            refused.append(Refused("embedding", ti.trigger, ti.path, str(e), fatal=True))
            continue
        if ti.base != spec.base:
            reason = f"embedding <{ti.trigger}> is {ti.base}, model {spec.name} is {spec.base}"
            refused.append(Refused("embedding", ti.trigger, ti.path, reason, base=ti.base))
            continue
        embeddings.append(ti)
    usable, maps, arch = [], {}, None
    patterns = [p for p in loras or () if is_glob(p)]
    for lora in spec.loras:
        if loras is not None and lora.name not in loras and not any(matching(p, [lora.name]) for p in patterns):
            continue
        arch = arch or model_architecture(spec.config_dir, spec.base)
        try:
            info, mapped = inspect_lora(lora, arch, hashes)
        except BatchgenError as e:
            if loras is not None:
                raise
            refused.append(Refused("lora", lora.name, lora.path, str(e), fatal=True))
            continue
        if mapped is None:
            reason = f"LoRA '{lora.name}' is {info.base}, model {spec.name} is {spec.base}"
            refused.append(Refused("lora", lora.name, lora.path, reason, base=info.base))
            continue
        usable.append(info)
        maps[lora.name] = mapped
    inspected = replace(spec, embeddings=tuple(embeddings), loras=tuple(usable), refused=tuple(refused))
    return inspected, maps


def _check_base(checkpoint: Path, base: str, where: str) -> None:
    """The pipeline class, or else the UNet's cross-attention width, tells the SD version; a mismatch would give
    skipped or broken jobs."""
    if not checkpoint.is_dir():
        return
    try:
        by_class = _index_base(checkpoint)
    except ValueError:
        raise BatchgenError(f"{checkpoint / 'model_index.json'}: not valid JSON; re-download the checkpoint") from None
    if by_class is not None or base in _TRANSFORMER_BASES:
        if by_class != base:
            found = f"is {by_class}" if by_class else f"is no {BY_NAME[base].label} pipeline"
            raise BatchgenError(f"{where}.base: '{base}' but {checkpoint} {found} (its model_index.json); fix base")
        return
    config = checkpoint / "unet" / "config.json"
    if not config.is_file():
        return
    try:
        found, width = _config_base(config)
    except ValueError:
        raise BatchgenError(f"{config}: not valid JSON; re-download the checkpoint") from None
    if found and found != base:
        raise BatchgenError(f"{where}.base: '{base}' but {checkpoint} is {found} (cross-attention {width}); fix base")


def _check_text_encoders(checkpoint: Path, base: str, where: str) -> None:  # where: the key naming the folder
    """Every text encoder the base conditions on is in the folder (a FLUX.1 folder without T5 would fail only at
    load, minutes in); one the base may go without (SD3's T5) may be absent."""
    record = BY_NAME[base]
    if not record.pipeline_encodes_prompts:
        return  # SD1/SD2/SDXL folders are checked by diffusers' own loader, as before
    index = json.loads((checkpoint / "model_index.json").read_text())
    for component in record.text_encoders:
        entry = index.get(component)
        present = isinstance(entry, list) and bool(entry[0]) and (checkpoint / component / "config.json").is_file()
        if present or component in record.optional_text_encoders:
            continue
        tokenizer = tokenizer_of(component)
        repo = record.tokenizer_repos[tokenizer][0][0] if tokenizer in record.tokenizer_repos else "the base's"
        name = record.encoder_names.get(component, component)
        raise BatchgenError(
            f"{where}: {checkpoint} has no {component}/ ({name}), which {record.label} conditions on; "
            f"copy {component}/ and {tokenizer}/ from {repo} into it"
        )


def _root(cfg: ModelSource, builtin_root: Callable[[str], Path], where: str, base: str) -> Path | None:
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise BatchgenError(f"{where}.root: {root} is not a directory")
        # InvokeAI's models folder holds one such root per base: <root>/sd-1/main, <root>/sdxl/lora, ...
        if not (root / "main").is_dir() and (root / base).is_dir():
            return root / base
        return root
    if cfg.builtin:
        return builtin_root(cfg.builtin)
    return None


def _inside(text: str, base: Path | None, root: Path | None, where: str) -> Path:
    """`text` relative to `base`; a relative path must not climb out of the model root (absolute paths may
    point anywhere: the user wrote them out)."""
    path = Path(text).expanduser()
    if path.is_absolute() or base is None:
        return path
    resolved = Path(os.path.normpath(base / path))
    if root is not None and not resolved.is_relative_to(Path(os.path.normpath(root))):
        raise BatchgenError(
            f"{where}: {text} escapes the model root {root}; name a checkpoint under {base}, or give an absolute path"
            if where.endswith(".checkpoint")
            else f"{where}: {text} escapes the model root {root}; name a folder under it, or give an absolute path"
        )
    return base / path


def _check_single_file(checkpoint: Path, cfg: ModelSource, given: frozenset[str], where: str) -> SingleFile:
    """A single file must hold a Stable Diffusion model of the configured base, and its tokenizers must be here."""
    if checkpoint.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} is not a checkpoint file batchgen reads; give a diffusers folder or a "
            f"single file ending in {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    header = _single_file_header(checkpoint)
    return check_single_file(
        checkpoint, header, cfg.base, cfg.config, cfg.tokenizer, cfg.prediction_type, where, given=given
    )


def _single_file_header(path: Path) -> Header:
    """Tensor names and shapes: a safetensors header, or a pickle unpickled weights-only with its data mapped."""
    if path.suffix.lower() == ".safetensors":
        return read_header(path)
    from batchgen.assets.tensors import checkpoint_header  # torch, only for pickled checkpoints

    return checkpoint_header(path)


def _default_dir(root: Path | None, kind: str) -> list[Path]:
    """InvokeAI's layout: a root's embedding/ and lora/ folders are used when the config lists none."""
    if root is not None and (root / kind).is_dir():
        return [root / kind]
    return []
