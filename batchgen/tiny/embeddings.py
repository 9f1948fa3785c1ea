"""The tiny models' textual inversions, one file per real TI format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.tiny.noise import EMBEDDING_STD, seeded_generator, uniform

if TYPE_CHECKING:
    import torch


def _vectors(count: int, width: int, *seed: object) -> torch.Tensor:
    return uniform((count, width), EMBEDDING_STD, seeded_generator("embedding", *seed))


def write_embeddings(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "tiny_sdxl":
        _write_sdxl_embeddings(folder, name)
    else:
        _write_sd1_embeddings(folder, name)


def _write_sd1_embeddings(folder: Path, name: str) -> None:
    import torch
    from safetensors.torch import save_file

    a1111 = {
        # 265 is "*</w>" in CLIP's vocabulary, and in ours, which keeps CLIP's byte order.
        "string_to_token": {"*": 265},
        "string_to_param": {"*": _vectors(1, 768, name, "alf")},
        "name": "alf",
        "step": 100,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    # torch.save is byte-stable: fixed zip timestamps, and its serialization id is a checksum of the
    # records. The archive's inner folder is the file stem, so the name must not change after saving.
    torch.save(a1111, folder / "alf.pt")
    torch.save({"<cartoona>": _vectors(1, 768, name, "cartoona")[0]}, folder / "cartoona.bin")
    save_file({"emb_params": _vectors(2, 768, name, "grainy")}, folder / "grainy.safetensors")


def _write_sdxl_embeddings(folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    for stem, count in (("alf", 1), ("cartoona", 2)):
        tensors = {
            "clip_l": _vectors(count, 768, name, stem, "clip_l"),
            "clip_g": _vectors(count, 1280, name, stem, "clip_g"),
        }
        save_file(tensors, folder / f"{stem}.safetensors")
