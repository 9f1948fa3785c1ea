"""Whole-file VAEs and text encoders as ComfyUI keeps them (`vae:`, `text_encoders:` of a model config): read in
place of the checkpoint's own, they render what the diffusers folder renders; a file that does not fit is refused
before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from batchgen.assets.bases import BY_NAME
from batchgen.assets.component_files import convert_component
from batchgen.tiny import tiny_root
from tests.confs import SMALL, write_conf
from tests.original_layout import clip_to_original, pipeline_to_original, vae_to_original
from tests.reference import assert_same_weights_render_alike
from tests.test_flux_single_file import bfl_state_dict


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(folder.glob("*.safetensors"))))


def comfy_vae(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers VAE folder's weights as ComfyUI's models/vae files hold them: CompVis names, no root."""
    config = json.loads((folder / "config.json").read_text())
    ldm = vae_to_original(_weights(folder), len(config["up_block_types"]))
    return {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}


def comfy_clip(folder: Path) -> dict[str, torch.Tensor]:
    """A CLIP text encoder as ComfyUI's clip_l.safetensors holds it: transformers' names with the text_model level,
    and a projection even where the model has none (CLIP-L's own, which FLUX.1 and SD1 do not use)."""
    state = clip_to_original(_weights(folder), "")
    width = state["text_model.embeddings.token_embedding.weight"].shape[1]
    return {"text_projection.weight": torch.eye(width), **state}


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path):
    return lambda name: tiny_root(name, tiny_cache) / "main" / name


def _render(run_cli, tmp_path: Path, models: dict[str, str], body: str) -> dict[tuple[str, str], Image.Image]:
    conf = write_conf(tmp_path / "conf", "parts", SMALL + body, models)
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=parts")
    assert code == 0, err
    table = pd.read_csv("runs/parts/manifest.csv", dtype=str, keep_default_na=False)
    assert set(table["status"]) == {"ok"}, table["error"]
    return {(r["model"], r["loras"]): Image.open(Path("runs/parts") / r["image"]) for _, r in table.iterrows()}


def _configs_only(source: Path, folder: Path) -> Path:
    """A diffusers folder with every config and tokenizer of `source` and no weights at all."""
    folder.mkdir()
    for entry in source.iterdir():
        if entry.is_file():
            (folder / entry.name).symlink_to(entry)
        elif entry.name.startswith("tokenizer") or entry.name == "scheduler":
            (folder / entry.name).symlink_to(entry)
        else:
            (folder / entry.name).mkdir()
            (folder / entry.name / "config.json").symlink_to(entry / "config.json")
    return folder


@pytest.mark.parametrize("layout", ["separate files", "one whole-model file"])
def test_a_flux_single_file_with_comfyui_vae_and_text_encoders_renders_the_folders_images(
    run_cli, tmp_path: Path, tiny, layout: str
) -> None:
    flux = tiny("tiny_flux")
    transformer = tmp_path / "flux1-tiny.safetensors"
    bfl = bfl_state_dict(_weights(flux / "transformer"), double=1, single=1)
    vae, clip, t5 = comfy_vae(flux / "vae"), comfy_clip(flux / "text_encoder"), _weights(flux / "text_encoder_2")
    if layout == "separate files":  # ComfyUI's models/unet, models/vae and models/text_encoders
        save_file(bfl, str(transformer))
        ae, clip_l, t5xxl = tmp_path / "ae.safetensors", tmp_path / "clip_l.safetensors", tmp_path / "t5.safetensors"
        save_file(vae, str(ae))
        save_file(clip, str(clip_l))
        save_file(t5, str(t5xxl))  # transformers' names: ComfyUI's t5xxl files are so
    else:  # ComfyUI's checkpoint save: every part in one file, each under its root
        whole = {f"model.diffusion_model.{k}": v for k, v in bfl.items()} | {f"vae.{k}": v for k, v in vae.items()}
        whole |= {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip.items()}
        whole |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()}
        save_file(whole, str(transformer))
        ae = clip_l = t5xxl = transformer
    rest = _configs_only(flux, tmp_path / "flux1-configs")
    lora = flux.parents[1] / "lora"
    models = {
        "folder": f"base: flux\ncheckpoint: {flux}\nloras: [{lora}]\n",
        "files": (
            f"base: flux\ncheckpoint: {transformer}\nconfig: {rest}\nloras: [{lora}]\nvae: {ae}\n"
            f"text_encoders: {{text_encoder: {clip_l}, text_encoder_2: {t5xxl}}}\n"
        ),
    }
    # ink is kohya with CLIP-L layers: it patches the text encoder read from clip_l.safetensors
    images = _render(run_cli, tmp_path, models, "  prompts: [a fox]\n  stacks: {none: {}, ink: {ink: 0.8}}\n")
    for loras in ("", "ink:0.8"):
        assert_same_weights_render_alike(images[("files", loras)], images[("folder", loras)], loras)
    assert images[("folder", "")].tobytes() != images[("folder", "ink:0.8")].tobytes()


