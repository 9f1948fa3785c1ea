"""What a LoRA does to an image, in numbers: effect and ssim against the no-LoRA reference, and degenerate images.

Pure functions on 8-bit RGB arrays (height x width x 3), so the writer (as images land), `batchgen report` (for
older runs) and `batchgen check` all measure alike. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchgen.cells import format_degenerate

# An image is "flat" when every channel's standard deviation is below this (in 0-255 units): nothing drawn.
FLAT_STD = 2.0
# ... and "clipped" when more than this share of its pixels sit at 0 or 255 in every channel.
CLIPPED_SHARE = 0.5
NONFINITE = "nonfinite"  # the latents or the decoded image held NaN or inf: there is no image to measure


@dataclass(frozen=True)
class Measured:
    effect: float  # mean absolute pixel difference from the reference, 0-255
    ssim: float  # structural similarity to the reference, 1 = identical


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def degenerate(pixels: np.ndarray) -> str:
    """`no`, or why the image is unusable: `flat`, `clipped` or `flat;clipped` (a black image is both)."""
    reasons = []
    if float(pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max()) < FLAT_STD:
        reasons.append("flat")
    extreme = ((pixels == 0) | (pixels == 255)).all(axis=-1)
    if float(extreme.mean()) > CLIPPED_SHARE:
        reasons.append("clipped")
    return format_degenerate(reasons)


def measure(image: np.ndarray, reference: np.ndarray) -> Measured:
    if image.shape != reference.shape:
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]}, its reference {reference.shape[1]}x{reference.shape[0]}"
        )
    from skimage.metrics import structural_similarity

    effect = float(np.abs(image.astype(np.int16) - reference.astype(np.int16)).mean())
    # scikit-image's default 7-pixel window, shrunk (odd) for images smaller than that
    window = min(7, *image.shape[:2])
    window -= 1 - window % 2
    ssim = float(structural_similarity(image, reference, channel_axis=-1, data_range=255, win_size=window))
    return Measured(effect=round(effect, 4), ssim=round(ssim, 4))
