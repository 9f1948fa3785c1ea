"""Conditioning for a UNet pipeline (SD1, SD2, SDXL): each text read under its job's prompt syntax, encoded by
that syntax's encoder, cached, and a job's prompt and negative prompt put together step by step.

Prompt syntax (batchgen.prompt_syntax) decides what is encoded: a text that needs no weights, BREAK or schedule
goes the plain way (engine/plain_text.py), unchanged; an A1111 text is encoded per phase of its prompt-editing
schedule (engine/a1111_text.py); a compel text goes through the compel library (engine/compel_text.py). When
prompt and negative prompt end up with different lengths they are padded with the empty text's chunks only under
pad_prompts; otherwise, as in A1111, each is conditioned in its own UNet pass (engine/passes.py).

Prompts and negative prompts share one cache (engine/conditioning_cache.py; diffusers encodes both the same way),
and every text a batch still needs goes through the encoders in one round.
"""

from __future__ import annotations

import torch

from batchgen.assets.bases import Base
from batchgen.engine.a1111_text import encode_weighted
from batchgen.engine.clip_encoders import ClipEncoders
from batchgen.engine.conditioning import Conditioning, Embeds, Encoded, Unit, texts_of
from batchgen.engine.conditioning_cache import ConditioningCache, Lookup
from batchgen.engine.plain_text import encode_plain
from batchgen.prompt_syntax import phases, plain_text
from batchgen.spec import Job


def schedule_units(text: str, job: Job) -> list[tuple[int, Unit]]:
    """(until, unit) per phase of the text under the job's prompt syntax."""
    plain = plain_text(text, job.prompt_syntax, job.steps)
    if plain is not None:
        return [(job.steps, plain)]
    if job.prompt_syntax == "compel":
        return [(job.steps, ("compel", text))]
    return [(phase.until, ("a1111", phase.fragments)) for phase in phases(text, job.prompt_syntax, job.steps)]


def _mode(job: Job) -> tuple[bool, int]:
    """What else changes a text's encoding: (truncate, clip_skip)."""
    return (job.truncate_prompts, job.clip_skip)


class PromptCache:
    def __init__(self, pipe, base: Base, max_entries: int = 1024) -> None:
        self.pipe = pipe
        self.base = base
        self.cache = ConditioningCache(max_entries)
        self.encoders = ClipEncoders(pipe, base)
        self._compel_text = None

    def embeds(self, batch: list[Job]) -> list[Conditioning]:
        """Each job's conditioning; the batch must share one text-encoder state (it shares its LoRA stack).

        Jobs may come back with different lengths or schedules: a pipeline call takes one `signature` only."""
        lookup = self.cache.open(batch, _mode, "prompt modes (truncation, clip skip)")
        schedules = [[schedule_units(text, job) for text in texts_of(self.base, self.pipe, job)] for job in batch]
        lookup.ensure(
            (unit for sides in schedules for side in sides for _, unit in side),
            lambda units: self._encode_units(units, lookup.mode),
        )
        out = []
        for job, sides in zip(batch, schedules, strict=True):
            lookup.touch(unit for side in sides for _, unit in side)
            out.append(self._conditioning(sides, lookup, job.pad_prompts))
        self.cache.trim()
        return out

    def _conditioning(self, sides: list[list[tuple[int, Unit]]], lookup: Lookup, pad: bool) -> Conditioning:
        """Prompt and negative schedules merged into one: an entry wherever either side switches."""
        ends = sorted({until for side in sides for until, _ in side})
        phases = []
        for end in ends:
            picked = [next(unit for until, unit in side if end <= until) for side in sides]
            cond = lookup[picked[0]]
            uncond = lookup[picked[1]] if len(picked) > 1 else None
            if uncond is not None and pad and cond.hidden.shape[1] != uncond.hidden.shape[1]:
                # The empty text's encoding is the chunk A1111 pads the shorter side with (long prompts only).
                lookup.ensure([""], lambda units: self._encode_units(units, lookup.mode))
                empty = lookup[""].hidden
                cond, uncond = _pad_to(cond, uncond, empty), _pad_to(uncond, cond, empty)
            embeds = Embeds(cond.hidden, uncond and uncond.hidden, cond.pooled, uncond and uncond.pooled)
            if phases and _same(phases[-1][1], embeds):
                phases[-1] = (end, embeds)
            else:
                phases.append((end, embeds))
        return Conditioning(tuple(phases))

    def _encode_units(self, units: list[Unit], mode: tuple[bool, int]) -> list[Encoded]:
        """Each unit by its syntax's encoder: the plain texts together, then the others in order."""
        truncate, clip_skip = mode
        texts = [u for u in units if isinstance(u, str)]
        encoded = dict(zip(texts, encode_plain(self.encoders, texts, truncate, clip_skip), strict=True))
        for unit in units:
            if isinstance(unit, str):
                continue
            kind, body = unit
            if kind == "compel":
                encoded[unit] = Encoded(*self._compel().encode(body, clip_skip, truncate))
            else:
                encoded[unit] = encode_weighted(self.encoders, body, truncate, clip_skip)
        return [encoded[u] for u in units]

    def _compel(self):
        if self._compel_text is None:
            from batchgen.engine.compel_text import CompelText  # only sweeps with compel prompts import compel

            self._compel_text = CompelText(self.pipe, self.base)
        return self._compel_text


def _same(a: Embeds, b: Embeds) -> bool:
    """Two phases made of the same cached encodings (an alternation back to a text already seen) are one."""
    return all(getattr(a, f) is getattr(b, f) for f in ("prompt", "negative", "pooled", "negative_pooled"))


def _pad_to(encoded: Encoded, other: Encoded, empty: torch.Tensor) -> Encoded:
    """A1111's padding of the shorter of prompt and negative prompt: empty-text chunks appended."""
    missing = (other.hidden.shape[1] - encoded.hidden.shape[1]) // empty.shape[1]
    if missing <= 0:
        return encoded
    return Encoded(torch.cat([encoded.hidden, *([empty] * missing)], dim=1), encoded.pooled)
