"""Golden job_ids and image bytes of the packaged sweep and a few override variants.

Written before the one-place-per-concept refactor (issue 13) and kept after it: a user's run directory must keep
its job_ids and its image bytes, so a re-run after an upgrade renders nothing it already has. A change to these
files is a change users see; regenerate with BATCHGEN_UPDATE_GOLDEN=1 only when pixels are meant to change, and
say why in the commit. The updating run writes the file and fails, naming what changed against the previous one: it
checks nothing, so it must never pass; run the test again without the variable to check the new file.

Image bytes are exact only on one kind of CPU: MKL and oneDNN take vendor- and ISA-specific code paths, so the same
job renders a few 1/255 steps apart on an AMD and an Intel machine. The file therefore records the platform it was
written on and, per image, an 8x8 grid of block means: job_ids and statuses must match everywhere, image bytes on the
recording platform, and every image's block means within 2/255 on any other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

GOLDEN = Path(__file__).parent / "golden" / "sweeps.json"
ONE_SD1 = ("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.seeds=[1]")
VARIANTS: dict[str, tuple[str, ...]] = {
    "styles": ("+sweep=styles",),
    "weights": (*ONE_SD1, "sweep.stacks.ink.ink=0.4,0.6", "sweep.stacks.ink_grain.grain=0.3"),
    "clip_skip": (*ONE_SD1, "sweep.clip_skip=1,2", "~sweep.stacks.lycoris", "~sweep.stacks.peft"),
    "settings": (
        "+sweep=styles",
        "sweep.seeds=[4]",
        "sweep.scheduler=euler_a,default",
        "sweep.guidance_scale=5",
        "sweep.steps=3",
        "sweep.width=48",
        "+sweep.stacks.split={ink: {unet: 0.9, text_encoder: 0.4}}",
    ),
    "inline_tags": (
        *ONE_SD1,
        "sweep.prompts=['a fox <lora:ink:0.7>, <alf>', 'a tower <lora:grain:0.5:0.2>']",
        "sweep.slots={}",
        "~sweep.stacks.lycoris",
    ),
    "lora_triggers": (*ONE_SD1, "+sweep.lora_triggers={ink: 'ink drawing'}", "~sweep.stacks.lycoris"),
    "prompts_file": ("+sweep=styles", "sweep.prompts=[]", "sweep.prompts_file=PROMPTS"),
    "truncate": (
        *ONE_SD1,
        "sweep.prompts=['" + ", ".join(["a red castle on a green hill"] * 14) + "']",
        "sweep.slots={}",
        "run.truncate_prompts=true",
        "~sweep.stacks.lycoris",
        "~sweep.stacks.peft",
    ),
    "long_prompt": (
        *ONE_SD1,
        "sweep.prompts=['" + ", ".join(["a blue tower by the sea"] * 16) + "']",
        "sweep.slots={}",
        "sweep.clip_skip=2",
        "~sweep.stacks.lycoris",
        "~sweep.stacks.peft",
    ),
    # Added with prompt syntax (issue 14), after the refactor: weights, a TI's strength, BREAK, editing, alternation.
    "a1111_syntax": (
        *ONE_SD1,
        "sweep.prompts=['a (castle:1.3) at [night:dusk:0.5], (<alf>:0.8)', 'a fox BREAK [night|dusk] \\(sky\\)']",
        "sweep.slots={}",
        "~sweep.stacks.lycoris",
        "~sweep.stacks.peft",
    ),
    "compel_syntax": (
        *ONE_SD1,
        "sweep.prompts=['a castle++ at night, (<alf>)0.8']",
        "sweep.slots={}",
        "sweep.prompt_syntax=compel",
        "~sweep.stacks.lycoris",
        "~sweep.stacks.peft",
    ),
}
PROMPTS_FILE = "prompt,negative_prompt,seed\na castle at night,blurry,5\na portrait of <alf>,,6\n"


FINGERPRINT_GRID = 8
FINGERPRINT_TOLERANCE = 2  # 0-255 per block mean: float noise between CPUs moves a few pixels by a step or two


def platform() -> str:
    """What decides float rounding on a CPU run: vendor, the ISA torch dispatches to, torch's version."""
    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("vendor_id")), "")
        vendor = line.partition(":")[2].strip() or vendor
    return f"{vendor}/{torch.backends.cpu.get_cpu_capability()}/torch-{torch.__version__}"


