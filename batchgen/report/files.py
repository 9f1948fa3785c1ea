"""Atomic writes for report files, and relative links that survive moving the run folder."""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote

from PIL import Image


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path) -> None:
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def write_text(path: Path, content: str) -> None:
    write_atomic(path, lambda handle: handle.write(content.encode("utf-8")))


def href(base: Path, path: Path) -> str:
    """Relative, URL-quoted, HTML-escaped link so a page works from a file or any static server."""
    rel = Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
    return html.escape(quote(rel, safe="/"), quote=True)


def safe_name(name: str) -> str:
    """A model's name as part of a file name (plots/strength-<model>.png)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
