"""Read tensor files safely. torch is imported here, so the planner never imports this module."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from batchgen.assets.safetensors_header import Header, TensorInfo
from batchgen.errors import BatchgenError

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")


def read_state_dict(path: Path) -> dict:
    """A safetensors file, or a pickle through torch.load(weights_only=True): a pickle that would run code fails."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for every kind of corruption
            raise BatchgenError(f"{path}: not a readable safetensors file ({_short(e)}); re-download it") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # Newer pickle protocols load fine; torch's notice about them would only confuse users.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                # Zip-format tensors are mapped, not read: planning a multi-GB checkpoint needs only keys and shapes.
                mmap = zipfile.is_zipfile(path)
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise BatchgenError(
                f"{path}: refused, the pickle would run code or load non-tensor objects ({_refusal(e)}); "
                "use a .safetensors version of this file"
            ) from None
        except Exception as e:
            raise BatchgenError(f"{path}: not a readable PyTorch file ({_short(e)}); re-download it") from None
    raise BatchgenError(f"{path}: unknown file type '{path.suffix}'; expected .safetensors, .pt, .bin or .ckpt")


# safetensors' dtype names of the float types torch reads and writes checkpoints in.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_INT_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
}


def check_values(path: Path, what: str, wanted=lambda key: not key.endswith("alpha")) -> None:
    """Every tensor `wanted(key)` picks is floating point and finite: a NaN in a LoRA or TI turns every image it
    touches black, and an integer one is corrupt. Reads the whole file, so callers cache the verdict."""
    check_tensors(_tensors(path), path, what, wanted)


def check_tensors(items, path: Path, what: str, wanted=lambda key: not key.endswith("alpha")) -> None:
    """check_values over (key, tensor) pairs already in memory."""
    for key, tensor in items:
        if not wanted(key):
            continue
        if not tensor.is_floating_point():
            name = _INT_NAMES.get(tensor.dtype, str(tensor.dtype))
            raise BatchgenError(f"{path}: tensor {key} is {name}; {what} must be floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise BatchgenError(f"{path}: tensor {key} holds NaN or Inf values; re-download or re-train it")


def _tensors(path: Path):
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except OSError as e:
            raise BatchgenError(f"{path}: cannot read it ({e.strerror or e}); check the disk") from None
        except BatchgenError:
            raise
        except Exception as e:  # safetensors' own error types for corruption the header check did not see
            raise BatchgenError(f"{path}: not a readable safetensors file ({_short(e)}); re-download it") from None
        return
    yield from _flatten(unwrap_state_dict(read_state_dict(path)))


def flat_tensors(state: dict, prefix: str = ""):
    """(dotted key, tensor) for every tensor of a possibly nested state dict."""
    return _flatten(state, prefix)


def _flatten(state: dict, prefix: str = ""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


def embedding_vectors(state_dict: dict, path: Path) -> dict[str, torch.Tensor]:
    """Normalise every TI format to {encoder: [n_vectors, width]}; encoder is `clip_l` or `clip_g`.

    A1111 .pt keeps vectors under string_to_param['*']; kohya/A1111 safetensors under emb_params; diffusers
    writes {token: tensor}; SDXL TIs carry clip_l (768) and clip_g (1280) for the two text encoders.
    """
    state_dict = unwrap_state_dict(state_dict)
    if "clip_l" in state_dict and "clip_g" in state_dict:
        return {"clip_l": _matrix(state_dict["clip_l"], path), "clip_g": _matrix(state_dict["clip_g"], path)}
    if isinstance(state_dict.get("string_to_param"), dict):
        params = state_dict["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise BatchgenError(f"{path}: string_to_param must hold exactly one tensor")
        return {"clip_l": _matrix(next(iter(params.values())), path)}
    if "emb_params" in state_dict:
        return {"clip_l": _matrix(state_dict["emb_params"], path)}
    tensors = [v for v in state_dict.values() if isinstance(v, torch.Tensor)]
    if len(state_dict) == 1 and len(tensors) == 1:
        return {"clip_l": _matrix(tensors[0], path)}
    raise BatchgenError(
        f"{path}: not a textual inversion (keys: {', '.join(list(map(str, state_dict))[:5])}); "
        "expected string_to_param, emb_params, clip_l/clip_g or a single {token: tensor}"
    )


def checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's tensors. CompVis/A1111 pickles keep them under "state_dict", sometimes beside
    training state (global_step, epoch), so the nesting is unwrapped whatever else sits next to it."""
    state = read_state_dict(path)
    if isinstance(state, dict):
        state = unwrap_state_dict(state)
    if not isinstance(state, dict):
        raise BatchgenError(f"{path}: holds a {type(state).__name__}, not a dict of tensors; re-download it")
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def checkpoint_header(path: Path) -> Header:
    """What read_header gives for a .safetensors file, from a pickled checkpoint (mapped, so its data stays unread)."""
    tensors = checkpoint_state_dict(path)
    return Header({k: TensorInfo(_dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}, metadata={})


def _dtype_name(dtype: torch.dtype) -> str:
    floats = {torch_dtype: name for name, torch_dtype in FLOAT_DTYPES.items()}
    return floats.get(dtype) or _INT_NAMES.get(dtype) or str(dtype)


def unwrap_state_dict(state_dict: dict) -> dict:
    """The tensors inside a checkpoint-style {"state_dict": {...}} wrapper (CompVis checkpoints, some TI trainers),
    whatever training state (global_step, epoch) sits beside it."""
    while isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    return state_dict


def _matrix(tensor: object, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2):
        raise BatchgenError(f"{path}: embedding vectors must be a float tensor of shape [n, width]")
    return tensor.reshape(-1, tensor.shape[-1]).float()


def _refusal(e: pickle.UnpicklingError) -> str:
    # torch's message opens with advice to retry with weights_only=False; the global it refused is what matters.
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    if found:
        return f"it references {found[1]}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    return detail[1].strip()[:160] if detail else _short(e)


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__
