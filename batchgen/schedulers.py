"""Scheduler names users write, the diffusers class they mean, and A1111's sampler name for PNG metadata.

Kept free of diffusers imports so the planner can validate names without loading anything.
"""

from __future__ import annotations

from typing import NamedTuple


class SchedulerChoice(NamedTuple):
    cls: str
    kwargs: dict
    a1111: str


SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", {}, "DDIM"),
    "pndm": SchedulerChoice("PNDMScheduler", {}, "PLMS"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", {}, "Heun"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", {}, "UniPC"),
    # LMSDiscreteScheduler integrates its coefficients with scipy, a runtime dependency for this reason alone.
    "lms": SchedulerChoice("LMSDiscreteScheduler", {}, "LMS"),
    "lms_karras": SchedulerChoice("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "LMS Karras"),
}
DEFAULT_SCHEDULER = "default"  # the checkpoint's own scheduler config
