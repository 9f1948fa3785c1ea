"""Find LoRA files; a LoRA's name is its file stem, looked up per model root."""

from __future__ import annotations

from pathlib import Path

from batchgen.assets.files import asset_files
from batchgen.assets.hashing import HashCache
from batchgen.errors import BatchgenError
from batchgen.spec import LoraFile

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def find_loras(sources: list[Path], hashes: HashCache, where: str) -> tuple[LoraFile, ...]:
    found: dict[str, LoraFile] = {}
    for file in asset_files(sources, LORA_SUFFIXES, where):
        if file.stem in found:
            raise BatchgenError(
                f"{where}: two LoRAs are named '{file.stem}': {found[file.stem].path} and {file}; rename one of them"
            )
        found[file.stem] = LoraFile(name=file.stem, path=file, sha256=hashes.file_sha256(file))
    return tuple(found.values())
