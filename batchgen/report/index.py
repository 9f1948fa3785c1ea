"""run_dir/index.html: summary, the grid viewer (any axes, filters, cell size; its view in the URL's fragment),
the PNG grids and plots, then the jobs as a filterable table with thumbnails; while a run renders, its progress.

Self-contained: inline CSS, JS (index.js) and data (viewer.py's JSON), relative links only, so it works opened
from disk, from any static server, and after the run folder is moved or zipped.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from batchgen.cells import is_degenerate
from batchgen.columns import INDEX_COLUMNS, INDEX_FILTERS, INDEX_NUMERIC
from batchgen.report.files import href, write_text
from batchgen.report.invocations import recorded
from batchgen.report.labels import stack_labels
from batchgen.report.summary import STATUSES, RunSummary, summarise
from batchgen.report.text import text
from batchgen.report.viewer import LIVE_REFRESH_SECONDS, Progress, data_script, image_links, progress_of, viewer_data

THUMB = 64

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
table.summary th { background: #f4f4f4; }
table.jobs td.prompt { max-width: 40em; }
table.jobs td.error { max-width: 30em; }
tr.failed { background: #fbd5d5; }
tr.skipped { background: #fff0c2; }
tr.pending { color: #888; }
tr[hidden] { display: none; }
form.filters { display: flex; flex-wrap: wrap; gap: 0.75em; align-items: center; margin-bottom: 0.75em; }
form.filters select { max-width: 24em; }
figure { margin: 0 0 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ccc; }
img.thumb { height: auto; }
pre.config { background: #f8f8f8; padding: 0.75em; overflow-x: auto; }
table.jobs th { cursor: pointer; user-select: none; }
table.jobs th[aria-sort=ascending]::after { content: " \\25B2"; }
table.jobs th[aria-sort=descending]::after { content: " \\25BC"; }
td.degenerate.bad { background: #fbd5d5; font-weight: bold; }
form.filters input[type=number] { width: 5em; }
#compare { position: fixed; inset: 0; background: rgba(0, 0, 0, 0.85); color: #eee; display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 0.5em; z-index: 10; }
#compare[hidden] { display: none; }
#compare .pair { display: flex; gap: 1em; }
#compare figure { margin: 0; text-align: center; }
#compare .pair img, #compare .wipe img { height: min(40vh, 512px); width: auto; max-width: 45vw; object-fit: contain;
  image-rendering: pixelated; border: 0; }
#compare .wipe { position: relative; line-height: 0; }
#compare .wipe img.over { position: absolute; left: 0; top: 0; }
#compare input[type=range] { width: min(45vw, 40vh, 512px); }
#progress { background: #fff0c2; padding: 0.5em 0.75em; }
form.view { display: flex; flex-wrap: wrap; gap: 0.75em; align-items: center; margin-bottom: 0.5em; }
#viewer-filters { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; margin-bottom: 0.75em; }
#viewer-filters fieldset { max-height: 10em; max-width: 30em; overflow: auto; border: 1px solid #ccc; }
#viewer-filters label { display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#viewer-filters button { font-size: 0.8em; margin: 0 0.25em 0.25em 0; }
#grid { --cell: 128px; }
#grid section.layer { display: inline-block; vertical-align: top; margin: 0 1.5em 1.5em 0; }
#grid h3 { margin: 0 0 0.25em 0; }
#grid .vrow { display: flex; content-visibility: auto; contain-intrinsic-size: auto var(--row, 134px);
  border-bottom: 1px solid #ccc; }
#grid .vrow.head { content-visibility: visible; background: #f4f4f4; }
#grid .ylabel { flex: none; width: 12em; padding: 2px 4px; overflow-wrap: anywhere; background: #f4f4f4; }
#grid .vcell { flex: none; width: calc(var(--n) * (var(--cell) + 2px)); padding: 2px; overflow-wrap: anywhere;
  border-left: 1px solid #ccc; }
#grid img { width: var(--cell); height: auto; border: 0; cursor: zoom-in; vertical-align: top; margin: 1px; }
#grid span.job { display: inline-block; vertical-align: top; width: var(--cell); min-height: calc(var(--row) - 8px);
  background: #e0e0e0; font-size: 0.8em; text-align: center; margin: 1px; }
#grid span.failed { background: #fbd5d5; }
#grid span.skipped { background: #fff0c2; }
"""

# The job table's filters and sorting, the compare view and the grid viewer: plain DOM, no library, inlined.
_JS = Path(__file__).with_name("index.js").read_text(encoding="utf-8")

