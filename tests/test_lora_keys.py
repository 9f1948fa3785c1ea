"""LoRA key mapping, checked on full-size SD1, SD2 and SDXL architectures built on the meta device (no weights).

Key sets are generated here the way each trainer names modules, independently of the mapping under test: kohya
from diffusers module names (SD1/SD2) or from an explicit table of SDXL's original (SGM) layout, PEFT from
module paths. Every key must reach the module it was made for, with shapes that fit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from batchgen.assets.architecture import ModuleRef, module_shapes
from batchgen.assets.bases import lora_base
from batchgen.assets.lora_formats import group_by_module, layer_evidence, map_to_modules
from batchgen.assets.lora_formats.kohya import kohya_names
from batchgen.tiny import LYCORIS_KINDS, tiny_root, write_lycoris

SD1_UNET: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD2_UNET = {
    **SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
SDXL_UNET: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
}
CLIP_L = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
OPENCLIP_H = {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16, "intermediate_size": 4096}
CLIP_BIG_G = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "projection_dim": 1280,
}

# kohya sd-scripts networks/lora.py: LoRA wraps every Linear/Conv2d inside modules of these classes.
KOHYA_UNET_TARGETS = frozenset({"Transformer2DModel"})
KOHYA_LOCON_TARGETS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})  # with conv_dim (LoCon)
KOHYA_TEXT_TARGETS = frozenset({"CLIPAttention", "CLIPMLP"})

# SDXL's original UNet as Stability's sgm and kohya's sdxl_original_unet build it, {SGM prefix: diffusers prefix}:
# input_blocks 1-8 hold resnets (slot 0) and transformers (slot 1) per level, 3 and 6 the downsamplers; output
# blocks 0-8 mirror them, with the upsamplers after the transformer in blocks 2 and 5.
SDXL_SGM_BLOCKS = {
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "input_blocks.2.0": "down_blocks.0.resnets.1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0": "down_blocks.1.resnets.0",
    "input_blocks.4.1": "down_blocks.1.attentions.0",
    "input_blocks.5.0": "down_blocks.1.resnets.1",
    "input_blocks.5.1": "down_blocks.1.attentions.1",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.7.0": "down_blocks.2.resnets.0",
    "input_blocks.7.1": "down_blocks.2.attentions.0",
    "input_blocks.8.0": "down_blocks.2.resnets.1",
    "input_blocks.8.1": "down_blocks.2.attentions.1",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "output_blocks.2.0": "up_blocks.0.resnets.2",
    "output_blocks.2.1": "up_blocks.0.attentions.2",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.0": "up_blocks.1.resnets.0",
    "output_blocks.3.1": "up_blocks.1.attentions.0",
    "output_blocks.4.0": "up_blocks.1.resnets.1",
    "output_blocks.4.1": "up_blocks.1.attentions.1",
    "output_blocks.5.0": "up_blocks.1.resnets.2",
    "output_blocks.5.1": "up_blocks.1.attentions.2",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.6.0": "up_blocks.2.resnets.0",
    "output_blocks.7.0": "up_blocks.2.resnets.1",
    "output_blocks.8.0": "up_blocks.2.resnets.2",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}
# The embedded tiny SDXL (batchgen.tiny): one resnet per level, two levels, the transformer on the second.
TINY_SDXL_SGM_BLOCKS = {
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0": "down_blocks.1.resnets.0",
    "input_blocks.3.1": "down_blocks.1.attentions.0",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "output_blocks.1.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.2.0": "up_blocks.1.resnets.0",
    "output_blocks.3.0": "up_blocks.1.resnets.1",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.2": "conv_out",
}
# SGM names of a resnet's modules (in_layers = norm, SiLU, conv; out_layers = norm, SiLU, dropout, conv).
SGM_RESNET = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


@dataclass
class Model:
    parts: dict[str, torch.nn.Module]
    unet_config: dict[str, Any]

    @cached_property
    def shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        return {component: module_shapes(part) for component, part in self.parts.items()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The test machines are shared; one thread keeps this module from competing with parallel test processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(unet: dict[str, Any], *encoders: tuple[dict[str, Any], bool]) -> Model:
    parts: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel(**unet)
        for component, (text, projected) in zip(("text_encoder", "text_encoder_2"), encoders, strict=False):
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            parts[component] = cls(CLIPTextConfig(**text))
    return Model(parts, dict(parts["unet"].config))


@pytest.fixture(scope="module")
def sd1() -> Model:
    return _build(SD1_UNET, (CLIP_L, False))


@pytest.fixture(scope="module")
def sd2() -> Model:
    return _build(SD2_UNET, (OPENCLIP_H, False))


@pytest.fixture(scope="module")
def sdxl() -> Model:
    return _build(SDXL_UNET, (CLIP_L, False), (CLIP_BIG_G, True))


# --- key set generators --------------------------------------------------------------------------------------------


def _lora_pair(weight_shape: tuple[int, ...], rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) as kohya and PEFT store them: convs get a down conv of the module's kernel and a 1x1 up conv."""
    out_dim, in_dim, *kernel = weight_shape
    down = torch.empty((rank, in_dim, *kernel), device="meta")
    up = torch.empty((out_dim, rank, *[1] * len(kernel)), device="meta")
    return down, up


