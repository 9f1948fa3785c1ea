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
        end = 8 + length + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if end > path.stat().st_size:
            raise ValueError("tensor data extends past the end of the file")
        tensors = {
            k: TensorInfo(
                str(v["dtype"]),
                tuple(int(d) for d in v["shape"]),
                8 + length + int(v["data_offsets"][0]),
                8 + length + int(v["data_offsets"][1]),
            )
            for k, v in header.items()
        }
    except OSError as e:
        raise unreadable(path, e) from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BatchgenError(f"{path}: not a readable safetensors file ({e}); re-download it") from None
    return Header(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})
