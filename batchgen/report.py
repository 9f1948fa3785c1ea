"""Labelled XY grids and the index.html report of a run directory.

Pure PIL + pandas: the report is rebuilt from a manifest (`batchgen report RUN_DIR`) on machines without torch.
"""

from __future__ import annotations

import hashlib
import html
import math
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

AXES = ("model", "stack", "prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler")

PLACEHOLDER_FILL = (224, 224, 224)
MARK_FILL = (200, 30, 30)
REASON_FILL = (60, 60, 60)
LABEL_FILL = (0, 0, 0)
BACKGROUND = (255, 255, 255)

MIN_FONT = 10
MIN_LABEL_W = 160  # room for ~16 characters of a y label even when cells are tiny
HEADER_LINES = 4
ROW_LINES = 8
TITLE_LINES = 3
PART_CHARS = 40
STEM_CHARS = 120
FALLBACK_CELL = 256

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
# A <trigger> is one unbreakable atom; anything else breaks between characters.
_ATOM = re.compile(r"<[^<>\s]*>|.", re.S)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAME_KEYS = {"prompt_template": "template"}  # shorter file names; the title keeps the column name


@dataclass(frozen=True)
class _Layout:
    cell_w: int
    cell_h: int
    left_w: int
    title_h: int
    header_h: int
    pad: int
    line_h: int

    @property
    def top(self) -> int:
        return self.title_h + self.header_h


# ---------------------------------------------------------------- axes and grouping


def _text(value: object) -> str:
    """Display form of a table value; 1 and 1.0 (an int column read back with NaNs) must group together."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return "" if pd.isna(value) else str(value)


def _all_axes(slots: Sequence[str]) -> tuple[str, ...]:
    return AXES + tuple(s for s in slots if s not in AXES)


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    # A missing column is an axis with one (empty) value, so grids still work on a trimmed manifest.
    if name not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=object)
    return table[name].map(_text)


def _ordered_unique(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values))


def grid_axes(table: pd.DataFrame, slots: list[str]) -> list[str]:
    """Axis columns that vary in this table (more than one distinct value), in AXES order then slots."""
    return [a for a in _all_axes(slots) if a in table.columns and _column(table, a).nunique() > 1]


def _check_axis(which: str, name: str, axes: Sequence[str]) -> None:
    if name not in axes:
        raise ValueError(f"sweep.grid.{which}: unknown axis '{name}'; choose one of: {', '.join(axes)}")


def _group_keys(table: pd.DataFrame, x: str, y: str, slots: list[str]) -> list[str]:
    """Columns that split the table into grids: every varying axis but x and y, model always first."""
    keys = [a for a in grid_axes(table, slots) if a not in (x, y)]
    if "prompt" in (x, y):
        # Slot values are part of the prompt on the axis; splitting by them would leave one row per grid.
        keys = [k for k in keys if k not in slots]
    if (x in slots or y in slots) and "prompt" in keys and "prompt_template" in table.columns:
        # The full prompt changes with the slot on the axis; the template is what stays fixed across it.
        varies = _column(table, "prompt_template").nunique() > 1
        keys[keys.index("prompt") : keys.index("prompt") + 1] = ["prompt_template"] if varies else []
    if "model" in table.columns and "model" not in (x, y) and "model" not in keys:
        # Name and title a grid after its model even when the run has only one.
        keys.insert(0, "model")
    return keys


def _groups(values: pd.DataFrame, keys: list[str]) -> dict[tuple[str, ...], list[int]]:
    """Row positions per group key, in order of first appearance."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for pos, key in enumerate(values[keys].itertuples(index=False, name=None)):
        groups.setdefault(tuple(key), []).append(pos)
    return groups


# ---------------------------------------------------------------- file names


def _sanitise(text: str, limit: int) -> tuple[str, bool]:
    clean = _UNSAFE.sub("_", text)
    return clean[:limit], len(clean) > limit


def _short_hash(keys: Sequence[str], values: Sequence[str]) -> str:
    full = "\x1f".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return hashlib.sha256(full.encode()).hexdigest()[:8]


