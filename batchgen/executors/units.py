"""Work units and who gets which: pure scheduling shared by the local and Ray executors (no torch import).

A unit is a run of consecutive jobs with one (model, LoRA state). Workers ask for work when idle and get a unit of
the state they hold when one is left, else one of the model they hold, else the next in render order, so a
worker keeps its loaded model and patched weights as long as there is work for them. A group bigger than its fair
share is split, so no worker idles while one group is left.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from batchgen.spec import Job, LoraState

StateKey = tuple[str, LoraState]


@dataclass(frozen=True)
class Unit:
    key: StateKey
    jobs: tuple[Job, ...]


def state_key(job: Job) -> StateKey:
    return (job.model, job.lora_state)


def make_units(jobs: list[Job], workers: int, batch: int) -> list[Unit]:
    """Jobs (in render order) cut into units: one per state group, or, for groups larger than an even share of
    the sweep, pieces of about that share rounded up to whole batches."""
    groups = group_by_state(jobs)
    if workers <= 1:
        return [Unit(state_key(g[0]), tuple(g)) for g in groups]
    # Pieces no larger than a quarter of a worker's share keep the tail of the sweep balanced.
    share = max(1, math.ceil(len(jobs) / (workers * 4)))
    size = max(batch, math.ceil(share / batch) * batch)
    units = []
    for group in groups:
        for start in range(0, len(group), size):
            units.append(Unit(state_key(group[0]), tuple(group[start : start + size])))
    return units


def group_by_state(jobs: list[Job]) -> list[list[Job]]:
    """Runs of consecutive jobs with one (model, LoRA state), in order."""
    groups: list[list[Job]] = []
    for job in jobs:
        if groups and state_key(groups[-1][0]) == state_key(job):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


class UnitQueue:
    """Pending units, handed out by affinity to what the asking worker holds."""

    def __init__(self, units: list[Unit]) -> None:
        self._pending: deque[Unit] = deque(units)

    def __len__(self) -> int:
        return len(self._pending)

    def next_for(self, held: StateKey | None) -> Unit | None:
        if not self._pending:
            return None
        if held is not None:
            for match in (lambda u: u.key == held, lambda u: u.key[0] == held[0]):
                for unit in self._pending:
                    if match(unit):
                        self._pending.remove(unit)
                        return unit
        return self._pending.popleft()

    def drain(self) -> list[Unit]:
        units, self._pending = list(self._pending), deque()
        return units

    def put_back(self, jobs: list[Job]) -> None:
        """A dead worker's unfinished jobs go first, so they are retried before new work."""
        if jobs:
            self._pending.appendleft(Unit(state_key(jobs[0]), tuple(jobs)))
