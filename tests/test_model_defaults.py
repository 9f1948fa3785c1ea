"""Each model's own settings: a sweep that gives no size, steps, guidance or T5 length renders with the model's (its
checkpoint's size as diffusers computes it, its base's steps and guidance per release), resolved in the plan so the
job_id hashes the value rendered; a value the sweep gives keeps the job_id it had before models had their own."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from batchgen.assets.bases import BASES, BY_NAME
from batchgen.assets.defaults import model_defaults
from batchgen.config import RunConfig, SweepConfig, compose_config
from batchgen.errors import BatchgenError
from batchgen.plan import build_plan
from batchgen.runner import prepare
from batchgen.settings import SETTINGS
from batchgen.spec import ModelSpec
from batchgen.tiny import tiny_root
from tests.confs import write_conf
from tests.test_plan import MODELS, _sweep

OWN = tuple(s.name for s in SETTINGS if s.model_own)
TINY_BASES = {"tiny_sd1": "sd-1", "tiny_sdxl": "sdxl", "tiny_sd3": "sd-3", "tiny_flux": "flux"}
UNSET = {"steps": None, "guidance_scale": None, "width": None, "height": None, "max_sequence_length": None}


def _spec(base: str, folder: Path, name: str = "m") -> ModelSpec:
    return ModelSpec(name=name, base=base, checkpoint=folder, checkpoint_sha256="c" * 64)


def _shipped(base: str, tmp_path: Path, **changes: object) -> Path:
    """A copy of batchgen's full-size configs of `base` (no weights), its denoiser config changed by `changes`."""
    folder = tmp_path / base
    shutil.copytree(BY_NAME[base].shipped_configs, folder)
    config = folder / BY_NAME[base].denoiser / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    return folder


def test_the_table_leaves_exactly_these_settings_to_the_model() -> None:
    assert OWN == ("steps", "guidance_scale", "width", "height", "max_sequence_length")
    for setting in SETTINGS:
        if setting.model_own:
            assert setting.default is None
            # Where no model is at hand (a Job built by hand, an empty cell) the value is SD1's, as before.
            assert setting.value_default == setting.fallback == setting.read("")
    assert {s.name: s.fallback for s in SETTINGS if s.model_own} == {
        **{"steps": 20, "guidance_scale": 7.5, "width": 512, "height": 512, "max_sequence_length": 0}
    }


# (width, height, steps, guidance_scale, max_sequence_length) from the full-size configs batchgen ships.
SHIPPED = {
    "sd-1": (512, 512, 20, 7.5, 0),  # SD1.5: sample_size 64 x VAE factor 8
    "sd-2": (768, 768, 20, 7.5, 0),  # SD2.1 768-v: 96 x 8
    "sdxl": (1024, 1024, 20, 7.5, 0),  # 128 x 8; batchgen's 20 / 7.5 rather than diffusers' 50 / 5.0
    "sd-3": (1024, 1024, 28, 3.5, 0),  # SD3.5 large: 128 x 8; its model card's 28 steps, guidance 3.5
    "flux": (1024, 1024, 28, 3.5, 0),  # FLUX.1-dev: FluxPipeline's default_sample_size 128 x 8; 0 = its 512 tokens
}


@pytest.mark.parametrize("base", [b.name for b in BASES])
def test_each_shipped_config_gives_its_models_own_settings(base: str) -> None:
    got = model_defaults(_spec(base, BY_NAME[base].shipped_configs), OWN)
    width, height, steps, guidance, length = SHIPPED[base]
    assert got == {
        "steps": steps,
        "guidance_scale": guidance,
        "width": width,
        "height": height,
        "max_sequence_length": length,
    }


@pytest.mark.parametrize(
    ("base", "changes", "expected"),
    [
        # FLUX.1-schnell: no guidance input; its card's 4 steps, guidance 0 and 256 T5 tokens.
        ("flux", {"guidance_embeds": False}, (1024, 1024, 4, 0.0, 256)),
        # SD3.5 medium (24 MMDiT-X layers): its card's 40 steps, guidance 4.5.
        ("sd-3", {"num_layers": 24}, (1024, 1024, 40, 4.5, 0)),
        # SD3 medium (no qk norm): StableDiffusion3Pipeline's own 28 / 7.0.
        ("sd-3", {"num_layers": 24, "qk_norm": None}, (1024, 1024, 28, 7.0, 0)),
        # An SD2 512 base config, and a UNet sample_size of [height, width], as diffusers reads it.
        ("sd-2", {"sample_size": 64}, (512, 512, 20, 7.5, 0)),
        ("sd-1", {"sample_size": [96, 64]}, (512, 768, 20, 7.5, 0)),
        # FluxPipeline fixes its size: a sample_size in the config changes nothing.
        ("flux", {"sample_size": 32}, (1024, 1024, 28, 3.5, 0)),
    ],
)
def test_a_release_is_told_by_its_denoiser_config(
    tmp_path: Path, base: str, changes: dict, expected: tuple[int, int, int, float, int]
) -> None:
    got = model_defaults(_spec(base, _shipped(base, tmp_path, **changes)), OWN)
    assert tuple(got[name] for name in ("width", "height", "steps", "guidance_scale", "max_sequence_length")) == (
        expected
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # The tiny UNets and SD3 transformer have sample_size 8 and every tiny VAE 4 blocks (factor 8): 64 pixels.
        ("tiny_sd1", (64, 64, 20, 7.5, 0)),
        ("tiny_sdxl", (64, 64, 20, 7.5, 0)),
        # Its 2 layers are no SD3.5 release: the pipeline's own 28 / 7.0.
        ("tiny_sd3", (64, 64, 28, 7.0, 0)),
        # FLUX.1-dev-like (guidance input); FluxPipeline's size is 128 latents whatever the model: 1024 pixels.
        ("tiny_flux", (1024, 1024, 28, 3.5, 0)),
    ],
)
def test_each_tiny_model_has_its_own_settings(
    tiny_cache: Path, name: str, expected: tuple[int, int, int, float, int]
) -> None:
    spec = _spec(TINY_BASES[name], tiny_root(name, tiny_cache) / "main" / name)
    got = model_defaults(spec, OWN)
    assert tuple(got[n] for n in ("width", "height", "steps", "guidance_scale", "max_sequence_length")) == expected


