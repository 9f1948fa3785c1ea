"""The run directory's durable state: an append-only manifest.csv, atomic files, and resume.

A kill at any moment loses at most the rows in flight: rows are appended, flushed and fsynced one at a time,
files are written to a temp name, fsynced and renamed, and a torn last line is dropped on the next start.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from batchgen.spec import MANIFEST_COLUMNS

MANIFEST = "manifest.csv"


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # a full disk must not also keep half an image
        if e.filename is None:
            e.filename = str(path)
        raise


def remove_stale_temp_files(run_dir: Path) -> int:
    """Temp files of atomic_write left by a killed process; never a finished file."""
    removed = 0
    for tmp in run_dir.glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(run_dir: Path) -> pd.DataFrame:
    """Every row as text (empty string for blanks), so ids and hashes never turn into numbers."""
    path = run_dir / MANIFEST
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def completed_jobs(run_dir: Path) -> set[str]:
    """Job ids with an ok row whose image exists with the recorded hash: these are not rendered again."""
    done: set[str] = set()
    for row in read_manifest(run_dir).itertuples(index=False):
        if row.status != "ok" or not row.image or row.job_id in done:
            continue
        image = run_dir / row.image
        if image.is_file() and sha256_file(image) == row.image_sha256:
            done.add(row.job_id)
    return done


class Manifest:
    """Append-only writer. Only one process writes a run's manifest."""

    def __init__(self, run_dir: Path, slots: Iterable[str] = ()) -> None:
        self.run_dir = run_dir
        self.path = run_dir / MANIFEST
        self.dropped_torn_line = False
        self.columns = self._prepare(list(MANIFEST_COLUMNS) + [s for s in slots if s not in MANIFEST_COLUMNS])
        self._file = self.path.open("a", newline="", encoding="utf-8")

    def recorded(self, status: str) -> set[str]:
        table = read_manifest(self.run_dir)
        return set(table.loc[table["status"] == status, "job_id"])

    def append(self, row: dict[str, Any]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_cell(row.get(c)) for c in self.columns])
        self._file.write(buffer.getvalue())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def _prepare(self, wanted: list[str]) -> list[str]:
        """Create the file with a header, drop a torn last line, and widen the header if slots were added."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, (",".join(wanted) + "\n").encode())
            return wanted
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            # A kill mid-append leaves a partial row; it never described a finished image.
            data = data[: data.rfind(b"\n") + 1]
            atomic_write(self.path, data)
            self.dropped_torn_line = True
        header = next(csv.reader(io.StringIO(data.decode("utf-8").split("\n", 1)[0])))
        extra = [c for c in wanted if c not in header]
        if not extra:
            return header
        table = read_manifest(self.run_dir)
        for column in extra:
            table[column] = ""
        atomic_write(self.path, table.to_csv(index=False).encode())
        return list(table.columns)


def _cell(value: Any) -> str:
    # A slot that a prompt does not use is NaN in the plan's table; written as "nan" it became a slot value.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(value)
    return str(value)


def record_invocation(run_dir: Path, config: dict[str, Any], overrides: list[str]) -> Path:
    """Keep what produced each invocation: .batchgen/<time>/config.yaml and overrides.yaml."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = run_dir / ".batchgen" / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = run_dir / ".batchgen" / f"{stamp}-{suffix}"
    atomic_write(folder / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode())
    atomic_write(folder / "overrides.yaml", yaml.safe_dump(list(overrides), allow_unicode=True).encode())
    return folder
