"""SD3/SD3.5 single files: an MMDiT in Stability's (SGM) layout (alone, or under ComfyUI's model.diffusion_model.)
with the rest of the pipeline from a diffusers folder renders exactly what that folder renders; a file that does
not fit is refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from batchgen.assets.sd3_checkpoint import convert_sd3_checkpoint, transformer_keys
from batchgen.tiny import tiny_root
from tests.confs import SMALL, write_conf
from tests.reference import assert_same_weights_render_alike

# SGM's module names (sd3_impls.py / SGM's mmdit.py) beside the diffusers modules whose rows they stack, as
# diffusers' convert_sd3_transformer_checkpoint_to_diffusers reads them; written out here apart from batchgen's
# tables. In a joint block:
X_BLOCK = {
    "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.proj": ("attn.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
    "adaLN_modulation.1": ("norm1.linear",),
}
X_BLOCK_NORMS = {"attn.ln_q": "attn.norm_q", "attn.ln_k": "attn.norm_k"}
# SD3.5-medium's second image attention, in its first blocks.
X_BLOCK_ATTN2 = {"attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.proj": ("attn2.to_out.0",)}
X_BLOCK_ATTN2_NORMS = {"attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k"}
CONTEXT_BLOCK = {
    "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn.proj": ("attn.to_add_out",),  # not in the last block: its context stream only feeds the attention
    "mlp.fc1": ("ff_context.net.0.proj",),
    "mlp.fc2": ("ff_context.net.2",),
    "adaLN_modulation.1": ("norm1_context.linear",),  # [shift; scale] in the last block, diffusers [scale; shift]
}
CONTEXT_BLOCK_NORMS = {"attn.ln_q": "attn.norm_added_q", "attn.ln_k": "attn.norm_added_k"}
TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}


def _shift_scale(tensor: torch.Tensor) -> torch.Tensor:
    scale, shift = tensor.chunk(2)
    return torch.cat([shift, scale])


def sgm_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer's weights as SGM saves them: fused Linears are their parts' rows stacked, the
    final layer's and the last block's context modulations are [shift; scale]."""
    count = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("transformer_blocks."))
    out = {"pos_embed": ours["pos_embed.pos_embed"]}
    for i in range(count):
        inside, last = f"transformer_blocks.{i}", i == count - 1
        dual = f"{inside}.attn2.to_q.weight" in ours
        qk_norm = f"{inside}.attn.norm_q.weight" in ours
        context = {k: v for k, v in CONTEXT_BLOCK.items() if not last or k in ("attn.qkv", "adaLN_modulation.1")}
        streams = (("x_block", {**X_BLOCK, **(X_BLOCK_ATTN2 if dual else {})}), ("context_block", context))
        for stream, linears in streams:
            for name, parts in linears.items():
                for param in ("weight", "bias"):
                    tensor = torch.cat([ours[f"{inside}.{p}.{param}"] for p in parts])
                    swap = last and stream == "context_block" and name == "adaLN_modulation.1"
                    out[f"joint_blocks.{i}.{stream}.{name}.{param}"] = _shift_scale(tensor) if swap else tensor
        norms = {
            "x_block": {**X_BLOCK_NORMS, **(X_BLOCK_ATTN2_NORMS if dual else {})},
            "context_block": CONTEXT_BLOCK_NORMS,
        }
        for stream, table in norms.items() if qk_norm else ():
            for name, path in table.items():
                out[f"joint_blocks.{i}.{stream}.{name}.weight"] = ours[f"{inside}.{path}.weight"]
    for name, path in TOP.items():
        for param in ("weight", "bias"):
            out[f"{name}.{param}"] = ours[f"{path}.{param}"]
    for param in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{param}"] = _shift_scale(ours[f"norm_out.linear.{param}"])
    return out


@pytest.fixture(scope="module")
def tiny_sd3(tiny_cache: Path) -> Path:
    return tiny_root("tiny_sd3", tiny_cache) / "main" / "tiny_sd3"


def _weights(tiny_sd3: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_sd3 / "transformer" / "diffusion_pytorch_model.safetensors"))


