"""Where the original bits of every patched weight come from, so they can be restored exactly.

On CPU the checkpoint file already holds them: a weight is read back with plain file reads (not mmap, which
would keep the pages in this process) and checked bit for bit against the module the first time, so a CPU model
does not carry a second copy of every LoRA-touched weight. Anything the file cannot give exactly (another dtype,
renamed keys, a converted layout) and every weight on an accelerator is kept as a CPU copy instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from batchgen.assets.architecture import ModuleRef
from batchgen.assets.safetensors_header import TensorInfo, read_header
from batchgen.assets.tensors import FLOAT_DTYPES
from batchgen.assets.text_model import spellings


class PristineStore:
    def __init__(self, checkpoint: Path | None, components: dict[str, torch.nn.Module]) -> None:
        self.checkpoint = checkpoint
        self.components = components
        self._copies: dict[tuple[ModuleRef, str], torch.Tensor] = {}
        self._on_disk: dict[tuple[ModuleRef, str], tuple[Path, TensorInfo]] = {}
        self._indexes: dict[str, dict[str, tuple[Path, TensorInfo]]] = {}
        # One buffer reused for every comparison: a fresh tensor per weight costs a page fault per 4 KiB, which
        # made the first LoRA switch several times slower than the rest.
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def __contains__(self, ref: ModuleRef) -> bool:
        return (ref, "weight") in self._copies or (ref, "weight") in self._on_disk

    def keep(self, ref: ModuleRef, module: torch.nn.Module) -> None:
        """Remember the module's current (original) weight and bias, before the first patch."""
        for name in ("weight", "bias"):
            tensor = getattr(module, name, None)
            if tensor is None:
                continue
            found = self._find_on_disk(ref, name, tensor) if tensor.device.type == "cpu" else None
            if found is not None:
                self._on_disk[(ref, name)] = found
            else:
                self._copies[(ref, name)] = tensor.detach().to("cpu", copy=True)

    def get(self, ref: ModuleRef, name: str) -> torch.Tensor | None:
        """The original tensor on the CPU in the module's dtype, or None if the module has no such parameter."""
        if (ref, name) in self._copies:
            return self._copies[(ref, name)]
        if (ref, name) in self._on_disk:
            return _read(*self._on_disk[(ref, name)])
        return None

    def restore_into(self, ref: ModuleRef, name: str, dest: torch.Tensor) -> None:
        """Put the original bits back into `dest`; from disk they are read straight into its storage."""
        if (ref, name) in self._on_disk and dest.device.type == "cpu" and dest.is_contiguous():
            path, info = self._on_disk[(ref, name)]
            _read_into(path, info, memoryview(dest.detach().numpy()).cast("B"))
        else:
            dest.copy_(self.get(ref, name))

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._copies.values())

    def _find_on_disk(self, ref: ModuleRef, name: str, tensor: torch.Tensor) -> tuple[Path, TensorInfo] | None:
        index = self._index(ref.component)
        for key in _candidate_keys(ref.path, name):
            if key in index:
                path, info = index[key]
                if FLOAT_DTYPES.get(info.dtype) == tensor.dtype and self._same_bytes(path, info, tensor.detach()):
                    return path, info
        return None

    def _same_bytes(self, path: Path, info: TensorInfo, tensor: torch.Tensor) -> bool:
        """Bit for bit, not torch.equal: -0.0 and 0.0 compare equal but would not restore the same bits."""
        size = info.end - info.start
        if size != tensor.numel() * tensor.element_size():
            return False
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.uint8)
        stored = self._scratch[:size]
        _read_into(path, info, memoryview(stored.numpy()).cast("B"))
        return torch.equal(stored, tensor.contiguous().reshape(-1).view(torch.uint8))

    def _index(self, component: str) -> dict[str, tuple[Path, TensorInfo]]:
        if component not in self._indexes:
            index: dict[str, tuple[Path, TensorInfo]] = {}
            folder = self.checkpoint / component if self.checkpoint else None
            if folder is not None and folder.is_dir():
                for file in sorted(folder.glob("*.safetensors")):
                    index.update({k: (file, info) for k, info in read_header(file).tensors.items()})
            self._indexes[component] = index
        return self._indexes[component]


def _candidate_keys(path: str, name: str) -> list[str]:
    # transformers may save a text encoder with or without its text_model. level, whatever its modules say.
    return [f"{spelled}.{name}" for spelled in spellings(path)]


def _read(path: Path, info: TensorInfo) -> torch.Tensor:
    tensor = torch.empty(info.shape, dtype=FLOAT_DTYPES[info.dtype])
    _read_into(path, info, memoryview(tensor.numpy()).cast("B"))
    return tensor


def _read_into(path: Path, info: TensorInfo, view: memoryview) -> None:
    if len(view) != info.end - info.start:
        raise ValueError(f"{path}: stored weight has {info.end - info.start} bytes, the module {len(view)}")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            read = os.preadv(fd, [view[done:]], info.start + done)
            if read <= 0:
                raise OSError(f"{path}: unexpected end of file reading a weight")
            done += read
    finally:
        os.close(fd)