# job_ids of main at 9255a8f, before models had their own settings, where every sweep that gave none rendered at
# 20 steps, guidance 7.5, 512x512 and the pipeline's T5 length: the test_plan models (no configs on disk) ...
IDS_AT_THE_OLD_DEFAULTS = {"sd1": "93e1914142faf19a", "xl": "69c57dbd812bc2a9"}
# ... and the sha256 of the sorted job_ids of the packaged sweeps on the tiny models, as written and with those
# values given. next's changed once since (were d76e3fcad6147f9f, bab63b40f67c7ab4): its FLUX.1 jobs stopped
# hashing the negative prompt "blurry", which FLUX.1 never reads (issue 34); its SD3 jobs kept their ids.
PACKAGED = {"+sweep=styles": "271edfcfbe51af6f", "+sweep=next": "02f5b0d7979830ca"}
PACKAGED_OLD_DEFAULTS = {"+sweep=styles": "0151d5ceff30daed", "+sweep=next": "a074c1d801dc1232"}
OLD_DEFAULTS = ("sweep.steps=20", "sweep.guidance_scale=7.5", "sweep.width=512", "sweep.height=512")


@pytest.mark.parametrize("model", sorted(IDS_AT_THE_OLD_DEFAULTS))
def test_the_old_defaults_given_keep_their_job_ids(model: str) -> None:
    sweep = dataclasses.replace(
        _sweep(models=[model], prompts=["a castle at night"], slots={}, stacks={}, seeds=[1]),
        steps=20,
        guidance_scale=7.5,
        width=512,
        height=512,
        max_sequence_length=0,
    )
    assert [job.job_id for job in build_plan(sweep, MODELS).jobs] == [IDS_AT_THE_OLD_DEFAULTS[model]]


def _ids_digest(*overrides: str) -> str:
    plan = prepare(compose_config(list(overrides)))
    return hashlib.sha256(",".join(sorted(plan.table["job_id"])).encode()).hexdigest()[:16]


@pytest.mark.parametrize("sweep", sorted(PACKAGED_OLD_DEFAULTS))
def test_packaged_sweeps_keep_their_job_ids(tiny_cache: Path, sweep: str) -> None:
    assert _ids_digest(sweep) == PACKAGED[sweep]
    # Every size, steps and guidance given as the old defaults: today's ids, FLUX.1 and SD3.5 jobs included.
    assert _ids_digest(sweep, *OLD_DEFAULTS, "sweep.max_sequence_length=0") == PACKAGED_OLD_DEFAULTS[sweep]


def _table(*overrides: str) -> pd.DataFrame:
    return prepare(compose_config(["+sweep=next", "sweep.seeds=[1]", *overrides])).table


def test_a_value_left_to_the_model_is_the_job_of_that_value_given(tiny_cache: Path) -> None:
    unset = ("sweep.width=null", "sweep.height=null", "sweep.steps=null", "sweep.guidance_scale=null")
    left = _table(*unset)
    flux, sd3 = (left.loc[left["model"] == m] for m in ("tiny_flux", "tiny_sd3"))
    own = {"width": 1024, "height": 1024, "steps": 28, "guidance_scale": 3.5, "max_sequence_length": 0}
    assert {name: set(flux[name]) for name in own} == {name: {value} for name, value in own.items()}
    assert {name: set(sd3[name]) for name in own} == {
        **{"width": {64}, "height": {64}, "steps": {28}, "guidance_scale": {7.0}, "max_sequence_length": {0}}
    }
    given = _table(
        "sweep.width=1024",
        "sweep.height=1024",
        "sweep.steps=28",
        "sweep.guidance_scale=3.5",
        "sweep.models=[tiny_flux]",
    )
    assert sorted(given["job_id"]) == sorted(flux["job_id"])  # the id hashes the value rendered
    assert not set(flux["job_id"]) & set(_table(*OLD_DEFAULTS)["job_id"])  # other pixels, other ids


