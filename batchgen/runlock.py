"""One batchgen per run directory: a lock file holding the owner's pid; a dead owner's lock is taken over."""

from __future__ import annotations

import os
from pathlib import Path

from batchgen.errors import BatchgenError

LOCK = Path(".batchgen") / "lock"


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK

    def __enter__(self) -> RunLock:
        try:
            return self._take()
        except OSError as e:  # the first write into the run directory: a read-only or full disk shows here
            run_dir = self.path.parent.parent
            raise BatchgenError(
                f"run.out_dir {run_dir} is not writable ({e.strerror or e}); fix its permissions or disk, or choose "
                "another run.out_dir"
            ) from None

    def _take(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise BatchgenError(
                        f"{self.path.parent.parent} is in use by batchgen (pid {owner}); wait for it to finish, "
                        f"or render into another run.out_dir"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            return self
        raise BatchgenError(f"{self.path}: could not take the run lock; remove the file if no batchgen is running")

    def __exit__(self, *exc: object) -> None:
        if _owner(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
