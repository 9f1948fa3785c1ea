"""Single-file checkpoints: base detection from full-size key sets (meta device), the shipped configs, tokenizer
lookup, base disagreement, and the tiny SD1/SDXL round trip (folder -> A1111-layout file -> same pixels)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from batchgen.assets.bases import checkpoint_base
from batchgen.assets.bases.record import SHIPPED_CONFIGS
from batchgen.assets.safetensors_header import Header, TensorInfo
from batchgen.assets.single_file import check_single_file
from batchgen.errors import BatchgenError
from tests import original_layout

# --- full-size key sets from the shipped configs, on the meta device --------------------------------------------


def _meta_original_header(base: str) -> Header:
    """The header a real A1111 checkpoint of `base` has: every original key with its shape, no data."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = SHIPPED_CONFIGS / base
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        state = original_layout.unet_to_original(unet.state_dict(), unet.config)
        state |= original_layout.vae_to_original(vae.state_dict(), len(vae.config.up_block_types))
        if base == "sd-1":
            state |= original_layout.clip_to_original(text.state_dict(), "cond_stage_model.transformer.")
        elif base == "sd-2":
            state |= original_layout.open_clip_to_original(text.state_dict(), "cond_stage_model.model.")
        else:
            state |= original_layout.clip_to_original(text.state_dict(), "conditioner.embedders.0.transformer.")
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            state |= original_layout.open_clip_to_original(text_2.state_dict(), "conditioner.embedders.1.model.")
    return Header(tensors={k: TensorInfo("F16", tuple(v.shape)) for k, v in state.items()}, metadata={})


@pytest.fixture(scope="module")
def headers() -> dict[str, Header]:
    return {base: _meta_original_header(base) for base in ("sd-1", "sd-2", "sdxl")}


