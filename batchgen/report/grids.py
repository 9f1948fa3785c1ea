"""Labelled XY grids of a run directory, with optional Z sub-grids side by side.

One grid per combination of the varying axes that are not on the grid; a grid larger than the size guard
(`report.max_grid_megapixels`) is split into pages. Pure PIL + pandas: grids are rebuilt from a manifest
(`batchgen report RUN_DIR`) on machines without torch.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from batchgen.axes import (
    BASE_AXES,
    blocks_label,
    blocks_lora,
    check_grid,
    check_max_megapixels,
    title,
    weight_label,
    weight_lora,
    weight_sort_key,
)
from batchgen.cells import is_degenerate, lora_names, stack_label
from batchgen.report.files import save_png
from batchgen.report.labels import prompt_labels, stack_labels
from batchgen.report.text import Font, draw_lines, font, line_height, text, wrap_label
from batchgen.spec import REFERENCE_STACK

AXES = BASE_AXES
REST = "other LoRAs"  # group key standing in for `stack` when a LoRA's weight is on the grid
DEFAULT_MAX_MEGAPIXELS = 64.0  # below PIL's decompression-bomb warning (89 MP), so PIL-based viewers open pages

PLACEHOLDER_FILL = (224, 224, 224)
MARK_FILL = (200, 30, 30)
REASON_FILL = (60, 60, 60)
BACKGROUND = (255, 255, 255)

MIN_FONT = 10
MIN_LABEL_W = 160  # room for ~16 characters of a y label even when cells are tiny
HEADER_LINES = 4
ROW_LINES = 8
TITLE_LINES = 3
LAYER_LINES = 2
PART_CHARS = 40
STEM_CHARS = 120
FALLBACK_CELL = 256

_LAYER = "__layer"  # the z column; a constant when there is no z axis, so one code path draws both
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NAME_KEYS = {"prompt_template": "template", REST: "others"}  # shorter file names; titles keep the full name


@dataclass(frozen=True)
class _Layout:
    cell_w: int
    cell_h: int
    left_w: int
    title_h: int
    layer_h: int  # band of z labels above each sub-grid; 0 without z
    header_h: int
    pad: int
    line_h: int
    gap: int  # between z sub-grids

    @property
    def top(self) -> int:
        return self.title_h + self.layer_h + self.header_h

    def size(self, layers: int, columns: int, rows: int) -> tuple[int, int]:
        width = self.left_w + layers * columns * self.cell_w + (layers - 1) * self.gap
        return width, self.top + rows * self.cell_h

    def block_left(self, layer: int, columns: int) -> int:
        return self.left_w + layer * (columns * self.cell_w + self.gap)


# ---------------------------------------------------------------- axes and grouping


def _all_axes(slots: Sequence[str]) -> tuple[str, ...]:
    return AXES + tuple(s for s in slots if s not in AXES)


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    # A missing column is an axis with one (empty) value, so grids still work on a trimmed manifest.
    if name not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=object)
    return table[name].map(text)


def axis_column(table: pd.DataFrame, name: str, on_grid: Sequence[str]) -> pd.Series:
    """A table column, or a value derived from it: a LoRA's weight, the stack without the grid's LoRAs, a stack's
    state by the sweep's name for it (`ink 0.5`, `ink_grain`)."""
    lora = weight_lora(name)
    if lora is not None:
        return _per_cell(_column(table, "loras"), lambda cell: weight_label(cell, lora))
    lora = blocks_lora(name)
    if lora is not None:
        return _per_cell(_column(table, "loras"), lambda cell: blocks_label(cell, lora))
    if name == REST:
        weights = [n for a in on_grid if (n := weight_lora(a)) is not None]
        blocks = [n for a in on_grid if (n := blocks_lora(a)) is not None]
        return _per_cell(_column(table, "loras"), lambda cell: stack_label(cell, weights, blocks))
    if name == "stack":
        return stack_labels(table, on_grid)
    if name == "prompt" and "prompt" in table.columns:
        return prompt_labels(table)
    return _column(table, name)


def _per_cell(cells: pd.Series, label: Callable[[str], str]) -> pd.Series:
    # Once per distinct cell: a sweep of 10,000 jobs has a few dozen `loras` cells.
    return cells.map({cell: label(cell) for cell in dict.fromkeys(cells)})


