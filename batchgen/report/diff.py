"""`batchgen diff RUN_A RUN_B`: which jobs only one run has, which images changed and by how much.

Rows are matched by `job_id` (the default: the same job, same files, so any pixel change is the renderer's), or
by the settings a person wrote (`--by settings`: model name, prompt, LoRA names and weights, seed, ...), which
is what compares a run before and after a LoRA or checkpoint file was replaced. Pure PIL + numpy + pandas.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from batchgen.columns import DIFF_COLUMNS, EMPTY_CELLS
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, read_latest
from batchgen.report.files import save_png, write_text
from batchgen.report.labels import stack_labels
from batchgen.report.text import Font, draw_lines, font, line_height, text, wrap_label

MATCH_BY = ("job_id", "settings")
CSV_COLUMNS = ("kind", "key", "job_id_a", "job_id_b", "max_diff", "mean_diff", "note", "label")
DEFAULT_MAX_MEGAPIXELS = 64.0
BACKGROUND = (255, 255, 255)
PLACEHOLDER_FILL = (224, 224, 224)
MIN_LABEL_W = 200
LABEL_LINES = 10


@dataclass(frozen=True)
class Entry:
    """The image of a job whose latest row is ok."""

    key: str
    job_id: str
    label: str
    image: Path


@dataclass(frozen=True)
class ImageDiff:
    key: str
    a: Entry
    b: Entry
    max_diff: int  # largest per-channel difference, 0-255
    mean_diff: float  # mean per-channel difference, 0-255
    note: str = ""  # why the images could not be compared pixel by pixel

    @property
    def label(self) -> str:
        return self.b.label


@dataclass(frozen=True)
class DiffResult:
    run_a: Path
    run_b: Path
    tolerance: int
    by: str
    count_a: int
    count_b: int
    only_a: list[Entry] = field(default_factory=list)
    only_b: list[Entry] = field(default_factory=list)
    compared: list[ImageDiff] = field(default_factory=list)

    @property
    def changed(self) -> list[ImageDiff]:
        return [d for d in self.compared if d.max_diff > self.tolerance]

    @property
    def within(self) -> list[ImageDiff]:
        return [d for d in self.compared if 0 < d.max_diff <= self.tolerance]

    @property
    def identical(self) -> int:
        return sum(1 for d in self.compared if d.max_diff == 0)

    @property
    def exit_code(self) -> int:
        return 1 if self.changed else 0


# ---------------------------------------------------------------- reading runs


def _label(row: pd.Series, stack: str) -> str:
    return " | ".join([text(row.get("model")), stack, text(row.get("prompt")), f"seed {text(row.get('seed'))}"])


def _key(row: pd.Series, by: str) -> str:
    if by == "job_id":
        return text(row.get("job_id"))
    return "\x1f".join(text(row.get(name)) or EMPTY_CELLS.get(name, "") for name in DIFF_COLUMNS)


def load_run(run_dir: Path, which: str, by: str = "job_id") -> dict[str, Entry]:
    """key -> the image of each job whose latest row (manifest.latest_rows) is ok; BatchgenError when run_dir is
    not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BatchgenError(f"{which} {run_dir}: no such run directory; pass one such as runs/styles")
    if not (run_dir / MANIFEST).is_file():
        raise BatchgenError(f"{which} {run_dir}: no {MANIFEST} here; pass a run directory such as runs/styles")
    try:
        latest = read_latest(run_dir)
    except BatchgenError as e:
        raise BatchgenError(f"{which} {e}") from None
    entries: dict[str, Entry] = {}
    ok = (latest["status"] == "ok").to_numpy()
    for (_, row), label in zip(latest[ok].iterrows(), stack_labels(latest)[ok], strict=True):
        key = _key(row, by)
        # Jobs sharing a key (--by settings, a file replaced between renders): the later render takes it and its place.
        entries.pop(key, None)
        entries[key] = Entry(key, text(row["job_id"]), _label(row, label), run_dir / text(row.get("image")))
    return entries


# ---------------------------------------------------------------- comparing images


def _pixels(path: Path) -> np.ndarray | str:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.int16)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, Image.DecompressionBombError):
        return "unreadable"


def compare_images(a: Entry, b: Entry) -> ImageDiff:
    pa, pb = _pixels(a.image), _pixels(b.image)
    if isinstance(pa, str) or isinstance(pb, str):
        sides = (("A", pa, a), ("B", pb, b))
        why = "; ".join(f"{side} image {p} ({e.image})" for side, p, e in sides if isinstance(p, str))
        return ImageDiff(a.key, a, b, 255, 255.0, why)
    if pa.shape != pb.shape:
        note = f"size {pa.shape[1]}x{pa.shape[0]} in A, {pb.shape[1]}x{pb.shape[0]} in B"
        return ImageDiff(a.key, a, b, 255, 255.0, note)
    delta = np.abs(pa - pb)
    return ImageDiff(a.key, a, b, int(delta.max()), float(delta.mean()))