@pytest.mark.parametrize("layout", ["diffusers folder", "single file"])
def test_an_sd1_vae_file_is_read_in_place_of_the_checkpoints_own(run_cli, tmp_path: Path, tiny, layout: str) -> None:
    from diffusers import StableDiffusionPipeline

    sd1 = tiny("tiny_sd1")
    checkpoint = sd1
    if layout == "single file":
        checkpoint = tmp_path / "tiny_sd1.safetensors"
        save_file(pipeline_to_original(StableDiffusionPipeline.from_pretrained(str(sd1))), str(checkpoint))
    same, other = tmp_path / "same-vae.safetensors", tmp_path / "other-vae.safetensors"
    vae = comfy_vae(sd1 / "vae")
    save_file(vae, str(same))
    save_file({**vae, "decoder.conv_out.bias": vae["decoder.conv_out.bias"] + 0.2}, str(other))
    config = f"config: {sd1}\ntokenizer: {sd1 / 'tokenizer'}\n" if layout == "single file" else ""
    models = {
        "plain": f"base: sd-1\ncheckpoint: {checkpoint}\n{config}",
        "same": f"base: sd-1\ncheckpoint: {checkpoint}\n{config}vae: {same}\n",
        "other": f"base: sd-1\ncheckpoint: {checkpoint}\n{config}vae: {other}\n",
    }
    images = _render(run_cli, tmp_path, models, "  prompts: [a fox]\n  stacks: {none: {}}\n")
    assert images[("same", "")].tobytes() == images[("plain", "")].tobytes()
    assert images[("other", "")].tobytes() != images[("plain", "")].tobytes()  # the file's weights decode
    table = pd.read_csv("runs/parts/manifest.csv", dtype=str, keep_default_na=False)
    assert table["job_id"].nunique() == 3  # each VAE file is part of its jobs' ids
    code, out, err = run_cli("--config-dir", str(tmp_path / "conf"), "+sweep=parts", "--list")
    assert code == 0, err
    assert f"  vae  same-vae.safetensors  whole file, vae  {same}" in out.splitlines()


def test_sdxl_text_encoder_files_render_the_folders_images(run_cli, tmp_path: Path, tiny) -> None:
    sdxl = tiny("tiny_sdxl")
    clip_l, clip_g = tmp_path / "clip_l.safetensors", tmp_path / "clip_g.safetensors"
    save_file(clip_to_original(_weights(sdxl / "text_encoder"), ""), str(clip_l))
    # SD3's clip_g.safetensors: under a root, with its projection (CLIPTextModelWithProjection)
    save_file(clip_to_original(_weights(sdxl / "text_encoder_2"), "text_encoders.clip_g.transformer."), str(clip_g))
    model = f"base: sdxl\ncheckpoint: {sdxl}\nloras: [{sdxl.parents[1] / 'lora'}]\n"
    models = {
        "folder": model,
        "files": model + f"text_encoders: {{text_encoder: {clip_l}, text_encoder_2: {clip_g}}}\n",
    }
    images = _render(run_cli, tmp_path, models, "  prompts: [a fox]\n  stacks: {none: {}, ink: {ink: 0.8}}\n")
    for loras in ("", "ink:0.8"):
        assert images[("files", loras)].tobytes() == images[("folder", loras)].tobytes()


def _refusal(run_cli, tmp_path: Path, model: str) -> str:
    conf = write_conf(tmp_path / "conf", "parts", SMALL + "  prompts: [a fox]\n", {"m": model})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=parts", "--dry-run")
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and not Path("runs").exists()
    return err.removeprefix("batchgen: error: ").rstrip("\n")


