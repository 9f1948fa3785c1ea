"""FLUX.1 LoRA keys (lora_formats/flux.py), checked on the full-size FLUX.1-dev transformer and text encoders built
on the meta device, and numerically against diffusers' own converters.

Key sets are generated from the tables below of Black Forest Labs' module names and weight shapes, written out
independently of the mapping under test; every group must reach a module of exactly its delta's shape, and the
targets together must cover every Linear of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_kohya_flux_lora_to_diffusers,
    _convert_xlabs_flux_lora_to_diffusers,
    swap_scale_shift,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from batchgen.assets.architecture import ModuleRef, module_shapes
from batchgen.assets.lora_formats import flux, group_by_module, map_to_modules
from batchgen.assets.lora_layers import delta_dims, layer_from_tensors
from batchgen.assets.loras import Shape

FLUX_DEV: dict[str, Any] = {
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# Inner width 16 (2 heads of 8), MLP 64: small enough for real tensors; split sizes come from the modules.
FLUX_SMALL: dict[str, Any] = {
    "in_channels": 4,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "pooled_projection_dim": 8,
    "guidance_embeds": True,
    "axes_dims_rope": (2, 2, 4),
}
CLIP_L = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64}

# BFL's FLUX.1-dev modules, (out, in) of each Linear weight; qkv and linear1 are fused, linear2 reads [attn; MLP].
BFL_STREAM = {
    "attn.qkv": (9216, 3072),
    "attn.proj": (3072, 3072),
    "mlp.0": (12288, 3072),
    "mlp.2": (3072, 12288),
    "mod.lin": (18432, 3072),
}
BFL_DOUBLE = {f"{stream}_{name}": shape for stream in ("img", "txt") for name, shape in BFL_STREAM.items()}
BFL_SINGLE = {"linear1": (21504, 3072), "linear2": (3072, 15360), "modulation.lin": (9216, 3072)}
BFL_TOP = {
    "img_in": (3072, 64),
    "txt_in": (3072, 4096),
    "time_in.in_layer": (3072, 256),
    "time_in.out_layer": (3072, 3072),
    "vector_in.in_layer": (3072, 768),
    "vector_in.out_layer": (3072, 3072),
    "guidance_in.in_layer": (3072, 256),
    "guidance_in.out_layer": (3072, 3072),
    "final_layer.linear": (64, 3072),
    "final_layer.adaLN_modulation.1": (6144, 3072),
}
CLIP_LAYER = {
    "self_attn.q_proj": (768, 768),
    "self_attn.k_proj": (768, 768),
    "self_attn.v_proj": (768, 768),
    "self_attn.out_proj": (768, 768),
    "mlp.fc1": (3072, 768),
    "mlp.fc2": (768, 3072),
}
T5_BLOCK = {
    "layer.0.SelfAttention.q": (4096, 4096),
    "layer.0.SelfAttention.k": (4096, 4096),
    "layer.0.SelfAttention.v": (4096, 4096),
    "layer.0.SelfAttention.o": (4096, 4096),
    "layer.1.DenseReluDense.wi_0": (10240, 4096),
    "layer.1.DenseReluDense.wi_1": (10240, 4096),
    "layer.1.DenseReluDense.wo": (4096, 10240),
}
RANK = 16
LOKR_MESSAGE = (
    "double_blocks.0.img_attn.qkv: batchgen cannot split a LoKr layer over FLUX's fused qkv/linear1; "
    "convert it to LoRA (e.g. with kohya's tools)"
)


@pytest.fixture(scope="module")
def flux_dev() -> dict[str, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        return {
            "transformer": module_shapes(FluxTransformer2DModel(**FLUX_DEV)),
            "text_encoder": module_shapes(CLIPTextModel(CLIPTextConfig(**CLIP_L))),
            "text_encoder_2": module_shapes(T5EncoderModel(T5Config(**T5_XXL, feed_forward_proj="gated-gelu"))),
        }


@pytest.fixture(scope="module")
def flux_small() -> dict[str, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        return {"transformer": module_shapes(FluxTransformer2DModel(**FLUX_SMALL))}


def bfl_modules() -> dict[str, tuple[int, int]]:
    modules = {f"double_blocks.{i}.{name}": shape for i in range(19) for name, shape in BFL_DOUBLE.items()}
    modules |= {f"single_blocks.{i}.{name}": shape for i in range(38) for name, shape in BFL_SINGLE.items()}
    return modules | BFL_TOP


def lora_keys(
    modules: dict[str, tuple[int, int]], name: Callable[[str], str], down: str, up: str, alpha: bool = True
) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for module, (out_dim, in_dim) in modules.items():
        keys[f"{name(module)}.{down}"] = Shape((RANK, in_dim))
        keys[f"{name(module)}.{up}"] = Shape((out_dim, RANK))
        if alpha:
            keys[f"{name(module)}.alpha"] = Shape(())
    return keys


def xlabs_keys(root: str = "") -> dict[str, Any]:
    """XLabs' processors: q/k/v and output projection LoRAs of each stream, and the same in single blocks."""
    double = {
        "qkv_lora1": (9216, 3072),
        "qkv_lora2": (9216, 3072),
        "proj_lora1": (3072, 3072),
        "proj_lora2": (3072, 3072),
    }
    single = {"qkv_lora": (9216, 3072), "proj_lora": (3072, 15360)}
    modules = {f"{root}double_blocks.{i}.processor.{n}": s for i in range(19) for n, s in double.items()}
    modules |= {f"{root}single_blocks.{i}.processor.{n}": s for i in range(38) for n, s in single.items()}
    return lora_keys(modules, str, "down.weight", "up.weight", alpha=False)


