"""The scheduler names issue #9 lists map to diffusers classes built from the checkpoint's own config.

(`lms` is left out: diffusers' LMSDiscreteScheduler needs scipy, which batchgen does not depend on.)"""

from __future__ import annotations

from pathlib import Path

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
