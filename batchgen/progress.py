"""Progress: a redrawn bar on a terminal, plain lines (about every 10%) in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_line = -1

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self.tty:
            self.stream.write("\r" + self.line(bar=True))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            step = max(1, self.total // 10)
            if self.done == self.total or self.done // step != self._last_line:
                self._last_line = self.done // step
                self.stream.write(self.line(bar=False) + "\n")
        self.stream.flush()

    def line(self, bar: bool) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        text = f"{self.done}/{self.total} images  {rate:.2f} img/s  ETA {_clock(eta)}"
        if self.failed:
            text += f"  {self.failed} failed"
        if not bar:
            return "render: " + text
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        return f"[{'#' * filled}{'.' * (width - filled)}] {text}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