def _ordered_unique(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values))


def axis_order(values: pd.Series, axis: str) -> list[str]:
    """First appearance (the sweep's own order), except weights, which read best ascending."""
    unique = _ordered_unique(values)
    return sorted(unique, key=weight_sort_key) if weight_lora(axis) is not None else unique


def grid_axes(table: pd.DataFrame, slots: list[str]) -> list[str]:
    """Axis columns that vary in this table (more than one distinct value), in AXES order then slots."""
    return [a for a in _all_axes(slots) if a in table.columns and axis_column(table, a, ()).nunique() > 1]


def _varies(table: pd.DataFrame, name: str, on_grid: Sequence[str]) -> bool:
    source = "loras" if name == REST else name
    return source in table.columns and axis_column(table, name, on_grid).nunique() > 1


def _group_keys(table: pd.DataFrame, on_grid: Sequence[str], slots: list[str]) -> list[str]:
    """Columns that split the table into grids: every varying axis not on the grid, model always first."""
    candidates = list(_all_axes(slots))
    if "stack" in on_grid:
        # A stack's label names its epoch where its states differ in it; other stacks have none to split by.
        candidates.remove("epoch")
    if any(weight_lora(a) or blocks_lora(a) for a in on_grid) and "stack" not in on_grid:
        # With ink's weight on an axis, `ink 0.5` and `none` belong in one grid; what else the stack holds splits.
        candidates[candidates.index("stack")] = REST
    keys = [a for a in candidates if a not in on_grid and _varies(table, a, on_grid)]
    if "prompt" in on_grid:
        # Slot values are part of the prompt on the axis; splitting by them would leave one row per grid.
        keys = [k for k in keys if k not in slots]
    if any(a in slots for a in on_grid) and "prompt" in keys and "prompt_template" in table.columns:
        # The full prompt changes with the slot on the axis; the template is what stays fixed across it.
        varies = _column(table, "prompt_template").nunique() > 1
        keys[keys.index("prompt") : keys.index("prompt") + 1] = ["prompt_template"] if varies else []
    if "model" in table.columns and "model" not in on_grid and "model" not in keys:
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


def _sanitise(value: str, limit: int) -> tuple[str, bool]:
    clean = _UNSAFE.sub("_", value)
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


def _grid_stems(keys: Sequence[str], groups: Sequence[tuple[str, ...]]) -> list[str]:
    """One unique, filesystem-safe file stem per group; a hash of the full key is added only when needed."""
    stems = [_stem(keys, values) for values in groups]
    counts: dict[str, int] = {}
    for stem, _ in stems:
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1  # case-insensitive file systems collide too
    names = []
    for (stem, cut), values in zip(stems, groups, strict=True):
        clash = cut or counts[stem.lower()] > 1
        names.append(f"{stem}-{_short_hash(keys, values)}" if clash else stem)
    return names


def _page_names(stem: str, pages: int) -> list[str]:
    if pages == 1:
        return [f"{stem}.png"]
    digits = len(str(pages))
    return [f"{stem}-p{i:0{digits}d}.png" for i in range(1, pages + 1)]


# ---------------------------------------------------------------- cells


def _label(value: str) -> str:
    return value if value else "(empty)"


def _reason(status: str, error: str) -> str:
    if not status:
        return "not rendered"
    return f"{status}: {error}" if error else status


def _cell_source(run_dir: Path, row: pd.Series | None) -> Path | str:
    """The image to paste, or why there is none."""
    if row is None:
        return "no job"
    status, error, image = text(row.get("status")), text(row.get("error")), text(row.get("image"))
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


def _planned_size(rows: pd.DataFrame) -> tuple[int, int]:
    def largest(name: str) -> int:
        values = pd.to_numeric(rows[name], errors="coerce") if name in rows.columns else pd.Series(dtype=float)
        return int(values.max()) if values.notna().any() else FALLBACK_CELL

    return largest("width"), largest("height")