def group(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fmt, groups = group_by_module(state_dict)
    assert fmt == "flux"
    return groups


def mapped(state_dict: dict[str, Any], modules: dict) -> dict[ModuleRef, dict[str, Any]]:
    """Every group mapped (map_to_modules splits them) to a module whose weight is exactly its delta's shape."""
    groups = group(state_dict)
    split = flux.split(groups, modules)
    assert flux.split(split, modules).keys() == split.keys()  # idempotent: a caller may split before mapping
    found, unmapped = map_to_modules(groups, "flux", modules, None)
    assert unmapped == []
    for ref, tensors in found.items():
        assert delta_dims(tensors) == modules[ref.component][ref.path], ref
    return found


def transformer_paths(refs: Iterable[ModuleRef]) -> set[str]:
    return {ref.path for ref in refs if ref.component == "transformer"}


# --- full-size key sets ---------------------------------------------------------------------------------------------


LAYOUTS = {
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), "lora_down.weight", "lora_up.weight"),
    "bfl": (str, "lora_A.weight", "lora_B.weight"),
    "bfl-diffusion_model": (lambda m: f"diffusion_model.{m}", "lora_A.weight", "lora_B.weight"),
    "comfyui": (lambda m: f"diffusion_model.{m}", "lora_down.weight", "lora_up.weight"),
    "fal": (lambda m: f"base_model.model.{m}", "lora_A.weight", "lora_B.weight"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_bfl_module_maps_and_every_linear_is_covered(layout: str, flux_dev: dict) -> None:
    name, down, up = LAYOUTS[layout]
    state_dict = lora_keys(bfl_modules(), name, down, up, alpha=layout != "bfl")
    assert flux.recognises(state_dict)
    found = mapped(state_dict, flux_dev)
    assert len(found) == len(flux_dev["transformer"])  # one group per module: none patched twice
    leftover = set(flux_dev["transformer"]) - transformer_paths(found)
    assert {p for p in leftover if p.startswith(("transformer_blocks.", "single_transformer_blocks."))} == set()
    assert leftover == set()  # the embedders and the final layer too
    for tensors in found.values():
        assert all(isinstance(value, Shape) for suffix, value in tensors.items() if suffix != "alpha")
        if layout == "bfl":
            assert float(tensors["alpha"]) == RANK  # a missing alpha is alpha = rank


@pytest.mark.parametrize("root", ["", "diffusion_model."])
def test_xlabs_keys_map_to_the_attention_modules(root: str, flux_dev: dict) -> None:
    state_dict = xlabs_keys(root)
    assert flux.recognises(state_dict)
    found = mapped(state_dict, flux_dev)
    double = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    expected = {f"transformer_blocks.{i}.attn.{p}" for i in range(19) for p in double}
    expected |= {f"single_transformer_blocks.{i}.attn.{p}" for i in range(38) for p in ("to_q", "to_k", "to_v")}
    expected |= {f"single_transformer_blocks.{i}.proj_out" for i in range(38)}
    assert transformer_paths(found) == expected
    assert {float(tensors["alpha"]) for tensors in found.values()} == {RANK}  # XLabs applies no scale


TEXT_LAYOUTS = {
    "kohya-te3": ("lora_te1_text_model_", "lora_te3_", "lora_down.weight", "lora_up.weight"),
    "kohya-te2": ("lora_te1_text_model_", "lora_te2_", "lora_down.weight", "lora_up.weight"),
    "comfyui": (
        "text_encoders.clip_l.transformer.text_model.",
        "text_encoders.t5xxl.transformer.",
        "lora_A.weight",
        "lora_B.weight",
    ),
}


@pytest.mark.parametrize("layout", TEXT_LAYOUTS)
def test_text_encoder_keys_cover_clip_and_t5(layout: str, flux_dev: dict) -> None:
    clip_root, t5_root, down, up = TEXT_LAYOUTS[layout]
    clip = {f"encoder.layers.{i}.{n}": s for i in range(12) for n, s in CLIP_LAYER.items()}
    t5 = {f"encoder.block.{i}.{n}": s for i in range(24) for n, s in T5_BLOCK.items()}
    spell = (lambda p: p.replace(".", "_")) if layout.startswith("kohya") else str
    state_dict = lora_keys(clip, lambda p: clip_root + spell(p), down, up)
    state_dict |= lora_keys(t5, lambda p: t5_root + spell(p), down, up)
    state_dict |= lora_keys({"double_blocks.0.img_attn.proj": (3072, 3072)}, str, down, up)
    found = mapped(state_dict, flux_dev)
    assert {ref.path for ref in found if ref.component == "text_encoder"} == set(flux_dev["text_encoder"])
    assert {ref.path for ref in found if ref.component == "text_encoder_2"} == set(flux_dev["text_encoder_2"])


def test_recognises() -> None:
    flux_keys = [
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_single_blocks_37_linear1.alpha",
        "diffusion_model.double_blocks.3.txt_mod.lin.lora_A.weight",
        "single_blocks.0.modulation.lin.lora_B.weight",
        "double_blocks.0.processor.qkv_lora1.down.weight",
        "diffusion_model.single_blocks.5.processor.proj_lora.up.weight",
    ]
    other_keys = [
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # SD1, diffusers layout
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",  # SDXL, SGM layout
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # SDXL's text encoder
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",  # diffusers / PEFT: peft.py's
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight",
        "lora_unet_final_layer_linear.lora_down.weight",  # SD3's MMDiT has a final_layer too
    ]
    for key in flux_keys:
        assert flux.recognises([key]), key
    for key in other_keys:
        assert not flux.recognises([key]), key
    assert not flux.recognises([1, None])
    assert flux.recognises([*other_keys, flux_keys[0]])


def test_component_of_and_missing_modules(flux_small: dict) -> None:
    assert flux.component_of("double_blocks.0.img_attn.qkv") == ("transformer", False)
    assert flux.component_of("single_blocks.1.linear1#mlp") == ("transformer", False)
    assert flux.component_of("img_in") == ("transformer", False)
    assert flux.component_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == ("text_encoder", False)
    assert flux.component_of("lora_te2_encoder_block_0_layer_0_SelfAttention_q") == ("text_encoder_2", False)
    assert flux.component_of("lora_unet_down_blocks_0") is None
    locate = flux.locator(flux_small, None)
    assert locate("double_blocks.1.txt_attn.qkv#k") == ModuleRef("transformer", "transformer_blocks.1.attn.add_k_proj")
    assert locate("double_blocks.1.txt_attn.qkv") is None  # a fused module maps only once split
    assert locate("double_blocks.2.img_mlp.0") is None  # the small model has two double blocks
    assert locate("final_layer.adaLN_modulation.1") is None  # BFL's row order: only its split group maps
    assert locate("final_layer.adaLN_modulation.1#scale_shift") == ModuleRef("transformer", "norm_out.linear")
    schnell = {"transformer": {p: s for p, s in flux_small["transformer"].items() if "guidance" not in p}}
    assert flux.locator(schnell, None)("guidance_in.in_layer") is None
    assert locate("guidance_in.in_layer") == ModuleRef("transformer", "time_text_embed.guidance_embedder.linear_1")


def test_a_fused_group_of_another_width_stays_whole(flux_small: dict) -> None:
    groups = {"double_blocks.0.img_attn.qkv": {"lora_down.weight": Shape((4, 16)), "lora_up.weight": Shape((60, 4))}}
    split = flux.split(groups, flux_small)
    assert list(split) == ["double_blocks.0.img_attn.qkv"]
    assert map_to_modules(groups, "flux", flux_small, None) == ({}, ["double_blocks.0.img_attn.qkv"])


# --- real tensors: splitting is exact -------------------------------------------------------------------------------


def ints(*shape: int, seed: int) -> torch.Tensor:
    """Small integers as floats: every product and sum is exact, whatever order a kernel adds in."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def delta(tensors: dict[str, Any], shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
    return layer_from_tensors(dict(tensors)).delta(torch.zeros(shape) if weight is None else weight)


def split_deltas(prefix: str, fused: dict[str, Any], modules: dict, weight: torch.Tensor | None = None):
    """(the split deltas stacked in row order, the fused delta)."""
    shapes, locate = modules["transformer"], flux.locator(modules, None)
    split = flux.split({prefix: fused}, modules)
    parts, start = [], 0
    for part_prefix, tensors in split.items():
        assert part_prefix.startswith(prefix + "#")
        shape = shapes[locate(part_prefix).path]
        part_weight = None if weight is None else weight[start : start + shape[0]]
        parts.append(delta(tensors, shape, part_weight))
        start += shape[0]
    out_rows = sum(part.shape[0] for part in parts)
    return torch.cat(parts), delta(fused, (out_rows, parts[0].shape[1]), weight)


@pytest.mark.parametrize(
    ("prefix", "parts"),
    [
        ("double_blocks.0.img_attn.qkv", ["q", "k", "v"]),
        ("double_blocks.1.txt_attn.qkv", ["q", "k", "v"]),
        ("single_blocks.1.linear1", ["q", "k", "v", "mlp"]),
    ],
)
def test_lora_split_is_exact(prefix: str, parts: list[str], flux_small: dict) -> None:
    out_rows = 112 if prefix.endswith("linear1") else 48  # 3 x 16, and the MLP input 4 x 16
    fused = {"lora_down.weight": ints(4, 16, seed=1), "lora_up.weight": ints(out_rows, 4, seed=2)}
    fused["alpha"] = torch.tensor(8.0)
    split = flux.split({prefix: fused}, flux_small)
    assert list(split) == [f"{prefix}#{part}" for part in parts]
    for tensors in split.values():
        assert tensors["lora_down.weight"] is fused["lora_down.weight"]
        assert tensors["alpha"] is fused["alpha"]
        assert tensors["lora_up.weight"].untyped_storage().data_ptr() == fused["lora_up.weight"].data_ptr()  # views
    stacked, whole = split_deltas(prefix, fused, flux_small)
    assert torch.equal(stacked, whole)
    assert whole.abs().sum() > 0


def test_loha_and_full_splits_are_exact(flux_small: dict) -> None:
    shapes = {"hada_w1_a": (112, 2), "hada_w1_b": (2, 16), "hada_w2_a": (112, 2), "hada_w2_b": (2, 16)}
    loha = {name: ints(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    loha["alpha"] = torch.tensor(4.0)
    stacked, whole = split_deltas("single_blocks.0.linear1", loha, flux_small)
    assert torch.equal(stacked, whole)
    full = {"diff": ints(112, 16, seed=5), "diff_b": ints(112, seed=6)}
    stacked, whole = split_deltas("single_blocks.0.linear1", full, flux_small)
    assert torch.equal(stacked, whole)
    biases = [part["diff_b"] for part in flux.split({"single_blocks.0.linear1": full}, flux_small).values()]
    assert torch.equal(torch.cat(biases), full["diff_b"])


def test_dora_split(flux_small: dict) -> None:
    lora = {"lora_down.weight": ints(4, 16, seed=1), "lora_up.weight": ints(48, 4, seed=2)}
    per_output = {**lora, "dora_scale": ints(48, 1, seed=3).abs() + 1}
    weight = ints(48, 16, seed=4)
    stacked, whole = split_deltas("double_blocks.0.img_attn.qkv", per_output, flux_small, weight)
    torch.testing.assert_close(stacked, whole, rtol=1e-6, atol=1e-6)  # a per-row norm is a part's own
    per_input = {**lora, "dora_scale": ints(1, 16, seed=3).abs() + 1}
    with pytest.raises(ValueError, match="cannot split a DoRA layer with per-input magnitudes"):
        flux.split({"double_blocks.0.img_attn.qkv": per_input}, flux_small)


def test_lokr_on_a_fused_module_is_refused(flux_small: dict) -> None:
    lokr = {"lokr_w1": ints(6, 2, seed=1), "lokr_w2": ints(8, 8, seed=2)}  # kron: [48, 16], the fused qkv
    with pytest.raises(ValueError) as refused:
        flux.split({"double_blocks.0.img_attn.qkv": lokr}, flux_small)
    assert str(refused.value) == LOKR_MESSAGE
    shapes = {"lokr_w1": Shape((6, 2)), "lokr_w2": Shape((8, 8))}  # planning refuses it from the header alone
    with pytest.raises(ValueError) as refused:
        flux.split({"double_blocks.0.img_attn.qkv": shapes}, flux_small)
    assert str(refused.value) == LOKR_MESSAGE
    # Not fused: it passes through.
    kept = flux.split({"double_blocks.0.img_attn.proj": lokr}, flux_small)["double_blocks.0.img_attn.proj"]
    assert kept.keys() == lokr.keys() and all(kept[name] is lokr[name] for name in lokr)


# --- against diffusers' converters ----------------------------------------------------------------------------------


def test_final_modulation_rows_are_swapped_like_diffusers(flux_small: dict) -> None:
    down, up = torch.randn(4, 16), torch.randn(32, 4)
    kohya = {
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up,
        "lora_unet_final_layer_linear.lora_down.weight": torch.randn(4, 16),
        "lora_unet_final_layer_linear.lora_up.weight": torch.randn(4, 4),
        # A file is read as FLUX's by its block names; the final layer alone could be SD3's.
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, 16),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(16, 4),
    }
    theirs = _convert_kohya_flux_lora_to_diffusers({key: value.clone() for key, value in kohya.items()})
    ours = flux.split(group(kohya), flux_small)
    modulation, linear = ours["final_layer.adaLN_modulation.1#scale_shift"], ours["final_layer.linear"]
    assert torch.equal(modulation["lora_up.weight"], theirs["norm_out.linear.lora_B.weight"])
    assert torch.equal(modulation["lora_down.weight"], theirs["norm_out.linear.lora_A.weight"])
    assert torch.equal(linear["lora_up.weight"], theirs["proj_out.lora_B.weight"])
    assert kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] is up  # the file's tensors untouched
    # The other layer types swap ΔW's halves too.
    loha = {"hada_w1_a": torch.randn(32, 2), "hada_w1_b": torch.randn(2, 16)}
    loha |= {"hada_w2_a": torch.randn(32, 2), "hada_w2_b": torch.randn(2, 16)}
    lokr = {"lokr_w1": torch.randn(4, 2), "lokr_w2": torch.randn(8, 8)}
    full = {"diff": torch.randn(32, 16), "diff_b": torch.randn(32)}
    for tensors in (loha, lokr, full):
        (swapped,) = flux.split({"final_layer.adaLN_modulation.1": tensors}, flux_small).values()
        torch.testing.assert_close(delta(swapped, (32, 16)), swap_scale_shift(delta(tensors, (32, 16))))
    assert torch.equal(swapped["diff_b"], swap_scale_shift(full["diff_b"]))  # the last, full, has a bias


def _diffusers_module(key: str) -> tuple[ModuleRef, str]:
    """(module, "A" or "B") of a key diffusers' kohya converter writes; its text encoder keys use the old names."""
    if key.startswith("text_encoder."):
        path = key.removeprefix("text_encoder.text_model.")
        for old, new in (("to_q_lora", "q_proj"), ("to_k_lora", "k_proj"), ("to_v_lora", "v_proj")):
            path = path.replace(old, new)
        path = path.replace("to_out_lora", "out_proj").replace(".lora_linear_layer", "")
        module, _, side = path.removesuffix(".weight").rpartition(".")
        return ModuleRef("text_encoder", module), "A" if side == "down" else "B"
    module, _, side = key.removeprefix("transformer.").removesuffix(".weight").rpartition(".")
    return ModuleRef("transformer", module), side.removeprefix("lora_")


def test_kohya_file_matches_diffusers_converter(flux_dev: dict) -> None:
    # Full width: diffusers' converter cuts linear1 at fixed sizes (3072 x 3 + 12288). One block of each kind.
    generator = torch.Generator().manual_seed(0)
    modules = {f"double_blocks.18.{name}": shape for name, shape in BFL_DOUBLE.items()}
    modules |= {f"single_blocks.37.{name}": shape for name, shape in BFL_SINGLE.items()}
    modules |= {name: shape for name, shape in BFL_TOP.items()}
    names = {"lora_unet_" + name.replace(".", "_"): shape for name, shape in modules.items()}
    names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] = (768, 768)
    names["lora_te1_text_model_encoder_layers_3_mlp_fc1"] = (3072, 768)
    kohya: dict[str, torch.Tensor] = {}
    for i, (name, (out_dim, in_dim)) in enumerate(names.items()):
        kohya[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=generator) / 10
        kohya[f"{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=generator) / 10
        # Alphas of every kind: above and below rank, none; diffusers drops the final layer's (a TODO in its
        # converter), so those two stay at rank.
        if i % 4 != 3 and "final_layer" not in name:
            kohya[f"{name}.alpha"] = torch.tensor((1.0, 8.0, 2.5)[i % 4])
    theirs: dict[ModuleRef, dict[str, torch.Tensor]] = {}
    # The converter scales text encoder factors in place: it gets copies.
    for key, value in _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in kohya.items()}).items():
        ref, side = _diffusers_module(key)
        theirs.setdefault(ref, {})[side] = value
    ours = mapped(kohya, flux_dev)
    assert set(ours) == set(theirs)
    assert len(ours) == 14 + 6 + 10 + 2  # a double block's 10 with 2 qkv in 3, a single's 3 with linear1 in 4
    for ref, tensors in ours.items():
        scale = float(tensors["alpha"]) / tensors["lora_down.weight"].shape[0]
        product = tensors["lora_up.weight"] @ tensors["lora_down.weight"] * scale
        # Factors ~0.1 make products ~0.02: 1e-6 is float32 rounding, not a different scale. (max, not
        # assert_close: these are up to 18432 x 3072.)
        assert (product - theirs[ref]["B"] @ theirs[ref]["A"]).abs().max() <= 1e-6, ref


