"""run_dir/index.html: summary, grids, then the jobs as a filterable table with thumbnails.

Self-contained: inline CSS and JS, relative links only, so it works opened from disk, from any static server,
and after the run folder is moved or zipped.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from batchgen.cells import is_degenerate
from batchgen.columns import INDEX_COLUMNS, INDEX_FILTERS, INDEX_NUMERIC
from batchgen.report.files import href, write_text
from batchgen.report.labels import stack_labels
from batchgen.report.summary import STATUSES, RunSummary, summarise
from batchgen.report.text import text

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
#compare .pair img, #compare .wipe img { width: min(40vw, 512px); image-rendering: pixelated; border: 0; }
#compare .wipe { position: relative; line-height: 0; }
#compare .wipe img.over { position: absolute; left: 0; top: 0; }
#compare input[type=range] { width: min(40vw, 512px); }
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
    var bounds = [];
    form.querySelectorAll("input[data-bound]").forEach(function (input) {
      if (input.value !== "") bounds.push([input.getAttribute("data-column"), input.getAttribute("data-bound"),
                                           parseFloat(input.value)]);
    });
    var count = 0;
    rows.forEach(function (tr) {
      var ok = chosen.every(function (c) { return tr.getAttribute("data-" + c[0]) === c[1]; });
      ok = ok && bounds.every(function (b) {
        var raw = tr.getAttribute("data-" + b[0]);
        if (raw === null || raw === "") return false;  // unmeasured rows do not pass a bound
        return b[1] === "min" ? parseFloat(raw) >= b[2] : parseFloat(raw) <= b[2];
      });
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

  // Sort by a column on a click of its header; a second click reverses. Numbers sort as numbers, blanks last.
  var body = document.querySelector("table.jobs tbody");
  document.querySelectorAll("table.jobs th").forEach(function (th, index) {
    th.addEventListener("click", function () {
      var descending = th.getAttribute("aria-sort") === "ascending";
      document.querySelectorAll("table.jobs th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      var numeric = th.hasAttribute("data-numeric");
      var list = Array.prototype.slice.call(body.rows);
      list.sort(function (a, b) {
        var x = a.cells[index].textContent, y = b.cells[index].textContent;
        if (x === "" || y === "") return (x === "") - (y === "");
        var order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
        return descending ? -order : order;
      });
      list.forEach(function (tr) { body.appendChild(tr); });
    });
  });

  // A thumbnail opens the image beside its reference, with a wipe slider between the two; the arrow keys step
  // through the jobs shown, in their current order; Escape closes.
  var box = document.getElementById("compare");
  var current = null;
  function show(tr) {
    current = tr;
    var image = tr.getAttribute("data-image"), reference = tr.getAttribute("data-reference-image");
    box.querySelector("img.job").src = image;
    box.querySelector("img.over").src = image;
    var refs = box.querySelectorAll("img.reference");
    refs.forEach(function (img) { img.src = reference || image; });
    box.querySelector(".caption").textContent = tr.getAttribute("data-label") + " | " +
      tr.getAttribute("data-prompt") + " | effect " + (tr.getAttribute("data-effect") || "-") + ", ssim " +
      (tr.getAttribute("data-ssim") || "-") + (reference ? "" : " | no reference image");
    wipe();
    box.hidden = false;
  }
  function wipe() {
    var value = box.querySelector("input[type=range]").value;
    box.querySelector("img.over").style.clipPath = "inset(0 " + (100 - value) + "% 0 0)";
  }
  function step(delta) {
    var visible = Array.prototype.filter.call(body.rows, function (tr) {
      return !tr.hidden && tr.hasAttribute("data-image");
    });
    var at = visible.indexOf(current);
    if (visible.length) show(visible[(at + delta + visible.length) % visible.length]);
  }
  body.addEventListener("click", function (e) {
    var link = e.target.closest("a.open");
    if (!link) return;
    e.preventDefault();
    show(link.closest("tr"));
  });
  box.querySelector("input[type=range]").addEventListener("input", wipe);
  box.querySelector("button.close").addEventListener("click", function () { box.hidden = true; });
  document.addEventListener("keydown", function (e) {
    if (box.hidden) return;
    if (e.key === "ArrowRight" || e.key === "ArrowDown") { e.preventDefault(); step(1); }
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") { e.preventDefault(); step(-1); }
    else if (e.key === "Escape") box.hidden = true;
  });
})();
"""

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