def test_files_that_do_not_fit_are_refused_before_anything_loads(run_cli, tmp_path: Path, tiny) -> None:
    flux, sd1 = tiny("tiny_flux"), tiny("tiny_sd1")
    clip_l, sd1_vae, lora = tmp_path / "clip_l.safetensors", tmp_path / "sd1-vae.safetensors", tmp_path / "x.txt"
    save_file(comfy_clip(flux / "text_encoder"), str(clip_l))
    save_file(comfy_vae(sd1 / "vae"), str(sd1_vae))
    lora.write_text("not weights")
    model = f"base: flux\ncheckpoint: {flux}\n"
    missing = tmp_path / "nowhere" / "ae.safetensors"
    assert _refusal(run_cli, tmp_path, model + f"vae: {missing}") == (
        f"models.m.vae: {missing} does not exist; give the vae file (.safetensors)"
    )
    assert _refusal(run_cli, tmp_path, model + f"vae: {lora}") == (
        f"models.m.vae: {lora} is not a weights file batchgen reads; give one ending in .safetensors, .ckpt, .pt, "
        ".pth, .bin"
    )
    assert _refusal(run_cli, tmp_path, model + f"vae: {clip_l}") == (
        f"models.m.vae: {clip_l} holds a CLIP text encoder, not a VAE; give the file of this model's vae "
        "(AutoencoderKL)"
    )
    assert _refusal(run_cli, tmp_path, model + f"text_encoders: {{text_encoder_2: {clip_l}}}") == (
        f"models.m.text_encoders.text_encoder_2: {clip_l} holds a CLIP text encoder, not a T5 text encoder; give the "
        "file of this model's text_encoder_2 (T5EncoderModel)"
    )
    assert _refusal(run_cli, tmp_path, model + f"vae: {sd1_vae}") == (  # 4 latent channels where FLUX.1 has 16
        f"models.m.vae: {sd1_vae}: decoder.conv_in.weight has shape [16, 4, 3, 3], the model's config wants "
        "[16, 16, 3, 3]; is it FLUX.1's vae (AutoencoderKL)?"
    )
    assert _refusal(run_cli, tmp_path, model + f"text_encoders: {{text_encoder_3: {clip_l}}}") == (
        "models.m.text_encoders.text_encoder_3: FLUX.1 has no text_encoder_3; name text_encoder (CLIP-L) or "
        "text_encoder_2 (T5-XXL)"
    )
    transformer = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_state_dict(_weights(flux / "transformer"), double=1, single=1), str(transformer))
    rest = _configs_only(flux, tmp_path / "configs")
    single = f"base: flux\ncheckpoint: {transformer}\nconfig: {rest}\n"
    assert _refusal(run_cli, tmp_path, single + f"vae: {tmp_path / 'nowhere.safetensors'}").startswith(
        f"models.m.vae: {tmp_path / 'nowhere.safetensors'} does not exist"
    )
    ae = tmp_path / "ae.safetensors"
    save_file(comfy_vae(flux / "vae"), str(ae))
    assert _refusal(run_cli, tmp_path, single + f"vae: {ae}") == (
        f"models.m.config: {rest / 'text_encoder'} has no weights (*.safetensors); add them, or name its file in "
        "models.m.text_encoders.text_encoder"
    )


@pytest.mark.parametrize("base", ["sd-1", "sdxl", "sd-3", "flux"])
def test_vae_names_match_diffusers_own_converter_at_full_size(base: str) -> None:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = json.loads((BY_NAME[base].shipped_configs / "vae" / "config.json").read_text())
    with torch.device("meta"):
        ours = dict(diffusers.AutoencoderKL.from_config(config).state_dict())
        ldm = vae_to_original(ours, len(config["up_block_types"]))
        theirs = convert_ldm_vae_checkpoint(dict(ldm), config)
    target = {k: tuple(v.shape) for k, v in ours.items()}
    for state in (ldm, {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}):
        converted = convert_component("vae", state, target)
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_the_conversions_give_back_every_weight_bit_for_bit(tiny) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for name in ("tiny_sd1", "tiny_flux"):
        folder = tiny(name) / "vae"
        ours = _weights(folder)
        ldm = comfy_vae(folder)
        target = {k: tuple(v.shape) for k, v in ours.items()}
        converted = convert_component("vae", ldm, target)
        theirs = convert_ldm_vae_checkpoint(dict(ldm), json.loads((folder / "config.json").read_text()))
        assert all(torch.equal(converted[k], ours[k]) and torch.equal(theirs[k], ours[k]) for k in ours), name
    xl = tiny("tiny_sdxl")
    for component in ("text_encoder", "text_encoder_2"):  # CLIPTextModel and CLIPTextModelWithProjection
        ours = _weights(xl / component)
        for root in ("", "text_encoders.clip_g.transformer.", "conditioner.embedders.0.transformer."):
            converted = convert_component("clip", clip_to_original(ours, root), {k: v.shape for k, v in ours.items()})
            assert converted.keys() == ours.keys() and all(torch.equal(converted[k], ours[k]) for k in ours)
    t5 = _weights(tiny("tiny_flux") / "text_encoder_2")
    target = {**{k: v.shape for k, v in t5.items()}, "encoder.embed_tokens.weight": t5["shared.weight"].shape}
    converted = convert_component("t5", {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()}, target)
    assert converted["encoder.embed_tokens.weight"] is converted["shared.weight"]  # saved once, tied