def _leaf_modules(root: torch.nn.Module, classes: frozenset[str]) -> Iterator[tuple[str, torch.nn.Module]]:
    """(path, module) of every Linear/Conv2d inside a module of one of `classes`, as kohya's create_modules walks."""
    for name, module in root.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                    yield f"{name}.{child_name}", child


def _kohya_file(entries: dict[str, tuple[ModuleRef, tuple[int, ...]]]) -> tuple[dict[str, Any], dict[str, ModuleRef]]:
    """(state dict, {kohya module name: module it was made for}) from {kohya name: (module, weight shape)}."""
    state: dict[str, Any] = {}
    for name, (_, shape) in entries.items():
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = _lora_pair(shape)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state, {name: ref for name, (ref, _) in entries.items()}


def _kohya_text(prefix: str, component: str, encoder: torch.nn.Module) -> dict[str, tuple[ModuleRef, Any]]:
    entries = {}
    for path, module in _leaf_modules(encoder, KOHYA_TEXT_TARGETS):
        # kohya files always say text_model_ (transformers 4's CLIPTextModel); transformers 5 dropped that level.
        spelled = path if path.startswith("text_model.") else f"text_model.{path}"
        entries[f"{prefix}_{spelled.replace('.', '_')}"] = (ModuleRef(component, path), tuple(module.weight.shape))
    return entries


def kohya_sd_keys(model: Model, locon: bool = True) -> tuple[dict[str, Any], dict[str, ModuleRef]]:
    """An SD1/SD2 kohya LoRA (LoCon when `locon`): diffusers module names, lora_te_ for the text encoder."""
    classes = KOHYA_UNET_TARGETS | (KOHYA_LOCON_TARGETS if locon else frozenset())
    entries = {
        f"lora_unet_{path.replace('.', '_')}": (ModuleRef("unet", path), tuple(module.weight.shape))
        for path, module in _leaf_modules(model.parts["unet"], classes)
    }
    entries.update(_kohya_text("lora_te", "text_encoder", model.parts["text_encoder"]))
    return _kohya_file(entries)


def sgm_unet_names(unet: torch.nn.Module, table: dict[str, str]) -> dict[str, str]:
    """{SGM module path: diffusers module path} of every Linear/Conv2d the table's blocks reach."""
    shapes = module_shapes(unet)
    names: dict[str, str] = {}
    for sgm, diffusers in table.items():
        if diffusers in shapes:  # a single conv or linear
            names[sgm] = diffusers
        elif ".resnets." in diffusers:
            names.update(
                {f"{sgm}.{s}": f"{diffusers}.{d}" for s, d in SGM_RESNET.items() if f"{diffusers}.{d}" in shapes}
            )
        else:  # a transformer: SGM keeps diffusers' names inside it
            inside = [path for path in shapes if path.startswith(f"{diffusers}.")]
            names.update({f"{sgm}.{path.removeprefix(diffusers + '.')}": path for path in inside})
    return names


