"""Pickled single-file checkpoints (.ckpt, .pt, .pth): read only through torch.load(weights_only=True), their base
and prediction type found from the unpickled keys and shapes as from a safetensors header, listed by --list.

The pixel round trip (.ckpt renders what the folder and the .safetensors render) is in test_single_file.py; a .ckpt
whose pickle would run code is in test_bad_inputs.py's corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from batchgen.assets.bases import checkpoint_base
from batchgen.assets.safetensors_header import read_header
from batchgen.assets.single_file import check_single_file
from batchgen.assets.tensors import checkpoint_header
from batchgen.errors import BatchgenError
from tests.confs import SMALL, write_conf

TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TEXT_KEYS = {
    "sd-1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    "sd-2": "cond_stage_model.model.ln_final.weight",
    "sdxl": "conditioner.embedders.1.model.ln_final.weight",
}


def _state(base: str, width: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keys base detection and check_single_file look at, with real (small) data."""
    return {
        TO_K: torch.randn(320, width, dtype=torch.float16),
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3, dtype=torch.float16),
        TEXT_KEYS[base]: torch.ones(8),
        **extra,
    }


def _tokenizer(folder: Path) -> Path:
    for name in ("tokenizer", "tokenizer_2"):
        (folder / name).mkdir(parents=True)
        (folder / name / "vocab.json").write_text("{}")
        (folder / name / "merges.txt").write_text("#version: 0.2\n")
    return folder


@pytest.mark.parametrize(
    ("base", "width", "suffix", "extra", "prediction"),
    [
        ("sd-1", 768, ".ckpt", {}, None),
        ("sd-2", 1024, ".pt", {"v_pred": torch.tensor(1.0)}, "v_prediction"),
        ("sdxl", 2048, ".pth", {}, None),
    ],
)
def test_base_and_prediction_type_from_a_pickle_match_the_safetensors_header(
    tmp_path: Path, base: str, width: int, suffix: str, extra: dict, prediction: str | None
) -> None:
    state = _state(base, width, **extra)
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / f"m{suffix}")
    save_file(state, str(tmp_path / "m.safetensors"))
    header = checkpoint_header(tmp_path / f"m{suffix}")
    from_safetensors = read_header(tmp_path / "m.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in header.tensors.items()} == {
        k: (v.dtype, v.shape) for k, v in from_safetensors.tensors.items()
    }
    assert header.tensors[TO_K].shape == (320, width) and header.tensors[TO_K].dtype == "F16"
    assert checkpoint_base(header) == checkpoint_base(from_safetensors) == (base, width)
    tokenizers = str(_tokenizer(tmp_path / "tok"))
    single = check_single_file(tmp_path / f"m{suffix}", header, base, None, tokenizers, None, "models.m")
    assert single.prediction_type == prediction
    wrong = "sd-1" if base != "sd-1" else "sdxl"
    with pytest.raises(BatchgenError) as e:
        check_single_file(tmp_path / f"m{suffix}", header, wrong, None, None, None, "m")
    assert str(e.value) == f"m.base: '{wrong}' but {tmp_path}/m{suffix} is {base} (cross-attention {width}); fix base"


def test_planning_maps_a_zip_pickle_and_reads_a_legacy_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mmap leaves a multi-GB checkpoint's data unread while planning; torch's pre-1.6 format cannot be mapped."""
    torch.save({"state_dict": _state("sd-1", 768)}, tmp_path / "zip.ckpt")
    torch.save({"state_dict": _state("sd-1", 768)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    loaded: list[dict] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loaded.append(kwargs)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert checkpoint_base(checkpoint_header(tmp_path / "zip.ckpt")) == ("sd-1", 768)
    assert checkpoint_base(checkpoint_header(tmp_path / "old.ckpt")) == ("sd-1", 768)
    assert loaded == [
        {"map_location": "cpu", "weights_only": True, "mmap": True},
        {"map_location": "cpu", "weights_only": True, "mmap": False},
    ]


def test_list_shows_pickled_checkpoints_with_their_base(run_cli, tiny_cache: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for base in ("sd-1", "sd-2", "sdxl"):
        (models / base / "main").mkdir(parents=True)
    tiny = next(tiny_cache.glob("*/tiny_sd1"))
    (models / "sd-1" / "main" / "tiny_sd1").symlink_to(tiny / "main" / "tiny_sd1")
    torch.save({"state_dict": _state("sd-1", 768)}, models / "sd-1" / "main" / "a1111.ckpt")
    torch.save(_state("sd-2", 1024, v_pred=torch.tensor(1.0)), models / "sd-2" / "main" / "v.pt")
    torch.save({"state_dict": _state("sdxl", 2048)}, models / "sdxl" / "main" / "xl.pth")
    (models / "sdxl" / "main" / "junk.ckpt").write_bytes(b"not a pickle")
    model = f"base: sd-1\nroot: {models}\ncheckpoint: tiny_sd1\n"
    conf = write_conf(tmp_path / "conf", "ls", "  prompts: ['a castle']\n" + SMALL, {"invoke": model})
    code, out, err = run_cli("--config-dir", str(conf), "+sweep=ls", "--list")
    assert code == 0, err
    assert out.splitlines()[1:6] == [
        f"  checkpoint  a1111.ckpt  single file, sd-1  {models}/sd-1/main/a1111.ckpt",
        f"  checkpoint  tiny_sd1  diffusers, sd-1  {models}/sd-1/main/tiny_sd1",
        f"  checkpoint  v.pt  single file, sd-2  {models}/sd-2/main/v.pt",
        f"  checkpoint  junk.ckpt  single file, ?  {models}/sdxl/main/junk.ckpt",
        f"  checkpoint  xl.pth  single file, sdxl  {models}/sdxl/main/xl.pth",
    ]
