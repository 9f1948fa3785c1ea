"""--list names each LoRA's key layout (kohya, PEFT/diffusers, BFL/ComfyUI, XLabs, SGM/ComfyUI) and its LyCORIS
layer types (LoRA, LoCon, LoHa, LoKr, DoRA, full)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from batchgen.assets.architecture import model_architecture
from batchgen.assets.bases import BY_NAME
from batchgen.assets.hashing import HashCache
from batchgen.assets.lora_formats import file_layout
from batchgen.assets.loras import inspect_lora
from batchgen.spec import LoraFile
from batchgen.tiny import tiny_root, write_lycoris


def test_list_names_each_flux_layout(run_cli, tiny_cache: Path) -> None:
    code, out, err = run_cli("+sweep=next", "sweep.models=[tiny_flux]", "--list")
    assert code == 0, err
    loras = {line.split("  ")[2]: line.split("  ")[3] for line in out.splitlines() if line.startswith("  lora  ")}
    assert {name: summary.split(",")[0] for name, summary in loras.items()} == {
        "ink": "kohya LoRA",
        "grain": "PEFT/diffusers LoRA",
        "pastel": "BFL/ComfyUI LoRA",
        "sketch": "XLabs LoRA",
    }


def test_list_of_the_tiny_sd_loras(run_cli) -> None:
    code, out, err = run_cli("+sweep=styles", "sweep.models=[tiny_sd1]", "--list")
    assert code == 0, err
    loras = {line.split("  ")[2]: line.split("  ")[3] for line in out.splitlines() if line.startswith("  lora  ")}
    assert loras["hatch"] == "kohya LoHa, rank 4, sd-1, text_encoder 12, unet 33"
    assert loras["kron"] == "kohya LoKr, rank 4, sd-1, text_encoder 12, unet 32"
    assert loras["ink"] == "kohya LoRA, rank 4, sd-1, text_encoder 12, unet 32"
    assert loras["peft_sketch"] == "PEFT/diffusers LoRA, rank 4, sd-1, text_encoder 12, unet 32"


_CONV = "down_blocks.1.resnets.0.conv1"  # a 3x3 convolution
_LINEAR = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize(
    ("kind", "with_conv", "types", "fmt"),
    [
        ("lora", False, ("LoRA",), "kohya+lora"),
        ("lora", True, ("LoCon",), "kohya+lora"),  # a LoRA layer over a 3x3 kernel is LoCon
        ("locon_mid", True, ("LoCon",), "kohya+lora"),
        ("loha", True, ("LoHa",), "kohya+loha"),
        ("loha_tucker", True, ("LoHa",), "kohya+loha"),
        ("lokr", False, ("LoKr",), "kohya+lokr"),
        ("dora", False, ("DoRA",), "kohya+dora"),
        ("dora", True, ("DoRA", "LoCon"), "kohya+dora"),
        ("full", True, ("full",), "kohya+full"),
    ],
)
def test_lycoris_layer_types(tiny_cache: Path, tmp_path: Path, kind, with_conv, types, fmt) -> None:
    checkpoint = tiny_root("tiny_sd1", tiny_cache) / "main" / "tiny_sd1"
    arch = model_architecture(checkpoint, "sd-1")
    targets = {_LINEAR: arch.modules["unet"][_LINEAR]}
    if with_conv:
        targets[_CONV] = arch.modules["unet"][_CONV]
    path = tmp_path / f"{kind}.safetensors"
    write_lycoris(path, {"lora_unet": targets}, kind)
    info, mapped = inspect_lora(LoraFile(kind, path), arch, HashCache(None))
    assert mapped is not None
    assert (info.layout, info.layer_types, info.format) == ("kohya", types, fmt)  # format keeps its meaning


def test_sd3_kohya_and_sgm_comfyui_layouts(tmp_path: Path) -> None:
    arch = model_architecture(BY_NAME["sd-3"].shipped_configs, "sd-3")
    shape = (7296, 2432)  # joint block 0's fused image q/k/v in SD3.5 large
    for layout, name in (
        ("kohya", "lora_unet_joint_blocks_0_x_block_attn_qkv"),
        ("SGM/ComfyUI", "diffusion_model.joint_blocks.0.x_block.attn.qkv"),
    ):
        path = tmp_path / f"{layout.replace('/', '_')}.safetensors"
        save_file(
            {f"{name}.lora_down.weight": torch.zeros(2, shape[1]), f"{name}.lora_up.weight": torch.zeros(shape[0], 2)},
            str(path),
        )
        info, mapped = inspect_lora(LoraFile("style", path), arch, HashCache(None))
        assert mapped is not None
        assert (info.layout, info.layer_types, info.format) == (layout, ("LoRA",), "sd3+lora")


def test_a_file_mixing_layouts_names_each() -> None:
    keys = ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "double_blocks.0.processor.qkv_lora1.down.weight"]  # fmt: skip
    assert file_layout(keys, "flux") == "XLabs + kohya"
    assert file_layout(["text_encoders.clip_l.transformer.x.lora_A.weight"], "flux") == "BFL/ComfyUI"