def test_xlabs_scale_matches_diffusers_converter(flux_small: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    modules = {
        "double_blocks.0.processor.qkv_lora1": (48, 16),
        "double_blocks.1.processor.qkv_lora2": (48, 16),
        "double_blocks.0.processor.proj_lora1": (16, 16),
        "double_blocks.1.processor.proj_lora2": (16, 16),
        "single_blocks.0.processor.qkv_lora": (48, 16),
        "single_blocks.1.processor.proj_lora": (16, 80),  # linear2 reads [attention; MLP]: 16 + 64
    }
    xlabs: dict[str, torch.Tensor] = {}
    for name, (out_dim, in_dim) in modules.items():
        xlabs[f"{name}.down.weight"] = torch.randn(4, in_dim, generator=generator)
        xlabs[f"{name}.up.weight"] = torch.randn(out_dim, 4, generator=generator)
    theirs: dict[ModuleRef, dict[str, torch.Tensor]] = {}
    # diffusers loads the result with no network alphas: PEFT's lora_alpha = r, a scale of 1.
    for key, value in _convert_xlabs_flux_lora_to_diffusers(dict(xlabs)).items():
        ref, side = _diffusers_module(key)
        theirs.setdefault(ref, {})[side] = value
    ours = mapped(xlabs, flux_small)
    assert set(ours) == set(theirs)
    for ref, tensors in ours.items():
        assert float(tensors["alpha"]) == 4
        product = tensors["lora_up.weight"] @ tensors["lora_down.weight"] * (float(tensors["alpha"]) / 4)
        torch.testing.assert_close(product, theirs[ref]["B"] @ theirs[ref]["A"], rtol=0, atol=0, msg=str(ref))