def test_full_size_key_sets_match_the_real_checkpoints(headers: dict[str, Header]) -> None:
    # Counts and shapes of the released SD1.5, SD2.1 and SDXL base files (their EMA-free tensors).
    sd1, sd2, sdxl = headers["sd-1"].tensors, headers["sd-2"].tensors, headers["sdxl"].tensors
    assert sd1["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd1["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (320, 640, 1, 1)
    assert sd1["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd1["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear projection
    assert sd2["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    assert sdxl["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert sdxl["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sdxl["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert sdxl["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"].shape == (5120, 1280)
    unet_keys = {b: sum(k.startswith("model.diffusion_model.") for k in h.tensors) for b, h in headers.items()}
    assert unet_keys == {"sd-1": 686, "sd-2": 686, "sdxl": 1680}


@pytest.mark.parametrize(("base", "width"), [("sd-1", 768), ("sd-2", 1024), ("sdxl", 2048)])
def test_base_is_detected_from_keys_and_shapes(headers: dict[str, Header], base: str, width: int) -> None:
    assert checkpoint_base(headers[base]) == (base, width)


@pytest.mark.parametrize("base", ["sd-1", "sd-2", "sdxl"])
def test_shipped_configs_load_every_key_of_a_real_checkpoint(headers: dict[str, Header], base: str) -> None:
    """diffusers' converters turn the full original key set into exactly the modules the shipped configs build."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    folder = SHIPPED_CONFIGS / base
    fake = {k: torch.empty(info.shape, device="meta") for k, info in headers[base].tensors.items()}
    for cls, convert, name in (
        (UNet2DConditionModel, convert_ldm_unet_checkpoint, "unet"),
        (AutoencoderKL, convert_ldm_vae_checkpoint, "vae"),
    ):
        config = json.loads((folder / name / "config.json").read_text())
        with torch.device("meta"):
            model = cls.from_config(config)
        converted = convert(fake, config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def _header(tmp_path: Path, headers: dict[str, Header], base: str, **extra: TensorInfo) -> Header:
    return Header(tensors={**headers[base].tensors, **extra}, metadata={})


def test_base_disagreement_is_an_error(headers: dict[str, Header], tmp_path: Path) -> None:
    with pytest.raises(BatchgenError) as e:
        check_single_file(tmp_path / "x.safetensors", headers["sdxl"], "sd-1", None, None, None, "models.m")
    assert (
        str(e.value) == f"models.m.base: 'sd-1' but {tmp_path}/x.safetensors is sdxl (cross-attention 2048); fix base"
    )


def _tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def test_tokenizer_comes_from_the_configured_folder(headers: dict[str, Header], tmp_path: Path) -> None:
    _tokenizer(tmp_path / "t")
    sd1 = check_single_file(tmp_path / "x.safetensors", headers["sd-1"], "sd-1", None, str(tmp_path / "t"), None, "m")
    assert sd1.config_dir == SHIPPED_CONFIGS / "sd-1"
    assert sd1.tokenizers == (("tokenizer", tmp_path / "t"),)
    _tokenizer(tmp_path / "xl" / "tokenizer")
    _tokenizer(tmp_path / "xl" / "tokenizer_2")
    xl = check_single_file(tmp_path / "x.safetensors", headers["sdxl"], "sdxl", None, str(tmp_path / "xl"), None, "m")
    assert xl.tokenizers == (("tokenizer", tmp_path / "xl/tokenizer"), ("tokenizer_2", tmp_path / "xl/tokenizer_2"))


def test_missing_tokenizer_says_where_to_put_one(
    headers: dict[str, Header], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(BatchgenError) as e:
        check_single_file(tmp_path / "x.safetensors", headers["sdxl"], "sdxl", None, None, None, "models.m")
    assert str(e.value) == (
        "models.m.tokenizer: no sdxl tokenizer found offline; copy tokenizer/ and tokenizer_2/ of "
        "stabilityai/stable-diffusion-xl-base-1.0 into a folder and set tokenizer: FOLDER in the model's yaml, or "
        "fetch it once with `hf download stabilityai/stable-diffusion-xl-base-1.0 --include 'tokenizer*/*'`"
    )
    with pytest.raises(BatchgenError) as e:
        check_single_file(tmp_path / "x.safetensors", headers["sd-1"], "sd-1", None, str(tmp_path), None, "models.m")
    assert str(e.value) == (
        f"models.m.tokenizer: {tmp_path}/tokenizer holds no tokenizer (vocab.json and merges.txt, or tokenizer.json); "
        "give a folder with tokenizer/ copied from stable-diffusion-v1-5/stable-diffusion-v1-5"
    )


def test_tokenizer_from_the_hugging_face_cache(
    headers: dict[str, Header], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--stabilityai--stable-diffusion-2-1" / "snapshots" / ("0" * 40)
    _tokenizer(snapshot / "tokenizer")
    (hub / "models--stabilityai--stable-diffusion-2-1" / "refs").mkdir()
    (hub / "models--stabilityai--stable-diffusion-2-1" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    sd2 = check_single_file(tmp_path / "x.safetensors", headers["sd-2"], "sd-2", None, None, None, "m")
    assert sd2.tokenizers == (("tokenizer", snapshot / "tokenizer"),)
    assert sd2.prediction_type is None  # the shipped sd-2 scheduler config is v_prediction already
    assert json.loads((sd2.config_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == (
        "v_prediction"
    )
    marked = _header(tmp_path, headers, "sd-2", v_pred=TensorInfo("F32", ()))
    assert check_single_file(tmp_path / "x.safetensors", marked, "sd-2", None, None, None, "m").prediction_type == (
        "v_prediction"
    )
    epsilon = check_single_file(tmp_path / "x.safetensors", headers["sd-2"], "sd-2", None, None, "epsilon", "m")
    assert epsilon.prediction_type == "epsilon"


def test_special_files_are_refused(headers: dict[str, Header], tmp_path: Path) -> None:
    inpaint = _header(
        tmp_path,
        headers,
        "sd-1",
        **{"model.diffusion_model.input_blocks.0.0.weight": TensorInfo("F16", (320, 9, 3, 3))},
    )
    with pytest.raises(BatchgenError, match="has a UNet with 9 input channels"):
        check_single_file(tmp_path / "x.safetensors", inpaint, "sd-1", None, None, None, "m")
    unet_only = Header({k: v for k, v in headers["sd-1"].tensors.items() if k.startswith("model.")}, {})
    with pytest.raises(BatchgenError) as e:
        check_single_file(tmp_path / "x.safetensors", unet_only, "sd-1", None, None, None, "m")
    assert str(e.value) == (
        f"m.checkpoint: {tmp_path}/x.safetensors holds no sd-1 text encoder (cond_stage_model.transformer.*); use a "
        "full checkpoint (UNet, VAE and text encoders in one file)"
    )


# --- the tiny round trip: folder -> single file -> the same image -----------------------------------------------


def _write_single_file(tiny_cache: Path, name: str, dest: Path) -> Path:
    """`dest` as .safetensors and, beside it, the same tensors as an A1111-style .ckpt pickle."""
    from diffusers import DiffusionPipeline

    folder = next((tiny_cache).glob(f"*/{name}/main/{name}"))
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    state = original_layout.pipeline_to_original(pipe)
    save_file(state, str(dest))
    # Training state beside the weights, as in CompVis checkpoints: unwrapped though "state_dict" is not alone.
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, dest.with_suffix(".ckpt"))
    return folder


@pytest.mark.parametrize(("name", "base"), [("tiny_sd1", "sd-1"), ("tiny_sdxl", "sdxl")])
def test_single_file_renders_the_same_image_as_its_folder(
    run_cli, tiny_cache: Path, tmp_path: Path, name: str, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _write_single_file(tiny_cache, name, tmp_path / f"{name}.safetensors")
    root = folder.parent.parent
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "sweep").mkdir()
    # The tiny model's configs and tokenizer stand in for the shipped full-size ones.
    for model, suffix in (("single", "safetensors"), ("ckpt", "ckpt")):
        (conf / "model" / f"{model}.yaml").write_text(
            f"base: {base}\ncheckpoint: {tmp_path}/{name}.{suffix}\nconfig: {folder}\n"
            f"loras: [{root}/lora]\nembeddings: [{root}/embedding]\n"
        )
    (conf / "sweep" / "rt.yaml").write_text(
        "# @package _global_\n"
        f"defaults:\n  - /model@models.folder: {name}\n  - /model@models.single: single\n"
        "  - /model@models.ckpt: ckpt\n"
        "sweep:\n  name: rt\n  prompts: ['a castle at night, watercolor']\n"
        "  stacks: {none: {}, ink: {ink: 0.8}}\n  seeds: [1]\n  steps: 2\n  width: 64\n  height: 64\n"
    )
    loads: list[tuple[str, object]] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loads.append((sys._getframe(1).f_globals["__name__"], str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=rt")
    assert code == 0, err
    ckpt = str(tmp_path / f"{name}.ckpt")
    # Once to plan (keys and shapes), once to load; never without weights_only, never by diffusers itself.
    assert loads == [("batchgen.assets.tensors", ckpt, True)] * 2, loads
    rows = pd.read_csv(tmp_path / "runs" / "rt" / "manifest.csv", keep_default_na=False)
    assert len(rows) == 6 and set(rows["status"]) == {"ok"}, rows[["model", "stack", "status"]]
    # PNG bytes differ by the model name and hash in their parameters; the pixels must not.
    run = tmp_path / "runs" / "rt"
    by = {(r.model, r.stack): np.asarray(Image.open(run / r.image)) for r in rows.itertuples()}
    assert len(by) == 6, list(by)
    for model in ("single", "ckpt"):
        assert np.array_equal(by[("folder", "none")], by[(model, "none")]), model
        assert np.array_equal(by[("folder", "ink")], by[(model, "ink")]), model
    assert not np.array_equal(by[("folder", "none")], by[("folder", "ink")])
    # A1111 names a checkpoint by the sha256 of the file, whatever its format.
    for model, suffix in (("single", "safetensors"), ("ckpt", "ckpt")):
        image = run / rows.loc[rows["model"] == model, "image"].iloc[0]
        digest = hashlib.sha256((tmp_path / f"{name}.{suffix}").read_bytes()).hexdigest()
        assert f"Model hash: {digest[:10]}, Model: {model}" in Image.open(image).info["parameters"]
