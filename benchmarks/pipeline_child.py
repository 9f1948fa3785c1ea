"""Memory baseline child: load a diffusers pipeline and render one image, nothing else.

Run as its own process by bench.py, which reads this process's peak RSS once it exits: the floor any renderer of
this checkpoint pays (interpreter, torch, diffusers, weights, one forward pass), to compare batchgen's peak against.
Usage: pipeline_child.py CHECKPOINT WIDTH HEIGHT STEPS
"""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionPipeline


def main(argv: list[str]) -> int:
    checkpoint, width, height, steps = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(
        checkpoint, dtype=torch.float32, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a castle at night, watercolor",
        num_inference_steps=steps,
        width=width,
        height=height,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
