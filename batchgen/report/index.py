"""run_dir/index.html: summary, grids, then the jobs as a filterable table with thumbnails.

Self-contained: inline CSS and JS, relative links only, so it works opened from disk, from any static server,
and after the run folder is moved or zipped.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from batchgen.report.files import href, write_text
from batchgen.report.summary import STATUSES, RunSummary, summarise
from batchgen.report.text import text

FILTERS = ("model", "stack", "prompt", "status")
JOB_COLUMNS = ("status", "model", "stack", "prompt", "seed", "steps", "guidance_scale", "size", "image", "error")
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
"""

# Plain DOM, no library: a row shows when every chosen filter equals its data-* value and the search text
# (any case) occurs in it.
_JS = """
(function () {
  var form = document.querySelector("form.filters");
  var rows = document.querySelectorAll("table.jobs tbody tr");
  var shown = document.getElementById("shown");
  function apply() {
    var chosen = [];
    form.querySelectorAll("select[data-filter]").forEach(function (s) {
      if (s.value !== "") chosen.push([s.getAttribute("data-filter"), s.value]);
    });
    var needle = form.querySelector("input[name=search]").value.toLowerCase();
    var count = 0;
    rows.forEach(function (tr) {
      var ok = chosen.every(function (c) { return tr.getAttribute("data-" + c[0]) === c[1]; });
      if (ok && needle) ok = tr.textContent.toLowerCase().indexOf(needle) !== -1;
      tr.hidden = !ok;
      if (ok) count += 1;
    });
    shown.textContent = String(count);
  }
  form.addEventListener("change", apply);
  form.addEventListener("input", apply);
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  apply();
})();
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
    if not grids:
        return "<p>No grids.</p>"
    figures = []
    for grid in grids:
        link, name = href(run_dir, grid), _esc(Path(grid).name)
        figures.append(
            f'<figure><a href="{link}"><img src="{link}" alt="{name}"></a><figcaption>{name}</figcaption></figure>'
        )
    return "\n".join(figures)


def _thumb_html(run_dir: Path, image: str) -> str:
    if not image:
        return ""
    if not (run_dir / image).is_file():
        return f"missing {_esc(image)}"
    link = href(run_dir, run_dir / image)
    return f'<a href="{link}"><img src="{link}" loading="lazy" width="{THUMB}" class="thumb" alt="{_esc(image)}"></a>'


def _status(row: pd.Series) -> str:
    return text(row.get("status")) or "pending"


def _row_class(status: str) -> str:
    if status in ("failed", "skipped", "pending"):
        return f' class="{status}"'
    return ""


def _job_row_html(run_dir: Path, row: pd.Series) -> str:
    status = _status(row)
    cells = {name: _esc(row.get(name)) for name in JOB_COLUMNS}
    cells["status"] = _esc(status)
    cells["size"] = f"{_esc(row.get('width'))}x{_esc(row.get('height'))}"
    cells["image"] = _thumb_html(run_dir, text(row.get("image")))
    tds = "".join(f'<td class="{name}">{cells[name]}</td>' for name in JOB_COLUMNS)
    data = "".join(f' data-{name}="{_esc(status if name == "status" else row.get(name))}"' for name in FILTERS)
    return f'<tr{_row_class(status)} title="{_esc(row.get("job_id"))}"{data}>{tds}</tr>'


def _options(values: list[str], order: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    ranked = [v for v in order if v in counts] + [v for v in counts if v not in order]
    return [(v, counts[v]) for v in ranked]


def _filters_html(table: pd.DataFrame) -> str:
    selects = []
    for name in FILTERS:
        if name == "status":
            values = [_status(row) for _, row in table.iterrows()]
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
    return (
        f'<form class="filters">{"".join(selects)}'
        '<label>search <input type="search" name="search" placeholder="any text"></label>'
        f'<span><span id="shown">{len(table)}</span> of {len(table)} shown</span></form>'
    )


def _jobs_html(run_dir: Path, table: pd.DataFrame) -> str:
    head = "".join(f"<th>{name}</th>" for name in JOB_COLUMNS)
    body = "\n".join(_job_row_html(run_dir, row) for _, row in table.iterrows())
    return f'<table class="jobs"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def build_index(
    table: pd.DataFrame, run_dir: Path, grids: list[Path], summary: dict[str, str] | None = None
) -> Path:
    """Write run_dir/index.html. `summary`: facts about the invocation that just ran, shown above the run's."""
    run_dir = Path(run_dir)
    title = _esc(f"batchgen run: {run_dir.resolve().name}")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title><style>{_CSS}</style></head><body>",
            f"<h1>{title}</h1>",
            _summary_html(summarise(table, run_dir), summary or {}),
            f"<h2>Grids ({len(grids)})</h2>",
            _grids_html(run_dir, grids),
            f"<h2>Jobs ({len(table)})</h2>",
            _filters_html(table),
            _jobs_html(run_dir, table),
            f"<script>{_JS}</script>",
            "</body></html>",
            "",
        ]
    )
    path = run_dir / "index.html"
    write_text(path, page)
    return path