def compare_runs(run_a: Path, run_b: Path, tolerance: int = 0, by: str = "job_id") -> DiffResult:
    if by not in MATCH_BY:
        raise BatchgenError(f"--by {by}: unknown; use one of {', '.join(MATCH_BY)}")
    if not 0 <= tolerance <= 255:
        raise BatchgenError(f"--tolerance {tolerance}: give a pixel difference from 0 to 255")
    a, b = load_run(run_a, "RUN_A", by), load_run(run_b, "RUN_B", by)
    return DiffResult(
        run_a=Path(run_a),
        run_b=Path(run_b),
        tolerance=tolerance,
        by=by,
        count_a=len(a),
        count_b=len(b),
        only_a=[entry for key, entry in a.items() if key not in b],
        only_b=[entry for key, entry in b.items() if key not in a],
        compared=[compare_images(a[key], entry) for key, entry in b.items() if key in a],
    )


# ---------------------------------------------------------------- outputs


@dataclass(frozen=True)
class _Sheet:
    cell_w: int
    cell_h: int
    left_w: int
    header_h: int
    pad: int
    line_h: int

    def size(self, rows: int) -> tuple[int, int]:
        return self.left_w + 3 * self.cell_w, self.header_h + rows * self.cell_h


def _open_rgb(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def difference_image(a: Image.Image, b: Image.Image) -> tuple[Image.Image, float]:
    """|A - B| per channel, stretched so the largest difference is white; returns it and the gain used."""
    delta = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    peak = int(delta.max())
    gain = 255.0 / peak if peak else 1.0
    return Image.fromarray(np.clip(delta * gain, 0, 255).astype(np.uint8), "RGB"), gain


def _placeholder(canvas: Image.Image, origin: tuple[int, int], sheet: _Sheet, reason: str, face: Font) -> None:
    x0, y0 = origin
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0, y0, x0 + sheet.cell_w - 1, y0 + sheet.cell_h - 1), fill=PLACEHOLDER_FILL)
    fits = max(1, (sheet.cell_h - 2 * sheet.pad) // sheet.line_h)
    lines = wrap_label(reason, face, sheet.cell_w - 2 * sheet.pad, fits)
    box = (x0 + sheet.pad, y0 + sheet.pad, x0 + sheet.cell_w - sheet.pad, y0 + sheet.cell_h - sheet.pad)
    draw_lines(draw, lines, face, box, sheet.line_h)


def _paste(canvas: Image.Image, origin: tuple[int, int], sheet: _Sheet, tile: Image.Image) -> None:
    canvas.paste(tile, (origin[0] + (sheet.cell_w - tile.width) // 2, origin[1] + (sheet.cell_h - tile.height) // 2))


def _draw_row(canvas: Image.Image, top: int, sheet: _Sheet, diff: ImageDiff, face: Font) -> None:
    a, b = _open_rgb(diff.a.image), _open_rgb(diff.b.image)
    origins = [(sheet.left_w + i * sheet.cell_w, top) for i in range(3)]
    for origin, tile, side in ((origins[0], a, "A"), (origins[1], b, "B")):
        if tile is None:
            _placeholder(canvas, origin, sheet, f"{side} image missing or unreadable", face)
        else:
            _paste(canvas, origin, sheet, tile)
    measure = f"max {diff.max_diff}, mean {diff.mean_diff:.3f}"
    if a is not None and b is not None and a.size == b.size:
        delta, gain = difference_image(a, b)
        _paste(canvas, origins[2], sheet, delta)
        measure += f", difference x{gain:.1f}"
    else:
        _placeholder(canvas, origins[2], sheet, diff.note, face)
    ids = diff.a.job_id if diff.a.job_id == diff.b.job_id else f"{diff.a.job_id} -> {diff.b.job_id}"
    lines = [
        *wrap_label(ids, face, sheet.left_w - 2 * sheet.pad, 2),
        *wrap_label(measure, face, sheet.left_w - 2 * sheet.pad, 2),
        *wrap_label(diff.label, face, sheet.left_w - 2 * sheet.pad, LABEL_LINES),
    ]
    lines = lines[: max(1, (sheet.cell_h - 2 * sheet.pad) // sheet.line_h)]
    box = (sheet.pad, top + sheet.pad, sheet.left_w - sheet.pad, top + sheet.cell_h - sheet.pad)
    draw_lines(ImageDraw.Draw(canvas), lines, face, box, sheet.line_h, centre_x=False)


def _sheet(diffs: list[ImageDiff]) -> tuple[_Sheet, Font]:
    sizes = []
    for diff in diffs:
        for entry in (diff.a, diff.b):
            try:
                with Image.open(entry.image) as img:
                    sizes.append(img.size)
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
    cell_w = max((w for w, _ in sizes), default=256)
    cell_h = max((h for _, h in sizes), default=256)
    size = max(10, min(cell_w, cell_h) // 12)
    face = font(size)
    line_h = line_height(face)
    pad = max(2, size // 3)
    cell_h = max(cell_h, 4 * line_h + 2 * pad)  # room for the id and the measures next to tiny images
    return _Sheet(cell_w, cell_h, max(MIN_LABEL_W, cell_w), line_h + 2 * pad, pad, line_h), face


def diff_grids(result: DiffResult, out_dir: Path, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS) -> list[Path]:
    """Pages of A | B | difference, one row per image that differs by more than the tolerance."""
    changed = result.changed
    if not changed:
        return []
    sheet, face = _sheet(changed)
    width = sheet.size(0)[0]
    per_page = max(1, math.floor((max_megapixels * 1e6 / width - sheet.header_h) / sheet.cell_h))
    pages = [changed[i : i + per_page] for i in range(0, len(changed), per_page)]
    digits = len(str(len(pages)))
    paths = []
    for number, rows in enumerate(pages, start=1):
        canvas = Image.new("RGB", sheet.size(len(rows)), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        headers = [f"over tolerance {result.tolerance}", f"A: {result.run_a}", f"B: {result.run_b}", "|A - B|"]
        for i, header in enumerate(headers):
            left = 0 if i == 0 else sheet.left_w + (i - 1) * sheet.cell_w
            right = sheet.left_w if i == 0 else left + sheet.cell_w
            line = wrap_label(header, face, right - left - 2 * sheet.pad, 1)
            draw_lines(draw, line, face, (left + sheet.pad, 0, right - sheet.pad, sheet.header_h), sheet.line_h)
        for i, diff in enumerate(rows):
            _draw_row(canvas, sheet.header_h + i * sheet.cell_h, sheet, diff, face)
        name = "diff.png" if len(pages) == 1 else f"diff-p{number:0{digits}d}.png"
        save_png(canvas, out_dir / name)
        paths.append(out_dir / name)
    return paths


def _csv(result: DiffResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in result.only_a:
        writer.writerow(["only_a", entry.key, entry.job_id, "", "", "", "", entry.label])
    for entry in result.only_b:
        writer.writerow(["only_b", entry.key, "", entry.job_id, "", "", "", entry.label])
    for d in result.compared:
        kind = "changed" if d.max_diff > result.tolerance else "within" if d.max_diff else "identical"
        writer.writerow([kind, d.key, d.a.job_id, d.b.job_id, d.max_diff, f"{d.mean_diff:.4f}", d.note, d.label])
    return buffer.getvalue()


def write_outputs(result: DiffResult, out_dir: Path) -> list[Path]:
    """diff.csv (every job and what happened to it) and the diff grid pages; stale pages are removed first."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchgenError(f"--out {out_dir}: exists and is not a folder; pass a folder for the diff outputs")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("diff.png"), *out_dir.glob("diff-p*.png")]:
        stale.unlink(missing_ok=True)
    csv_path = out_dir / "diff.csv"
    write_text(csv_path, _csv(result))
    return [*diff_grids(result, out_dir), csv_path]


def _entry_line(entry: Entry) -> str:
    return f"  {entry.job_id}  {entry.label}"


def format_report(result: DiffResult, written: list[Path]) -> str:
    """What a CI log shows: counts, then each job that is only on one side or changed."""
    lines = [
        f"A {result.run_a}: {result.count_a} images; B {result.run_b}: {result.count_b} images; "
        f"matched by {result.by}: {len(result.compared)}",
        f"only in A: {len(result.only_a)}",
        *map(_entry_line, result.only_a),
        f"only in B: {len(result.only_b)}",
        *map(_entry_line, result.only_b),
        f"differ by more than {result.tolerance}: {len(result.changed)}",
    ]
    for d in result.changed:
        ids = d.a.job_id if d.a.job_id == d.b.job_id else f"{d.a.job_id} -> {d.b.job_id}"
        note = f"  ({d.note})" if d.note else ""
        lines.append(f"  {ids}  max {d.max_diff}  mean {d.mean_diff:.3f}  {d.label}{note}")
    lines += [
        f"differ within tolerance: {len(result.within)}",
        f"identical: {result.identical}",
        "wrote " + ", ".join(str(p) for p in written),
    ]
    return "\n".join(lines) + "\n"
