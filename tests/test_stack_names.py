"""The manifest's `stack` holds the sweep's key; grids, index.html, diff and check label each state by that name
plus what varies between the stack's states; a manifest from before (content labels in `stack`) still reports."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
from PIL import Image

from batchgen.axes import state_labels
from batchgen.columns import PNG_STACK
from batchgen.config import SweepConfig
from batchgen.engine.writer import encode_row
from batchgen.plan import build_plan
from batchgen.report import diff, grids
from batchgen.report.check import CheckRequest, check_run
from batchgen.report.grids import MIN_LABEL_W, build_grids
from batchgen.report.index import build_index
from batchgen.spec import LoraFile, ModelSpec, RenderResult
from tests.synthetic import CELL, colour, write_manifest

V0 = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
SPEC = ModelSpec(
    "m",
    "sd-1",
    Path("/m/m"),
    "f" * 64,
    loras=(
        LoraFile("ink", Path("/l/ink"), "a" * 64),
        LoraFile("grain", Path("/l/grain"), "b" * 64),
        LoraFile("mylora-000002", Path("/l/mylora-000002"), "c" * 64, epoch=2, steps=380),
        LoraFile("mylora-000004", Path("/l/mylora-000004"), "d" * 64, epoch=4, steps=760),
    ),
)
STACKS = {
    "none": {},
    "ink": {"ink": [0.5, 1.0]},  # a weight list
    "ink_grain": {"ink": 0.8, "grain": 0.6},
    "split": {"ink": {"unet": 1.0, "text_encoder": 0.5}},
    "v0": {"ink": {"weight": 1, "blocks": V0}},
    "ink_out": {"ink": {"weight": 0.8, "blocks": ["ALL", "OUTD"]}},  # a block-weight list
    "epochs": {"mylora-*": 1.0},  # a glob
}


def _plan(prompts: list[str], stacks: dict = STACKS, **changes):
    # Every setting given: these models have no configs to take their own defaults from.
    sweep = SweepConfig(name="n", models=["m"], prompts=prompts, stacks=stacks, seeds=[1], steps=8, guidance_scale=7.5)
    return build_plan(replace(sweep, width=64, height=64, **changes), {"m": SPEC})


def _labels(plan) -> list[tuple[str, str]]:
    return list(zip(plan.table["stack"], state_labels(plan.table.to_dict("records"), plan.slots), strict=True))


# ---------------------------------------------------------------- the plan: manifest cells and labels


def test_the_stack_column_holds_the_key_and_a_label_adds_what_varies() -> None:
    plan = _plan(["a castle at night"])
    assert _labels(plan) == [
        ("none", "none"),
        ("ink", "ink 0.5"),
        ("ink", "ink 1"),
        ("ink_grain", "ink_grain"),
        ("split", "split"),
        ("v0", "v0"),
        ("ink_out", "ink_out: ink lbw=ALL"),
        ("ink_out", "ink_out: ink lbw=OUTD"),
        ("epochs", "epochs: mylora e2 (380 steps)"),
        ("epochs", "epochs: mylora e4 (760 steps)"),
    ]
    assert list(plan.table["loras"])[3:6] == ["grain:0.6;ink:0.8", "ink:1/0.5", f"ink:1:lbw={V0}"]
    assert len(plan.table[plan.table["stack"] == "ink_grain"]) == 1  # the user's name finds its rows
    renamed = _plan(["a castle at night"], {f"other_{name}": loras for name, loras in STACKS.items()})
    assert list(renamed.table["job_id"]) == list(plan.table["job_id"])  # names never enter a job_id
    # --dry-run counts the states, as a stack axis has columns
    assert plan.axis_counts()["stack"] == 10 and plan.table["stack"].nunique() == 7


def test_a_prompts_tags_follow_the_stacks_label_as_written_and_references_say_so() -> None:
    plan = _plan(["a knight <lora:ink:0.5>"], {"none": {}, "ink": STACKS["ink"]}, references=True)
    # `none` plus a tagged ink is never `none` alone; a weight is the one applied (the stack's plus the tag's)
    assert _labels(plan) == [
        ("none", "none + <lora:ink:0.5>"),
        ("ink", "ink 1 + <lora:ink:0.5>"),
        ("ink", "ink 1.5 + <lora:ink:0.5>"),
        ("(reference)", "(reference)"),
    ]
    assert list(plan.table["loras"]) == ["ink:0.5", "ink:1", "ink:1.5", ""]
    labels = dict(_labels(_plan(["a knight <lora:ink:0.5>"])))
    assert labels["ink_grain"] == "ink_grain + <lora:ink:0.5>" and labels["v0"] == "v0 + <lora:ink:0.5>"
    # A tag in a slot value counts as in the prompt; an untagged prompt's rows are the plain stack.
    slotted = _plan(["a knight, {s}", "a castle"], {"none": {}}, slots={"s": ["<lora:grain:1> ink"]})
    assert _labels(slotted) == [("none", "none + <lora:grain:1>"), ("none", "none"), ("(reference)", "(reference)")]


def test_the_png_chunk_keeps_naming_the_stack_by_its_content() -> None:
    plan = _plan(["a castle at night"])
    # What `stack` held before it held the key; a glob's files by the glob.
    assert list(plan.table[PNG_STACK]) == [
        "none",
        "ink 0.5",
        "ink 1",
        "grain 0.6 + ink 0.8",
        "ink 1/0.5",
        f"ink 1 lbw={V0}",
        "ink 0.8 lbw=ALL",
        "ink 0.8 lbw=OUTD",
        "mylora-* 1",
        "mylora-* 1",
    ]
    row = plan.table.to_dict("records")[3]
    recorded, data = encode_row({"m": SPEC}, row, RenderResult(row["job_id"], Image.new("RGB", (8, 8)), 0.1, "w"))
    with Image.open(io.BytesIO(data)) as img:
        chunk = json.loads(img.text["batchgen"])
    assert chunk["stack"] == "grain 0.6 + ink 0.8" and PNG_STACK not in chunk
    assert recorded["stack"] == "ink_grain"  # the manifest row keeps the key


# ---------------------------------------------------------------- grids and index.html from a run directory


def _run(run_dir: Path, states: list[tuple[str, str, str, str]], seeds: tuple[int, ...] = (1,)) -> pd.DataFrame:
    """A run with one ok job per (stack, loras, epoch, prompt template) and seed; job i is colour(i)."""
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for stack, loras, epoch, template in states:
            job_id = f"{len(rows):016x}"
            image = f"images/{job_id}.png"
            Image.new("RGB", (CELL, CELL), colour(len(rows))).save(run_dir / image)
            prompt = re.sub(r"\s*<lora:[^>]*>", "", template)
            rows.append(
                dict(
                    job_id=job_id,
                    status="ok",
                    model="m",
                    stack=stack,
                    loras=loras,
                    epoch=epoch,
                    prompt=prompt,
                    prompt_template=template,
                    seed=seed,
                    width=CELL,
                    height=CELL,
                    image=image,
                    error="",
                )
            )
    return pd.DataFrame(rows)


NEW = [
    ("none", "", "", "a castle"),
    ("ink", "ink:0.5", "", "a castle"),
    ("ink", "ink:1", "", "a castle"),
    ("ink_grain", "grain:0.6;ink:0.8", "", "a castle"),
    ("epochs", "mylora-000002:1", "mylora e2 (380 steps)", "a castle"),
    ("epochs", "mylora-000004:1", "mylora e4 (760 steps)", "a castle"),
    ("none", "ink:0.5", "", "a knight <lora:ink:0.5>"),
]
NEW_LABELS = [
    "none",
    "ink 0.5",
    "ink 1",
    "ink_grain",
    "epochs: mylora e2 (380 steps)",
    "epochs: mylora e4 (760 steps)",
    "none + <lora:ink:0.5>",
]


def _cell(grid: Image.Image, col: int, row: int, ncols: int, nrows: int) -> tuple[int, int, int]:
    return grid.getpixel(
        (grid.width - (ncols - col) * CELL + CELL // 2, grid.height - (nrows - row) * CELL + CELL // 2)
    )


def _grids(monkeypatch, table: pd.DataFrame, run_dir: Path, x: str, y: str) -> list[tuple[str, list, list, Path]]:
    """(title, column labels, row labels, path) of each grid built: the labels as they are drawn."""
    drawn, real = [], grids._render_grid

    def spy(rows, values, spec, *args):
        drawn.append(spec)
        return real(rows, values, spec, *args)

    monkeypatch.setattr(grids, "_render_grid", spy)
    paths = build_grids(table, run_dir, x, y, [])
    return [(spec.title, spec.columns, spec.rows, path) for spec, path in zip(drawn, paths, strict=True)]


def test_a_stack_axis_has_a_column_per_state_and_a_tagged_prompt_shows_its_tags(monkeypatch, tmp_path) -> None:
    table = _run(tmp_path, NEW)
    # One grid (epochs are in the labels, not a split); the tagged none job is in the none column, as its prompt
    # row names the tag.
    ((title, columns, rows, path),) = _grids(monkeypatch, table, tmp_path, "stack", "prompt")
    assert (title, columns) == ("model: m", [label for label in NEW_LABELS if "<" not in label])
    assert rows == ["a castle", "a knight <lora:ink:0.5>"]
    with Image.open(path) as img:
        grid = img.convert("RGB")
    assert (path.name, grid.width) == ("m.png", MIN_LABEL_W + 6 * CELL)
    assert [_cell(grid, c, 0, 6, 2) for c in range(6)] == [colour(i) for i in range(6)]
    assert _cell(grid, 0, 1, 6, 2) == colour(6)


def test_where_no_prompt_label_shows_a_tag_the_stack_label_does(monkeypatch, tmp_path) -> None:
    tagged = [("none", "ink:0.5", "", "a knight <lora:ink:0.5>"), ("ink", "ink:1", "", "a knight <lora:ink:0.5>")]
    table = _run(tmp_path, [*tagged, ("ink", "ink:1.5", "", "a knight <lora:ink:0.5>")], seeds=(1, 2))
    ((title, columns, rows, _),) = _grids(monkeypatch, table, tmp_path, "stack", "seed")
    assert (title, rows) == ("model: m", ["1", "2"])
    assert columns == ["none + <lora:ink:0.5>", "ink 1 + <lora:ink:0.5>", "ink 1.5 + <lora:ink:0.5>"]


def test_an_epoch_on_an_axis_or_in_a_title_leaves_the_stack_label(monkeypatch, tmp_path) -> None:
    table = _run(tmp_path, NEW[4:6], seeds=(1, 2))
    ((title, columns, rows, path),) = _grids(monkeypatch, table, tmp_path, "epoch", "seed")  # one grid
    assert (title, columns, rows) == ("model: m", ["mylora e2 (380 steps)", "mylora e4 (760 steps)"], ["1", "2"])
    with Image.open(path) as img:
        grid = img.convert("RGB")
    assert grid.width == MIN_LABEL_W + 2 * CELL
    assert [_cell(grid, c, r, 2, 2) for r in range(2) for c in range(2)] == [colour(i) for i in range(4)]
    titles = [drawn[0] for drawn in _grids(monkeypatch, table, tmp_path, "seed", "prompt")]
    assert titles == [
        "model: m, stack: epochs, epoch: mylora e2 (380 steps)",
        "model: m, stack: epochs, epoch: mylora e4 (760 steps)",
    ]


def test_index_shows_labels_and_filters_by_the_users_names(tmp_path: Path) -> None:
    table = _run(tmp_path, NEW)
    page = build_index(table, tmp_path, []).read_text(encoding="utf-8")
    rows = [line for line in page.split("<tbody>", 1)[1].splitlines() if line.startswith("<tr")]
    cells = [re.search(r'<td class="stack">(.*?)</td>', r).group(1) for r in rows]
    assert cells == [label.replace("<", "&lt;").replace(">", "&gt;") for label in NEW_LABELS]
    assert 'data-stack="none"' in rows[6] and 'data-label="none + &lt;lora:ink:0.5&gt;"' in rows[6]
    stack = re.search(r'<select name="stack" data-filter="stack">(.*?)</select>', page).group(1)
    assert stack == (
        '<option value="">all</option><option value="none">none (2)</option><option value="ink">ink (2)</option>'
        '<option value="ink_grain">ink_grain (1)</option><option value="epochs">epochs (2)</option>'
    )


def test_diff_and_check_name_a_job_by_its_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = _run(run, NEW[:3])
    table.loc[2, ["status", "image", "error"]] = ["failed", "", "boom"]
    write_manifest(run, table, slots=())
    assert [e.label for e in diff.load_run(run, "A").values()] == [
        "m | none | a castle | seed 1",
        "m | ink 0.5 | a castle | seed 1",
    ]
    problems = check_run(CheckRequest(run, max_failed=0)).problems
    assert problems[0] == 'failed (boom): model m, stack ink 1, prompt "a castle", seed 1 (job 0000000000000002)'


# ---------------------------------------------------------------- a manifest from before: content labels in `stack`

OLD = [
    ("none", "", "", "a castle"),
    ("ink 0.5", "ink:0.5", "", "a castle"),
    ("ink 1", "ink:1", "", "a castle"),
    ("grain 0.6 + ink 0.8", "grain:0.6;ink:0.8", "", "a castle"),
    ("mylora-* 1", "mylora-000002:1", "mylora e2 (380 steps)", "a castle"),
    ("mylora-* 1", "mylora-000004:1", "mylora e4 (760 steps)", "a castle"),
    ("ink 0.5", "ink:0.5", "", "a knight <lora:ink:0.5>"),  # the none stack with a tag: its content was the label
]


def test_batchgen_report_rebuilds_a_manifest_from_before_stacks_kept_their_names(cli, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "old"
    write_manifest(run, _run(run, OLD, seeds=(1, 2)), slots=())
    code, out, err = cli("report", "runs/old")
    assert code == 0, err
    assert out.startswith("2 grids, ") and out.endswith("runs/old/index.html\n")  # one per seed
    with Image.open(run / "grids" / "m__seed-1.png") as img:
        grid = img.convert("RGB")
    # The old labels stay (a tagged row's content label names what it applied); a glob's epochs get a column each.
    assert grid.width == MIN_LABEL_W + 6 * CELL
    assert [_cell(grid, c, 0, 6, 2) for c in range(6)] == [colour(i) for i in range(6)]
    assert _cell(grid, 1, 1, 6, 2) == colour(6)  # `ink 0.5` of the tagged prompt: the same column as the stack's
    page = (run / "index.html").read_text(encoding="utf-8")
    cells = re.findall(r'<td class="stack">(.*?)</td>', page)[:7]
    assert cells == [
        "none",
        "ink 0.5",
        "ink 1",
        "grain 0.6 + ink 0.8",
        "mylora-* 1: mylora e2 (380 steps)",
        "mylora-* 1: mylora e4 (760 steps)",
        "ink 0.5",
    ]
