"""Resolve model configs to ModelSpecs: paths checked, assets found, everything hashed. No torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchgen.assets.embeddings import find_embeddings
from batchgen.assets.hashing import HashCache
from batchgen.assets.loras import find_loras
from batchgen.config import ModelConfig
from batchgen.errors import BatchgenError
from batchgen.spec import ModelSpec

BASES = ("sd-1", "sd-2", "sdxl")


def resolve_model(name: str, cfg: ModelConfig, hashes: HashCache, builtin_root: Callable[[str], Path]) -> ModelSpec:
    """`builtin_root` builds an embedded model on first use and returns its root."""
    where = f"models.{name}"
    if cfg.base not in BASES:
        raise BatchgenError(f"{where}.base: '{cfg.base}' is not one of {', '.join(BASES)}")
    root = _root(cfg, builtin_root, where)
    checkpoint = _path(cfg.checkpoint, root / "main" if root else None)
    if not checkpoint.exists():
        raise BatchgenError(f"{where}.checkpoint: {checkpoint} does not exist; fix the path in model/{name}.yaml")
    if checkpoint.is_dir() and not (checkpoint / "model_index.json").is_file():
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} is a folder without model_index.json, not a diffusers pipeline"
        )
    embedding_dirs = [_path(p, root) for p in cfg.embeddings] or _default_dir(root, "embedding")
    lora_dirs = [_path(p, root) for p in cfg.loras] or _default_dir(root, "lora")
    return ModelSpec(
        name=name,
        base=cfg.base,
        checkpoint=checkpoint,
        checkpoint_sha256=hashes.sha256(checkpoint),
        embeddings=find_embeddings(embedding_dirs, hashes, f"{where}.embeddings"),
        loras=find_loras(lora_dirs, hashes, f"{where}.loras"),
    )


def _root(cfg: ModelConfig, builtin_root: Callable[[str], Path], where: str) -> Path | None:
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise BatchgenError(f"{where}.root: {root} is not a directory")
        return root
    if cfg.builtin:
        return builtin_root(cfg.builtin)
    return None


def _path(text: str, base: Path | None) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _default_dir(root: Path | None, kind: str) -> list[Path]:
    """InvokeAI's layout: a root's embedding/ and lora/ folders are used when the config lists none."""
    if root is not None and (root / kind).is_dir():
        return [root / kind]
    return []
