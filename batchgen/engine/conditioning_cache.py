"""The one cache of text encodings, for the CLIP path (engine/prompts.py) and the MMDiT path (engine/mmdit.py).

An entry is keyed by (unit, text-encoder LoRA state, encoding mode): the unit is what one encoder pass reads
(engine/conditioning.py), the state is what the job's LoRAs put into the text encoders (`text_encoder_state`, the
planner's `Job.lora_state` without the denoiser's part), the mode is what else changes an encoding of the same text
(truncation and clip skip on the CLIP path, the T5 length on the MMDiT path).

A sweep renders each prompt under many denoiser-only changes (seeds, steps, UNet weights); encoding it once per
text-encoder state removes that work from every image but the first. Jobs arrive grouped by LoRA state, so a state
left behind rarely comes back: its entries are forgotten when the state changes (memory stays flat in the number
of LoRAs), except the pristine state's, which every denoiser-only stack shares. At most `max_entries` stay, the
least recently used going first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from batchgen.assets.bases import DENOISERS
from batchgen.engine.conditioning import Encoded, Unit
from batchgen.spec import Job, LoraState


def text_encoder_state(job: Job) -> LoraState:
    """What the job's LoRAs put into the text encoders, block weights included: the planner's state without the
    denoiser's part, so that jobs differing only in the denoiser share their encodings."""
    return job.lora_state.excluding(DENOISERS)


class ConditioningCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[Unit, LoraState, Hashable], Encoded] = OrderedDict()
        self.misses = 0  # units encoded
        self.rounds = 0  # encoder rounds: a batch's missing units, or a unit fetched on its own (the empty text)
        self._state: LoraState | None = None  # the text-encoder state of the last batch
        self._retain = False

    def retain_all(self) -> None:
        """Keep every entry until the cache goes (a plan that encodes every text ahead, engine/placement.py)."""
        self._retain = True

    def open(self, batch: list[Job], mode: Callable[[Job], Hashable], mixed: str) -> Lookup:
        """The cache as `batch` sees it: the batch's one text-encoder state and one `mode(job)` (`mixed` names
        that mode in the error when the batch has several). Opening a new state forgets the others but the
        pristine one."""
        states = {text_encoder_state(job) for job in batch}
        if len(states) != 1:
            raise RuntimeError("a batch spans text-encoder states; batches must be cut by batch_key")
        state = states.pop()
        if state != self._state:
            self._forget_other_states(state)
        modes = {mode(job) for job in batch}
        if len(modes) != 1:
            raise RuntimeError(f"a batch mixes {mixed}; batches must be cut by batch_key")
        return Lookup(self, state, modes.pop())

    def trim(self) -> None:
        """Drop the least recently used entries past `max_entries` (after a batch, so none it reads goes first)."""
        while not self._retain and len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def encodings(self) -> list[Encoded]:
        return list(self._entries.values())

    def _forget_other_states(self, state: LoraState) -> None:
        keep = {state, LoraState()}
        for key in [] if self._retain else [key for key in self._entries if key[1] not in keep]:
            del self._entries[key]
        self._state = state


@dataclass(frozen=True)
class Lookup:
    """The cache's entries under one (text-encoder state, mode): what a batch reads."""

    cache: ConditioningCache
    state: LoraState
    mode: Hashable

    def ensure(self, units: Iterable[Unit], encode: Callable[[list[Unit]], list[Encoded]]) -> None:
        """Encode in one round, with `encode(missing)` (results in order), the units the cache lacks."""
        entries = self.cache._entries
        missing = [unit for unit in dict.fromkeys(units) if self._key(unit) not in entries]
        if not missing:
            return
        for unit, encoded in zip(missing, encode(missing), strict=True):
            entries[self._key(unit)] = encoded
        self.cache.misses += len(missing)
        self.cache.rounds += 1

    def __getitem__(self, unit: Unit) -> Encoded:
        return self.cache._entries[self._key(unit)]

    def touch(self, units: Iterable[Unit]) -> None:
        """Mark the units most recently used."""
        for unit in units:
            self.cache._entries.move_to_end(self._key(unit))

    def _key(self, unit: Unit) -> tuple[Unit, LoraState, Hashable]:
        return (unit, self.state, self.mode)
