"""Listing asset files under configured folders."""

from __future__ import annotations

from pathlib import Path

from batchgen.errors import BatchgenError


def asset_files(sources: list[Path], suffixes: tuple[str, ...], where: str) -> list[Path]:
    """Files given directly, plus files with a matching suffix anywhere under given folders, sorted."""
    files: list[Path] = []
    for source in sources:
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            files.extend(sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes))
        else:
            raise BatchgenError(f"{where}: {source} does not exist; fix the path or remove it from the list")
    return files
