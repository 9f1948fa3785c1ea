"""The base registry: one module per base under batchgen/assets/bases/, each listed in BASES, each record agreeing
with the component configs batchgen ships for it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from batchgen.assets import bases
from batchgen.assets.block_weights import BLOCK_IDS
from batchgen.plan.compel_rules import COMPEL_CLIP_SKIPS

MODULES = sorted(p.stem for p in Path(bases.__file__).parent.glob("*.py") if p.stem not in ("__init__", "record"))


def test_every_base_module_is_registered_once() -> None:
    declared = [importlib.import_module(f"batchgen.assets.bases.{name}").BASE for name in MODULES]
    assert MODULES == ["flux", "sd1", "sd2", "sd3", "sdxl"]
    assert sorted(b.name for b in declared) == sorted(bases.BASE_NAMES) == ["flux", "sd-1", "sd-2", "sd-3", "sdxl"]
    assert sorted(map(id, bases.BASES)) == sorted(map(id, declared))  # the modules' own records, each once


@pytest.mark.parametrize("base", bases.BASES, ids=lambda b: b.name)
def test_a_base_record_agrees_with_its_shipped_configs(base: bases.Base) -> None:
    folder = base.shipped_configs
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == base.pipeline_class
    assert bases.pipeline_base(index) == (base.name if base.denoiser == "transformer" or base.name == "sdxl" else None)
    assert index[base.denoiser][1] == base.denoiser_class
    denoiser = json.loads((folder / base.denoiser / "config.json").read_text())
    assert denoiser.get("cross_attention_dim") == base.cross_attention_width
    for component, width in base.text_encoders.items():
        config = json.loads((folder / component / "config.json").read_text())
        assert config.get("hidden_size", config.get("d_model")) == width
    assert sorted(c for c in index if c.startswith("text_encoder")) == sorted(base.text_encoders)
    if base.denoiser == "transformer":
        # What reads the encoders: the pooled CLIP vector(s) and T5's sequence.
        t5 = base.text_encoders[max(base.text_encoders)]
        assert denoiser["joint_attention_dim"] == t5
        clips = [w for c, w in base.text_encoders.items() if w != t5]
        assert denoiser["pooled_projection_dim"] == (clips[0] if base.guidance == "distilled" else sum(clips))


UNET_BASES = [b for b in bases.BASES if b.denoiser == "unet"]


@pytest.mark.parametrize("base", UNET_BASES, ids=lambda b: b.name)
def test_a_base_record_feeds_block_weights_and_compel(base: bases.Base) -> None:
    assert BLOCK_IDS[base.name] == base.block_ids
    full = base.block_ids[max(base.block_ids)]
    assert full[0] == "BASE" and "M00" in full and len(set(full)) == len(full)
    for ids in base.block_ids.values():
        assert set(ids) <= set(full)  # a short vector names a subset of the full one's blocks
    assert COMPEL_CLIP_SKIPS[base.name] == base.compel_clip_skips and 1 in base.compel_clip_skips


def test_levels_of_the_unet_give_the_block_counts() -> None:
    # 12 input/output blocks for SD1/SD2's 4 levels, 9 for SDXL's 3: the extension's 26- and 20-vectors.
    assert {b.name: max(b.block_ids) for b in UNET_BASES} == {"sd-1": 26, "sd-2": 26, "sdxl": 20}
    assert bases.BY_NAME["sd-2"].block_ids is bases.BY_NAME["sd-1"].block_ids


def test_transformer_bases_encode_their_own_prompts_and_have_no_compel() -> None:
    for base in bases.BASES:
        assert (base.denoiser == "transformer") == base.pipeline_encodes_prompts
        # A base whose blocks are not the CompVis UNet's says how its modules fall into them.
        assert (base.module_block is not None) == (base.denoiser == "transformer" and bool(base.block_ids))
    transformer = [b.name for b in bases.BASES if b.denoiser == "transformer"]
    assert transformer == ["sd-3", "flux"]
    assert not any(b.name in COMPEL_CLIP_SKIPS for b in bases.BASES if b.name in transformer)
    assert "sd-3" not in BLOCK_IDS  # the extension has no SD3 ids
    assert bases.DENOISERS == ("unet", "transformer")


def test_flux_block_ids_count_the_blocks_of_flux1() -> None:
    config = json.loads((bases.BY_NAME["flux"].shipped_configs / "transformer" / "config.json").read_text())
    ids = BLOCK_IDS["flux"][61]
    assert sum(b.startswith("D") for b in ids) == config["num_layers"] == 19
    assert sum(b.startswith("S") for b in ids) == config["num_single_layers"] == 38


def test_variants_are_told_from_the_denoiser_config() -> None:
    flux, sd3 = bases.BY_NAME["flux"], bases.BY_NAME["sd-3"]
    dev = json.loads((flux.shipped_configs / "transformer" / "config.json").read_text())
    assert flux.variant(dev) == "dev"
    assert flux.variant({**dev, "guidance_embeds": False}) == "schnell"  # FLUX.1-schnell's config
    large = json.loads((sd3.shipped_configs / "transformer" / "config.json").read_text())
    assert sd3.variant(large) == "3.5 large"
    assert sd3.variant({**large, "num_layers": 24, "qk_norm": None}) == "3 medium"
    assert sd3.variant({**large, "num_layers": 2}) is None  # the tiny one
    assert bases.BY_NAME["sdxl"].variant({}) is None  # a base without variants


def test_list_names_the_variant(run_cli) -> None:
    code, out, err = run_cli("+sweep=next", "--list")
    assert code == 0, err
    lines = [line for line in out.splitlines() if not line.startswith(" ")]
    assert [line.split("  ")[0] for line in lines] == ["tiny_sd3 (sd-3)", "tiny_flux (flux, dev)"]


def test_one_rule_says_whether_a_job_runs_a_negative_pass() -> None:
    sd1, sd3, flux = bases.BY_NAME["sd-1"], bases.BY_NAME["sd-3"], bases.BY_NAME["flux"]
    assert [sd1.negative_pass(g) for g in (0.0, 1.0, 1.5, 7.5)] == [False, False, True, True]
    assert [sd3.negative_pass(g) for g in (1.0, 3.5)] == [False, True]
    assert [flux.negative_pass(g) for g in (0.0, 3.5, 7.5)] == [False, False, False]
    # LCM: a UNet that reads the guidance scale as an input runs no negative pass, as diffusers decides
    assert (sd1.negative_pass(7.5, {"time_cond_proj_dim": 256}), sd1.negative_pass(7.5, {})) == (False, True)
    assert (sd1.reads_negative_prompt, sd3.reads_negative_prompt, flux.reads_negative_prompt) == (True, True, False)


def test_each_base_declares_the_kohya_prefixes_of_its_text_encoders() -> None:
    for base in bases.BASES:
        assert set(base.kohya_text_encoder_prefixes.values()) == set(base.text_encoders), base.name
        assert all(p.startswith("lora_te") and p.endswith("_") for p in base.kohya_text_encoder_prefixes), base.name
