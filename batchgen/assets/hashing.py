"""sha256 of files and folders, cached by path, size and mtime so multi-GB checkpoints hash once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 20


class HashCache:
    """A JSON file of {path: [size, mtime_ns, sha256]} (and of checks and memos by label and path); a stale or
    unreadable cache is just rebuilt."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def file_sha256(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        key = str(path)
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        digest = _sha256_of(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._dirty = True
        return digest

    def checked(self, path: Path, label: str, check) -> None:
        """Run `check(path)` (which raises on a bad file) unless it passed for this exact file before."""
        path = path.resolve()
        stat = path.stat()
        key = f"{label}:{path}"
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return
        check(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, "ok"]
        self._dirty = True

    def memo(self, path: Path, label: str, compute):
        """`compute(path)` (JSON-able) for this exact file version, computed once: a pickle's tensor shapes, read
        with torch the first time, are then known without it."""
        path = path.resolve()
        stat = path.stat()
        key = f"{label}:{path}"
        cached = self._entries.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns and len(cached) == 4:
            return cached[3]
        value = compute(path)
        self._entries[key] = [stat.st_size, stat.st_mtime_ns, "memo", value]
        self._dirty = True
        return value

    def tree_sha256(self, folder: Path) -> str:
        """Hash of every file's relative path and content, so renaming the folder keeps the hash."""
        outer = hashlib.sha256()
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            if rel.startswith(".") or "/." in rel:
                continue
            outer.update(rel.encode() + b"\0" + self.file_sha256(file).encode() + b"\n")
        return outer.hexdigest()

    def sha256(self, path: Path) -> str:
        return self.tree_sha256(path) if path.is_dir() else self.file_sha256(path)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._entries, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self._dirty = False


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
