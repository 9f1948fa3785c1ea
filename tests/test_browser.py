"""index.html in a real browser: headless Chromium loads a rendered run's report from disk, every image loads,
the filters hide and show rows, and a screenshot lands in runs/browser-test/.

Marked `browser` and deselected by default; `make test-browser` installs Chromium (Debian package `chromium`)
when it is missing and runs this. Without Chromium the test fails: it never skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from batchgen.manifest import Manifest, read_manifest
from tests.cdp import Chromium, find_chromium

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parents[1] / "runs" / "browser-test" / "index.png"
# <grainy> exists for tiny_sd1 only, so tiny_sdxl's jobs with it are skipped rows.
ARGS = ("+sweep=styles", "sweep.seeds=[1]", "sweep.prompts=['<grainy> cat','a castle at night']")

LOAD_ALL_IMAGES = """
(async () => {
  // the compare view's images get their src when it opens
  const images = Array.from(document.images).filter((img) => !img.closest("#compare"));
  images.forEach((img) => { img.loading = "eager"; });  // lazy thumbnails below the fold load now
  const settle = (img) => img.complete ? Promise.resolve() :
    new Promise((done) => { img.addEventListener("load", done); img.addEventListener("error", done); });
  await Promise.race([Promise.all(images.map(settle)), new Promise((done) => setTimeout(done, 20000))]);
  const ok = (img) => img.complete && img.naturalWidth > 0;
  return {total: images.length, loaded: images.filter(ok).length,
          broken: images.filter((img) => !ok(img)).map((img) => img.getAttribute("src"))};
})()
"""


def choose(name: str, value: str) -> str:
    """JS: pick a filter value the way a user does (a change event), then report what is visible."""
    return f"""
(() => {{
  const select = document.querySelector('select[data-filter="{name}"]');
  select.value = {json.dumps(value)};
  select.dispatchEvent(new Event("change", {{bubbles: true}}));
  const rows = Array.from(document.querySelectorAll("table.jobs tbody tr"));
  const visible = rows.filter((tr) => !tr.hidden && tr.offsetParent !== null);
  return {{visible: visible.length, statuses: visible.map((tr) => tr.dataset.status),
           models: visible.map((tr) => tr.dataset.model), shown: document.getElementById("shown").textContent}};
}})()
"""


def search(text: str) -> str:
    return f"""