def kohya_sdxl_keys(model: Model, table: dict[str, str]) -> tuple[dict[str, Any], dict[str, ModuleRef]]:
    """An SDXL kohya/LyCORIS LoRA on every UNet module, named in the SGM layout, plus lora_te1_/lora_te2_."""
    shapes = module_shapes(model.parts["unet"])
    entries = {
        f"lora_unet_{sgm.replace('.', '_')}": (ModuleRef("unet", path), shapes[path])
        for sgm, path in sgm_unet_names(model.parts["unet"], table).items()
    }
    entries.update(_kohya_text("lora_te1", "text_encoder", model.parts["text_encoder"]))
    entries.update(_kohya_text("lora_te2", "text_encoder_2", model.parts["text_encoder_2"]))
    return _kohya_file(entries)


def peft_keys(model: Model, text_model: bool = True) -> tuple[dict[str, Any], dict[str, ModuleRef]]:
    """A diffusers/PEFT LoRA on the attention projections, text encoders named with or without text_model."""
    unet_targets = (".to_q", ".to_k", ".to_v", ".to_out.0")
    text_targets = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
    state: dict[str, Any] = {}
    expected: dict[str, ModuleRef] = {}
    for component, shapes in model.shapes.items():
        targets = unet_targets if component == "unet" else text_targets
        for path, shape in shapes.items():
            if not path.endswith(targets):
                continue
            inner = path.removeprefix("text_model.")
            spelled = f"text_model.{inner}" if text_model and component != "unet" else inner
            prefix = f"{component}.{spelled}"
            state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"] = _lora_pair(shape)
            expected[prefix] = ModuleRef(component, path)
    return state, expected


def assert_maps_exactly(state: dict[str, Any], expected: dict[str, ModuleRef], model: Model) -> None:
    """Every group maps, to the module it was made for, with a down/up pair that fits the module's weight."""
    fmt, groups = group_by_module(state)
    shapes = model.shapes
    mapped, unmapped = map_to_modules(groups, fmt, shapes, model.unet_config)
    assert unmapped == []
    assert set(groups) == set(expected)
    assert set(mapped) == set(expected.values())
    for prefix, ref in expected.items():
        assert mapped[ref]["lora_down.weight"] is groups[prefix]["lora_down.weight"], prefix
        weight = shapes[ref.component][ref.path]
        down, up = mapped[ref]["lora_down.weight"].shape, mapped[ref]["lora_up.weight"].shape
        assert (up[0], *down[1:]) == weight, prefix


# --- kohya ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sd1", "sd2"])
def test_kohya_sd_locon_maps_every_key(base: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(base)
    state, expected = kohya_sd_keys(model)
    assert len(expected) > 300  # attention, resnet, sampler and text encoder modules all took part
    assert_maps_exactly(state, expected, model)
    assert group_by_module(state)[0] == "kohya"


def test_kohya_sdxl_sgm_names_map_every_unet_module(sdxl: Model) -> None:
    state, expected = kohya_sdxl_keys(sdxl, SDXL_SGM_BLOCKS)
    assert {ref.path for ref in expected.values() if ref.component == "unet"} == set(sdxl.shapes["unet"])
    assert_maps_exactly(state, expected, sdxl)


# Facts about kohya's SDXL names, from sd-scripts' sdxl_model_util / sdxl_original_unet and diffusers' SGM mapping.
KNOWN_SDXL_NAMES = {
    "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "output_blocks_0_1_transformer_blocks_9_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.2",
    "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    # diffusers' own names keep working
    "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k": (
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    ),
}
# The SD1 layout in SGM names (diffusers' convert_diffusers_to_original_stable_diffusion); kohya itself names SD1
# modules the diffusers way, but other trainers write these.
KNOWN_SD1_SGM_NAMES = {
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_11_0_out_layers_3": "down_blocks.3.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",  # UpBlock2D: no transformer, so slot 1
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_11_1_transformer_blocks_0_attn2_to_out_0": (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0"
    ),
}


@pytest.mark.parametrize(("name", "path"), KNOWN_SDXL_NAMES.items())
def test_known_sdxl_kohya_names(sdxl: Model, name: str, path: str) -> None:
    assert kohya_names("unet", sdxl.shapes["unet"], sdxl.unet_config)[f"lora_unet_{name}"] == path


@pytest.mark.parametrize(("name", "path"), KNOWN_SD1_SGM_NAMES.items())
def test_sd1_also_answers_to_sgm_names(sd1: Model, name: str, path: str) -> None:
    assert kohya_names("unet", sd1.shapes["unet"], sd1.unet_config)[f"lora_unet_{name}"] == path


