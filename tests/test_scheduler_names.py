"""The scheduler names issue #9 lists map to diffusers classes built from the checkpoint's own config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchgen.engine.pipeline import SchedulerSwitch, load_pipeline
from batchgen.spec import ModelSpec

EXPECTED = {
    "ddim": ("DDIMScheduler", False),
    "euler": ("EulerDiscreteScheduler", False),
    "euler_a": ("EulerAncestralDiscreteScheduler", False),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", False),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", True),
    "pndm": ("PNDMScheduler", False),
    "lms": ("LMSDiscreteScheduler", False),
    "lms_karras": ("LMSDiscreteScheduler", True),
}


@pytest.fixture(scope="module")
def pipe(tiny_cache: Path):
    folder = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    return load_pipeline(ModelSpec("tiny_sd1", "sd-1", folder, ""), "cpu", torch.float32)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_scheduler_keeps_the_checkpoint_betas(pipe, name: str) -> None:
    switch = SchedulerSwitch(pipe)
    original = dict(switch.original.config)
    switch.use(name)
    cls, karras = EXPECTED[name]
    assert type(pipe.scheduler).__name__ == cls
    assert bool(pipe.scheduler.config.get("use_karras_sigmas", False)) == karras
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert pipe.scheduler.config[key] == original[key]
    pipe.scheduler.set_timesteps(4)
    assert len(pipe.scheduler.timesteps) >= 4 and int(pipe.scheduler.timesteps.max()) < original["num_train_timesteps"]
    switch.use("default")
    assert pipe.scheduler is switch.original


def _render(pipe, scheduler: str):
    switch = SchedulerSwitch(pipe)
    switch.use(scheduler)
    try:
        generator = torch.Generator("cpu").manual_seed(1)
        out = pipe("a castle", num_inference_steps=3, width=64, height=64, generator=generator, output_type="np")
        return out.images[0]
    finally:
        switch.use("default")


def test_lms_steps_with_scipy(pipe) -> None:
    """LMS's step() integrates its multistep coefficients with scipy; set_timesteps alone would never reach it."""
    images = {name: _render(pipe, name) for name in ("euler", "lms", "lms_karras")}
    for image in images.values():
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    # LMS's first step equals Euler's; later ones weigh earlier model outputs by scipy-integrated coefficients.
    assert not np.array_equal(images["lms"], images["euler"])
    assert not np.array_equal(images["lms"], images["lms_karras"])
    assert np.array_equal(images["lms"], _render(pipe, "lms"))
