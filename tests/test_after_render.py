"""The steps after rendering are one function (report/after_render.py) for a render and `batchgen report`; the
manifest is read and written only by batchgen/manifest.py; an invocation's recorded settings are read typed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pandas as pd
import pytest

from batchgen.manifest import MANIFEST, Manifest, fill_cells, read_manifest, record_invocation, with_cells
from batchgen.report.invocations import Recorded, recorded

PACKAGE = Path(__file__).resolve().parent.parent / "batchgen"
SMALL = (
    "+sweep=styles",
    "sweep.models=[tiny_sd1]",
    "sweep.steps=2",
    "sweep.seeds=[1]",
    "sweep.slots.style=[ink]",
    "~sweep.stacks.peft",
    "~sweep.stacks.lycoris",
    "run.threads=1",
)


def _rows(run: Path) -> None:
    manifest = Manifest(run, slots=["style"])
    for job_id, status, style in (("a" * 16, "ok", "ink"), ("b" * 16, "failed", ""), ("a" * 16, "ok", "oil")):
        manifest.append({"job_id": job_id, "status": status, "style": style, "prompt": 'a, "quoted" cat'})
    manifest.close()


def test_fill_cells_changes_only_the_cells_it_is_given(tmp_path: Path) -> None:
    _rows(tmp_path)
    before = read_manifest(tmp_path)
    seen: list[pd.DataFrame] = []

    def cells_of(rows: pd.DataFrame) -> dict[int, dict[str, str]]:
        seen.append(rows)
        return {2: {"effect": "1.5", "degenerate": "no"}, 0: {"reference": "c" * 16}}

    assert fill_cells(tmp_path, cells_of) == 2
    assert seen[0].equals(before)  # it was handed the file as read_manifest reads it
    after = read_manifest(tmp_path)
    assert list(after.columns) == list(before.columns) and len(after) == 3
    expected = before.copy()
    expected.loc[2, ["effect", "degenerate"]] = ["1.5", "no"]
    expected.loc[0, "reference"] = "c" * 16
    assert after.equals(expected)
    assert not list(tmp_path.glob(".*.tmp"))


def test_fill_cells_with_nothing_to_change_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    _rows(tmp_path)
    data = (tmp_path / MANIFEST).read_bytes()
    assert fill_cells(tmp_path, lambda rows: {}) == 0
    assert (tmp_path / MANIFEST).read_bytes() == data


def test_with_cells_is_a_copy(tmp_path: Path) -> None:
    _rows(tmp_path)
    rows = read_manifest(tmp_path)
    changed = with_cells(rows, {1: {"error": "late"}})
    assert changed.loc[1, "error"] == "late" and rows.loc[1, "error"] == ""


def test_only_the_manifest_module_reads_or_writes_a_csv_table() -> None:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "manifest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("read_csv", "to_csv"):
                calls.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert calls == []


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {
                "sweep": {"name": "styles", "references": False, "grid": {"x": "seed", "y": "stack", "z": "style"}},
                "report": {"max_grid_megapixels": 16},
            },
            Recorded("styles", "seed", "stack", "style", 16, False),
        ),
        ({"sweep": {"name": "s", "grid": {"x": "", "z": None}, "references": "no"}}, Recorded("s")),
        ({"sweep": "styles", "report": ["x"]}, Recorded()),  # not sections: nothing recorded
        ({}, Recorded()),
    ],
)
def test_recorded_settings_are_read_typed(tmp_path: Path, config: dict, expected: Recorded) -> None:
    record_invocation(tmp_path, config, [])
    assert recorded(tmp_path) == expected


def test_nothing_recorded_reads_as_unrecorded(tmp_path: Path) -> None:
    assert recorded(tmp_path) == Recorded()


def _outputs(run: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("[gp]*/*.png"))}
    page = (run / "index.html").read_text(encoding="utf-8")
    # Only a render knows the invocation that just ran: its facts come first, under their own heading.
    page = re.sub(r"<h3>This invocation</h3>.*?<h3>Run</h3>\n", "", page, flags=re.S)
    return {**files, "index.html": page.encode(), MANIFEST: (run / MANIFEST).read_bytes()}


@pytest.mark.slow
def test_a_render_and_batchgen_report_write_the_same_grids_plots_and_index(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(*SMALL)
    assert code == 0, err
    run = tmp_path / "runs" / "styles"
    rendered = _outputs(run)
    assert "<h3>This invocation</h3>" in (run / "index.html").read_text(encoding="utf-8")
    assert any(name.startswith("grids/") for name in rendered) and any(name.startswith("plots/") for name in rendered)
    for path in [*run.glob("[gp]*/*.png"), run / "index.html"]:
        path.unlink()
    code, out, err = run_cli("report", "runs/styles")
    assert (code, err) == (0, "")  # the render measured every image already
    assert _outputs(run) == rendered