def _stem(keys: Sequence[str], values: Sequence[str]) -> tuple[str, bool]:
    """File stem for one group and whether information was cut from it."""
    parts, cut = [], False
    for key, value in zip(keys, values, strict=True):
        part, part_cut = _sanitise(value if key == "model" else f"{_NAME_KEYS.get(key, key)}-{value}", PART_CHARS)
        parts.append(part)
        cut = cut or part_cut
    stem = "__".join(parts).lstrip(".") or "grid"
    return stem[:STEM_CHARS], cut or len(stem) > STEM_CHARS


def _grid_names(keys: Sequence[str], groups: Sequence[tuple[str, ...]]) -> list[str]:
    """One unique, filesystem-safe file name per group; a hash of the full key is added only when needed."""
    stems = [_stem(keys, values) for values in groups]
    counts: dict[str, int] = {}
    for stem, _ in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1  # case-insensitive file systems collide too
    names = []
    for (stem, cut), values in zip(stems, groups, strict=True):
        clash = cut or counts[stem.lower()] > 1
        names.append(f"{stem}-{_short_hash(keys, values)}.png" if clash else f"{stem}.png")
    return names


# ---------------------------------------------------------------- text


def _font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def _line_height(font: Font) -> int:
    bottom = font.getbbox("Ag|")[3]
    return int(bottom + max(2, bottom // 5))


def _add_word(lines: list[str], word: str, font: Font, width: float) -> None:
    if lines and lines[-1] and font.getlength(f"{lines[-1]} {word}") <= width:
        lines[-1] = f"{lines[-1]} {word}"
        return
    if font.getlength(word) <= width:
        lines.append(word)
        return
    current = ""
    for atom in _ATOM.findall(word):
        if current and font.getlength(current + atom) > width:
            lines.append(current)
            current = ""
        current += atom
    lines.append(current)


def _ellipsize(line: str, font: Font, width: float) -> str:
    atoms = _ATOM.findall(line)
    while atoms and font.getlength("".join(atoms).rstrip() + "...") > width:
        atoms.pop()
    return "".join(atoms).rstrip() + "..."


def wrap_label(text: str, font: Font, width: float, max_lines: int) -> list[str]:
    """Wrap to `width` pixels by measured length, never inside a `<trigger>`; cut to max_lines with '...'."""
    lines: list[str] = []
    for word in text.split():
        _add_word(lines, word, font, width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, width)
    return lines or [""]


def _label(value: str) -> str:
    return value if value else "(empty)"


def _draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: Sequence[str],
    font: Font,
    box: tuple[int, int, int, int],
    line_h: int,
    centre_x: bool = True,
    fill: tuple[int, int, int] = LABEL_FILL,
) -> None:
    """Draw lines vertically centred in box, each centred (or left-aligned) horizontally."""
    left, top, right, bottom = box
    y = top + (bottom - top - len(lines) * line_h) / 2
    for line in lines:
        x = left + (right - left - font.getlength(line)) / 2 if centre_x else left
        draw.text((x, y), line, font=font, fill=fill)
        y += line_h


# ---------------------------------------------------------------- cells


def _reason(status: str, error: str) -> str:
    if not status:
        return "not rendered"
    return f"{status}: {error}" if error else status


def _cell_source(run_dir: Path, row: pd.Series | None) -> Path | str:
    """The image to paste, or why there is none."""
    if row is None:
        return "no job"
    status, error, image = _text(row.get("status")), _text(row.get("error")), _text(row.get("image"))
    if status != "ok":
        return _reason(status, error)
    if not image:
        return "ok: no image recorded"
    path = run_dir / image
    return path if path.is_file() else f"missing {image}"


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:  # reads the header only
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _pick_row(rows: pd.DataFrame) -> pd.Series:
    """A re-rendered job may appear twice in a manifest: the last ok row wins, else the last row."""
    ok = rows[_column(rows, "status") == "ok"]
    return (ok if len(ok) else rows).iloc[-1]


def _planned_size(rows: pd.DataFrame) -> tuple[int, int]:
    def largest(name: str) -> int:
        values = pd.to_numeric(rows[name], errors="coerce") if name in rows.columns else pd.Series(dtype=float)
        return int(values.max()) if values.notna().any() else FALLBACK_CELL

    return largest("width"), largest("height")


def _draw_placeholder(canvas: Image.Image, origin: tuple[int, int], layout: _Layout, reason: str, font: Font) -> None:
    """Grey cell, red X in the upper part and the reason in the lower part; the centre stays plain grey."""
    x0, y0 = origin
    w, h = layout.cell_w, layout.cell_h
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=PLACEHOLDER_FILL)
    side = max(4, min(w, h) * 3 // 10)
    left, top = x0 + (w - side) // 2, y0 + h // 12
    stroke = max(1, side // 8)
    draw.line((left, top, left + side, top + side), fill=MARK_FILL, width=stroke)
    draw.line((left, top + side, left + side, top), fill=MARK_FILL, width=stroke)
    line_h = _line_height(font)
    text_top = y0 + h * 7 // 12
    fits = (y0 + h - layout.pad - text_top) // line_h
    if fits < 1:
        return
    lines = wrap_label(reason, font, w - 2 * layout.pad, fits)
    _draw_lines(
        draw,
        lines,
        font,
        (x0 + layout.pad, text_top, x0 + w - layout.pad, text_top + len(lines) * line_h),
        line_h,
        fill=REASON_FILL,
    )


def _paste_image(canvas: Image.Image, origin: tuple[int, int], layout: _Layout, path: Path) -> bool:
    """Paste centred in the cell (smaller images keep their pixels, not stretched); False if unreadable."""
    try:
        with Image.open(path) as img:
            tile = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    x0 = origin[0] + (layout.cell_w - tile.width) // 2
    y0 = origin[1] + (layout.cell_h - tile.height) // 2
    canvas.paste(tile, (x0, y0))
    return True


# ---------------------------------------------------------------- grid rendering


@dataclass(frozen=True)
class _GridSpec:
    x: str
    y: str
    columns: list[str]
    rows: list[str]
    title: str


def _layout(
    spec: _GridSpec, cell: tuple[int, int], font: Font, font_size: int
) -> tuple[_Layout, list[list[str]], list[list[str]]]:
    """Cell and margin sizes plus the wrapped header and row labels they were computed from."""
    cell_w, cell_h = cell
    pad = max(2, font_size // 3)
    line_h = _line_height(font)
    left_w = max(cell_w, MIN_LABEL_W)
    total_w = left_w + len(spec.columns) * cell_w
    headers = [wrap_label(_label(c), font, cell_w - 2 * pad, HEADER_LINES) for c in spec.columns]
    row_fit = max(1, min(ROW_LINES, (cell_h - 2 * pad) // line_h))
    row_labels = [wrap_label(_label(r), font, left_w - 2 * pad, row_fit) for r in spec.rows]
    title_lines = _title_lines(spec, font, total_w - 2 * pad)
    layout = _Layout(
        cell_w=cell_w,
        cell_h=cell_h,
        left_w=left_w,
        title_h=len(title_lines) * line_h + 2 * pad,
        header_h=max(len(h) for h in headers) * line_h + 2 * pad,
        pad=pad,
        line_h=line_h,
    )
    return layout, headers, row_labels


def _title_lines(spec: _GridSpec, font: Font, width: int) -> list[str]:
    fixed = wrap_label(spec.title, font, width, TITLE_LINES) if spec.title else []
    return [*fixed, *wrap_label(f"x: {spec.x}, y: {spec.y}", font, width, 2)]


def _draw_labels(
    canvas: Image.Image, spec: _GridSpec, layout: _Layout, font: Font, labels: tuple[list[list[str]], list[list[str]]]
) -> None:
    headers, row_labels = labels
    draw = ImageDraw.Draw(canvas)
    title_lines = _title_lines(spec, font, canvas.width - 2 * layout.pad)
    _draw_lines(
        draw,
        title_lines,
        font,
        (layout.pad, 0, canvas.width - layout.pad, layout.title_h),
        layout.line_h,
        centre_x=False,
    )
    for i, lines in enumerate(headers):
        left = layout.left_w + i * layout.cell_w
        box = (left + layout.pad, layout.title_h, left + layout.cell_w - layout.pad, layout.top)
        _draw_lines(draw, lines, font, box, layout.line_h)
    for j, lines in enumerate(row_labels):
        top = layout.top + j * layout.cell_h
        box = (layout.pad, top, layout.left_w - layout.pad, top + layout.cell_h)
        _draw_lines(draw, lines, font, box, layout.line_h, centre_x=False)


Sources = dict[tuple[str, str], Path | str]


def _cell_sources(rows: pd.DataFrame, values: pd.DataFrame, spec: _GridSpec, run_dir: Path) -> Sources:
    """(column, row) -> image path to paste, or the reason there is none."""
    cells = values.groupby([spec.x, spec.y], sort=False).indices
    sources: Sources = {}
    for col in spec.columns:
        for row in spec.rows:
            positions = cells.get((col, row))
            sources[(col, row)] = _cell_source(run_dir, None if positions is None else _pick_row(rows.iloc[positions]))
    return sources


def _readable(sources: Sources) -> tuple[Sources, list[tuple[int, int]]]:
    """Swap unreadable images for a reason, and collect the sizes of the rest."""
    checked: Sources = {}
    sizes = []
    for key, source in sources.items():
        size = _image_size(source) if isinstance(source, Path) else None
        if isinstance(source, Path) and size is None:
            source = "unreadable image"
        checked[key] = source
        if size is not None:
            sizes.append(size)
    return checked, sizes


def _cell_size(sizes: list[tuple[int, int]], rows: pd.DataFrame) -> tuple[int, int]:
    """Largest image in the grid, so no image is scaled; the planned size when nothing rendered yet."""
    if not sizes:
        return _planned_size(rows)
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def _render_grid(rows: pd.DataFrame, values: pd.DataFrame, spec: _GridSpec, run_dir: Path) -> Image.Image:
    sources, sizes = _readable(_cell_sources(rows, values, spec, run_dir))
    cell = _cell_size(sizes, rows)
    font_size = max(MIN_FONT, min(cell) // 12)
    font, small = _font(font_size), _font(max(MIN_FONT, font_size * 2 // 3))
    layout, headers, row_labels = _layout(spec, cell, font, font_size)
    size = (layout.left_w + len(spec.columns) * layout.cell_w, layout.top + len(spec.rows) * layout.cell_h)
    canvas = Image.new("RGB", size, BACKGROUND)
    _draw_labels(canvas, spec, layout, font, (headers, row_labels))
    for i, col in enumerate(spec.columns):
        for j, row in enumerate(spec.rows):
            origin = (layout.left_w + i * layout.cell_w, layout.top + j * layout.cell_h)
            source = sources[(col, row)]
            if isinstance(source, str) or not _paste_image(canvas, origin, layout, source):
                _draw_placeholder(
                    canvas, origin, layout, source if isinstance(source, str) else "unreadable image", small
                )
    return canvas


# ---------------------------------------------------------------- atomic files


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Temp file in the same folder, fsync, rename: a crash leaves the old file or the new one, never half."""
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


def _save_png(image: Image.Image, path: Path) -> None:
    _write_atomic(path, lambda handle: image.save(handle, format="PNG"))


# ---------------------------------------------------------------- public: grids


def build_grids(table: pd.DataFrame, run_dir: Path, x: str, y: str, slots: list[str]) -> list[Path]:
    """One labelled XY grid PNG per combination of the other varying axes.

    Returns the written paths (under run_dir/grids), in order of each group's first job.
    """
    axes = _all_axes(slots)
    _check_axis("x", x, axes)
    _check_axis("y", y, axes)
    if x == y:
        raise ValueError(f"sweep.grid: x and y are both '{x}'; choose two different axes")
    if table.empty:
        return []
    run_dir = Path(run_dir)
    table = table.reset_index(drop=True)
    keys = _group_keys(table, x, y, slots)
    values = pd.DataFrame({name: _column(table, name) for name in dict.fromkeys([x, y, *keys])})
    groups = _groups(values, keys)
    x_order, y_order = _ordered_unique(values[x]), _ordered_unique(values[y])
    out = run_dir / "grids"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (group, positions), name in zip(groups.items(), _grid_names(keys, list(groups)), strict=True):
        group_values = values.iloc[positions]
        present_x, present_y = set(group_values[x]), set(group_values[y])
        spec = _GridSpec(
            x=x,
            y=y,
            columns=[v for v in x_order if v in present_x],
            rows=[v for v in y_order if v in present_y],
            title=", ".join(f"{k}: {_label(v)}" for k, v in zip(keys, group, strict=True)),
        )
        image = _render_grid(table.iloc[positions], group_values, spec, run_dir)
        path = out / name
        _save_png(image, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- public: index.html

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.jobs td.prompt { max-width: 40em; }
tr.failed { background: #fbd5d5; }
tr.skipped { background: #fff0c2; }
tr.pending { color: #888; }
figure { margin: 0 0 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; }
"""

_JOB_COLUMNS = ("status", "model", "stack", "prompt", "seed", "steps", "guidance_scale", "size", "image", "error")


def _esc(value: object) -> str:
    return html.escape(_text(value), quote=True)


def _href(run_dir: Path, path: Path) -> str:
    """Relative, URL-quoted link so the report works when the run folder is moved or served statically."""
    rel = Path(os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())).as_posix()
    return html.escape(quote(rel, safe="/"), quote=True)


def _summary_html(summary: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(str(v))}</td></tr>" for k, v in summary.items())
    return f'<table class="summary">{rows}</table>'


def _grids_html(run_dir: Path, grids: list[Path]) -> str:
    if not grids:
        return "<p>No grids.</p>"
    figures = []
    for grid in grids:
        href, name = _href(run_dir, grid), _esc(Path(grid).name)
        figures.append(
            f'<figure><a href="{href}"><img src="{href}" alt="{name}"></a><figcaption>{name}</figcaption></figure>'
        )
    return "\n".join(figures)


def _thumb_html(run_dir: Path, image: str) -> str:
    if not image:
        return ""
    if not (run_dir / image).is_file():
        return f"missing {_esc(image)}"
    href = _href(run_dir, run_dir / image)
    return f'<a href="{href}"><img src="{href}" loading="lazy" width="64" alt="{_esc(image)}"></a>'


def _row_class(status: str) -> str:
    if status in ("failed", "skipped"):
        return f' class="{status}"'
    return "" if status == "ok" else ' class="pending"'


def _job_row_html(run_dir: Path, row: pd.Series) -> str:
    status = _text(row.get("status"))
    cells = {name: _esc(row.get(name)) for name in _JOB_COLUMNS}
    cells["status"] = _esc(status or "pending")
    cells["size"] = f"{_esc(row.get('width'))}x{_esc(row.get('height'))}"
    cells["image"] = _thumb_html(run_dir, _text(row.get("image")))
    tds = "".join(f'<td class="{name}">{cells[name]}</td>' for name in _JOB_COLUMNS)
    return f'<tr{_row_class(status)} title="{_esc(row.get("job_id"))}">{tds}</tr>'


def _jobs_html(run_dir: Path, table: pd.DataFrame) -> str:
    head = "".join(f"<th>{name}</th>" for name in _JOB_COLUMNS)
    body = "\n".join(_job_row_html(run_dir, row) for _, row in table.iterrows())
    return f'<table class="jobs"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def build_index(table: pd.DataFrame, run_dir: Path, grids: list[Path], summary: dict[str, str]) -> Path:
    """Write run_dir/index.html: summary, grids, then the table with thumbnails linking images."""
    run_dir = Path(run_dir)
    title = _esc(f"batchgen run: {run_dir.resolve().name}")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title><style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            _summary_html(summary),
            f"<h2>Grids ({len(grids)})</h2>",
            _grids_html(run_dir, grids),
            f"<h2>Jobs ({len(table)})</h2>",
            _jobs_html(run_dir, table),
            "</body></html>",
            "",
        ]
    )
    path = run_dir / "index.html"
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda handle: handle.write(page.encode("utf-8")))
    return path
