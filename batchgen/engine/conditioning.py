"""What text encoding hands the denoiser: one text's encoding, one image's embeds, one job's schedule of them.

Shared by every encoder (plain, A1111, compel, an MMDiT pipeline's own), the conditioning cache and the code that
feeds a pipeline call (engine/passes.py); nothing here encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchgen.assets.bases import Base
from batchgen.spec import Job

# What one encoder pass reads: a plain text (as it is, so plain prompts of every syntax share their encoding), the
# weighted pieces of one A1111 phase ("a1111", fragments), or a text compel parses ("compel", text).
Unit = str | tuple


@dataclass(frozen=True)
class Encoded:
    """One unit's encoding: hidden [1, tokens, width] in the text encoder's dtype; pooled [1, width] where the
    pipeline reads one (SDXL, SD3, FLUX.1), else None."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None


@dataclass(frozen=True)
class Embeds:
    """One image's conditioning, shaped [1, tokens, width] (pooled: [1, width]) as diffusers returns it."""

    prompt: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class Conditioning:
    """One job's conditioning over the steps: A1111's schedule, (until, embeds) with `until` the last 0-based step
    index the entry conditions; one entry for a prompt without editing."""

    phases: tuple[tuple[int, Embeds], ...]

    @property
    def first(self) -> Embeds:
        return self.phases[0][1]

    def at(self, step: int) -> Embeds:
        return next((e for until, e in self.phases if step <= until), self.phases[-1][1])

    @property
    def signature(self) -> tuple:
        """What jobs in one pipeline call must share: the switch steps and, at each, both sides' lengths."""
        return tuple(
            (until, e.prompt.shape[1], None if e.negative is None else e.negative.shape[1]) for until, e in self.phases
        )

    @property
    def simple(self) -> bool:
        """One phase with prompt and negative of one length: the pipeline's own call, no switching or passes."""
        (_, cond, uncond), *rest = self.signature
        return not rest and (uncond is None or uncond == cond)


def negative_pass(base: Base, pipe, job: Job) -> bool:
    """Whether the job's pipeline call runs a negative-prompt pass: the base's rule (Base.negative_pass) on the
    loaded denoiser's config, so cached embeddings match what the pipeline computes. The UNet and MMDiT paths both
    ask here."""
    return base.negative_pass(job.guidance_scale, getattr(pipe, base.denoiser).config)


def texts_of(base: Base, pipe, job: Job) -> list[str]:
    """What the job encodes: its prompt, and its negative prompt where a negative pass reads it."""
    return [job.prompt, job.negative_prompt] if negative_pass(base, pipe, job) else [job.prompt]
