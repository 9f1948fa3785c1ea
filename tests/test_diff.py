"""`batchgen diff RUN_A RUN_B` on synthetic runs: matching, pixel measures, exit codes, outputs, errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from batchgen.report import diff
from tests.synthetic import CELL, colour, make_run, write_manifest

ALL_CHANNELS = CELL * CELL * 3


def two_runs(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    """runs/a and an identical copy runs/b: 6 ok jobs (one model, 3 stacks, 2 styles)."""
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    table = make_run(a, models=["m"])
    write_manifest(a, table)
    shutil.copytree(a, b)
    return a, b, table


def nudge(path: Path, xy: tuple[int, int], by: int) -> None:
    """Add `by` to the red channel of one pixel."""
    with Image.open(path) as img:
        image = img.convert("RGB")
    r, g, b = image.getpixel(xy)
    image.putpixel(xy, (r + by, g, b))
    image.save(path)


def test_identical_runs_exit_0(cli, tmp_path):
    two_runs(tmp_path)
    code, out, err = cli("diff", "runs/a", "runs/b")
    assert (code, err) == (0, "")
    assert out == (
        "A runs/a: 6 images; B runs/b: 6 images; matched by job_id: 6\n"
        "only in A: 0\nonly in B: 0\ndiffer by more than 0: 0\ndiffer within tolerance: 0\nidentical: 6\n"
        "wrote runs/b/diff/diff.csv\n"
    )
    assert not (tmp_path / "runs/b/diff/diff.png").exists()


def test_one_changed_pixel_fails_at_tolerance_0_and_passes_at_its_size(cli, tmp_path):
    _, b, table = two_runs(tmp_path)
    nudge(b / table.loc[3, "image"], (10, 20), 5)
    code, out, _ = cli("diff", "runs/a", "runs/b")
    assert code == 1
    mean = 5 / ALL_CHANNELS
    assert f"differ by more than 0: 1\n  0000000000000003  max 5  mean {mean:.3f}  m | ink 0.8 + grain 0.6 |" in out
    rows = list(csv.DictReader((b / "diff" / "diff.csv").open()))
    assert [(r["kind"], r["job_id_a"]) for r in rows if r["kind"] != "identical"] == [("changed", "0000000000000003")]
    assert rows[3]["max_diff"] == "5" and float(rows[3]["mean_diff"]) == pytest.approx(mean, abs=1e-4)
    code, out, _ = cli("diff", "runs/a", "runs/b", "--tolerance", "5")
    assert code == 0
    assert "differ by more than 5: 0\ndiffer within tolerance: 1\nidentical: 5\n" in out


def test_diff_grid_shows_a_b_and_the_stretched_difference(tmp_path):
    a, b, table = two_runs(tmp_path)
    nudge(b / table.loc[3, "image"], (10, 20), 5)
    result = diff.compare_runs(a, b)
    written = diff.write_outputs(result, tmp_path / "out")
    assert [p.name for p in written] == ["diff.png", "diff.csv"]
    with Image.open(written[0]) as img:
        sheet = img.convert("RGB")
    assert sheet.width == diff.MIN_LABEL_W + 3 * CELL
    top = sheet.height - CELL  # one row of cells under the header band
    left = diff.MIN_LABEL_W
    assert sheet.getpixel((left + 1, top + 1)) == colour(3)  # A
    r, g, bl = colour(3)
    assert sheet.getpixel((left + CELL + 10, top + 20)) == (r + 5, g, bl)  # B, with its nudged pixel
    assert sheet.getpixel((left + 2 * CELL + 10, top + 20)) == (255, 0, 0)  # 5 stretched to 255, red only
    assert sheet.getpixel((left + 2 * CELL + 11, top + 20)) == (0, 0, 0)


def test_jobs_on_one_side_are_listed_but_do_not_fail(cli, tmp_path):
    a, b, table = two_runs(tmp_path)
    (b / "manifest.csv").unlink()
    extra = table.iloc[[0]].assign(job_id="00000000000000ff", image="images/00000000000000ff.png")
    Image.new("RGB", (CELL, CELL), colour(99)).save(b / "images" / "00000000000000ff.png")
    write_manifest(b, pd.concat([table.iloc[1:], extra], ignore_index=True))
    code, out, _ = cli("diff", "runs/a", "runs/b")
    assert code == 0
    label = "m | none | a portrait of <alf> in ink drawing | seed 1"
    assert f"only in A: 1\n  0000000000000000  {label}\nonly in B: 1\n  00000000000000ff  {label}\n" in out
    assert "identical: 5\n" in out
    kinds = [r["kind"] for r in csv.DictReader((b / "diff" / "diff.csv").open())]
    assert kinds == ["only_a", "only_b", *["identical"] * 5]


def test_by_settings_matches_jobs_whose_files_changed(cli, tmp_path):
    a, b, table = two_runs(tmp_path)
    (b / "manifest.csv").unlink()
    renamed = table.assign(job_id=[f"{i:016x}".replace("0", "e", 1) for i in range(len(table))])
    write_manifest(b, renamed)  # same images, same settings, new ids (as after a LoRA file update)
    code, out, _ = cli("diff", "runs/a", "runs/b")
    assert code == 0 and "only in A: 6" in out and "matched by job_id: 0" in out
    nudge(b / table.loc[0, "image"], (0, 0), 1)
    code, out, _ = cli("diff", "runs/a", "runs/b", "--by", "settings")
    assert code == 1
    assert "matched by settings: 6" in out
    assert "  0000000000000000 -> e000000000000000  max 1  mean 0.000  m | none |" in out


def test_latest_ok_row_of_a_job_is_the_one_compared(tmp_path):
    a, b, table = two_runs(tmp_path)
    Image.new("RGB", (CELL, CELL), colour(50)).save(a / "images" / "old.png")
    (a / "manifest.csv").unlink()
    first = table.iloc[[2]].assign(image="images/old.png")  # an earlier render of job 2, then a failed retry
    failed = table.iloc[[2]].assign(status="failed", image="", error="boom")
    write_manifest(a, pd.concat([first, failed, table], ignore_index=True))
    result = diff.compare_runs(a, b)
    assert result.exit_code == 0 and result.identical == 6 and result.count_a == 6


def test_size_mismatch_and_missing_image_count_as_changed(cli, tmp_path):
    _, b, table = two_runs(tmp_path)
    Image.new("RGB", (CELL, CELL // 2), colour(1)).save(b / table.loc[1, "image"])
    (b / table.loc[2, "image"]).unlink()
    code, out, _ = cli("diff", "runs/a", "runs/b")
    assert code == 1
    label = "m | none | a portrait of <alf> in <cartoona> style | seed 1"
    assert f"  0000000000000001  max 255  mean 255.000  {label}  (size 64x64 in A, 64x32 in B)\n" in out
    assert "(B image missing (runs/b/images/0000000000000002.png))" in out
    assert (b / "diff" / "diff.png").is_file()


def test_stale_diff_pages_are_removed(tmp_path):
    a, b, table = two_runs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "diff-p1.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert [p.name for p in diff.write_outputs(diff.compare_runs(a, b), out)] == ["diff.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["diff.csv", "notes.txt"]


def test_many_changes_are_split_into_pages(tmp_path):
    a, b, table = two_runs(tmp_path)
    for image in table["image"]:
        nudge(b / image, (0, 0), 9)
    result = diff.compare_runs(a, b)
    sheet, _ = diff._sheet(result.changed)
    limit = sheet.size(4)[0] * sheet.size(4)[1] / 1e6  # four rows per page
    paths = diff.diff_grids(result, tmp_path / "out", max_megapixels=limit)
    assert [p.name for p in paths] == ["diff-p1.png", "diff-p2.png"]
    with Image.open(paths[1]) as img:
        assert img.size == sheet.size(2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("diff", "runs/nope", "runs/b"), "RUN_A runs/nope: no such run directory; pass one such as runs/styles"),
        (("diff", "runs/a", "runs/empty"), "RUN_B runs/empty: no manifest.csv here; pass a run directory such as"),
        (("diff", "runs/a", "runs/b", "--tolerance", "256"), "--tolerance 256: give a pixel difference from 0 to 255"),
        (("diff", "runs/a", "runs/b", "--by", "name"), "--by name: unknown; use one of job_id, settings"),
        (("diff", "runs/a", "runs/b", "--out", "runs/a/manifest.csv"), "--out runs/a/manifest.csv: exists and is not"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, message):
    two_runs(tmp_path)
    (tmp_path / "runs" / "empty").mkdir()
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith(f"batchgen: error: {message}") and err.count("\n") == 1
