"""Keep batched renders bit-identical to single-image ones.

A matrix product's rows are bit-identical whatever the batch only once every image contributes enough rows to the
product (measured on x86 oneDNN: rows per image of 4, 8 and >= 12 are stable, 1-3, 5-7 and 9-11 are not). Attention,
projections and convolutions see hundreds of rows per image; the timestep and added-condition embeddings see one
(two with guidance). Those few layers are run on each image's rows alone, exactly as a batch of one runs them, so
batching changes speed and never pixels. Their cost is a handful of tiny matmuls per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

# UNet submodules that see one row per image (per guidance half), by diffusers' names, SD1/SD2/SDXL alike; the
# added-condition embedding only exists in UNets whose config asks for one (SDXL's).
UNET_PER_IMAGE = ("time_embedding", "time_emb_proj")
UNET_PER_IMAGE_OPTIONAL = ("add_embedding",)

T = TypeVar("T")


class ImageRows:
    """How many images the model's running forward holds, for its per-image layers.

    diffusers calls those layers from inside its own forward, whose signature cannot carry the count, so it is held
    here: set by the model's wrapped forward, which gets it from its pipeline call (engine/denoiser_call.py), for
    the length of that one forward only. Outside it, every call is one image's."""

    def __init__(self) -> None:
        self.images = 1

    def holding(self, images: int, forward: Callable[[], T]) -> T:
        """`forward()` with its per-image layers splitting `images` images."""
        before, self.images = self.images, images
        try:
            return forward()
        finally:
            self.images = before


def isolate_image_rows(model: torch.nn.Module, expected: tuple[str, ...], optional: tuple[str, ...] = ()) -> ImageRows:
    """Wrap the forward of every per-image-row layer of `model` in place (module paths and weights are untouched,
    so LoRA keys and the patcher see the same model): each module whose name is in `expected` or `optional`.
    Returns what the model's forward sets to the image count of its call.

    Raises RuntimeError when a name in `expected` matches no module: diffusers renamed the layer, and batching
    would silently change pixels.
    """
    rows = ImageRows()
    found: set[str] = set()
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name in expected or name in optional:
            module.forward = _per_image(module.forward, rows)
            found.add(name)
    missing = [name for name in expected if name not in found]
    if missing:
        raise RuntimeError(
            f"{type(model).__name__} has no module named {', '.join(missing)}, which batchgen runs image by image "
            "so that batching never changes pixels; this diffusers/transformers version renamed it: update the "
            "names in batchgen/engine/rows.py, or pin the version batchgen was tested with"
        )
    return rows


def _per_image(forward, rows: ImageRows):
    def run(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n = rows.images
        extra_tensors = any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values()))
        if n <= 1 or x.dim() < 2 or x.shape[0] % n or extra_tensors:
            return forward(x, *args, **kwargs)
        # diffusers stacks guidance halves as [uncond x n, cond x n]: image i owns rows i, i+n, ...
        blocks = x.view(-1, n, *x.shape[1:])
        if bool((blocks == blocks[:, :1]).all()):
            # The timestep layers see one timestep for the whole batch: every image's rows are the same, so one
            # image's result, computed as a batch of one computes it, serves them all.
            first = forward(blocks[:, 0].contiguous(), *args, **kwargs)
            return first.unsqueeze(1).expand(first.shape[0], n, *first.shape[1:]).reshape(x.shape[0], *first.shape[1:])
        return by_image(x.shape[0], n, x.device, lambda index: forward(x[index], *args, **kwargs))

    return run


def by_image(
    rows: int, images: int, device: torch.device, run: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`run(index)` on each image's rows alone, the results put back in place. diffusers stacks guidance halves as
    [uncond x n, cond x n]: image i owns rows i, i+n, ..."""
    owned = torch.arange(rows, device=device).view(-1, images).t()
    parts = [run(index) for index in owned]
    out = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
    for index, part in zip(owned, parts, strict=True):
        out[index] = part
    return out