def _rest(tiny_sd3: Path, folder: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A diffusers folder of tiny_sd3's other components (symlinks), its transformer/ only a config.json."""
    folder.mkdir()
    for entry in tiny_sd3.iterdir():
        if entry.name not in ("transformer", *leave_out):
            (folder / entry.name).symlink_to(entry)
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").symlink_to(tiny_sd3 / "transformer" / "config.json")
    return folder


def _files(tiny_sd3: Path, folder: Path) -> tuple[Path, Path, Path]:
    """(ComfyUI-layout whole-model file, SGM transformer-only file, a diffusers folder without the transformer's
    weights)."""
    sgm = sgm_state_dict(_weights(tiny_sd3))
    comfy, alone = folder / "sd3.5-tiny-comfy.safetensors", folder / "sd3.5-tiny-transformer.safetensors"
    extra = {  # the file's own VAE and text encoders: not read
        "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
    }
    save_file({**{f"model.diffusion_model.{k}": v for k, v in sgm.items()}, **extra}, str(comfy))
    save_file(sgm, str(alone))
    return comfy, alone, _rest(tiny_sd3, folder / "sd3-rest")


def test_the_conversion_gives_back_every_weight_bit_for_bit(tiny_sd3: Path) -> None:
    ours = _weights(tiny_sd3)
    sgm = sgm_state_dict(ours)
    assert "joint_blocks.1.context_block.mlp.fc1.weight" not in sgm  # the last block is pre-only, as in SD3
    whole = {f"model.diffusion_model.{k}": v for k, v in sgm.items()} | {"first_stage_model.x": torch.zeros(1)}
    assert transformer_keys(whole).keys() == transformer_keys(sgm).keys() == sgm.keys()
    converted = convert_sd3_checkpoint(transformer_keys(whole), {k: v.shape for k, v in ours.items()})
    assert converted.keys() == ours.keys()
    assert all(torch.equal(converted[k].view(torch.uint8), ours[k].view(torch.uint8)) for k in ours)


def test_values_match_diffusers_own_converter_with_dual_attention() -> None:
    """An SD3.5-medium-like transformer (a second image attention in its first block): batchgen's conversion of
    its SGM weights is diffusers' own, value for value."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    )
    ours = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # norms and modulations not all ones
    sgm = sgm_state_dict(ours)
    assert "joint_blocks.0.x_block.attn2.ln_q.weight" in sgm and "joint_blocks.1.x_block.attn2.qkv.weight" not in sgm
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(sgm))
    converted = convert_sd3_checkpoint(transformer_keys(sgm), {k: v.shape for k, v in ours.items()})
    assert converted.keys() == theirs.keys() == ours.keys()
    assert all(torch.equal(converted[k], theirs[k]) and torch.equal(converted[k], ours[k]) for k in ours)


# SD3.5 large (the shipped config), SD3.5 medium (a second image attention in blocks 0-12) and SD3 medium (no qk
# norm), as their diffusers releases configure them.
VARIANTS = {
    "3.5 large": {},
    "3.5 medium": {
        "num_layers": 24,
        "num_attention_heads": 24,
        "caption_projection_dim": 1536,
        "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)),
    },
    "3 medium": {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536, "qk_norm": None},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_and_shapes_match_diffusers_own_converter_at_full_size(variant: str) -> None:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from batchgen.assets.bases import BY_NAME

    config = json.loads((BY_NAME["sd-3"].shipped_configs / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel.from_config({**config, **VARIANTS[variant]})
        ours = dict(model.state_dict())
        sgm = sgm_state_dict(ours)
        theirs = convert_sd3_transformer_checkpoint_to_diffusers(
            {f"model.diffusion_model.{k}": v for k, v in sgm.items()}
        )
    target = {k: tuple(v.shape) for k, v in ours.items()}
    converted = convert_sd3_checkpoint(transformer_keys(sgm), target)
    assert (
        {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in theirs.items()} == target
    )


@pytest.mark.parametrize("layout", ["comfy", "transformer_only"])
def test_a_single_file_renders_what_its_diffusers_folder_renders(
    layout: str, run_cli, tmp_path: Path, tiny_sd3: Path
) -> None:
    comfy, alone, rest = _files(tiny_sd3, tmp_path)
    file = comfy if layout == "comfy" else alone
    lora = tiny_sd3.parents[1] / "lora"
    models = {
        "folder": f"base: sd-3\ncheckpoint: {tiny_sd3}\nloras: [{lora}]\n",
        "file": f"base: sd-3\ncheckpoint: {file}\nconfig: {rest}\nloras: [{lora}]\n",
    }
    stacks = "{none: {}, ink: {ink: 0.8}, grain: {grain: 1.0}, pastel: {pastel: 1.0}}"
    body = SMALL + f"  prompts: [a fox]\n  stacks: {stacks}\n"
    conf = write_conf(tmp_path / "conf", "sd3", body, models)
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=sd3")
    assert code == 0, err
    table = pd.read_csv("runs/sd3/manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 8 and set(table["status"]) == {"ok"}
    # The PNGs' parameters name the model; the pixels must be the same.
    images = {(r["model"], r["loras"]): Image.open(Path("runs/sd3") / r["image"]) for _, r in table.iterrows()}
    stacks = ("", "ink:0.8", "grain:1", "pastel:1")
    for loras in stacks:
        assert_same_weights_render_alike(images[("file", loras)], images[("folder", loras)], loras)
    assert len({images[("folder", loras)].tobytes() for loras in stacks}) == 4  # the LoRAs change the image


def test_a_config_folder_without_t5_renders_as_diffusers_does_without_it(
    run_cli, tmp_path: Path, tiny_sd3: Path
) -> None:
    _, alone, _ = _files(tiny_sd3, tmp_path)
    without_t5 = ("text_encoder_3", "tokenizer_3")
    folder = _rest(tiny_sd3, tmp_path / "no-t5-folder", leave_out=without_t5)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(
        tiny_sd3 / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    models = {
        "folder": f"base: sd-3\ncheckpoint: {tiny_sd3}\n",
        "folder_no_t5": f"base: sd-3\ncheckpoint: {folder}\n",
        "file_no_t5": f"base: sd-3\ncheckpoint: {alone}\nconfig: {_rest(tiny_sd3, tmp_path / 'rest', without_t5)}\n",
    }
    conf = write_conf(tmp_path / "conf", "sd3", SMALL + "  prompts: [a fox]\n", models)
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=sd3")
    assert code == 0, err
    table = pd.read_csv("runs/sd3/manifest.csv", dtype=str, keep_default_na=False)
    assert set(table["status"]) == {"ok"}
    images = {r["model"]: Image.open(Path("runs/sd3") / r["image"]) for _, r in table.iterrows()}
    assert_same_weights_render_alike(images["file_no_t5"], images["folder_no_t5"], "without T5")
    assert images["folder_no_t5"].tobytes() != images["folder"].tobytes()


def _refusal(run_cli, tmp_path: Path, model: str) -> str:
    conf = write_conf(tmp_path / "conf", "sd3", SMALL, {"m": model})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=sd3", "--dry-run")
    assert (code, out) == (2, ""), err
    return err


def test_a_file_without_config_with_a_missing_weight_or_of_another_base_is_refused(
    run_cli, tmp_path: Path, tiny_sd3: Path, tiny_cache: Path
) -> None:
    comfy, alone, rest = _files(tiny_sd3, tmp_path)
    err = _refusal(run_cli, tmp_path, f"base: sd-3\ncheckpoint: {alone}\n")
    assert err == (
        f"batchgen: error: models.m.config: {alone} is read for SD3/SD3.5's transformer alone; give config: a "
        "diffusers SD3/SD3.5 folder with its text encoders, tokenizers and VAE (its transformer/ needs only "
        "config.json), e.g. stabilityai/stable-diffusion-3.5-large downloaded without transformer/*.safetensors\n"
    )
    broken = tmp_path / "broken.safetensors"
    save_file(
        {k: v for k, v in load_file(str(alone)).items() if k != "joint_blocks.1.x_block.attn.ln_k.weight"}, str(broken)
    )
    err = _refusal(run_cli, tmp_path, f"base: sd-3\ncheckpoint: {broken}\nconfig: {rest}\n")
    assert err == (
        f"batchgen: error: models.m.checkpoint: {broken}: the file lacks 1 weights of the transformer, e.g. "
        f"transformer_blocks.1.attn.norm_k.weight; is {rest / 'transformer' / 'config.json'} this model's config?\n"
    )
    err = _refusal(run_cli, tmp_path, f"base: sdxl\ncheckpoint: {comfy}\nconfig: {rest}\n")
    assert err == f"batchgen: error: models.m.base: 'sdxl' but {comfy} is a SD3/SD3.5 checkpoint; fix base\n"
    flux = tiny_root("tiny_flux", tiny_cache) / "main" / "tiny_flux"
    err = _refusal(run_cli, tmp_path, f"base: sd-3\ncheckpoint: {comfy}\nconfig: {flux}\n")
    assert err.startswith(
        f"batchgen: error: models.m.config: {flux} is a FluxPipeline folder, not a StableDiffusion3Pipeline; give "
        "config: a diffusers SD3/SD3.5 folder"
    )
