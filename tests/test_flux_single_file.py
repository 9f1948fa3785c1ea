"""FLUX.1 single files: a transformer in Black Forest Labs' layout (alone, or under ComfyUI's model.diffusion_model.)
with the rest of the pipeline from a diffusers folder renders exactly what that folder renders; a file that does
not fit is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from batchgen.assets.flux_checkpoint import convert_flux_checkpoint, transformer_keys
from batchgen.tiny import tiny_root
from tests.confs import SMALL, write_conf
from tests.reference import assert_same_weights_render_alike

# BFL's module names (its flux/model.py and flux/modules/layers.py) beside the diffusers modules whose rows they
# stack, written out here apart from batchgen's tables.
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
DOUBLE_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def bfl_state_dict(ours: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's weights as BFL saves them: fused Linears are their parts' rows stacked, the
    final modulation is [shift; scale] where diffusers keeps [scale; shift]."""
    out = {}
    for kind, count, root, linears, norms in (
        ("double_blocks", double, "transformer_blocks", DOUBLE, DOUBLE_NORMS),
        ("single_blocks", single, "single_transformer_blocks", SINGLE, SINGLE_NORMS),
    ):
        for i in range(count):
            for name, parts in linears.items():
                for param in ("weight", "bias"):
                    out[f"{kind}.{i}.{name}.{param}"] = torch.cat([ours[f"{root}.{i}.{p}.{param}"] for p in parts])
            for name, path in norms.items():
                out[f"{kind}.{i}.{name}.scale"] = ours[f"{root}.{i}.{path}.weight"]
    for name, path in TOP.items():
        for param in ("weight", "bias"):
            out[f"{name}.{param}"] = ours[f"{path}.{param}"]
    for param in ("weight", "bias"):
        scale, shift = ours[f"norm_out.linear.{param}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
    return out


@pytest.fixture(scope="module")
def tiny_flux(tiny_cache: Path) -> Path:
    return tiny_root("tiny_flux", tiny_cache) / "main" / "tiny_flux"


def _files(tiny_flux: Path, folder: Path) -> tuple[Path, Path, Path]:
    """(ComfyUI-layout file, BFL transformer-only file, a diffusers folder without the transformer's weights)."""
    from safetensors.torch import load_file

    ours = load_file(str(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors"))
    bfl = bfl_state_dict(ours, double=1, single=1)
    comfy, alone = folder / "flux1-tiny-comfy.safetensors", folder / "flux1-tiny-transformer.safetensors"
    extra = {"vae.decoder.conv_in.weight": torch.zeros(1), "text_encoders.clip_l.x": torch.zeros(1)}  # not read
    save_file({**{f"model.diffusion_model.{k}": v for k, v in bfl.items()}, **extra}, str(comfy))
    save_file(bfl, str(alone))
    rest = folder / "flux1-rest"
    rest.mkdir()
    for entry in tiny_flux.iterdir():
        if entry.name != "transformer":
            (rest / entry.name).symlink_to(entry)
    (rest / "transformer").mkdir()
    (rest / "transformer" / "config.json").symlink_to(tiny_flux / "transformer" / "config.json")
    return comfy, alone, rest


def test_the_conversion_gives_back_every_weight_bit_for_bit(tiny_flux: Path) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors"))
    converted = convert_flux_checkpoint(
        transformer_keys(bfl_state_dict(ours, 1, 1)), {k: v.shape for k, v in ours.items()}
    )
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k].view(torch.uint8), ours[k].view(torch.uint8)) for k in ours)


def test_keys_and_shapes_match_diffusers_own_converter_at_full_size() -> None:
    import json

    import diffusers
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from batchgen.assets.bases import BY_NAME

    config = json.loads((BY_NAME["flux"].shipped_configs / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel.from_config(config)
        ours = dict(model.state_dict())
        bfl = bfl_state_dict(ours, double=19, single=38)
        theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    target = {k: tuple(v.shape) for k, v in ours.items()}
    converted = convert_flux_checkpoint(transformer_keys(bfl), target)
    assert (
        {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()} == target
    )


@pytest.mark.parametrize("layout", ["comfy", "transformer_only"])
def test_a_single_file_renders_what_its_diffusers_folder_renders(
    layout: str, run_cli, tmp_path: Path, tiny_flux: Path
) -> None:
    comfy, alone, rest = _files(tiny_flux, tmp_path)
    file = comfy if layout == "comfy" else alone
    lora = tiny_flux.parents[1] / "lora"
    models = {
        "folder": f"base: flux\ncheckpoint: {tiny_flux}\nloras: [{lora}]\n",
        "file": f"base: flux\ncheckpoint: {file}\nconfig: {rest}\nloras: [{lora}]\n",
    }
    body = SMALL + "  prompts: [a fox]\n  stacks: {none: {}, ink: {ink: 0.8}, sketch: {sketch: 1.0}}\n"
    conf = write_conf(tmp_path / "conf", "flux1", body, models)
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=flux1")
    assert code == 0, err
    table = pd.read_csv("runs/flux1/manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 6 and set(table["status"]) == {"ok"}
    # The PNGs' parameters name the model; the pixels must be the same.
    images = {(r["model"], r["loras"]): Image.open(Path("runs/flux1") / r["image"]) for _, r in table.iterrows()}
    for loras in ("", "ink:0.8", "sketch:1"):
        assert_same_weights_render_alike(images[("file", loras)], images[("folder", loras)], loras)
    assert len({images[("folder", loras)].tobytes() for loras in ("", "ink:0.8", "sketch:1")}) == 3  # LoRAs show


def _refusal(run_cli, tmp_path: Path, model: str) -> str:
    conf = write_conf(tmp_path / "conf", "flux1", SMALL, {"m": model})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=flux1", "--dry-run")
    assert (code, out) == (2, ""), err
    return err


def test_a_file_without_config_or_with_a_missing_weight_is_refused(run_cli, tmp_path: Path, tiny_flux: Path) -> None:
    comfy, alone, rest = _files(tiny_flux, tmp_path)
    err = _refusal(run_cli, tmp_path, f"base: flux\ncheckpoint: {alone}\n")
    assert err == (
        f"batchgen: error: models.m.config: {alone} is read for FLUX.1's transformer alone; give config: a diffusers "
        "FLUX.1 folder with its text encoders, tokenizers and VAE (its transformer/ needs only config.json), e.g. "
        "black-forest-labs/FLUX.1-dev downloaded without transformer/*.safetensors\n"
    )
    from safetensors.torch import load_file

    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in load_file(str(alone)).items() if k != "single_blocks.0.linear2.bias"}, str(broken))
    err = _refusal(run_cli, tmp_path, f"base: flux\ncheckpoint: {broken}\nconfig: {rest}\n")
    assert err == (
        f"batchgen: error: models.m.checkpoint: {broken}: the file lacks 1 weights of the transformer, e.g. "
        f"single_transformer_blocks.0.proj_out.bias; is {rest / 'transformer' / 'config.json'} this model's config?\n"
    )
    err = _refusal(run_cli, tmp_path, f"base: sdxl\ncheckpoint: {comfy}\nconfig: {rest}\n")
    assert err == f"batchgen: error: models.m.base: 'sdxl' but {comfy} is a FLUX.1 checkpoint; fix base\n"