def _draw_placeholder(canvas: Image.Image, origin: tuple[int, int], layout: _Layout, reason: str, face: Font) -> None:
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
    line_h = line_height(face)
    text_top = y0 + h * 7 // 12
    fits = (y0 + h - layout.pad - text_top) // line_h
    if fits < 1:
        return
    lines = wrap_label(reason, face, w - 2 * layout.pad, fits)
    box = (x0 + layout.pad, text_top, x0 + w - layout.pad, text_top + len(lines) * line_h)
    draw_lines(draw, lines, face, box, line_h, fill=REASON_FILL)


def _draw_degenerate_mark(canvas: Image.Image, origin: tuple[int, int], layout: _Layout) -> None:
    """A red frame and a red corner triangle over a degenerate image: visible at any zoom, image still readable."""
    x0, y0 = origin
    w, h = layout.cell_w, layout.cell_h
    draw = ImageDraw.Draw(canvas)
    stroke = max(1, min(w, h) // 32)
    draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), outline=MARK_FILL, width=stroke)
    side = max(4, min(w, h) // 6)
    draw.polygon([(x0 + w - side, y0), (x0 + w - 1, y0), (x0 + w - 1, y0 + side)], fill=MARK_FILL)


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


# ---------------------------------------------------------------- grid layout


@dataclass(frozen=True)
class _GridSpec:
    x: str
    y: str
    z: str | None
    columns: list[str]
    rows: list[str]
    layers: list[str]  # z values; [""] without a z axis
    title: str


@dataclass(frozen=True)
class _Labels:
    headers: list[list[str]]
    rows: list[list[str]]
    layers: list[list[str]]
    corner: list[str]


@dataclass(frozen=True)
class _Page:
    layers: range
    columns: range
    rows: range
    number: int
    count: int


def _layout(spec: _GridSpec, cell: tuple[int, int], face: Font, font_size: int) -> tuple[_Layout, _Labels]:
    """Cell and margin sizes plus the wrapped labels they were computed from (title height: the worst case)."""
    cell_w, cell_h = cell
    pad = max(2, font_size // 3)
    line_h = line_height(face)
    left_w = max(cell_w, MIN_LABEL_W)
    headers = [wrap_label(_label(c), face, cell_w - 2 * pad, HEADER_LINES) for c in spec.columns]
    corner = [
        *wrap_label(f"x: {title(spec.x)}", face, left_w - 2 * pad, 2),
        *wrap_label(f"y: {title(spec.y)}", face, left_w - 2 * pad, 2),
    ]
    row_fit = max(1, min(ROW_LINES, (cell_h - 2 * pad) // line_h))
    row_labels = [wrap_label(_label(r), face, left_w - 2 * pad, row_fit) for r in spec.rows]
    layer_labels: list[list[str]] = []
    if spec.z:
        # Each z label must fit over one sub-grid even on a page that shows only one of its columns.
        width = cell_w - 2 * pad
        layer_labels = [wrap_label(f"{title(spec.z)}: {_label(v)}", face, width, LAYER_LINES) for v in spec.layers]
    layout = _Layout(
        cell_w=cell_w,
        cell_h=cell_h,
        left_w=left_w,
        title_h=(TITLE_LINES + 1) * line_h + 2 * pad,
        layer_h=max(len(lines) for lines in layer_labels) * line_h + 2 * pad if layer_labels else 0,
        header_h=max(len(corner), *(len(h) for h in headers)) * line_h + 2 * pad,
        pad=pad,
        line_h=line_h,
        gap=max(2 * pad, cell_w // 8) if len(spec.layers) > 1 else 0,
    )
    return layout, _Labels(headers, row_labels, layer_labels, corner)


def _largest(count: int, fits) -> int:
    """Largest n in 1..count with fits(n), else 1 (a single cell is never split)."""
    for n in range(count, 0, -1):
        if fits(n):
            return n
    return 1


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def paginate(layout: _Layout, layers: int, columns: int, rows: int, max_pixels: float) -> list[_Page]:
    """Split a grid that is too large: whole z sub-grids first, then rows, then columns, as few pages as fit."""

    def fits(n_layers: int, n_columns: int, n_rows: int) -> bool:
        width, height = layout.size(n_layers, n_columns, n_rows)
        return width * height <= max_pixels

    per_layers, per_columns, per_rows = layers, columns, rows
    if not fits(layers, columns, rows):
        per_layers = _largest(layers, lambda n: fits(n, columns, rows))
        if not fits(per_layers, columns, rows):
            per_rows = _largest(rows, lambda n: fits(1, columns, n))
            if not fits(1, columns, per_rows):
                per_columns = _largest(columns, lambda n: fits(1, n, 1))
    parts = [
        (lz, cz, rz)
        for lz in _chunks(layers, per_layers)
        for rz in _chunks(rows, per_rows)
        for cz in _chunks(columns, per_columns)
    ]
    return [_Page(lz, cz, rz, i + 1, len(parts)) for i, (lz, cz, rz) in enumerate(parts)]


# ---------------------------------------------------------------- grid rendering

Sources = dict[tuple[str, str, str], Path | str]


def _cell_sources(
    rows: pd.DataFrame, values: pd.DataFrame, spec: _GridSpec, run_dir: Path
) -> tuple[Sources, set[tuple[str, str, str]]]:
    """(layer, column, row) -> image path to paste, or the reason there is none; and the cells whose image is
    degenerate (flat, clipped), which get a mark."""
    cells = values.groupby([_LAYER, spec.x, spec.y], sort=False).indices
    sources: Sources = {}
    marked: set[tuple[str, str, str]] = set()
    for layer in spec.layers:
        for col in spec.columns:
            for row in spec.rows:
                positions = cells.get((layer, col, row))
                # One row per job (manifest.latest_rows); jobs that share every axis value (the same settings
                # with a replaced file) share a cell, and the last one shows.
                picked = None if positions is None else rows.iloc[positions[-1]]
                sources[(layer, col, row)] = _cell_source(run_dir, picked)
                if picked is not None and is_degenerate(text(picked.get("degenerate"))):
                    marked.add((layer, col, row))
    return sources, marked


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


def _draw_page_labels(
    canvas: Image.Image, spec: _GridSpec, page: _Page, layout: _Layout, face: Font, labels: _Labels
) -> None:
    draw = ImageDraw.Draw(canvas)
    pad, line_h = layout.pad, layout.line_h
    title_lines = wrap_label(spec.title, face, canvas.width - 2 * pad, TITLE_LINES) if spec.title else []
    if page.count > 1:
        title_lines.append(f"page {page.number} of {page.count}")
    draw_lines(draw, title_lines, face, (pad, 0, canvas.width - pad, layout.title_h), line_h, centre_x=False)
    header_top = layout.title_h + layout.layer_h
    draw_lines(draw, labels.corner, face, (pad, header_top, layout.left_w - pad, layout.top), line_h, centre_x=False)
    ncols = len(page.columns)
    for li, layer in enumerate(page.layers):
        left = layout.block_left(li, ncols)
        if labels.layers:
            box = (left + pad, layout.title_h, left + ncols * layout.cell_w - pad, header_top)
            draw_lines(draw, labels.layers[layer], face, box, line_h)
        for ci, col in enumerate(page.columns):
            x0 = left + ci * layout.cell_w
            box = (x0 + pad, header_top, x0 + layout.cell_w - pad, layout.top)
            draw_lines(draw, labels.headers[col], face, box, line_h)
    for ri, row in enumerate(page.rows):
        top = layout.top + ri * layout.cell_h
        box = (pad, top, layout.left_w - pad, top + layout.cell_h)
        draw_lines(draw, labels.rows[row], face, box, line_h, centre_x=False)


def _render_page(
    spec: _GridSpec,
    page: _Page,
    sources: Sources,
    marked: set[tuple[str, str, str]],
    layout: _Layout,
    faces: tuple[Font, Font],
    labels: _Labels,
) -> Image.Image:
    face, small = faces
    canvas = Image.new("RGB", layout.size(len(page.layers), len(page.columns), len(page.rows)), BACKGROUND)
    _draw_page_labels(canvas, spec, page, layout, face, labels)
    for li, layer in enumerate(page.layers):
        left = layout.block_left(li, len(page.columns))
        for ci, col in enumerate(page.columns):
            for ri, row in enumerate(page.rows):
                origin = (left + ci * layout.cell_w, layout.top + ri * layout.cell_h)
                key = (spec.layers[layer], spec.columns[col], spec.rows[row])
                source = sources[key]
                if isinstance(source, str) or not _paste_image(canvas, origin, layout, source):
                    reason = source if isinstance(source, str) else "unreadable image"
                    _draw_placeholder(canvas, origin, layout, reason, small)
                elif key in marked:
                    _draw_degenerate_mark(canvas, origin, layout)
    return canvas


def _render_grid(
    rows: pd.DataFrame, values: pd.DataFrame, spec: _GridSpec, run_dir: Path, max_pixels: float
) -> list[Image.Image]:
    found, marked = _cell_sources(rows, values, spec, run_dir)
    sources, sizes = _readable(found)
    cell = _cell_size(sizes, rows)
    font_size = max(MIN_FONT, min(cell) // 12)
    faces = (font(font_size), font(max(MIN_FONT, font_size * 2 // 3)))
    layout, labels = _layout(spec, cell, faces[0], font_size)
    pages = paginate(layout, len(spec.layers), len(spec.columns), len(spec.rows), max_pixels)
    if len(pages) == 1 and not spec.title:
        layout = replace(layout, title_h=layout.pad)  # nothing to say above the grid
    elif len(pages) == 1:
        width = layout.size(len(spec.layers), len(spec.columns), len(spec.rows))[0]
        lines = wrap_label(spec.title, faces[0], width - 2 * layout.pad, TITLE_LINES)
        layout = replace(layout, title_h=len(lines) * layout.line_h + 2 * layout.pad)
    return [_render_page(spec, page, sources, marked, layout, faces, labels) for page in pages]


# ---------------------------------------------------------------- public


def build_grids(
    table: pd.DataFrame,
    run_dir: Path,
    x: str,
    y: str,
    slots: list[str],
    z: str | None = None,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> list[Path]:
    """One labelled grid PNG (or its pages) per combination of the other varying axes; z sub-grids side by side.

    Returns the written paths (under run_dir/grids), in order of each group's first job. PNGs left in grids/
    from an earlier build with other axes are removed, so the folder always matches index.html.
    """
    z = z or None
    if table.empty:
        check_grid(x, y, z, slots, [])
        return []
    check_grid(x, y, z, slots, lora_names(_column(table, "loras")))
    max_pixels = check_max_megapixels(max_megapixels) * 1e6
    run_dir = Path(run_dir)
    on_grid = [a for a in (x, y, z) if a]
    if "stack" not in on_grid:
        # Added references are there to be measured against; with stack off the axes they would split every grid
        # in two. On a stack axis they are a column of their own.
        table = table[_column(table, "stack") != REFERENCE_STACK]
    table = table.reset_index(drop=True)
    keys = _group_keys(table, on_grid, slots)
    names = list(dict.fromkeys([*on_grid, *keys]))
    # A stack's label leaves out what the grid shows on an axis or in its title (an epoch, a prompt's tags).
    values = pd.DataFrame({name: axis_column(table, name, names) for name in names})
    values[_LAYER] = values[z] if z else ""
    groups = _groups(values, keys)
    orders = {axis: axis_order(values[axis], axis) for axis in on_grid}
    out = run_dir / "grids"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (group, positions), stem in zip(groups.items(), _grid_stems(keys, list(groups)), strict=True):
        group_values = values.iloc[positions]

        def present(axis: str | None, group_values: pd.DataFrame = group_values) -> list[str]:
            if axis is None:
                return [""]
            seen = set(group_values[axis])
            return [v for v in orders[axis] if v in seen]

        spec = _GridSpec(
            x=x,
            y=y,
            z=z,
            columns=present(x),
            rows=present(y),
            layers=present(z),
            title=", ".join(f"{k}: {_label(v)}" for k, v in zip(keys, group, strict=True)),
        )
        images = _render_grid(table.iloc[positions], group_values, spec, run_dir, max_pixels)
        for image, name in zip(images, _page_names(stem, len(images)), strict=True):
            path = out / name
            save_png(image, path)
            paths.append(path)
    written = {p.name for p in paths}
    for stale in out.glob("*.png"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)
    return paths