def fingerprint(path: Path) -> list[int]:
    """The image's mean per channel over an 8x8 grid of blocks, rounded: equal within float noise anywhere."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    rows = np.array_split(pixels, FINGERPRINT_GRID, axis=0)
    return [
        round(float(v))
        for row in rows
        for block in np.array_split(row, FINGERPRINT_GRID, axis=1)
        for v in block.mean(axis=(0, 1))
    ]


def _record(run_cli, tmp_path: Path, name: str, overrides: tuple[str, ...]) -> dict[str, list]:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(PROMPTS_FILE)
    args = [a.replace("PROMPTS", str(prompts)) for a in overrides]
    code, _, err = run_cli(*args, f"run.out_dir=runs/{name}")
    assert code == 0, err
    run_dir = tmp_path / "runs" / name
    table = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
    out = {}
    for row in table.itertuples():
        marks: list = []
        if row.status == "ok":
            data = (run_dir / row.image).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.image_sha256  # the file is what the manifest says
            marks = [fingerprint(run_dir / row.image)]
        out[row.job_id] = [row.status, row.image_sha256, *marks]
    return dict(sorted(out.items()))


def _rewrite_golden(got: dict[str, dict[str, list]], path: Path = GOLDEN) -> NoReturn:
    """Write this run's record over `path` and fail, saying what changed against the file it replaces."""
    before = json.loads(path.read_text())["variants"] if path.exists() else {}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"platform": platform(), "variants": got}, indent=1, sort_keys=True) + "\n")
    old = {(name, jid): row for name, rows in before.items() for jid, row in rows.items()}
    new = {(name, jid): row for name, rows in got.items() for jid, row in rows.items()}
    changed = sorted(
        f"{name}/{jid}" for (name, jid), row in new.items() if (name, jid) in old and old[name, jid] != row
    )
    pytest.fail(
        f"{path.name} rewritten, not checked: {len(new.keys() - old.keys())} jobs added, "
        f"{len(old.keys() - new.keys())} removed, {len(changed)} changed ({', '.join(changed[:5]) or 'none'}); "
        "review its diff and run again without BATCHGEN_UPDATE_GOLDEN=1",
        pytrace=False,
    )


def _far_blocks(got: list[int], expected: list[int]) -> int:
    return sum(abs(a - b) > FINGERPRINT_TOLERANCE for a, b in zip(got, expected, strict=True))


@pytest.mark.slow
def test_job_ids_and_image_bytes_match_the_golden_file(run_cli, tmp_path: Path) -> None:
    got = {name: _record(run_cli, tmp_path, name, overrides) for name, overrides in VARIANTS.items()}
    if os.environ.get("BATCHGEN_UPDATE_GOLDEN") == "1":
        _rewrite_golden(got)
    golden = json.loads(GOLDEN.read_text())
    expected, exact = golden["variants"], golden["platform"] == platform()
    assert sorted(got) == sorted(expected)
    for name in VARIANTS:
        ids = {jid: row[0] for jid, row in got[name].items()}
        assert ids == {jid: row[0] for jid, row in expected[name].items()}, f"variant {name}: job_ids changed"
        for jid, row in got[name].items():
            if exact:
                assert row[1] == expected[name][jid][1], f"variant {name}: image bytes of {jid} changed"
            elif row[0] == "ok":
                far = _far_blocks(row[2], expected[name][jid][2])
                assert far == 0, f"variant {name}: {far} of {len(row[2])} block means of {jid} moved"
    # Every variant renders something, and the variants are different jobs (the file guards more than one sweep).
    assert all(any(row[0] == "ok" for row in rows.values()) for rows in got.values())
    assert len({jid for rows in got.values() for jid in rows}) > len(got["styles"])


def test_updating_the_golden_file_writes_it_and_never_passes(tmp_path: Path) -> None:
    path = tmp_path / "golden" / "sweeps.json"
    first = {"styles": {"a": ["ok", "1", [1]], "b": ["ok", "2", [2]]}}
    with pytest.raises(pytest.fail.Exception) as failed:
        _rewrite_golden(first, path)
    assert str(failed.value) == (
        "sweeps.json rewritten, not checked: 2 jobs added, 0 removed, 0 changed (none); "
        "review its diff and run again without BATCHGEN_UPDATE_GOLDEN=1"
    )
    assert json.loads(path.read_text()) == {"platform": platform(), "variants": first}
    second = {"styles": {"a": ["ok", "9", [1]], "c": ["failed", "", []]}}
    with pytest.raises(pytest.fail.Exception) as failed:
        _rewrite_golden(second, path)
    assert str(failed.value).startswith(
        "sweeps.json rewritten, not checked: 1 jobs added, 1 removed, 1 changed (styles/a);"
    )
    assert json.loads(path.read_text())["variants"] == second


def test_fingerprints_tell_a_changed_image_from_float_noise(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    noisy = pixels.astype(int)
    noisy[rng.random((64, 64)) < 0.05] += 1  # what another CPU's rounding does: a step here and there
    changed = pixels.copy()
    changed[:8, :8] = 0  # one block really different
    paths = {}
    for name, image in (("a", pixels), ("noisy", np.clip(noisy, 0, 255).astype(np.uint8)), ("changed", changed)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(image).save(paths[name])
    base = fingerprint(paths["a"])
    assert len(base) == 8 * 8 * 3
    assert _far_blocks(fingerprint(paths["noisy"]), base) == 0
    assert _far_blocks(fingerprint(paths["changed"]), base) == 3