(() => {{
  const box = document.querySelector('input[name="search"]');
  box.value = {json.dumps(text)};
  box.dispatchEvent(new Event("input", {{bubbles: true}}));
  return Array.from(document.querySelectorAll("table.jobs tbody tr")).filter((tr) => !tr.hidden)
    .map((tr) => tr.querySelector("td.prompt").textContent);
}})()
"""


def test_report_in_headless_chromium(run_cli, tmp_path: Path) -> None:
    binary = find_chromium()
    assert binary, "Chromium not found: `make test-browser` installs the Debian package, or set BATCHGEN_CHROMIUM"
    code, _, err = run_cli(*ARGS)
    assert code == 0, err
    run = Path("runs/styles").resolve()
    table = read_manifest(run)
    # One failed job too, the way a crash mid-render records it, then the report rebuilt from the manifest.
    failed = table[table["status"] == "ok"].iloc[0].to_dict()
    failed.update(job_id="f" * 16, status="failed", image="", image_sha256="", error="RuntimeError: simulated")
    manifest = Manifest(run)
    manifest.append(failed)
    manifest.close()
    code, out, _ = run_cli("report", str(run))
    assert code == 0
    table = read_manifest(run)
    ok, skipped = int((table["status"] == "ok").sum()), int((table["status"] == "skipped").sum())
    assert (ok, skipped) == (18, 6)
    grids = len(list((run / "grids").glob("*.png"))) + len(list((run / "plots").glob("*.png")))

    with Chromium(binary, tmp_path / "profile") as browser:
        page = browser.open((run / "index.html").as_uri())
        images = browser.evaluate(page, LOAD_ALL_IMAGES)
        assert images == {"total": ok + grids, "loaded": ok + grids, "broken": []}

        assert browser.evaluate(page, 'document.getElementById("shown").textContent') == str(ok + skipped + 1)
        picked = browser.evaluate(page, choose("status", "failed"))
        assert picked == {"visible": 1, "statuses": ["failed"], "models": ["tiny_sd1"], "shown": "1"}
        colour = browser.evaluate(page, 'getComputedStyle(document.querySelector("tr.failed")).backgroundColor')
        assert colour == "rgb(251, 213, 213)"  # failed rows are highlighted
        picked = browser.evaluate(page, choose("status", "skipped"))
        assert picked["visible"] == 6 and set(picked["models"]) == {"tiny_sdxl"}
        browser.evaluate(page, choose("status", ""))
        picked = browser.evaluate(page, choose("model", "tiny_sdxl"))
        assert picked["visible"] == 12 and set(picked["models"]) == {"tiny_sdxl"} and picked["shown"] == "12"
        assert browser.evaluate(page, search("CASTLE")) == ["a castle at night"] * 6  # any case
        browser.evaluate(page, search(""))
        browser.evaluate(page, choose("model", ""))
        shot = browser.screenshot(page, SCREENSHOT)

    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50  # text and thumbnails, not a blank page


COMPARE = """
(() => {
  const rows = Array.from(document.querySelectorAll("table.jobs tbody tr"));
  const lora = rows.find((tr) => tr.dataset.referenceImage && tr.dataset.effect !== "");
  lora.querySelector("a.open").click();
  const box = document.getElementById("compare");
  const opened = {hidden: box.hidden, job: box.querySelector("img.job").getAttribute("src"),
                  reference: box.querySelector("img.reference").getAttribute("src"),
                  image: lora.dataset.image, referenceImage: lora.dataset.referenceImage,
                  caption: box.querySelector(".caption").textContent};
  const slider = box.querySelector("input[type=range]");
  slider.value = "30";
  slider.dispatchEvent(new Event("input", {bubbles: true}));
  const clip = box.querySelector("img.over").style.clipPath;
  document.dispatchEvent(new KeyboardEvent("keydown", {key: "ArrowRight", bubbles: true}));
  const withImages = rows.filter((tr) => !tr.hidden && tr.dataset.image);
  const next = withImages[(withImages.indexOf(lora) + 1) % withImages.length];
  const stepped = box.querySelector("img.job").getAttribute("src") === next.dataset.image;
  document.dispatchEvent(new KeyboardEvent("keydown", {key: "Escape", bubbles: true}));
  return {opened, clip, stepped, closed: box.hidden};
})()
"""

SORT_AND_BOUND = """
(() => {
  const header = Array.from(document.querySelectorAll("table.jobs th")).find((th) => th.textContent === "effect");
  const effects = () => Array.from(document.querySelectorAll("table.jobs tbody tr"))
    .map((tr) => tr.querySelector("td.effect").textContent);
  header.click();
  const ascending = effects();
  header.click();
  const descending = effects();
  const bound = document.querySelector('input[data-column="effect"][data-bound="min"]');
  bound.value = "1";
  bound.dispatchEvent(new Event("input", {bubbles: true}));
  const shown = Array.from(document.querySelectorAll("table.jobs tbody tr")).filter((tr) => !tr.hidden)
    .map((tr) => parseFloat(tr.dataset.effect));
  bound.value = "";
  bound.dispatchEvent(new Event("input", {bubbles: true}));
  return {ascending, descending, shown};
})()
"""


def test_compare_view_sort_and_effect_filter_in_headless_chromium(run_cli, tmp_path: Path) -> None:
    binary = find_chromium()
    assert binary, "Chromium not found: `make test-browser` installs the Debian package, or set BATCHGEN_CHROMIUM"
    code, _, err = run_cli(
        "+sweep=styles",
        "sweep.seeds=[1]",
        "sweep.models=[tiny_sd1]",
        "sweep.slots={}",
        "sweep.prompts=['a castle at night']",
    )
    assert code == 0, err
    run = Path("runs/styles").resolve()
    latest = read_manifest(run)
    measured = sorted(float(v) for v in latest["effect"] if v)
    assert len(measured) == 5  # ink 0.5, ink 1, ink_grain, peft, lycoris against the none job
    with Chromium(binary, tmp_path / "profile") as browser:
        page = browser.open((run / "index.html").as_uri())
        result = browser.evaluate(page, COMPARE)
        opened = result["opened"]
        assert opened["hidden"] is False and opened["job"] == opened["image"]
        assert opened["reference"] == opened["referenceImage"] != opened["image"]
        assert "effect " in opened["caption"] and "no reference image" not in opened["caption"]
        assert result["clip"] == "inset(0px 70% 0px 0px)" and result["stepped"] and result["closed"]

        order = browser.evaluate(page, SORT_AND_BOUND)
        numbers = [float(v) for v in order["ascending"] if v]
        assert numbers == measured and order["ascending"][len(numbers) :] == [""] * (6 - len(numbers))
        assert [float(v) for v in order["descending"] if v] == measured[::-1]
        assert sorted(order["shown"]) == [v for v in measured if v >= 1]
