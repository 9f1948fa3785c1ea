"""Golden job_ids and image bytes of the packaged sweep and a few override variants.

Written before the one-place-per-concept refactor (issue 13) and kept after it: a user's run directory must keep
its job_ids and its image bytes, so a re-run after an upgrade renders nothing it already has. A change to these
files is a change users see; regenerate with BATCHGEN_UPDATE_GOLDEN=1 only when pixels are meant to change, and
say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

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


def _record(run_cli, tmp_path: Path, name: str, overrides: tuple[str, ...]) -> dict[str, list[str]]:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(PROMPTS_FILE)
    args = [a.replace("PROMPTS", str(prompts)) for a in overrides]
    code, _, err = run_cli(*args, f"run.out_dir=runs/{name}")
    assert code == 0, err
    run_dir = tmp_path / "runs" / name
    table = pd.read_csv(run_dir / "manifest.csv", dtype=str, keep_default_na=False)
    out = {}
    for row in table.itertuples():
        if row.status == "ok":
            data = (run_dir / row.image).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row.image_sha256  # the file is what the manifest says
        out[row.job_id] = [row.status, row.image_sha256]
    return dict(sorted(out.items()))


@pytest.mark.slow
def test_job_ids_and_image_bytes_match_the_golden_file(run_cli, tmp_path: Path) -> None:
    got = {name: _record(run_cli, tmp_path, name, overrides) for name, overrides in VARIANTS.items()}
    if os.environ.get("BATCHGEN_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(expected)
    for name in VARIANTS:
        assert got[name] == expected[name], f"variant {name}: job_ids or image bytes changed"
    # Every variant renders something, and the variants are different jobs (the file guards more than one sweep).
    assert all(any(s == "ok" for s, _ in rows.values()) for rows in got.values())
    assert len({jid for rows in got.values() for jid in rows}) > len(got["styles"])