_COMPARE = """
<div id="compare" hidden role="dialog" aria-label="image and its reference">
  <div class="pair">
    <figure><img class="job" alt="image"><figcaption>this job</figcaption></figure>
    <figure><img class="reference" alt="reference"><figcaption>reference (no LoRA)</figcaption></figure>
  </div>
  <div class="wipe"><img class="reference" alt="reference"><img class="over" alt="image over its reference"></div>
  <input type="range" min="0" max="100" value="50" aria-label="wipe between the image and its reference">
  <div class="caption"></div>
  <div>left/right: previous/next job, Esc: close <button type="button" class="close">close</button></div>
</div>
"""


def _esc(value: object) -> str:
    return html.escape(text(value), quote=True)


def _facts_html(facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in facts)
    return f'<table class="summary">{rows}</table>'


def _summary_html(summary: RunSummary, invocation: dict[str, str]) -> str:
    parts = ["<h2>Summary</h2>"]
    if invocation:
        parts += ["<h3>This invocation</h3>", _facts_html(list(invocation.items())), "<h3>Run</h3>"]
    parts.append(_facts_html(summary.facts))
    if summary.config_yaml:
        parts.append(
            f'<details><summary>Config of the latest invocation</summary><pre class="config">'
            f"{html.escape(summary.config_yaml)}</pre></details>"
        )
    return "\n".join(parts)


def _grids_html(run_dir: Path, grids: list[Path]) -> str:
    return _figures_html(run_dir, grids) if grids else "<p>No grids.</p>"


def _figures_html(run_dir: Path, grids: list[Path]) -> str:
    figures = []
    for grid in grids:
        link, name = href(run_dir, grid), _esc(Path(grid).name)
        figures.append(
            f'<figure><a href="{link}"><img src="{link}" alt="{name}"></a><figcaption>{name}</figcaption></figure>'
        )
    return "\n".join(figures)


def _thumb_html(run_dir: Path, image: str, link: str | None = None) -> str:
    """`link`: the image's href when known to exist (an ok job's), else it is looked up."""
    if not image:
        return ""
    if link is None and not (run_dir / image).is_file():
        return f"missing {_esc(image)}"
    link = link or href(run_dir, run_dir / image)
    return (
        f'<a class="open" href="{link}"><img src="{link}" loading="lazy" width="{THUMB}" class="thumb"'
        f' alt="{_esc(image)}"></a>'
    )


def _status(row: Mapping[str, object]) -> str:
    return text(row.get("status")) or "pending"


def _row_class(status: str) -> str:
    if status in ("failed", "skipped", "pending"):
        return f' class="{status}"'
    return ""


def _job_row_html(run_dir: Path, row: Mapping[str, object], images: dict[str, str], label: str) -> str:
    """One job; `label`: its stack state as a grid labels it (`ink 0.5`), shown in the stack column."""
    status = _status(row)
    cells = {name: _esc(row.get(name)) for name in INDEX_COLUMNS}
    cells["status"] = _esc(status)
    cells["stack"] = _esc(label)
    cells["size"] = f"{_esc(row.get('width'))}x{_esc(row.get('height'))}"
    job_id = text(row.get("job_id"))
    cells["image"] = _thumb_html(run_dir, text(row.get("image")), images.get(job_id))
    degenerate = text(row.get("degenerate"))
    classes = {"degenerate": "degenerate bad" if is_degenerate(degenerate) else "degenerate"}
    tds = "".join(f'<td class="{classes.get(name, name)}">{cells[name]}</td>' for name in INDEX_COLUMNS)
    data = "".join(f' data-{name}="{_esc(status if name == "status" else row.get(name))}"' for name in INDEX_FILTERS)
    data += "".join(f' data-{name}="{_esc(row.get(name))}"' for name in ("effect", "ssim"))
    data += f' data-label="{_esc(label)}"'
    if job_id in images:
        data += f' data-image="{images[job_id]}"'
        reference = images.get(text(row.get("reference")))
        data += f' data-reference-image="{reference}"' if reference else ""
    return f'<tr{_row_class(status)} title="{_esc(job_id)}"{data}>{tds}</tr>'


