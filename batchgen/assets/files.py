"""Listing asset files under configured folders, refusing what cannot be a readable file."""

from __future__ import annotations

import os
from pathlib import Path

from batchgen.errors import BatchgenError


def display(path: Path) -> str:
    """A path as text that can always be printed: undecodable bytes of a file name shown as \\xNN escapes."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="backslashreplace")


def asset_files(
    sources: list[Path], suffixes: tuple[str, ...], where: str
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files, refused): files given directly plus files with a matching suffix anywhere under given folders,
    sorted; and the entries with such a suffix that are not readable files, with why (a directory, a broken link
    or a link loop). A name that is not UTF-8 cannot be named in a config or printed safely: that is an error."""
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    for source in sources:
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            for entry in sorted(source.rglob("*")):
                if entry.suffix.lower() not in suffixes:
                    continue
                _check_name(entry)
                if entry.is_file():
                    files.append(entry)
                elif entry.is_symlink() and not entry.exists():
                    refused.append((entry, f"{entry}: a broken symlink or a symlink loop; fix the link or remove it"))
                elif entry.is_dir():
                    kind = "LoRA" if where.endswith(".loras") else "embedding"
                    refused.append((entry, f"{entry}: is a directory, not a {kind} file; move or rename it"))
        elif source.is_symlink():
            raise BatchgenError(f"{where}: {source} is a broken symlink or a symlink loop; fix the link")
        else:
            raise BatchgenError(f"{where}: {source} does not exist; fix the path or remove it from the list")
    return files, refused


def _check_name(entry: Path) -> None:
    try:
        os.fsencode(entry).decode("utf-8")
    except UnicodeDecodeError:
        raise BatchgenError(f"{display(entry)}: the file name is not valid UTF-8; rename it") from None
