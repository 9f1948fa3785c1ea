"""SD3/SD3.5 LoRA keys in kohya / SGM naming (lora_formats/sd3.py), checked on the full-size SD3.5-large transformer
and text encoders built on the meta device from the configs batchgen ships, and numerically against diffusers.

Key sets are generated from the tables below of the original (SGM) module names and weight shapes, written out
independently of the mapping under test; every group must reach a module of exactly its delta's shape, and the
targets together must cover every Linear of the model. diffusers has no converter for these LoRAs (its SD3 loader
reads diffusers/PEFT names only), so the oracle is its single-file converter of SGM checkpoints: a LoRA patched
onto a model must give what converting the SGM weights with the LoRA added gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers, swap_scale_shift
from safetensors.torch import save_file

from batchgen.assets.architecture import ModuleRef, model_architecture, module_shapes
from batchgen.assets.bases import BY_NAME, lora_bases
from batchgen.assets.hashing import HashCache
from batchgen.assets.lora_formats import detect_format, group_by_module, layer_evidence, map_to_modules, sd3
from batchgen.assets.lora_layers import delta_dims, layer_from_tensors
from batchgen.assets.loras import Shape, inspect_lora
from batchgen.engine.patcher import WeightPatcher, load_lora_layers
from batchgen.spec import Contribution, LoraFile, LoraState

RANK = 16
# SD3.5-large: 38 blocks of 38 heads x 64, MLP 4x; T5's 4096-wide tokens, CLIP-L + CLIP-G pooled (768 + 1280).
LARGE = {"width": 2432, "mlp": 9728, "layers": 38, "dual": (), "in_channels": 16, "context": 4096, "pooled": 2048}
# Inner width 16 (2 heads of 8), MLP 64, three blocks, the first two with SD3.5-medium's second image attention.
SMALL = {"width": 16, "mlp": 64, "layers": 3, "dual": (0, 1), "in_channels": 4, "context": 12, "pooled": 10}
SMALL_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "pos_embed_max_size": 8,
    "dual_attention_layers": (0, 1),
    "qk_norm": "rms_norm",
}
LOKR_MESSAGE = (
    "joint_blocks.0.x_block.attn.qkv: batchgen cannot split a LoKr layer over SD3's fused qkv; "
    "convert it to LoRA (e.g. with kohya's tools)"
)


def sgm_modules(width: int, mlp: int, layers: int, dual: tuple[int, ...], in_channels: int, context: int, pooled: int):
    """{SGM module name: weight shape} of an MMDiT: each joint block's image (x) and text (context) stream; the last
    block's context stream is "pre only", q/k/v and a [shift; scale] modulation; dual-attention blocks (SD3.5
    medium) add a second image attention and modulate nine ways."""
    modules: dict[str, tuple[int, ...]] = {}
    stream = {
        "attn.qkv": (3 * width, width),
        "attn.proj": (width, width),
        "mlp.fc1": (mlp, width),
        "mlp.fc2": (width, mlp),
        "adaLN_modulation.1": (6 * width, width),
    }
    for i in range(layers):
        image = dict(stream)
        if i in dual:
            image |= {"attn2.qkv": (3 * width, width), "attn2.proj": (width, width)}
            image["adaLN_modulation.1"] = (9 * width, width)
        text = (
            dict(stream)
            if i < layers - 1
            else {"attn.qkv": (3 * width, width), "adaLN_modulation.1": (2 * width, width)}
        )
        modules |= {f"joint_blocks.{i}.x_block.{name}": shape for name, shape in image.items()}
        modules |= {f"joint_blocks.{i}.context_block.{name}": shape for name, shape in text.items()}
    return modules | {
        "x_embedder.proj": (width, in_channels, 2, 2),  # the patch embedding, a 2x2 convolution
        "context_embedder": (width, context),
        "t_embedder.mlp.0": (width, 256),
        "t_embedder.mlp.2": (width, width),
        "y_embedder.mlp.0": (width, pooled),
        "y_embedder.mlp.2": (width, width),
        "final_layer.linear": (4 * in_channels, width),  # 2x2 patches of the output channels
        "final_layer.adaLN_modulation.1": (2 * width, width),
    }


# What diffusers' SD3Transformer2DModel keeps outside its joint blocks, all Linear but the patch embedding.
TOP_LINEARS = {
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "context_embedder",
    "norm_out.linear",
    "proj_out",
}
CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_BLOCK = {
    "layer.0.SelfAttention.q": (4096, 4096),
    "layer.0.SelfAttention.k": (4096, 4096),
    "layer.0.SelfAttention.v": (4096, 4096),
    "layer.0.SelfAttention.o": (4096, 4096),
    "layer.1.DenseReluDense.wi_0": (10240, 4096),
    "layer.1.DenseReluDense.wi_1": (10240, 4096),
    "layer.1.DenseReluDense.wo": (4096, 10240),
}


def clip_modules(width: int, mlp: int, layers: int) -> dict[str, tuple[int, int]]:
    shapes = dict(zip(CLIP_LAYER, [(width, width)] * 4 + [(mlp, width), (width, mlp)], strict=True))
    return {f"encoder.layers.{i}.{name}": shape for i in range(layers) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def large() -> dict[str, dict[str, tuple[int, ...]]]:
    return model_architecture(BY_NAME["sd-3"].shipped_configs, "sd-3").modules


@pytest.fixture(scope="module")
def small() -> dict[str, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        return {"transformer": module_shapes(SD3Transformer2DModel(**SMALL_CONFIG))}


def lora_keys(
    modules: dict[str, tuple[int, ...]], name: Callable[[str], str], down: str, up: str, alpha: bool = True
) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for module, (out_dim, in_dim, *kernel) in modules.items():
        keys[f"{name(module)}.{down}"] = Shape((RANK, in_dim, *kernel))
        keys[f"{name(module)}.{up}"] = Shape((out_dim, RANK, *(1 for _ in kernel)))
        if alpha:
            keys[f"{name(module)}.alpha"] = Shape(())
    return keys


def group(state_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fmt, groups = group_by_module(state_dict)
    assert fmt == "sd3"
    return groups


def mapped(state_dict: dict[str, Any], modules: dict) -> dict[ModuleRef, dict[str, Any]]:
    """Every group mapped (map_to_modules splits them) to a module whose weight is exactly its delta's shape."""
    groups = group(state_dict)
    split = sd3.split(groups, modules)
    assert sd3.split(split, modules).keys() == split.keys()  # idempotent: a caller may split before mapping
    found, unmapped = map_to_modules(groups, "sd3", modules, None)
    assert unmapped == []
    for ref, tensors in found.items():
        shape = modules[ref.component][ref.path]
        assert delta_dims(tensors) == (shape[0], shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)), ref
    return found