def test_a_model_without_readable_configs_needs_the_sweeps_values() -> None:
    sweep = dataclasses.replace(_sweep(models=["sd1"], stacks={}), **{**UNSET, "steps": 8, "guidance_scale": 5.0})
    with pytest.raises(BatchgenError) as raised:
        build_plan(sweep, MODELS, (), RunConfig())
    assert str(raised.value) == (
        "models.sd1: /m/sd1/unet/config.json cannot be read, and the sweep leaves sweep.width, sweep.height to the "
        "model; give them in the sweep, or complete the model's configs"
    )


def test_a_missing_vae_config_is_named(tmp_path: Path) -> None:
    folder = _shipped("sdxl", tmp_path)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(BatchgenError, match=r"^models\.m: .*/sdxl/vae/config\.json cannot be read, and the sweep "):
        model_defaults(_spec("sdxl", folder), ["width"])
    # What the sweep gives is never looked up.
    assert model_defaults(_spec("sdxl", folder), ["steps"]) == {"steps": 20}


def test_the_dry_run_prints_each_models_settings_that_are_no_axis(run_cli, tmp_path: Path) -> None:
    # A sweep file that names no size, steps or guidance, as a user writes one; the T5 length is an axis.
    body = "  prompts: [a castle]\n  seeds: [1]\n  max_sequence_length: [0, 77]\n"
    conf = write_conf(tmp_path / "conf", "own", body, {"tiny_sd1": None, "tiny_flux": None})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=own", "--dry-run")
    assert code == 0, err
    block = out.split("settings of each model, where not an axis:\n")[1].split("jobs:")[0]
    assert block == (
        "  tiny_sd1   seed 1, steps 20, guidance_scale 7.5, width 64, height 64, scheduler default, clip_skip 1,\n"
        "             truncate_prompts false, prompt_syntax a1111, pad_prompts false\n"
        "  tiny_flux  seed 1, steps 28, guidance_scale 3.5, width 1024, height 1024, scheduler default, clip_skip 1,\n"
        "             truncate_prompts false, prompt_syntax a1111, pad_prompts false\n"
    )
    # Two models' own steps are one value each, no axis; the T5 length is one (SD1's jobs do not read it).
    assert "  steps           1\n" in out and "  width           1\n" in out and "  max_sequence_length  2\n" in out
    assert "jobs: 3 to render in total" in out  # SD1 renders 0 and 77 alike: one job


def test_the_dry_run_says_what_a_t5_length_of_0_is_and_leaves_it_out_without_t5(run_cli) -> None:
    code, out, err = run_cli("+sweep=next", "sweep.models=[tiny_flux]", "sweep.seeds=[1]", "--dry-run")
    assert code == 0, err
    assert out.split("where not an axis:\n")[1].split("jobs:")[0] == (
        "  tiny_flux  seed 1, steps 4, guidance_scale 3.5, width 64, height 64, scheduler default, clip_skip 1,\n"
        "             truncate_prompts false, prompt_syntax a1111, pad_prompts false,\n"
        "             max_sequence_length 0 (the pipeline's 512)\n"
    )
    code, out, err = run_cli("+sweep=styles", "sweep.models=[tiny_sd1]", "--dry-run")
    assert code == 0, err
    assert out.split("where not an axis:\n")[1].split("jobs:")[0] == (
        "  tiny_sd1  steps 8, guidance_scale 7.5, width 64, height 64, scheduler default, clip_skip 1, "
        "truncate_prompts false,\n"
        "            prompt_syntax a1111, pad_prompts false\n"
    )


def test_a_tiny_flux_sweep_without_a_size_renders_at_the_models_own(run_cli) -> None:
    code, out, err = run_cli(
        "+sweep=next",
        "sweep.models=[tiny_flux]",
        "sweep.prompts=[a castle]",
        "sweep.slots={}",
        "sweep.seeds=[1]",
        "sweep.steps=1",  # one step keeps 1024x1024 cheap on a CPU
        "sweep.width=null",
        "sweep.height=null",
        "sweep.guidance_scale=null",
        "~sweep.stacks.ink",
        "~sweep.stacks.ink_grain",
        "~sweep.stacks.pastel",
    )
    assert code == 0, err
    run = Path("runs/next")
    row = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False).iloc[0]
    assert (row.status, row.width, row.height, row.steps, row.guidance_scale) == ("ok", "1024", "1024", "1", "3.5")
    with Image.open(run / row.image) as image:
        assert image.size == (1024, 1024)
        assert "Size: 1024x1024" in image.text["parameters"]


def test_a_sweep_config_default_is_null_for_each_setting_left_to_the_model() -> None:
    sweep = SweepConfig(name="x")
    assert {name: getattr(sweep, name) for name in OWN} == UNSET
