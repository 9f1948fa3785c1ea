"""Read a safetensors header (tensor names, dtypes, shapes, metadata) without torch and without the data."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from batchgen.errors import BatchgenError

# Real headers are kilobytes to a few megabytes; anything larger is corrupt or hostile.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # absolute byte offsets of the tensor's data in the file
    end: int = 0


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def unreadable(path: Path, e: OSError) -> BatchgenError:
    """The file exists but the OS will not give its bytes: permissions, I/O errors, a vanished mount."""
    fix = "fix its permissions" if isinstance(e, PermissionError) else "check the disk or copy the file again"
    return BatchgenError(f"{path}: cannot read it ({e.strerror or e}); {fix}")


def check_float_dtypes(header: Header, path: Path, what: str) -> None:
    """Integer or boolean tensors in a LoRA or TI are corrupt or not what they claim (alphas may be any number)."""
    for key, info in header.tensors.items():
        if info.dtype not in FLOAT_DTYPES and not key.endswith("alpha"):
            raise BatchgenError(f"{path}: tensor {key} is {info.dtype}; {what} must be floating point")


def _tensor_info(key: str, entry: object, base: int) -> TensorInfo:
    """One header entry, checked: a dtype name, non-negative dimensions, and offsets in order."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"entry {key!r} is not a tensor description")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r} has shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"tensor {key!r} has data offsets {offsets!r}")
    return TensorInfo(str(entry["dtype"]), tuple(shape), base + offsets[0], base + offsets[1])


def read_header(path: Path) -> Header:
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header claims {length} bytes")
            raw = f.read(length)
        if len(raw) < length:
            raise ValueError("header is truncated")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("__metadata__ is not a JSON object")
        base = 8 + length
        tensors = {str(k): _tensor_info(k, v, base) for k, v in header.items()}
        end = max((t.end for t in tensors.values()), default=base)
        if end > path.stat().st_size:
            raise ValueError("tensor data extends past the end of the file")
    except OSError as e:
        raise unreadable(path, e) from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise BatchgenError(f"{path}: not a readable safetensors file ({e}); re-download it") from None
    return Header(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})
