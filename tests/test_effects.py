"""Effect sizes: each LoRA image against its no-LoRA reference, degenerate images, strength curves, `batchgen check`.

The manifest's numbers are recomputed here from the PNGs: effect with plain numpy (float64, not the int16 path
batchgen takes), ssim with scikit-image's own call at its defaults for these sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage.metrics import structural_similarity

from batchgen.manifest import read_latest, read_manifest
from batchgen.metrics import degenerate, measure
from batchgen.report.curves import curves
from batchgen.tiny.build import tiny_root

SWEEP = (
    "+sweep=styles",
    "sweep.models=[tiny_sd1]",
    "sweep.seeds=[1,2]",
    "sweep.prompts=['a castle at night, watercolor']",
    "sweep.slots={}",
    "sweep.steps=3",
    *("~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris"),
    "sweep.stacks.ink.ink=[0,0.5,1.0]",
    "+sweep.stacks.grain={grain: 1.0}",
)


def _pixels(run: Path, image: str) -> np.ndarray:
    return np.asarray(Image.open(run / image).convert("RGB"))


def _broken_lora(folder: Path, tiny_cache: Path) -> Path:
    """ink with its up factors multiplied by 10^30: a LoRA trained into the ground (fp32 activations overflow)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(tiny_root("tiny_sd1", tiny_cache) / "lora" / "ink.safetensors")
    save_file({k: v * 1e30 if "lora_up" in k else v for k, v in tensors.items()}, folder / "broken.safetensors")
    return folder


@pytest.fixture
def rendered(run_cli) -> Path:
    code, _, err = run_cli(*SWEEP)
    assert code == 0, err
    return Path("runs/styles").resolve()


def test_effect_and_ssim_match_an_independent_computation_from_the_pngs(rendered: Path) -> None:
    run = rendered
    table = read_latest(run)
    assert len(table) == 5 * 2 and set(table["status"]) == {"ok"}
    images = dict(zip(table["job_id"], table["image"], strict=True))
    loras = table[table["loras"] != ""]
    assert (table.loc[table["loras"] == "", ["reference", "effect", "ssim"]] == "").all().all()
    for _, row in loras.iterrows():
        ours, ref = _pixels(run, row["image"]), _pixels(run, images[row["reference"]])
        effect = float(np.mean(np.abs(ours.astype(np.float64) - ref.astype(np.float64))))
        ssim = structural_similarity(ours, ref, channel_axis=2, data_range=255)
        assert float(row["effect"]) == pytest.approx(effect, abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(ssim, abs=1e-4)
    zero = loras[loras["loras"] == "ink:0"]
    assert len(zero) == 2 and (zero["effect"] == "0.0").all() and (zero["ssim"] == "1.0").all()
    full = loras[loras["loras"] == "ink:1"]
    assert (full["effect"].astype(float) > 1.0).all() and (full["ssim"].astype(float) < 1.0).all()
    assert set(table["degenerate"]) == {"no"}

    # One curve per LoRA and model, median over the 2 seeds, a band from their min to max.
    lines = curves(table)
    assert list(lines) == ["tiny_sd1"] and sorted(lines["tiny_sd1"]) == ["grain", "ink"]
    ink = lines["tiny_sd1"]["ink"]
    assert [p.weight for p in ink] == [0.0, 0.5, 1.0] and ink[0].median == ink[0].high == 0.0
    at_one = sorted(full["effect"].astype(float))
    assert (ink[2].low, ink[2].median, ink[2].high, ink[2].images) == (at_one[0], np.median(at_one), at_one[1], 2)
    plot = run / "plots" / "strength-tiny_sd1.png"
    assert Image.open(plot).size == (640, 400)
    assert 'src="plots/strength-tiny_sd1.png"' in (run / "index.html").read_text()


def test_report_fills_the_measurements_of_a_run_from_before_batchgen_measured(rendered: Path, run_cli) -> None:
    run = rendered
    manifest = run / "manifest.csv"
    table = read_manifest(run)
    expected = table[["job_id", "reference", "effect", "ssim", "degenerate"]].copy()
    old = table.drop(columns=["reference", "effect", "ssim", "degenerate"])
    old.to_csv(manifest, index=False)
    code, out, err = run_cli("report", str(run))
    assert code == 0, err
    assert err == "measured 10 images (effect, ssim, degenerate) into the manifest\n"
    assert out == f"2 grids, 1 strength plots, {run / 'index.html'}\n"  # one grid per seed
    refilled = read_manifest(run)
    assert len(refilled) == len(table)  # filled in place: no row added
    pd.testing.assert_frame_equal(refilled[expected.columns], expected)
    code, _, err = run_cli("report", str(run))
    assert code == 0 and err == ""  # nothing left to measure


def test_a_reference_that_lands_after_its_jobs_is_measured_at_the_end_of_the_run(run_cli) -> None:
    # First without references and without the none stack: nothing to measure against.
    code, _, _ = run_cli(*SWEEP, "~sweep.stacks.none", "sweep.references=false")
    assert code == 0
    first = read_latest(Path("runs/styles"))
    assert len(first) == 8 and (first["effect"] == "").all() and (first["reference"] != "").all()
    code, _, _ = run_cli(*SWEEP, "~sweep.stacks.none")
    assert code == 0
    table = read_latest(Path("runs/styles"))
    assert len(table) == 10 and (table["stack"] == "(reference)").sum() == 2
    assert (table.loc[table["loras"] != "", "effect"] != "").all()
    assert len(read_manifest(Path("runs/styles"))) == 10  # the 8 old rows were filled, not appended again


def test_a_lora_with_huge_weights_is_flagged_degenerate_and_check_says_so(
    run_cli, tmp_path: Path, tiny_cache: Path
) -> None:
    folder = _broken_lora(tmp_path / "broken", tiny_cache)
    lora_dirs = f"models.tiny_sd1.loras=[{tiny_root('tiny_sd1', tiny_cache) / 'lora'},{folder}]"
    code, _, _ = run_cli(*SWEEP, lora_dirs, "+sweep.stacks.broken={broken: 1.0}")
    table = read_latest(Path("runs/styles"))
    broken = table[table["loras"] == "broken:1"]
    assert len(broken) == 2 and not broken["degenerate"].isin(["", "no"]).any()
    assert set(table.loc[table["loras"] != "broken:1", "degenerate"]) == {"no"}
    assert code == (1 if (broken["status"] == "failed").any() else 0)

    code, out, _ = run_cli("check", "runs/styles", "--no-degenerate")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("degenerate (") for line in lines[:2])
    assert 'stack broken, prompt "a castle at night, watercolor", seed 1 (job ' in lines[0]
    assert lines[2].startswith("check runs/styles: 2 problems; ")


