"""Find textual-inversion files and name their triggers."""

from __future__ import annotations

import re
from pathlib import Path

from batchgen.assets.files import asset_files
from batchgen.assets.hashing import HashCache
from batchgen.errors import BatchgenError
from batchgen.spec import EmbeddingFile

TI_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
# InvokeAI's trigger grammar; the planner finds triggers in prompts with the same pattern.
TRIGGER_PATTERN = re.compile(r"<([a-zA-Z0-9., _-]+)>")
_TRIGGER_NAME = re.compile(r"[a-zA-Z0-9., _-]+")
# Trainers write these names for every embedding, so the folder is the only thing that tells them apart.
GENERIC_STEMS = frozenset({"learned_embeds", "embedding", "embeddings"})


def trigger_for(path: Path) -> str:
    stem = path.stem
    return path.parent.name if stem in GENERIC_STEMS else stem


def find_embeddings(sources: list[Path], hashes: HashCache, where: str) -> tuple[EmbeddingFile, ...]:
    """Every TI file in `sources` (files or folders, searched recursively), keyed by a unique trigger."""
    found: dict[str, EmbeddingFile] = {}
    for file in asset_files(sources, TI_SUFFIXES, where):
        trigger = trigger_for(file)
        if not _TRIGGER_NAME.fullmatch(trigger):
            raise BatchgenError(
                f"{file}: trigger '<{trigger}>' has characters outside [a-zA-Z0-9., _-]; rename the file"
            )
        if trigger in found:
            raise BatchgenError(
                f"{where}: two embeddings claim the trigger <{trigger}>: {found[trigger].path} and {file}; "
                "rename one of them"
            )
        found[trigger] = EmbeddingFile(trigger=trigger, path=file, sha256=hashes.file_sha256(file))
    return tuple(found.values())
