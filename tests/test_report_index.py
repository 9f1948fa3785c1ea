"""index.html (summary, filters, links) and `batchgen report`, from manifests and from PNGs alone; no rendering."""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from batchgen.columns import MANIFEST_COLUMNS
from batchgen.engine.png import encode_png
from batchgen.manifest import completed_jobs, latest_rows, read_manifest, record_invocation
from batchgen.report.index import build_index
from tests.synthetic import STYLES, colour, make_run, write_manifest

VOLATILE = {"status", "image", "image_sha256", "error", "seconds", "worker", "finished_at", "timings"}


def mixed_run(run: Path) -> pd.DataFrame:
    """12 jobs: one failed, one skipped, the rest ok, with seconds and stage timings."""
    table = make_run(run, skip={1})
    table.loc[4, ["status", "error", "image"]] = ["failed", "RuntimeError: boom <x>", ""]
    table["seconds"] = [0.5 if s == "ok" else None for s in table["status"]]
    table["timings"] = ["load=0.1000;denoise=0.3000;write=0.1000" if s == "ok" else "" for s in table["status"]]
    stamps = [f"2026-01-01T10:00:{i:02d}+0000" for i in range(len(table))]
    table["finished_at"] = [t if s == "ok" else "" for t, s in zip(stamps, table["status"], strict=True)]
    return table


def page_rows(page: str) -> list[str]:
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [line for line in body.splitlines() if line.startswith("<tr")]


# ---------------------------------------------------------------- index.html


def test_filters_offer_each_value_with_its_count(tmp_path):
    table = mixed_run(tmp_path)
    page = build_index(table, tmp_path, []).read_text(encoding="utf-8")
    status = re.search(r'<select name="status" data-filter="status">(.*?)</select>', page).group(1)
    assert status == (
        '<option value="">all</option><option value="ok">ok (10)</option>'
        '<option value="failed">failed (1)</option><option value="skipped">skipped (1)</option>'
    )
    model = re.search(r'<select name="model" data-filter="model">(.*?)</select>', page).group(1)
    assert '<option value="tiny_sd1">tiny_sd1 (6)</option><option value="tiny_sdxl">tiny_sdxl (6)</option>' in model
    stack = re.search(r'<select name="stack" data-filter="stack">(.*?)</select>', page).group(1)
    assert '<option value="ink 0.8 + grain 0.6">ink 0.8 + grain 0.6 (4)</option>' in stack
    prompt = re.search(r'<select name="prompt" data-filter="prompt">(.*?)</select>', page).group(1)
    assert '<option value="a portrait of &lt;alf&gt; in ink drawing">' in prompt
    assert '<span id="shown">12</span> of 12 shown' in page


def test_rows_carry_filter_values_and_failed_rows_their_reason(tmp_path):
    table = mixed_run(tmp_path)
    rows = page_rows(build_index(table, tmp_path, []).read_text(encoding="utf-8"))
    assert len(rows) == 12
    assert rows[4].startswith('<tr class="failed" title="0000000000000004" data-model="tiny_sd1" data-stack=')
    assert 'data-status="failed"' in rows[4] and '<td class="error">RuntimeError: boom &lt;x&gt;</td>' in rows[4]
    assert rows[1].startswith('<tr class="skipped"') and "has no file for tiny_sd1</td>" in rows[1]
    assert rows[0].startswith('<tr title="0000000000000000" data-model="tiny_sd1" data-stack="none" data-prompt=')
    assert 'data-status="ok"' in rows[0]


def test_summary_shows_counts_timings_overrides_and_config(tmp_path):
    table = mixed_run(tmp_path)
    write_manifest(tmp_path, table)
    record_invocation(tmp_path, {"sweep": {"name": "styles", "grid": {"x": "stack"}}}, ["+sweep=styles", "a=<b>"])
    page = build_index(table, tmp_path, [], {"rendered now": "10"}).read_text(encoding="utf-8")
    facts = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page))
    assert facts["rendered now"] == "10"
    assert facts["sweep"] == "styles"
    assert facts["invocations"] == "1"
    assert facts["latest overrides"] == "+sweep=styles a=&lt;b&gt;"
    assert facts["jobs"] == "12: 10 ok, 1 failed, 1 skipped, 0 pending"
    assert facts["render time"] == "5.0 s for 10 images (0.50 s per image)"
    assert facts["stages"] == "load 1.00 s, denoise 3.00 s, write 1.00 s"
    assert facts["finished"] == "2026-01-01T10:00:00+0000 .. 2026-01-01T10:00:11+0000"
    config = re.search(r'<pre class="config">(.*?)</pre>', page, re.S).group(1)
    assert html.unescape(config) == "sweep:\n  name: styles\n  grid:\n    x: stack\n"
    assert page.index("<h3>This invocation</h3>") < page.index("<h3>Run</h3>") < page.index("Grids (0)")