def _options(values: list[str], order: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    ranked = [v for v in order if v in counts] + [v for v in counts if v not in order]
    return [(v, counts[v]) for v in ranked]


def _filters_html(table: pd.DataFrame) -> str:
    selects = []
    for name in INDEX_FILTERS:
        if name == "status":
            values = [text(v) or "pending" for v in table.get("status", [""] * len(table))]
        else:
            values = [text(v) for v in table[name]] if name in table.columns else []
        options = "".join(
            f'<option value="{html.escape(v, quote=True)}">{_esc(v or "(empty)")} ({n})</option>'
            for v, n in _options(values, STATUSES if name == "status" else ())
        )
        selects.append(
            f'<label>{name} <select name="{name}" data-filter="{name}"><option value="">all</option>'
            f"{options}</select></label>"
        )
    bounds = "".join(
        f'<label>{label} <input type="number" step="any" data-column="{column}" data-bound="{bound}"'
        f' name="{column}-{bound}"></label>'
        for label, column, bound in (("effect &ge;", "effect", "min"), ("ssim &le;", "ssim", "max"))
    )
    return (
        f'<form class="filters">{"".join(selects)}{bounds}'
        '<label>search <input type="search" name="search" placeholder="any text"></label>'
        f'<span><span id="shown">{len(table)}</span> of {len(table)} shown</span></form>'
    )


def _jobs_html(run_dir: Path, table: pd.DataFrame, links: dict[str, str]) -> str:
    head = "".join(f"<th{' data-numeric' if name in INDEX_NUMERIC else ''}>{name}</th>" for name in INDEX_COLUMNS)
    images = {job_id: html.escape(link, quote=True) for job_id, link in links.items()}
    labels = stack_labels(table)
    # Records, not iterrows: a dict's get is what 10,000 rows can afford.
    rows = zip(table.to_dict("records"), labels, strict=True)
    body = "\n".join(_job_row_html(run_dir, row, images, label) for row, label in rows)
    return f'<table class="jobs"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def _progress_html(progress: Progress) -> str:
    if progress.finished:
        return ""
    seconds = f"{progress.refresh_seconds:g}"
    return (
        f'<p id="progress">Rendering: {progress.rendered} of {progress.total} rendered, {progress.failed} failed. '
        f'<label><input type="checkbox" id="live-reload" checked> reload every {seconds} s</label>'
        " until the run ends (the view stays as it is)</p>"
    )


_VIEWER = """<h2>Viewer</h2>
<form class="view">
<label>x <select name="x"></select></label>
<label>y <select name="y"></select></label>
<label>z <select name="z"></select></label>
<label>cell size <input type="range" name="size" step="1"></label> <span id="cell-size"></span>
<span id="viewer-shown"></span>
</form>
<div id="viewer-filters"></div>
<div id="grid"></div>"""


def _view(run_dir: Path, view: tuple[str, str, str | None] | None) -> tuple[str, str, str | None]:
    if view is not None:
        return view
    run = recorded(run_dir)  # the axes the run was rendered with, as `batchgen report` takes them
    return run.grid_x or "stack", run.grid_y or "prompt", run.grid_z


def build_index(
    table: pd.DataFrame,
    run_dir: Path,
    grids: list[Path],
    summary: dict[str, str] | None = None,
    plots: list[Path] = (),
    tradeoffs: list[Path] = (),
    view: tuple[str, str, str | None] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write run_dir/index.html atomically (a temp file, then os.replace), so that a browser reloading it while a
    run rewrites it reads the old page or the new one. `summary`: facts about the invocation that just ran, shown
    above the run's; `plots`: the strength curves (report.curves); `tradeoffs`: clip_i against clip_t
    (report.tradeoff); `view`: the viewer's x, y, z until the URL's fragment says otherwise (default: the recorded
    sweep.grid); `progress`: the run's counts while it renders (write_live_index), None once it has ended."""
    run_dir = Path(run_dir)
    title = _esc(f"batchgen run: {run_dir.resolve().name}")
    progress = progress or progress_of(table, finished=True)
    links = image_links(table, run_dir)
    data = viewer_data(table, links, _view(run_dir, view), progress)
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title><style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            _progress_html(progress),
            _summary_html(summarise(table, run_dir), summary or {}),
            _VIEWER,
            f"<h2>Grids ({len(grids)})</h2>",
            _grids_html(run_dir, grids),
            *([f"<h2>Strength curves ({len(plots)})</h2>", _figures_html(run_dir, plots)] if plots else []),
            *(
                [f"<h2>Concept vs prompt fidelity ({len(tradeoffs)})</h2>", _figures_html(run_dir, tradeoffs)]
                if tradeoffs
                else []
            ),
            f"<h2>Jobs ({len(table)})</h2>",
            _filters_html(table),
            _jobs_html(run_dir, table, links),
            _COMPARE,
            data_script(data),
            f"<script>{_JS}</script>",
            "</body></html>",
            "",
        ]
    )
    path = run_dir / "index.html"
    write_text(path, page)
    return path


def write_live_index(
    table: pd.DataFrame,
    run_dir: Path,
    grids: list[Path] = (),
    summary: dict[str, str] | None = None,
    view: tuple[str, str, str | None] | None = None,
    refresh_seconds: float = LIVE_REFRESH_SECONDS,
) -> Path:
    """index.html while a run renders, for the writer to call as rows land: the page says how many of the table's
    jobs have rendered and failed, and reloads itself every `refresh_seconds` (keeping its view) until a page
    written by build_index without `progress` (the run's end) replaces it."""
    progress = progress_of(table, finished=False, refresh_seconds=refresh_seconds)
    return build_index(table, run_dir, list(grids), summary, view=view, progress=progress)
