"""The run directory's durable state: an append-only manifest.csv, atomic files, and resume.

The one reader of manifest.csv (read_manifest) and the one rule for a job's latest row (latest_rows), which the
runner's index.html, `batchgen report`, the grids, `batchgen diff`, resume and --retry-failed all go by; and its
only writers: Manifest appends rows, fill_cells changes cells of rows already there (measurements filled later).

A kill at any moment loses at most the rows in flight: rows are appended, flushed and fsynced one at a time,
files are written to a temp name, fsynced and renamed, and a torn last line is dropped on the next start.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from batchgen.cells import format_value
from batchgen.columns import MANIFEST_COLUMNS
from batchgen.errors import BatchgenError

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
    """Every row as text (empty string for blanks), so ids and hashes never turn into numbers.

    A manifest written before a column existed reads with that column blank, so no reader checks for it; the file
    itself gains the column on its next render (Manifest._prepare).
    """
    path = run_dir / MANIFEST
    table = _read_rows(path)
    if not {"job_id", "status"} <= set(table.columns):
        raise BatchgenError(f"{path}: no job_id/status columns; is this a batchgen manifest?")
    for column in MANIFEST_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    return table


def _read_rows(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(MANIFEST_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def latest_rows(rows: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """One row per job, its state: what index.html (after a render and after `batchgen report`), the grids, diff,
    resume (`completed_jobs`) and --retry-failed (`failed_jobs`) all go by. `rows`: read_manifest(run_dir).

    The rule: a job's latest row is its last row, except that a failed or skipped row never undoes an earlier `ok`
    row whose image is still on disk with its recorded hash; then the last such ok row stands.
    Why: rows are only appended, so the last one is what happened most recently. But resume treats a job with an
    intact ok image as done and never renders it again, so calling it failed would show a failure that no re-run
    clears, next to an image that is there to look at. When that image is gone or changed, the job is not done:
    it renders again, and until then its most recent failure is what it is (and what --retry-failed re-renders).

    Jobs are in the order they were first rendered. Skipped rows are all recorded before rendering starts, so
    ordering by them would put the models with skipped jobs first; jobs only ever skipped follow, in their order.
    """
    return rows.iloc[_latest_positions(rows, _IntactImages(run_dir, rows))].reset_index(drop=True)


def latest_positions(rows: pd.DataFrame, run_dir: Path) -> list[int]:
    """Where each job's latest row (latest_rows) sits in `rows`: for code that updates those rows in place."""
    return _latest_positions(rows, _IntactImages(run_dir, rows))


Cells = dict[int, dict[str, str]]  # position of a row in read_manifest's table -> {column: new text}


def fill_cells(run_dir: Path, cells_of: Callable[[pd.DataFrame], Cells]) -> int:
    """Change cells of rows already in manifest.csv: `cells_of(read_manifest(run_dir))` says which, and the file is
    replaced atomically with no row added, dropped or moved. The one write besides `Manifest.append`; only under
    the run lock (what it read must still be the file it replaces). Returns the number of rows changed."""
    rows = read_manifest(run_dir)
    cells = cells_of(rows)
    if cells:
        atomic_write(run_dir / MANIFEST, with_cells(rows, cells).to_csv(index=False, lineterminator="\n").encode())
    return len(cells)


def with_cells(rows: pd.DataFrame, cells: Cells) -> pd.DataFrame:
    """A copy of `rows` (read_manifest's table) with `cells` in place: what fill_cells would write."""
    changed = rows.copy()
    for position, values in cells.items():
        for column, value in values.items():
            changed.iat[position, changed.columns.get_loc(column)] = value
    return changed


def _latest_positions(rows: pd.DataFrame, intact: _IntactImages) -> list[int]:
    statuses = rows["status"].tolist()
    by_job: dict[str, list[int]] = {}
    for position, job_id in enumerate(rows["job_id"]):
        by_job.setdefault(job_id, []).append(position)
    after_all = len(rows)
    first = {
        job_id: min(p + (after_all if statuses[p] == "skipped" else 0) for p in positions)
        for job_id, positions in by_job.items()
    }
    return [_latest(by_job[job_id], statuses, intact) for job_id in sorted(by_job, key=first.__getitem__)]


def _latest(positions: list[int], statuses: list[str], intact: _IntactImages) -> int:
    last = positions[-1]
    oks = [p for p in positions if statuses[p] == "ok"]
    if not oks or oks == [last]:
        return last  # the last row whether or not its image is intact: no need to hash it
    return next((p for p in reversed(oks) if intact(p)), last)


class _IntactImages:
    """Whether a row's image is on disk with the hash the row recorded; each file is hashed at most once."""

    def __init__(self, run_dir: Path, rows: pd.DataFrame) -> None:
        self.run_dir = run_dir
        self.images = rows["image"].tolist()
        self.hashes = rows["image_sha256"].tolist()
        self._sha256: dict[str, str | None] = {}

    def __call__(self, position: int) -> bool:
        image = self.images[position]
        if not image:
            return False
        if image not in self._sha256:
            path = self.run_dir / image
            self._sha256[image] = sha256_file(path) if path.is_file() else None
        return self._sha256[image] == self.hashes[position]


def slot_columns(table: pd.DataFrame) -> list[str]:
    """A manifest table's prompt-slot columns: every column that is not a manifest column, in its order."""
    return [column for column in table.columns if column not in MANIFEST_COLUMNS]


def read_latest(run_dir: Path) -> pd.DataFrame:
    """Each job's latest row (latest_rows) from run_dir's manifest."""
    return latest_rows(read_manifest(run_dir), run_dir)


def completed_jobs(run_dir: Path) -> set[str]:
    """Jobs whose latest row is ok and whose image exists with the recorded hash: these are not rendered again."""
    rows = read_manifest(run_dir)
    intact = _IntactImages(run_dir, rows)
    statuses, job_ids = rows["status"].tolist(), rows["job_id"].tolist()
    return {job_ids[p] for p in _latest_positions(rows, intact) if statuses[p] == "ok" and intact(p)}


def failed_jobs(run_dir: Path) -> set[str]:
    """Jobs whose latest row is failed: what --retry-failed renders."""
    latest = read_latest(run_dir)
    return set(latest.loc[latest["status"] == "failed", "job_id"])


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
        csv.writer(buffer, lineterminator="\n").writerow([format_value(row.get(c)) for c in self.columns])
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
        table = _read_rows(self.path)
        for column in extra:
            table[column] = ""
        atomic_write(self.path, table.to_csv(index=False).encode())
        return list(table.columns)


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