def test_page_is_self_contained_and_every_link_resolves(tmp_path):
    from batchgen.report.grids import build_grids

    table = mixed_run(tmp_path)
    grids = build_grids(table, tmp_path, "stack", "style", ["style"])
    page = build_index(table, tmp_path, grids).read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(links) == 2 * 10 + 2 * len(grids)  # a link and an image per thumbnail and per grid
    for link in links:
        assert not re.match(r"^[a-z]+:|^/", link), link
        assert (tmp_path / html.unescape(link)).is_file(), link
    assert "<link" not in page and "<script src" not in page and "@import" not in page
    assert page.count("<script>") == 1 and page.count("<style>") == 1


def test_links_to_odd_file_names_are_url_quoted(tmp_path):
    table = make_run(tmp_path, models=["m"], stacks=["none"], styles=["a"])
    (tmp_path / "images" / "a b#1.png").write_bytes((tmp_path / table.loc[0, "image"]).read_bytes())
    table.loc[0, "image"] = "images/a b#1.png"
    page = build_index(table, tmp_path, []).read_text(encoding="utf-8")
    assert '<a class="open" href="images/a%20b%231.png"><img src="images/a%20b%231.png"' in page


# ---------------------------------------------------------------- batchgen report RUN_DIR


def test_latest_rows_keeps_the_last_ok_row_in_first_render_order(tmp_path):
    hashes = {}
    for job in "abc":
        Image.new("RGB", (8, 8), colour(ord(job))).save(tmp_path / f"{job}.png")
        hashes[job] = hashlib.sha256((tmp_path / f"{job}.png").read_bytes()).hexdigest()
    manifest = pd.DataFrame(
        {
            "job_id": ["s", "t", "a", "b", "a", "c", "b", "c"],
            "status": ["skipped", "skipped", "failed", "ok", "ok", "ok", "failed", "failed"],
            "error": ["no ink", "no ink", "x", "", "", "", "late", "later"],
            "image": ["", "", "", "b.png", "a.png", "c.png", "", ""],
            "image_sha256": ["", "", "", hashes["b"], hashes["a"], hashes["c"], "", ""],
        }
    )
    rows = latest_rows(manifest, tmp_path)
    assert list(rows["job_id"]) == ["a", "b", "c", "s", "t"]  # skipped rows come first in a manifest, not here
    assert list(rows["status"]) == ["ok", "ok", "ok", "skipped", "skipped"]  # ok beats a later failure
    (tmp_path / "c.png").unlink()
    rows = latest_rows(manifest, tmp_path)
    assert list(rows["status"]) == ["ok", "ok", "failed", "skipped", "skipped"]  # unless its image is gone
    assert rows.loc[2, "error"] == "later"


