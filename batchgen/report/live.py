"""index.html while a run renders: rewritten as rows land, at most every few seconds, so that a page opened
mid-run shows the progress and the images so far (report.index.write_live_index writes it atomically)."""

from __future__ import annotations

import time
from collections.abc import Callable

INTERVAL_S = 3.0
# A page of many thousand rows takes a while to build: the writer spends at most about 1/SHARE of its time on it.
SHARE = 5


class LivePage:
    """Calls `write` when a row lands and `interval` seconds of `clock` have passed since the last write began (the
    first row writes at once); a write that took long pushes the next one out to SHARE times its duration."""

    def __init__(
        self, write: Callable[[], object], interval: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.write = write
        self.interval = interval
        self.clock = clock
        self._next: float | None = None
        self.writes = 0

    def landed(self) -> None:
        """A row was recorded."""
        began = self.clock()
        if self._next is not None and began < self._next:
            return
        self.write()
        self.writes += 1
        self._next = began + max(self.interval, SHARE * (self.clock() - began))
