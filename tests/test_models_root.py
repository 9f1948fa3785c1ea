"""InvokeAI's models folder (<root>/<base>/main|embedding|lora): a model names the root and a checkpoint, gets
that base's TI and LoRA folders, and --list shows every checkpoint under the root."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.confs import SMALL, write_conf


def test_invokeai_models_folder(run_cli, tiny_cache: Path, tmp_path: Path) -> None:
    tiny = next(tiny_cache.glob("*/tiny_sd1"))
    models = tmp_path / "models"
    (models / "sd-1" / "main").mkdir(parents=True)
    (models / "sd-1" / "main" / "tiny_sd1").symlink_to(tiny / "main" / "tiny_sd1")
    (models / "sd-1" / "lora").symlink_to(tiny / "lora")
    (models / "sd-1" / "embedding").symlink_to(tiny / "embedding")
    (models / "sdxl" / "main").mkdir(parents=True)
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(8, 2048)}, str(models / "sdxl" / "main" / "xl.safetensors"))
    # InvokeAI keeps FLUX.1 under flux/main; a BFL file is told by its block names
    (models / "flux" / "main").mkdir(parents=True)
    save_file(
        {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(models / "flux" / "main" / "f1.safetensors")
    )
    (models / "flux" / "main" / "flux1-tiny").symlink_to(next(tiny_cache.glob("*/tiny_flux")) / "main" / "tiny_flux")
    model = f"base: sd-1\nroot: {models}\ncheckpoint: tiny_sd1\n"
    body = "  prompts: ['a portrait of <alf>']\n  stacks: {ink: {ink: 0.5}}\n" + SMALL
    conf = write_conf(tmp_path / "conf", "inv", body, {"invoke": model})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=inv", "--list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"invoke (sd-1)  {models}/sd-1/main/tiny_sd1"
    assert lines[1:5] == [
        f"  checkpoint  tiny_sd1  diffusers, sd-1  {models}/sd-1/main/tiny_sd1",
        f"  checkpoint  xl.safetensors  single file, sdxl  {models}/sdxl/main/xl.safetensors",
        f"  checkpoint  f1.safetensors  single file, flux  {models}/flux/main/f1.safetensors",
        f"  checkpoint  flux1-tiny  diffusers, flux  {models}/flux/main/flux1-tiny",
    ]
    assert any(line.startswith("  lora  ink  kohya") for line in lines)
    assert any(line.startswith("  embedding  <alf>  a1111") for line in lines)
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=inv", "--dry-run")
    assert code == 0, err
    assert "jobs: 2 to render in total, 2 new" in out  # the LoRA job and its no-LoRA reference
