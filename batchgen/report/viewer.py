"""index.html's grid viewer, Python side: every axis a run can be drawn on (batchgen.axes.choices, the axes
`batchgen report --x/--y/--z` accepts), each job's value on it as the grids label it, its image, and the run's
progress, as the JSON that index.js draws grids from in the page.

Compact for 10,000 jobs: an axis holds its distinct values once, in the order grids show them, and per job the
index of its value (no list at all for an axis with one value); a status is one character.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from batchgen.axes import blocks_lora, choices, state_labels, title, weight_lora
from batchgen.cells import absent_label, lora_names
from batchgen.report.grids import axis_column, axis_order
from batchgen.report.labels import distinct_rows, slot_names
from batchgen.report.summary import status_counts
from batchgen.report.text import text

LIVE_REFRESH_SECONDS = 5.0
STATUS_CODES = {"ok": "o", "failed": "f", "skipped": "s", "pending": "p"}  # anything else: "?"


@dataclass(frozen=True)
class Progress:
    """A run's counts as index.html shows them. Not finished: the page reloads itself every refresh_seconds."""

    rendered: int  # jobs whose latest row is ok
    failed: int
    total: int  # jobs to render: every job but the skipped
    finished: bool
    refresh_seconds: float = LIVE_REFRESH_SECONDS


def progress_of(table: pd.DataFrame, finished: bool, refresh_seconds: float = LIVE_REFRESH_SECONDS) -> Progress:
    counts = status_counts(table)
    total = len(table) - counts["skipped"]
    return Progress(counts["ok"], counts["failed"], total, finished, refresh_seconds)


def image_links(table: pd.DataFrame, run_dir: Path) -> dict[str, str]:
    """job_id -> its image as a relative, URL-quoted link, for jobs whose latest row is ok and whose file exists."""
    base = Path(run_dir).resolve()
    real: dict[str, str] = {}  # a folder's real path, looked up once (one per folder, not one per image)
    links = {}
    rows = zip(_cells(table, "job_id"), _cells(table, "status"), _cells(table, "image"), strict=True)
    for job_id, status, image in rows:
        path = base / image
        if status != "ok" or not image or not path.is_file():
            continue
        if path.is_symlink():
            target = str(path.resolve())
        else:
            folder = str(path.parent)
            if folder not in real:
                real[folder] = os.path.realpath(folder)
            target = os.path.join(real[folder], path.name)
        links[job_id] = quote(Path(os.path.relpath(target, base)).as_posix(), safe="/")
    return links


def _cells(table: pd.DataFrame, name: str) -> list[str]:
    return [text(v) for v in table[name]] if name in table.columns else [""] * len(table)


def _indexed(values: pd.Series, axis: str) -> dict[str, object]:
    order = axis_order(values, axis)
    out: dict[str, object] = {"values": order}
    if len(order) > 1:
        where = {value: i for i, value in enumerate(order)}
        out["rows"] = [where[v] for v in values]
    return out


def _stack_variants(table: pd.DataFrame, columns: Mapping[str, pd.Series]) -> dict[str, object]:
    """The stack's labels for each set of axes beside it on a grid that changes them: a label leaves out what
    another axis shows (a LoRA's weight or blocks, the epoch), as on the PNG grids. Keyed by those axes, sorted
    and joined by `|`; "" when none is on the grid. Identical label lists are stored once. `columns`: each
    axis's values off the grid."""
    varies = {name for name, values in columns.items() if values.nunique() > 1}
    # The prompt is on the grid or a filter whenever it varies, so its <lora:...> tags show there.
    base = ["prompt"] if "prompt" in varies else []
    affecting = sorted(a for a in varies if a == "epoch" or weight_lora(a) is not None or blocks_lora(a) is not None)
    records, codes = distinct_rows(table)
    slots = slot_names(table)
    lists: list[dict[str, object]] = []
    seen: dict[str, int] = {}
    variants: dict[str, int] = {}
    # The stack takes one of the three axes: at most two others change its labels.
    for size in range(3):
        for chosen in itertools.combinations(affecting, size):
            labels = state_labels(records, slots, [*base, *chosen])
            entry = _indexed(pd.Series([labels[code] for code in codes], dtype=object), "stack")
            key = json.dumps(entry, separators=(",", ":"))
            if key not in seen:
                seen[key] = len(lists)
                lists.append(entry)
            variants["|".join(chosen)] = seen[key]
    return {"labels": lists, "variants": variants}


def viewer_data(
    table: pd.DataFrame,
    images: Mapping[str, str],
    view: tuple[str, str, str | None],
    progress: Progress,
) -> dict[str, object]:
    """What the page's viewer reads. `images`: image_links; `view`: the x, y and z shown before the URL's fragment
    names any (the run's sweep.grid)."""
    table = table.reset_index(drop=True)
    ids = _cells(table, "job_id")
    axes = choices(slot_names(table), lora_names(dict.fromkeys(_cells(table, "loras"))))
    columns = {name: axis_column(table, name, ()) for name in axes}
    stack = _stack_variants(table, columns)
    entries = []
    for name in axes:
        # The stack's filter reads its labels with no other axis beside it; on a grid, its variant for the others.
        values = stack["labels"][stack["variants"][""]] if name == "stack" else _indexed(columns[name], name)
        entries.append({"name": name, "title": title(name), **values})
        if blocks_lora(name) is not None and set(values["values"]) <= {
            absent_label(blocks_lora(name)),
            blocks_lora(name),
        }:
            entries[-1]["filter"] = False  # no block weights: what it tells apart, the LoRA's weight axis does
    widths = [int(float(w)) for w in _cells(table, "width") if w]
    statuses = "".join(STATUS_CODES.get(s or "pending", "?") for s in _cells(table, "status"))
    return {
        "id": ids,
        "status": statuses,
        # 0: no image; 1: images/<job_id>.png, the usual place; else the link
        "image": [_image_code(job_id, images.get(job_id)) for job_id in ids],
        "axes": entries,
        "stack": stack,
        "view": {"x": view[0], "y": view[1], "z": view[2] or ""},
        "full": max(widths, default=512),
        "live": {
            "finished": progress.finished,
            "rendered": progress.rendered,
            "failed": progress.failed,
            "total": progress.total,
            "refresh": progress.refresh_seconds,
        },
    }


def _image_code(job_id: str, link: str | None) -> int | str:
    if not link:
        return 0
    return 1 if link == f"images/{job_id}.png" else link


def data_script(data: Mapping[str, object]) -> str:
    """The data as a JSON script element: `<` escaped, so no text in it can end the element or open a tag."""
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    return f'<script type="application/json" id="viewer-data">{body}</script>'
