"""Deterministic random weights: the same bits on every CPU, seeded by names."""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EMBEDDING_STD = 0.02  # CLIP's token embedding init; TI vectors use it too, so they look like real tokens


def seeded_generator(*parts: object) -> torch.Generator:
    import torch

    # crc32 rather than hash(): str hashes are salted per process.
    return torch.Generator("cpu").manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def uniform(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise with the given std, with the same bits on any CPU.

    torch's float samplers (normal_, uniform_) are vectorised per CPU capability and may round differently;
    integer draws from the Mersenne twister plus exactly rounded float64 arithmetic do not.
    """
    import torch

    steps = 1 << 24
    ticks = torch.randint(0, steps, shape, generator=generator, dtype=torch.int64).to(torch.float64)
    unit = (ticks + 0.5) * (2.0 / steps) - 1.0  # exact: in (-1, 1)
    return (unit * (std * math.sqrt(3.0))).to(torch.float32)


def reinit(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every random weight with :func:`uniform` draws of torch's default Linear/Conv scale."""
    import torch

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.copy_(uniform(tuple(module.weight.shape), EMBEDDING_STD, generator))
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            std = default_std(tuple(module.weight.shape))
            for param in (module.weight, module.bias):
                if param is not None:
                    param.copy_(uniform(tuple(param.shape), std, generator))
        elif not isinstance(module, norms) and any(True for _ in module.parameters(recurse=False)):
            # A new parameterised layer type would keep platform-dependent library init: refuse.
            raise TypeError(f"reinit does not know how to initialise {path} ({type(module).__name__})")


def default_std(shape: tuple[int, ...]) -> float:
    """The std of torch's default Linear/Conv2d init, U(+-1/sqrt(fan_in)), for a weight of ``shape``."""
    return 1.0 / math.sqrt(3.0 * math.prod(shape[1:]))
