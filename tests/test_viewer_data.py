"""The grid viewer's data in index.html (report/viewer.py): the axes `batchgen report --x/--y` accepts, each job's
value on them as the grids label it, images, the default view and the live flag; no browser (test_browser.py
draws it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from batchgen.axes import choices
from batchgen.manifest import record_invocation
from batchgen.report.index import build_index, write_live_index
from batchgen.report.labels import stack_labels
from tests.synthetic import make_run

_DATA = re.compile(r'<script type="application/json" id="viewer-data">(.*?)</script>', re.S)


def page_data(page: Path) -> dict:
    (found,) = _DATA.findall(page.read_text(encoding="utf-8"))
    return json.loads(found)


def values(data: dict, axis: str) -> list[str]:
    """Each job's value on `axis`, from the page's data."""
    (entry,) = [a for a in data["axes"] if a["name"] == axis]
    return [entry["values"][i] for i in entry.get("rows", [0] * len(data["id"]))]


def test_axes_are_those_batchgen_report_accepts_with_each_jobs_value(tmp_path: Path) -> None:
    table = make_run(tmp_path, seeds=[1, 2], skip={1})
    data = page_data(build_index(table, tmp_path, []))
    assert [a["name"] for a in data["axes"]] == choices(["style"], ["grain", "ink"])
    assert data["id"] == list(table["job_id"])
    assert values(data, "seed") == [str(s) for s in table["seed"]]
    assert values(data, "style") == list(table["style"])
    assert values(data, "weight:ink") == [
        {"none": "no ink", "ink 0.5": "ink 0.5", "ink 0.8 + grain 0.6": "ink 0.8"}[s] for s in table["stack"]
    ]
    weight = next(a for a in data["axes"] if a["name"] == "weight:ink")
    assert (weight["title"], weight["values"]) == ("ink weight", ["no ink", "ink 0.5", "ink 0.8"])  # ascending
    steps = next(a for a in data["axes"] if a["name"] == "steps")
    assert steps == {"name": "steps", "title": "steps", "values": ["20"]}  # one value: no per-job list
    assert data["status"] == "os" + "o" * 22
    assert data["image"] == [1, 0] + [1] * 22  # 1: images/<job_id>.png; 0: none (the skipped job)
    assert data["full"] == 64


def test_stack_labels_leave_out_what_an_axis_beside_them_shows(tmp_path: Path) -> None:
    table = make_run(tmp_path, seeds=[1])
    data = page_data(build_index(table, tmp_path, []))
    stack = data["stack"]
    for beside in ["", "weight:ink", "weight:grain|weight:ink"]:
        entry = stack["labels"][stack["variants"][beside]]
        shown = entry["values"]
        labels = [shown[i] for i in entry["rows"]]
        assert labels == list(stack_labels(table, ["prompt", *filter(None, beside.split("|"))])), beside
    assert values(data, "stack") == list(stack_labels(table, ["prompt"]))  # the filter's values
    # A weight axis takes the weight out of `ink 0.5`'s label: with ink's weight on x, it reads like `none`.
    assert stack["labels"][stack["variants"]["weight:ink"]]["values"] == ["none", "ink 0.8 + grain 0.6"]


def test_images_are_url_quoted_links_and_a_missing_file_has_none(tmp_path: Path) -> None:
    table = make_run(tmp_path, models=["m"], stacks=["none"], styles=["a", "b"])
    (tmp_path / "images" / "a b#1.png").write_bytes((tmp_path / table.loc[0, "image"]).read_bytes())
    table.loc[0, "image"] = "images/a b#1.png"
    (tmp_path / table.loc[1, "image"]).unlink()
    data = page_data(build_index(table, tmp_path, []))
    assert data["image"] == ["images/a%20b%231.png", 0]


def test_no_text_in_the_data_can_end_its_script_element(tmp_path: Path) -> None:
    table = make_run(tmp_path, models=["m"], stacks=["none"], styles=["a"])
    table.loc[0, "prompt"] = "</script><script>alert(1)</script> & <b>"
    page = build_index(table, tmp_path, [])
    (raw,) = _DATA.findall(page.read_text(encoding="utf-8"))
    assert "<" not in raw
    assert values(json.loads(raw), "prompt") == ["</script><script>alert(1)</script> & <b>"]


def test_the_view_is_the_recorded_grid_unless_given(tmp_path: Path) -> None:
    table = make_run(tmp_path, seeds=[1, 2])
    assert page_data(build_index(table, tmp_path, []))["view"] == {"x": "stack", "y": "prompt", "z": ""}
    record_invocation(tmp_path, {"sweep": {"name": "s", "grid": {"x": "seed", "y": "style", "z": "model"}}}, [])
    assert page_data(build_index(table, tmp_path, []))["view"] == {"x": "seed", "y": "style", "z": "model"}
    given = build_index(table, tmp_path, [], view=("weight:ink", "seed", None))
    assert page_data(given)["view"] == {"x": "weight:ink", "y": "seed", "z": ""}


def test_a_live_page_says_the_run_renders_until_a_finished_page_replaces_it(tmp_path: Path) -> None:
    table = make_run(tmp_path, seeds=[1, 2], skip={1})
    table.loc[20:, ["status", "image"]] = ["", ""]  # 4 jobs still to render
    table.loc[19, ["status", "image", "error"]] = ["failed", "", "RuntimeError: boom"]
    page = write_live_index(table, tmp_path, refresh_seconds=2)
    assert page == tmp_path / "index.html"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["index.html"]  # written through a temp file
    data = page_data(page)
    assert data["live"] == {"finished": False, "rendered": 18, "failed": 1, "total": 23, "refresh": 2}
    text = page.read_text(encoding="utf-8")
    assert '<p id="progress">Rendering: 18 of 23 rendered, 1 failed. ' in text
    assert "reload every 2 s" in text

    finished = page_data(build_index(table.assign(status="ok"), tmp_path, []))
    assert finished["live"]["finished"] is True
    assert 'id="progress"' not in page.read_text(encoding="utf-8")


def test_ten_thousand_jobs_are_compact(tmp_path: Path) -> None:
    rows = [
        {"job_id": f"{i:016x}", "status": "ok", "model": "m", "stack": "none", "prompt": f"prompt {i % 10}",
         "seed": i // 10, "image": f"images/{i:016x}.png"}
        for i in range(10_000)
    ]  # fmt: skip
    page = build_index(pd.DataFrame(rows), tmp_path, [])
    (raw,) = _DATA.findall(page.read_text(encoding="utf-8"))
    # ids (19 bytes each), a status character, an image code and two axis indexes per job: about 40 bytes a job
    assert len(raw) < 45 * 10_000
    assert values(json.loads(raw), "seed")[-1] == "999"