def test_unet_without_config_gets_diffusers_names_only(sdxl: Model) -> None:
    names = kohya_names("unet", sdxl.shapes["unet"])
    assert len(names) == len(sdxl.shapes["unet"])
    assert names["lora_unet_mid_block_attentions_0_proj_in"] == "mid_block.attentions.0.proj_in"


def test_text_encoder_names_use_text_model_spelling_for_either_transformers_layout(sd1: Model, sdxl: Model) -> None:
    flat = sd1.shapes["text_encoder"]  # transformers 5 CLIPTextModel: encoder.layers.0...
    nested = sdxl.shapes["text_encoder_2"]  # CLIPTextModelWithProjection: text_model.encoder.layers.0...
    assert "encoder.layers.0.self_attn.q_proj" in flat
    assert "text_model.encoder.layers.0.self_attn.q_proj" in nested
    te = kohya_names("text_encoder", flat)
    assert te["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == "encoder.layers.0.self_attn.q_proj"
    assert te["lora_te1_text_model_encoder_layers_11_mlp_fc2"] == "encoder.layers.11.mlp.fc2"
    te2 = kohya_names("text_encoder_2", nested)
    assert te2["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == "text_model.encoder.layers.31.mlp.fc1"
    assert te2["lora_te2_text_projection"] == "text_projection"


def test_kohya_text_keys_fit_a_text_model_layout_too(sd1: Model) -> None:
    state, expected = kohya_sd_keys(sd1)
    nested = {"text_model." + path: shape for path, shape in sd1.shapes["text_encoder"].items()}
    fmt, groups = group_by_module(state)
    mapped, unmapped = map_to_modules(groups, fmt, {"text_encoder": nested}, None)
    text = [prefix for prefix in groups if prefix.startswith("lora_te_")]
    assert sorted(unmapped) == sorted(prefix for prefix in groups if prefix.startswith("lora_unet_"))
    assert {ref.path for ref in mapped} == {"text_model." + expected[prefix].path for prefix in text}


def test_tiny_sdxl_sgm_layout_follows_its_config(tiny_cache: Path) -> None:
    config = json.loads((tiny_root("tiny_sdxl", tiny_cache) / "main/tiny_sdxl/unet/config.json").read_text())
    assert config["layers_per_block"] == 1 and len(config["block_out_channels"]) == 2
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    names = sgm_unet_names(unet, TINY_SDXL_SGM_BLOCKS)
    assert set(names.values()) == set(module_shapes(unet))
    derived = kohya_names("unet", module_shapes(unet), config)
    assert {name: derived[f"lora_unet_{name.replace('.', '_')}"] for name in names} == names


@pytest.mark.parametrize(("name", "base"), [("tiny_sd1", "sd-1"), ("tiny_sdxl", "sdxl")])
def test_tiny_model_lora_files_map_fully(tiny_cache: Path, name: str, base: str) -> None:
    root = tiny_root(name, tiny_cache)
    folder = root / "main" / name
    config = json.loads((folder / "unet" / "config.json").read_text())
    parts: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(config)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if (folder / "text_encoder_2").is_dir():
            te2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(te2)
    model = Model(parts, config)
    formats = set()
    for file in sorted((root / "lora").glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            metadata = f.metadata()
        fmt, groups = group_by_module(load_file(file), metadata)
        mapped, unmapped = map_to_modules(groups, fmt, model.shapes, config)
        assert (unmapped, len(mapped)) == ([], len(groups)), file.name
        assert {ref.component for ref in mapped} == set(parts), file.name
        assert lora_base(layer_evidence(groups, fmt)) == base, file.name
        assert all("alpha" in tensors for tensors in groups.values()), file.name  # PEFT's from its metadata
        formats.add(fmt)
    assert formats == {"kohya", "peft"}


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_every_lycoris_layer_type_fits_every_module(tiny_cache: Path, tmp_path: Path, kind: str) -> None:
    # batchgen.tiny's LyCORIS writer, on every Linear and Conv2d of the tiny SDXL: 1x1 and 3x3 convs included.
    folder = tiny_root("tiny_sdxl", tiny_cache) / "main" / "tiny_sdxl"
    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        shapes = module_shapes(UNet2DConditionModel.from_config(config))
    write_lycoris(tmp_path / "layers.safetensors", {"lora_unet": shapes}, kind, rank=2)
    fmt, groups = group_by_module(load_file(tmp_path / "layers.safetensors"))
    mapped, unmapped = map_to_modules(groups, fmt, {"unet": shapes}, config)
    assert (fmt, unmapped) == ("kohya", [])
    assert {ref.path for ref in mapped} == set(shapes)


def test_dora_magnitudes_are_filed_as_dora_scale(sd1: Model) -> None:
    path = "mid_block.attentions.0.proj_in"
    down, up = _lora_pair(sd1.shapes["unet"][path])
    magnitude = torch.empty(up.shape[0], device="meta")
    state = {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up}
    state[f"unet.{path}.lora_magnitude_vector"] = magnitude
    fmt, groups = group_by_module(state)
    assert groups[f"unet.{path}"]["dora_scale"] is magnitude
    assert list(map_to_modules(groups, fmt, sd1.shapes, None)[0]) == [ModuleRef("unet", path)]


# --- PEFT / diffusers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("text_model", [True, False], ids=["text_model", "flat"])
def test_peft_keys_map_every_key(base: str, text_model: bool, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(base)
    state, expected = peft_keys(model, text_model)
    fmt, groups = group_by_module(state)
    assert fmt == "peft"
    assert all(set(tensors) == {"lora_down.weight", "lora_up.weight"} for tensors in groups.values())
    assert_maps_exactly(state, expected, model)


def test_older_diffusers_and_peft_namings(sdxl: Model) -> None:
    attn = "down_blocks.1.attentions.0.transformer_blocks.0"
    layer = "text_model.encoder.layers.0.self_attn"
    flat = "encoder.layers.0.self_attn"  # transformers 5 CLIPTextModel
    cases = {  # (key prefix, down and up names) -> module it must reach
        (f"unet.{attn}.attn1.to_q.lora", "down", "up"): ModuleRef("unet", f"{attn}.attn1.to_q"),
        (f"{attn}.attn1.processor.to_out_lora", "down", "up"): ModuleRef("unet", f"{attn}.attn1.to_out.0"),
        (f"text_encoder.{layer}.q_proj.lora_linear_layer", "down", "up"): ModuleRef("text_encoder", f"{flat}.q_proj"),
        (f"text_encoder.{layer}.to_k_lora", "down", "up"): ModuleRef("text_encoder", f"{flat}.k_proj"),
        (f"base_model.model.{attn}.attn2.to_k", "lora_A", "lora_B"): ModuleRef("unet", f"{attn}.attn2.to_k"),
        (f"unet.base_model.model.{attn}.ff.net.2", "lora_A.x", "lora_B.x"): ModuleRef("unet", f"{attn}.ff.net.2"),
        (f"text_encoder_2.{layer}.out_proj", "lora_A", "lora_B"): ModuleRef("text_encoder_2", f"{layer}.out_proj"),
    }  # fmt: skip
    shapes = sdxl.shapes
    state: dict[str, Any] = {}
    for (prefix, down_name, up_name), ref in cases.items():
        down, up = _lora_pair(shapes[ref.component][ref.path])
        state[f"{prefix}.{down_name}.weight"], state[f"{prefix}.{up_name}.weight"] = down, up
    fmt, groups = group_by_module(state)
    mapped, unmapped = map_to_modules(groups, fmt, shapes, sdxl.unet_config)
    assert (fmt, unmapped) == ("peft", [])
    assert set(mapped) == set(cases.values())
    for (prefix, down_name, _), ref in cases.items():
        assert mapped[ref]["lora_down.weight"] is state[f"{prefix}.{down_name}.weight"]


def _one_peft_module(sd1: Model) -> dict[str, Any]:
    state = {}
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.proj_in"):
        down, up = _lora_pair(sd1.shapes["unet"][path], rank=4)
        state[f"unet.{path}.lora_A.weight"], state[f"unet.{path}.lora_B.weight"] = down, up
    down, up = _lora_pair(sd1.shapes["text_encoder"]["encoder.layers.0.mlp.fc1"], rank=9)
    state["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = down
    state["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = up
    return state


def test_peft_alpha_comes_from_diffusers_adapter_metadata(sd1: Model) -> None:
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.alpha_pattern": {"attn2.to_k": 2},
        "text_encoder.r": 9,
        "text_encoder.lora_alpha": 6,
        "text_encoder.use_rslora": True,
    }
    _, groups = group_by_module(_one_peft_module(sd1), {"lora_adapter_metadata": json.dumps(config)})
    alphas = {prefix.rsplit(".", 1)[-1]: float(tensors["alpha"]) for prefix, tensors in groups.items()}
    assert alphas == {"to_k": 2.0, "proj_in": 8.0, "fc1": 6.0 * 3.0}  # rsLoRA: alpha/sqrt(r) == (alpha*sqrt(r))/r
    assert all(tensors["alpha"].shape == () for tensors in groups.values())


def test_peft_without_alpha_metadata_has_no_alpha(sd1: Model) -> None:
    for metadata in (None, {"format": "pt"}, {"lora_adapter_metadata": json.dumps({"unet.r": 4})}):
        _, groups = group_by_module(_one_peft_module(sd1), metadata)
        assert not any("alpha" in tensors for tensors in groups.values())


def test_unprefixed_adapter_metadata_applies_to_every_component(sd1: Model) -> None:
    _, groups = group_by_module(_one_peft_module(sd1), {"lora_adapter_metadata": json.dumps({"lora_alpha": 2})})
    assert {float(tensors["alpha"]) for tensors in groups.values()} == {2.0}


def test_alpha_metadata_as_diffusers_writes_it(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        sample_size=8,
    )
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k"], rank_pattern={"attn2.to_k": 8})
    config.alpha_pattern = {"attn2.to_k": 16}
    unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict()
    )
    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    fmt, groups = group_by_module(load_file(file), metadata)
    alphas = {(prefix.split("transformer_blocks.0.")[1], float(t["alpha"])) for prefix, t in groups.items()}
    assert fmt == "peft"
    assert alphas == {("attn1.to_q", 2.0), ("attn1.to_k", 2.0), ("attn2.to_q", 2.0), ("attn2.to_k", 16.0)}


# --- base detection ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "expected"), [("sd1", "sd-1"), ("sd2", "sd-2"), ("sdxl", "sdxl")])
def test_lora_base_from_full_key_sets(base: str, expected: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(base)
    kohya = kohya_sdxl_keys(model, SDXL_SGM_BLOCKS)[0] if base == "sdxl" else kohya_sd_keys(model)[0]
    for state in (kohya, peft_keys(model)[0], peft_keys(model, text_model=False)[0]):
        fmt, groups = group_by_module(state)
        assert lora_base(layer_evidence(groups, fmt)) == expected


def _only(state: dict[str, Any], *fragments: str) -> dict[str, Any]:
    return {key: value for key, value in state.items() if any(f in key for f in fragments)}


def test_lora_base_from_partial_files(sd1: Model, sd2: Model, sdxl: Model) -> None:
    sd1_kohya, sd2_kohya = kohya_sd_keys(sd1)[0], kohya_sd_keys(sd2)[0]
    sdxl_kohya = kohya_sdxl_keys(sdxl, SDXL_SGM_BLOCKS)[0]

    def base(state: dict[str, Any]) -> str | None:
        fmt, groups = group_by_module(state)
        return lora_base(layer_evidence(groups, fmt))

    assert base(_only(sd1_kohya, "lora_te_")) == "sd-1"  # CLIP-L alone
    assert base(_only(sd2_kohya, "lora_te_")) == "sd-2"
    assert base(_only(sdxl_kohya, "lora_te2_")) == "sdxl"
    assert base(_only(sdxl_kohya, "lora_te1_")) == "sdxl"  # only SDXL files number their text encoders
    assert base(_only(sdxl_kohya, "attn2_to_v")) == "sdxl"
    assert base(_only(sd1_kohya, "resnets")) is None  # convs read image channels: same in every base
    assert base(_only(sd1_kohya, "attn1")) is None  # self-attention widths are shared by SD1 and SD2
    assert base({**_only(sd1_kohya, "attn2_to_k"), **_only(sd2_kohya, "lora_te_")}) is None  # they disagree


def test_lora_base_reads_loha_lokr_and_full_layers() -> None:
    meta = {"device": "meta"}
    to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = {f"{to_k}.hada_w1_a": torch.empty(640, 8, **meta), f"{to_k}.hada_w1_b": torch.empty(8, 2048, **meta)}
    loha |= {f"{to_k}.hada_w2_a": torch.empty(640, 8, **meta), f"{to_k}.hada_w2_b": torch.empty(8, 2048, **meta)}
    lokr = {f"{to_k}.lokr_w1": torch.empty(8, 4, **meta), f"{to_k}.lokr_w2_a": torch.empty(40, 4, **meta)}
    lokr |= {f"{to_k}.lokr_w2_b": torch.empty(4, 192, **meta)}  # in = 4 * 192 = 768
    full = {f"{to_k}.diff": torch.empty(640, 1024, **meta), f"{to_k}.diff_b": torch.empty(640, **meta)}
    for state, expected in ((loha, "sdxl"), (lokr, "sd-1"), (full, "sd-2")):
        fmt, groups = group_by_module(state)
        assert lora_base(layer_evidence(groups, fmt)) == expected


# --- what does not map ---------------------------------------------------------------------------------------------


def test_unknown_modules_come_back_unmapped(sd1: Model) -> None:
    state, _ = kohya_sd_keys(sd1, locon=False)
    down, up = _lora_pair((320, 320))
    state |= {"lora_unet_not_a_module.lora_down.weight": down, "lora_unet_not_a_module.lora_up.weight": up}
    state |= {"lora_te3_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}
    fmt, groups = group_by_module(state)
    mapped, unmapped = map_to_modules(groups, fmt, sd1.shapes, sd1.unet_config)
    assert unmapped == ["lora_unet_not_a_module", "lora_te3_text_model_encoder_layers_0_mlp_fc1"]
    assert len(mapped) == len(groups) - 2

    fmt, groups = group_by_module({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": down})
    assert map_to_modules(groups, fmt, sd1.shapes, sd1.unet_config) == (
        {},
        ["unet.down_blocks.9.attentions.0.proj_in"],
    )


def test_layers_of_the_wrong_width_come_back_unmapped(sd1: Model, sd2: Model) -> None:
    # SD2's text encoder has the same module names as SD1's for its first 12 layers, but is 1024 wide.
    fmt, groups = group_by_module(_only(kohya_sd_keys(sd2)[0], "lora_te_text_model_encoder_layers_0_"))
    mapped, unmapped = map_to_modules(groups, fmt, sd1.shapes, sd1.unet_config)
    assert mapped == {}
    assert len(unmapped) == len(groups) == 6


def test_two_names_for_one_module_are_refused(sdxl: Model) -> None:
    down, up = _lora_pair(sdxl.shapes["unet"]["mid_block.attentions.0.proj_in"])
    state = {}
    for name in ("lora_unet_middle_block_1_proj_in", "lora_unet_mid_block_attentions_0_proj_in"):
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    fmt, groups = group_by_module(state)
    with pytest.raises(ValueError, match="both patch unet module mid_block.attentions.0.proj_in"):
        map_to_modules(groups, fmt, sdxl.shapes, sdxl.unet_config)


def test_unparseable_keys_raise_listing_the_first_five() -> None:
    state = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.empty(1, device="meta") for i in range(7)}
    with pytest.raises(ValueError, match=r"7 of 7 keys") as raised:
        group_by_module(state)
    message = str(raised.value)
    assert all(f"input_blocks.{i}.0.weight" in message for i in range(5))
    assert "input_blocks.5.0.weight" not in message


def test_kohya_file_with_an_unknown_tensor_name_raises() -> None:
    state = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.empty(4, 8, device="meta"),
        "lora_unet_mid_block_attentions_0_proj_in.oft_blocks": torch.empty(4, 2, 2, device="meta"),
    }
    with pytest.raises(ValueError, match=r"1 of 2 keys .*kohya detected.*proj_in\.oft_blocks"):
        group_by_module(state)


def test_module_shapes_lists_linear_and_conv_weights(sdxl: Model) -> None:
    shapes = sdxl.shapes["unet"]
    assert shapes["conv_in"] == (320, 4, 3, 3)
    assert shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (640, 2048)
    assert shapes["add_embedding.linear_1"] == (1280, 2816)
    assert not any(path.endswith(("norm1", "norm")) for path in shapes)