def _thumb_html(run_dir: Path, image: str) -> str:
    if not image:
        return ""
    if not (run_dir / image).is_file():
        return f"missing {_esc(image)}"
    link = href(run_dir, run_dir / image)
    return (
        f'<a class="open" href="{link}"><img src="{link}" loading="lazy" width="{THUMB}" class="thumb"'
        f' alt="{_esc(image)}"></a>'
    )


def _status(row: pd.Series) -> str:
    return text(row.get("status")) or "pending"


def _row_class(status: str) -> str:
    if status in ("failed", "skipped", "pending"):
        return f' class="{status}"'
    return ""


def _job_row_html(run_dir: Path, row: pd.Series, images: dict[str, str], label: str) -> str:
    """One job; `label`: its stack state as a grid labels it (`ink 0.5`), shown in the stack column."""
    status = _status(row)
    cells = {name: _esc(row.get(name)) for name in INDEX_COLUMNS}
    cells["status"] = _esc(status)
    cells["stack"] = _esc(label)
    cells["size"] = f"{_esc(row.get('width'))}x{_esc(row.get('height'))}"
    cells["image"] = _thumb_html(run_dir, text(row.get("image")))
    degenerate = text(row.get("degenerate"))
    classes = {"degenerate": "degenerate bad" if is_degenerate(degenerate) else "degenerate"}
    tds = "".join(f'<td class="{classes.get(name, name)}">{cells[name]}</td>' for name in INDEX_COLUMNS)
    data = "".join(f' data-{name}="{_esc(status if name == "status" else row.get(name))}"' for name in INDEX_FILTERS)
    data += "".join(f' data-{name}="{_esc(row.get(name))}"' for name in ("effect", "ssim"))
    data += f' data-label="{_esc(label)}"'
    job_id = text(row.get("job_id"))
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


def _jobs_html(run_dir: Path, table: pd.DataFrame) -> str:
    head = "".join(f"<th{' data-numeric' if name in INDEX_NUMERIC else ''}>{name}</th>" for name in INDEX_COLUMNS)
    images = {
        text(row["job_id"]): href(run_dir, run_dir / text(row["image"]))
        for _, row in table.iterrows()
        if text(row.get("status")) == "ok" and text(row.get("image")) and (run_dir / text(row["image"])).is_file()
    }
    labels = stack_labels(table)
    rows = zip(table.iterrows(), labels, strict=True)
    body = "\n".join(_job_row_html(run_dir, row, images, label) for (_, row), label in rows)
    return f'<table class="jobs"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def build_index(
    table: pd.DataFrame,
    run_dir: Path,
    grids: list[Path],
    summary: dict[str, str] | None = None,
    plots: list[Path] = (),
    tradeoffs: list[Path] = (),
) -> Path:
    """Write run_dir/index.html. `summary`: facts about the invocation that just ran, shown above the run's;
    `plots`: the strength curves (report.curves); `tradeoffs`: clip_i against clip_t (report.tradeoff)."""
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
            *([f"<h2>Strength curves ({len(plots)})</h2>", _figures_html(run_dir, plots)] if plots else []),
            *(
                [f"<h2>Concept vs prompt fidelity ({len(tradeoffs)})</h2>", _figures_html(run_dir, tradeoffs)]
                if tradeoffs
                else []
            ),
            f"<h2>Jobs ({len(table)})</h2>",
            _filters_html(table),
            _jobs_html(run_dir, table),
            _COMPARE,
            f"<script>{_JS}</script>",
            "</body></html>",
            "",
        ]
    )
    path = run_dir / "index.html"
    write_text(path, page)
    return path