def test_check_exit_codes_and_messages(rendered: Path, run_cli) -> None:
    code, out, _ = run_cli("check", "runs/styles", "--min-effect", "0.0", "--no-degenerate", "--max-failed", "0")
    assert code == 0
    assert out == (
        "check runs/styles: ok; 6 LoRA jobs checked for effect >= 0, 10 images checked for degenerate, "
        "0 failed (at most 0)\n"
    )
    # ink:0 (weight below 0.5) takes no part; ink:0.5, ink:1 and grain:1 do, 2 seeds each
    table = read_latest(rendered)
    strong = table[table["loras"].isin(["ink:0.5", "ink:1", "grain:1"])]
    assert len(strong) == 6
    threshold = float(strong["effect"].astype(float).max()) + 1
    code, out, _ = run_cli("check", "runs/styles", "--min-effect", str(threshold))
    lines = out.splitlines()
    assert code == 1 and len(lines) == 7
    expected = f" < {threshold:g}: model tiny_sd1, stack "
    assert all(line.startswith("effect ") and expected in line for line in lines[:6])
    assert lines[6] == f"check runs/styles: 6 problems; 6 LoRA jobs checked for effect >= {threshold:g}"

    for args, message in [
        # click's wording of the reason differs between typer versions; the option is always named
        (("--min-effect", "abc"), "Invalid value for '--min-effect': "),
        (("--max-failed", "x"), "Invalid value for '--max-failed': "),
        (("--min-efect", "1"), "No such option: --min-efect"),
        (
            (),
            "batchgen: error: check: nothing to check; give --min-effect N, --no-degenerate, --max-failed N, "
            "--min-clip-t N, --min-clip-i N and/or --min-dino-i N",
        ),
        (("--min-effect", "-1"), "batchgen: error: --min-effect -1.0: give a pixel difference from 0 to 255"),
    ]:
        code, _, err = run_cli("check", "runs/styles", *args)
        assert code == 2 and message in err, (args, err)
    code, _, err = run_cli("check", "runs/nowhere", "--max-failed", "0")
    assert code == 2
    assert err == "batchgen: error: runs/nowhere: no manifest.csv here; pass a run directory such as runs/styles\n"


def test_min_effect_on_a_run_without_references_says_how_to_add_them(run_cli) -> None:
    code, _, _ = run_cli(*SWEEP, "~sweep.stacks.none", "sweep.references=false")
    assert code == 0
    code, out, err = run_cli("check", "runs/styles", "--min-effect", "1")
    assert code == 2 and out == ""
    assert err == (
        "batchgen: error: runs/styles: --min-effect needs reference images, and this run was rendered with "
        "sweep.references=false; render it again with sweep.references=true (the default) to add them\n"
    )


def test_degenerate_rules() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert degenerate(noise) == "no"
    assert degenerate(np.full((16, 16, 3), 128, np.uint8)) == "flat"
    assert degenerate(np.zeros((16, 16, 3), np.uint8)) == "flat;clipped"
    half = noise.copy()
    half[:9] = 255  # 9 of 16 rows white: over half the pixels clipped
    assert degenerate(half) == "clipped"
    half[:7] = noise[:7]  # 2 rows white: fine
    assert degenerate(half) == "no"
    nearly_flat = np.full((16, 16, 3), 100, np.uint8)
    nearly_flat[0, 0] = 115  # std 0.94 < 2
    assert degenerate(nearly_flat) == "flat"
    measured = measure(noise, noise)
    assert (measured.effect, measured.ssim) == (0.0, 1.0)
    with pytest.raises(ValueError, match="image is 16x16, its reference 16x8"):
        measure(noise, noise[:8])


def test_curves_label_block_presets_split_weights_and_epochs_and_skip_stacks_of_two() -> None:
    rows = [
        ("ink:0.5:lbw=OUTD", "", "2.0"),
        ("ink:1:lbw=OUTD", "", "4.0"),
        ("ink:1/0.2", "", "3.0"),
        ("mylora-000002:1", "mylora e2 (380 steps)", "5.0"),
        ("grain:0.6;ink:0.8", "", "9.0"),  # two LoRAs: no single weight for the x axis
        ("ink:1", "", ""),  # not measured
    ]
    table = pd.DataFrame(
        [
            {"model": "m", "status": "ok", "loras": loras, "epoch": epoch, "effect": effect}
            for loras, epoch, effect in rows
        ]
    )
    lines = curves(table)["m"]
    assert sorted(lines) == ["ink lbw=OUTD", "ink te=0.2", "mylora e2 (380 steps)"]
    assert [(p.weight, p.median) for p in lines["ink lbw=OUTD"]] == [(0.5, 2.0), (1.0, 4.0)]
    assert [(p.weight, p.median) for p in lines["ink te=0.2"]] == [(1.0, 3.0)]