def paths(refs: Iterable[ModuleRef], component: str = "transformer") -> set[str]:
    return {ref.path for ref in refs if ref.component == component}


def linears(modules: dict[str, tuple[int, ...]]) -> set[str]:
    return {path for path, shape in modules.items() if len(shape) == 2}


# --- full-size key sets ---------------------------------------------------------------------------------------------


LAYOUTS = {
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), "lora_down.weight", "lora_up.weight", True),
    "sgm": (str, "lora_A.weight", "lora_B.weight", False),
    "sgm-diffusion_model": (lambda m: f"diffusion_model.{m}", "lora_A.weight", "lora_B.weight", False),
    "comfyui": (lambda m: f"diffusion_model.{m}", "lora_down.weight", "lora_up.weight", True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_sgm_module_maps_and_every_linear_is_covered(layout: str, large: dict) -> None:
    name, down, up, alpha = LAYOUTS[layout]
    state_dict = lora_keys(sgm_modules(**LARGE), name, down, up, alpha)
    assert sd3.recognises(state_dict)
    found = mapped(state_dict, large)
    assert len(found) == len(large["transformer"])  # one group per module: none patched twice
    assert linears(large["transformer"]) - paths(found) == set()
    assert paths(found) == set(large["transformer"])  # the patch embedding (a convolution) too
    for tensors in found.values():
        assert all(isinstance(value, Shape) for suffix, value in tensors.items() if suffix != "alpha")
        if not alpha:
            assert float(tensors["alpha"]) == RANK  # a missing alpha is alpha = rank


def test_blocks_only_leave_exactly_the_top_level_linears(large: dict) -> None:
    # sd-scripts trains the joint blocks unless told to train the embedders and final layer too.
    blocks = {m: s for m, s in sgm_modules(**LARGE).items() if m.startswith("joint_blocks.")}
    found = mapped(lora_keys(blocks, LAYOUTS["kohya"][0], "lora_down.weight", "lora_up.weight"), large)
    assert linears(large["transformer"]) - paths(found) == TOP_LINEARS
    # 37 full blocks of 14 modules (two fused qkv in 3 each); the last has q/k/v and a modulation for its text.
    assert len(found) == 37 * 14 + 7 + 4
    last = {p for p in paths(found) if p.startswith("transformer_blocks.37.")}
    assert "transformer_blocks.37.norm1_context.linear" in last and "transformer_blocks.37.attn.add_q_proj" in last


TEXT_LAYOUTS = {
    "kohya": (
        ("lora_te1_text_model_", "lora_te2_text_model_", "lora_te3_"),
        lambda p: p.replace(".", "_"),
        "lora_down.weight",
        "lora_up.weight",
    ),
    "comfyui": (
        (
            "text_encoders.clip_l.transformer.text_model.",
            "text_encoders.clip_g.transformer.text_model.",
            "text_encoders.t5xxl.transformer.",
        ),
        str,
        "lora_A.weight",
        "lora_B.weight",
    ),
}


@pytest.mark.parametrize("layout", TEXT_LAYOUTS)
def test_text_encoder_keys_cover_both_clips_and_t5(layout: str, large: dict) -> None:
    roots, spell, down, up = TEXT_LAYOUTS[layout]
    t5 = {f"encoder.block.{i}.{n}": s for i in range(24) for n, s in T5_BLOCK.items()}
    encoders = (clip_modules(768, 3072, 12), clip_modules(1280, 5120, 32), t5)
    state_dict: dict[str, Any] = {}
    for root, modules in zip(roots, encoders, strict=True):
        state_dict |= lora_keys(modules, lambda p, root=root: root + spell(p), down, up)
    state_dict |= lora_keys({"joint_blocks.0.x_block.attn.proj": (2432, 2432)}, str, down, up)
    found = mapped(state_dict, large)
    # sd-scripts trains attention and MLPs, not the CLIPs' projections.
    assert set(large["text_encoder"]) - paths(found, "text_encoder") == {"text_projection"}
    assert set(large["text_encoder_2"]) - paths(found, "text_encoder_2") == {"text_projection"}
    assert paths(found, "text_encoder_3") == set(large["text_encoder_3"])
    # A CLIP projection is read when a file has one.
    projection = {"lora_te2_text_projection": (1280, 1280), "lora_unet_joint_blocks_0_x_block_mlp_fc1": (9728, 2432)}
    found = mapped(lora_keys(projection, str, "lora_down.weight", "lora_up.weight"), large)
    assert ModuleRef("text_encoder_2", "text_projection") in found


def test_the_base_is_sd3(large: dict) -> None:
    kohya = LAYOUTS["kohya"][0]
    everything = lora_keys(sgm_modules(**LARGE), kohya, "lora_down.weight", "lora_up.weight")
    for root, modules in (("te1", clip_modules(768, 3072, 12)), ("te2", clip_modules(1280, 5120, 32))):
        spelled = {f"{root}_text_model.{path}": shape for path, shape in modules.items()}
        everything |= lora_keys(spelled, lambda m: "lora_" + m.replace(".", "_"), "lora_down.weight", "lora_up.weight")
    blocks = {k: v for k, v in everything.items() if k.startswith("lora_unet_joint_blocks_")}
    one = {k: v for k, v in everything.items() if k.startswith("lora_unet_joint_blocks_5_context_block_mlp_fc2.")}
    sgm = lora_keys(sgm_modules(**LARGE), lambda m: f"diffusion_model.{m}", "lora_A.weight", "lora_B.weight")
    for state_dict in (everything, blocks, one, sgm):
        fmt, groups = group_by_module(state_dict)
        assert fmt == "sd3"
        assert lora_bases(layer_evidence(groups, fmt)) == {"sd-3"}
        assert lora_bases(layer_evidence(sd3.split(groups, large), fmt)) == {"sd-3"}  # split prefixes say so too


def test_recognises() -> None:
    sd3_keys = [
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
        "lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.alpha",
        "lora_unet_joint_blocks_3_x_block_attn2_proj.hada_w1_a",
        "diffusion_model.joint_blocks.3.context_block.mlp.fc2.lora_A.weight",
        "joint_blocks.0.x_block.adaLN_modulation.1.lora_B.weight",
    ]
    other_keys = [
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",  # FLUX, kohya: flux.py's
        "diffusion_model.single_blocks.3.linear1.lora_A.weight",
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # SD1, diffusers layout
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",  # SDXL, SGM layout
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # SDXL's text encoder, or SD3's
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",  # diffusers / PEFT: peft.py's
        "lora_unet_final_layer_linear.lora_down.weight",  # FLUX has a final_layer too
        "lora_unet_joint_blocks_0_x_block_attn_ln_q.lora_down.weight",  # an RMSNorm: no LoRA module
    ]
    for key in sd3_keys:
        assert sd3.recognises([key]), key
        assert detect_format([key]) == "sd3", key
    for key in other_keys:
        assert not sd3.recognises([key]), key
    assert not sd3.recognises([1, None])
    assert detect_format(other_keys[:2]) == "flux" and detect_format(other_keys[2:4]) == "kohya"
    assert sd3.recognises([*other_keys, sd3_keys[0]])
    with pytest.raises(ValueError, match="1 of 2 keys are not LoRA tensors in a known layout \\(sd3 detected\\)"):
        group_by_module({sd3_keys[0]: Shape((4, 8)), other_keys[-1]: Shape((4, 8))})


def test_component_of_and_the_last_blocks_modulation(large: dict) -> None:
    assert sd3.component_of("joint_blocks.0.x_block.attn.qkv") == ("transformer", False)
    assert sd3.component_of("joint_blocks.1.context_block.attn.qkv#k") == ("transformer", False)
    assert sd3.component_of("final_layer.adaLN_modulation.1#scale_shift") == ("transformer", False)
    assert sd3.component_of("x_embedder.proj") == ("transformer", False)
    assert sd3.component_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == ("text_encoder", True)
    assert sd3.component_of("lora_te2_text_model_encoder_layers_0_mlp_fc1") == ("text_encoder_2", True)
    assert sd3.component_of("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == ("text_encoder_3", True)
    assert sd3.component_of("lora_unet_down_blocks_0") is None
    locate = sd3.locator(large, None)
    assert locate("joint_blocks.4.context_block.attn.qkv#v") == ModuleRef(
        "transformer", "transformer_blocks.4.attn.add_v_proj"
    )
    assert locate("joint_blocks.4.context_block.attn.qkv") is None  # a fused module maps only once split
    assert locate("x_embedder.proj") == ModuleRef("transformer", "pos_embed.proj")
    # A full block's context modulation is in diffusers' order; the last block's maps only once swapped.
    full = ModuleRef("transformer", "transformer_blocks.36.norm1_context.linear")
    assert locate("joint_blocks.36.context_block.adaLN_modulation.1") == full
    assert locate("joint_blocks.36.context_block.adaLN_modulation.1#scale_shift") is None
    assert locate("joint_blocks.37.context_block.adaLN_modulation.1") is None
    last = ModuleRef("transformer", "transformer_blocks.37.norm1_context.linear")
    assert locate("joint_blocks.37.context_block.adaLN_modulation.1#scale_shift") == last
    assert locate("joint_blocks.37.context_block.attn.proj") is None  # pre only: no output, no MLP
    assert locate("joint_blocks.37.context_block.mlp.fc1") is None
    assert locate("joint_blocks.38.x_block.mlp.fc1") is None  # SD3.5-large has 38 blocks
    assert locate("joint_blocks.0.x_block.attn2.qkv#q") is None  # and no second attention
    assert locate("final_layer.adaLN_modulation.1") is None
    assert locate("final_layer.adaLN_modulation.1#scale_shift") == ModuleRef("transformer", "norm_out.linear")
    assert locate("lora_te3_encoder_block_23_layer_1_DenseReluDense_wo") == ModuleRef(
        "text_encoder_3", "encoder.block.23.layer.1.DenseReluDense.wo"
    )
    split = sd3.split({"joint_blocks.37.context_block.adaLN_modulation.1": {"diff": Shape((4864, 2432))}}, large)
    assert list(split) == ["joint_blocks.37.context_block.adaLN_modulation.1#scale_shift"]
    split = sd3.split({"joint_blocks.36.context_block.adaLN_modulation.1": {"diff": Shape((14592, 2432))}}, large)
    assert list(split) == ["joint_blocks.36.context_block.adaLN_modulation.1"]


def test_a_fused_group_of_another_width_stays_whole(small: dict) -> None:
    groups = {
        "joint_blocks.0.x_block.attn.qkv": {"lora_down.weight": Shape((4, 16)), "lora_up.weight": Shape((60, 4))}
    }
    assert list(sd3.split(groups, small)) == ["joint_blocks.0.x_block.attn.qkv"]
    assert map_to_modules(groups, "sd3", small, None) == ({}, ["joint_blocks.0.x_block.attn.qkv"])


# --- real tensors: splitting is exact -------------------------------------------------------------------------------


def ints(*shape: int, seed: int) -> torch.Tensor:
    """Small integers as floats: every product and sum is exact, whatever order a kernel adds in."""
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


def delta(tensors: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
    return layer_from_tensors(dict(tensors)).delta(torch.zeros(shape))


@pytest.mark.parametrize(
    ("prefix", "targets"),
    [
        ("joint_blocks.0.x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("joint_blocks.1.x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
        ("joint_blocks.2.context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ],
)
def test_qkv_split_is_exact(prefix: str, targets: tuple[str, ...], small: dict) -> None:
    block = f"transformer_blocks.{prefix.split('.')[1]}"
    layers = {
        "lora": {
            "lora_down.weight": ints(4, 16, seed=1),
            "lora_up.weight": ints(48, 4, seed=2),
            "alpha": torch.tensor(8.0),
        },
        "loha": {
            "hada_w1_a": ints(48, 2, seed=1),
            "hada_w1_b": ints(2, 16, seed=2),
            "hada_w2_a": ints(48, 2, seed=3),
            "hada_w2_b": ints(2, 16, seed=4),
        },
        "full": {"diff": ints(48, 16, seed=5), "diff_b": ints(48, seed=6)},
    }
    for kind, fused in layers.items():
        split = sd3.split({prefix: fused}, small)
        assert list(split) == [f"{prefix}#{part}" for part in "qkv"], kind
        locate = sd3.locator(small, None)
        assert [locate(p) for p in split] == [ModuleRef("transformer", f"{block}.{t}") for t in targets]
        stacked = torch.cat([delta(tensors, (16, 16)) for tensors in split.values()])
        whole = delta(fused, (48, 16))
        assert torch.equal(stacked, whole), kind
        assert whole.abs().sum() > 0
    lora = layers["lora"]
    for tensors in sd3.split({prefix: lora}, small).values():
        assert tensors["lora_down.weight"] is lora["lora_down.weight"] and tensors["alpha"] is lora["alpha"]
        assert tensors["lora_up.weight"].untyped_storage().data_ptr() == lora["lora_up.weight"].data_ptr()  # views
    biases = [tensors["diff_b"] for tensors in sd3.split({prefix: layers["full"]}, small).values()]
    assert torch.equal(torch.cat(biases), layers["full"]["diff_b"])


def test_modulations_are_swapped_like_diffusers(small: dict) -> None:
    # The small model's block 2 is its last: its text stream's modulation is [shift; scale], 2 x 16 rows.
    lora = {"lora_down.weight": torch.randn(4, 16), "lora_up.weight": torch.randn(32, 4)}
    loha = {"hada_w1_a": torch.randn(32, 2), "hada_w1_b": torch.randn(2, 16)}
    loha |= {"hada_w2_a": torch.randn(32, 2), "hada_w2_b": torch.randn(2, 16)}
    lokr = {"lokr_w1": torch.randn(4, 2), "lokr_w2": torch.randn(8, 8)}
    full = {"diff": torch.randn(32, 16), "diff_b": torch.randn(32)}
    for prefix in ("final_layer.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"):
        for tensors in (lora, loha, lokr, full):
            ((swapped_prefix, swapped),) = sd3.split({prefix: tensors}, small).items()
            assert swapped_prefix == f"{prefix}#scale_shift"
            expected = swap_scale_shift(delta(tensors, (32, 16)), dim=None)
            torch.testing.assert_close(delta(swapped, (32, 16)), expected)
        assert torch.equal(swapped["diff_b"], swap_scale_shift(full["diff_b"], dim=None))
    assert lora["lora_up.weight"].shape == (32, 4)  # the file's tensors untouched
    # A block before the last keeps its modulation's rows (96: six ways).
    kept = {"lora_down.weight": torch.randn(4, 16), "lora_up.weight": torch.randn(96, 4)}
    (same,) = sd3.split({"joint_blocks.1.context_block.adaLN_modulation.1": kept}, small).values()
    assert same["lora_up.weight"] is kept["lora_up.weight"]


def test_lokr_on_a_fused_qkv_is_refused(small: dict) -> None:
    lokr = {"lokr_w1": ints(6, 2, seed=1), "lokr_w2": ints(8, 8, seed=2)}  # kron: [48, 16], the fused qkv
    with pytest.raises(ValueError) as refused:
        sd3.split({"joint_blocks.0.x_block.attn.qkv": lokr}, small)
    assert str(refused.value) == LOKR_MESSAGE
    shapes = {"lokr_w1": Shape((6, 2)), "lokr_w2": Shape((8, 8))}  # planning refuses it from the header alone
    with pytest.raises(ValueError) as refused:
        map_to_modules({"joint_blocks.0.x_block.attn.qkv": shapes}, "sd3", small, None)
    assert str(refused.value) == LOKR_MESSAGE
    per_input = {"lora_down.weight": ints(4, 16, seed=1), "lora_up.weight": ints(48, 4, seed=2)}
    per_input["dora_scale"] = ints(1, 16, seed=3).abs() + 1
    with pytest.raises(ValueError, match="cannot split a DoRA layer with per-input magnitudes over SD3's fused qkv"):
        sd3.split({"joint_blocks.1.context_block.attn.qkv": per_input}, small)
    # Not fused: it passes through.
    kept = sd3.split({"joint_blocks.0.x_block.attn.proj": lokr}, small)["joint_blocks.0.x_block.attn.proj"]
    assert kept.keys() == lokr.keys() and all(kept[name] is lokr[name] for name in lokr)


# --- against diffusers' single-file converter -----------------------------------------------------------------------


def _sgm_checkpoint(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random SGM checkpoint of the small model: every module's weight and bias, the position table (8 x 8
    patches), the qk norms."""
    state: dict[str, torch.Tensor] = {"pos_embed": torch.randn(1, 64, 16, generator=generator)}
    for name, shape in sgm_modules(**SMALL).items():
        state[f"{name}.weight"] = torch.randn(shape, generator=generator)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator)
    for i in range(SMALL["layers"]):
        for attention in ("x_block.attn", "context_block.attn") + (("x_block.attn2",) if i in SMALL["dual"] else ()):
            for norm in ("ln_q", "ln_k"):
                state[f"joint_blocks.{i}.{attention}.{norm}.weight"] = torch.randn(8, generator=generator)
    return state


def test_patched_model_matches_diffusers_converter(tmp_path: Path) -> None:
    """ΔW patched onto the diffusers model equals diffusers' conversion of the SGM weights with ΔW added: the q/k/v
    cuts, both [shift; scale] swaps, the pre-only last block, the second attention and the convolution."""
    generator = torch.Generator().manual_seed(0)
    base = _sgm_checkpoint(generator)
    kohya: dict[str, torch.Tensor] = {}
    patched = dict(base)
    for i, (name, (out_dim, in_dim, *kernel)) in enumerate(sgm_modules(**SMALL).items()):
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(4, in_dim, *kernel, generator=generator) / 10
        up = torch.randn(out_dim, 4, *(1 for _ in kernel), generator=generator) / 10
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
        alpha = (1.0, 8.0, 2.5, None)[i % 4]  # above and below rank, none (alpha = rank)
        if alpha is not None:
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
        product = (up.flatten(1) @ down.flatten(1)).reshape(out_dim, in_dim, *kernel)
        patched[f"{name}.weight"] = base[f"{name}.weight"] + product * ((alpha or 4) / 4)
    save_file(kohya, str(tmp_path / "sd3_kohya.safetensors"))

    model = SD3Transformer2DModel(**SMALL_CONFIG)
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(base)), strict=True)
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(patched))
    layers = load_lora_layers(tmp_path / "sd3_kohya.safetensors", {"transformer": model}, {}, "cpu")
    assert paths(layers) == set(module_shapes(model))  # every Linear and the patch embedding
    patcher = WeightPatcher({"transformer": model})
    patcher.add("sd3_kohya", layers)
    patcher.apply(LoraState((("transformer", (Contribution("sd3_kohya", 1.0),)),)))
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        # Factors ~0.1 make products ~0.04 on weights ~1: 1e-6 is float32 rounding, not a different scale.
        assert (state[key] - value).abs().max() <= 1e-6, key
    patcher.restore()
    for key, value in convert_sd3_transformer_checkpoint_to_diffusers(dict(base)).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_inspect_reads_a_kohya_file_for_sd3(tmp_path: Path) -> None:
    arch = model_architecture(BY_NAME["sd-3"].shipped_configs, "sd-3")
    modules = {
        "joint_blocks.0.x_block.attn.qkv": (7296, 2432),
        "joint_blocks.37.context_block.adaLN_modulation.1": (4864, 2432),
        "final_layer.adaLN_modulation.1": (4864, 2432),
    }
    tensors = {}
    for name, (out_dim, in_dim) in modules.items():
        tensors[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.randn(2, in_dim) / 10
        tensors[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.randn(out_dim, 2) / 10
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.randn(2, 4096) / 10
    tensors["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.randn(4096, 2) / 10
    path = tmp_path / "style.safetensors"
    save_file(tensors, str(path))
    info, refs = inspect_lora(LoraFile("style", path), arch, HashCache(None))
    assert (info.format, info.base, info.rank) == ("sd3+lora", "sd-3", 2)
    assert info.modules == (("text_encoder_3", 1), ("transformer", 5))
    assert refs is not None and ModuleRef("transformer", "transformer_blocks.37.norm1_context.linear") in refs