def test_report_rebuilds_from_the_manifest_with_the_recorded_axes(cli, tmp_path):
    run = tmp_path / "runs" / "styles"
    table = mixed_run(run)
    rerun = table.iloc[[4]].assign(status="ok", error="", image="images/0000000000000004.png", seconds=0.5)
    Image.new("RGB", (64, 64), colour(4)).save(run / "images" / "0000000000000004.png")
    write_manifest(run, pd.concat([table, rerun], ignore_index=True))  # job 4 failed, then rendered
    record_invocation(run, {"sweep": {"name": "styles", "grid": {"x": "style", "y": "stack", "z": None}}}, [])
    code, out, err = cli("report", "runs/styles")
    # a run from before batchgen measured: its ok images get `degenerate` now (solid colours: flat)
    assert (code, err) == (0, "measured 11 images (effect, ssim, degenerate) into the manifest\n")
    assert out == "2 grids, 2 strength plots, runs/styles/index.html\n"
    assert sorted(p.name for p in (run / "grids").iterdir()) == ["tiny_sd1.png", "tiny_sdxl.png"]
    with Image.open(run / "grids" / "tiny_sd1.png") as img:
        assert img.width == 160 + 2 * 64  # x is the recorded style axis: two columns
    rows = page_rows((run / "index.html").read_text(encoding="utf-8"))
    assert len(rows) == 12 and not rows[4].startswith('<tr class="failed"')
    code, out, _ = cli("report", "runs/styles", "--x", "seed", "--y", "stack", "--z", "style")
    assert code == 0 and out == "2 grids, 2 strength plots, runs/styles/index.html\n"
    with Image.open(run / "grids" / "tiny_sd1.png") as img:
        assert img.width == 160 + 2 * 64 + 64 // 8  # one seed column in each of two style sub-grids


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("report", "runs/nope"), "runs/nope: no such run directory; pass one such as runs/styles"),
        (
            ("report", "runs/empty"),
            "runs/empty: no manifest.csv here; pass a run directory such as runs/styles, "
            "or rebuild the manifest from the PNGs' metadata with --from-pngs",
        ),
        (("report", "runs/empty", "--from-pngs"), "runs/empty/images: no batchgen PNGs to rebuild a manifest from"),
        (("report", "runs/ok", "--x", "sed"), "sweep.grid.x: unknown axis 'sed' (did you mean 'seed'?); choose"),
        (("report", "runs/ok", "--from-pngs"), "runs/ok/manifest.csv exists; --from-pngs only rebuilds a missing"),
        (("report", "runs/ok", "--max-megapixels", "0"), "report.max_grid_megapixels: 0.0 is not a positive number"),
    ],
)
def test_report_errors_are_one_line_with_the_fix(cli, tmp_path, args, message):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    write_manifest(tmp_path / "runs" / "ok", make_run(tmp_path / "runs" / "ok", models=["m"]))
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith(f"batchgen: error: {message}") and err.count("\n") == 1


def png_only_run(run: Path) -> pd.DataFrame:
    """The PNGs a render writes (parameters + batchgen JSON chunk), and no manifest."""
    table = make_run(run, models=["m"], skip={1})
    table["prompt_template"] = [t if i != 2 else "a castle" for i, t in enumerate(table["prompt_template"])]
    table["style"] = [s if i != 2 else float("nan") for i, s in enumerate(table["style"])]  # the slot is unused
    for row in table.to_dict("records"):
        if row["status"] != "ok":
            continue
        path = run / row["image"]
        with Image.open(path) as img:
            data = encode_png(img.convert("RGB"), row["prompt"], {k: v for k, v in row.items() if k not in VOLATILE})
        path.write_bytes(data)
    return table


def test_report_from_pngs_rebuilds_the_manifest(cli, tmp_path):
    run = tmp_path / "runs" / "lost"
    table = png_only_run(run)
    Image.new("RGB", (8, 8)).save(run / "images" / "foreign.png")
    code, out, err = cli("report", "runs/lost", "--from-pngs")
    assert code == 0 and out == "1 grids, 1 strength plots, runs/lost/index.html\n"
    assert err == (
        "batchgen: ignored runs/lost/images/foreign.png: no 'batchgen' text chunk\n"
        "rebuilt runs/lost/manifest.csv: 5 jobs from their PNGs\n"
        "measured 5 images (effect, ssim, degenerate) into the manifest\n"
    )
    manifest = read_manifest(run)
    assert list(manifest.columns) == [*MANIFEST_COLUMNS, "style"]
    ok = table[table["status"] == "ok"]
    # sorted as text by model, stack, template, then prompt ('<' before 'i'; the 'a castle' template first)
    assert [int(j, 16) for j in manifest["job_id"]] == [5, 4, 2, 3, 0]
    assert set(manifest["status"]) == {"ok"} and set(manifest["error"]) == {""}
    by_id = manifest.set_index("job_id")
    for row in ok.itertuples():
        recovered = by_id.loc[row.job_id]
        assert recovered["image"] == row.image
        assert recovered["image_sha256"] == hashlib.sha256((run / row.image).read_bytes()).hexdigest()
        assert (recovered["prompt"], recovered["stack"], recovered["loras"]) == (row.prompt, row.stack, row.loras)
        assert (recovered["seed"], recovered["guidance_scale"], recovered["width"]) == ("1", "7.5", "64")
    assert by_id.loc["0000000000000002", "style"] == "" and by_id.loc["0000000000000000", "style"] == STYLES[0]
    assert completed_jobs(run) == set(ok["job_id"])  # a later render in this folder keeps these images
    assert len(page_rows((run / "index.html").read_text(encoding="utf-8"))) == 5
