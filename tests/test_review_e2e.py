"""One real render of the tiny models, then everything a reviewer does with it: grids on a LoRA weight axis,
index.html, `report`, `diff` against a copy, and rebuilding a lost manifest from the PNGs."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from batchgen.cells import stack_label
from batchgen.manifest import read_manifest

ARGS = ("+sweep=styles", "sweep.seeds=[1]", "sweep.models=[tiny_sd1]", "sweep.grid.x=weight:ink")
GRIDS = [
    "tiny_sd1__others-grain_0.6.png",
    "tiny_sd1__others-hatch_0.7___kron_0.5.png",
    "tiny_sd1__others-none.png",
    "tiny_sd1__others-peft_sketch_0.8.png",
]
VOLATILE = ["seconds", "worker", "finished_at", "timings", "dtype"]  # not in a PNG, so not recovered


def test_render_then_review_report_diff_and_recover(run_cli) -> None:
    code, out, err = run_cli(*ARGS)
    assert code == 0, err
    run = Path("runs/styles")
    table = read_manifest(run)
    assert len(table) == 18 and set(table["status"]) == {"ok"}  # 6 stack states x 3 prompts
    assert sorted(p.name for p in (run / "grids").iterdir()) == GRIDS
    assert set(table.loc[table["prompt_template"] == "a castle at night, watercolor", "style"]) == {""}  # not "nan"

    # x = ink's weight: the grid of stacks with nothing else holds no ink, ink 0.5, ink 1, each cell the job's image
    with Image.open(run / "grids" / "tiny_sd1__others-none.png") as img:
        grid = img.convert("RGB")
    assert grid.width == 160 + 3 * 64
    castle = table[(table["prompt"] == "a castle at night, watercolor") & (table["loras"] == "ink:0.5")].iloc[0]
    with Image.open(run / castle["image"]) as img:
        expected = img.convert("RGB")
    cell = grid.crop((160 + 64, grid.height - 64, 160 + 128, grid.height))  # castle is the last prompt row
    assert cell.tobytes() == expected.tobytes()

    page = (run / "index.html").read_text(encoding="utf-8")
    assert "<h3>This invocation</h3>" in page and page.count('data-status="ok"') == 18
    (run / "index.html").unlink()
    code, out, _ = run_cli("report", "runs/styles")  # the recorded axes, weight:ink included
    assert code == 0 and out == "4 grids, 1 strength plots, runs/styles/index.html\n"
    assert sorted(p.name for p in (run / "grids").iterdir()) == GRIDS

    shutil.copytree(run, "runs/copy")
    code, out, _ = run_cli("diff", "runs/styles", "runs/copy")
    assert code == 0 and "matched by job_id: 18\n" in out and "identical: 18\n" in out

    (run / "manifest.csv").rename(run / "manifest.old.csv")
    code, out, err = run_cli("report", "runs/styles", "--from-pngs")
    assert code == 0 and err == (
        "rebuilt runs/styles/manifest.csv: 18 jobs from their PNGs\n"
        "measured 18 images (effect, ssim, degenerate) into the manifest\n"  # the PNGs do not carry the numbers
    )
    recovered = read_manifest(run).drop(columns=VOLATILE).set_index("job_id").sort_index()
    original = table.drop(columns=VOLATILE).set_index("job_id").sort_index()
    assert list(recovered.columns) == list(original.columns)
    # The PNGs name a stack by its content, as before `stack` held the sweep's key (so their bytes did not change):
    # the recovered rows have that label (`grain 0.6 + ink 0.8`), not the key, and report as an older manifest.
    assert list(recovered["stack"]) == [stack_label(loras) for loras in original["loras"]]
    assert recovered.drop(columns="stack").equals(original.drop(columns="stack"))
    code, out, _ = run_cli(*ARGS)
    assert code == 0 and "rendered 0, failed 0, skipped 0, already done 18" in out
