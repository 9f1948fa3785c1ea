"""How torch's OpenMP threads wait, chosen from how busy the CPUs are when a render starts.

By default libgomp's threads spin between parallel regions, which is fastest on a quiet machine. When another
process wants the same cores, spinning threads take turns with it and with each other: a sweep that renders in 20 s
alone took 44 s beside one busy process and 77 s beside two on 2 cores. Passive waiting (the threads sleep) brings
that to 22 s and 38 s, but costs about 30% on a quiet machine, so it is chosen only when the CPUs are busy.
The thread count is left alone: CPU pixels depend on it, and an image must not depend on the machine's load.
The sample starts when the command does and is read once the config is composed, so planning fills the wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Other processes keeping this much of one CPU busy make spinning threads lose more than sleeping ones.
BUSY_CPUS = 0.5
SAMPLE_S = 0.1


def _read(path: str) -> Callable[[], str]:
    return lambda: Path(path).read_text()


@dataclass(frozen=True)
class Probe:
    """Where a sample reads the time and the kernel's counters: the machine itself, or a test's fakes (a test must
    not depend on how busy the machine running it is)."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    proc_stat: Callable[[], str] = _read("/proc/stat")
    own_stat: Callable[[], str] = _read("/proc/self/stat")
    cpu_count: Callable[[], int | None] = os.cpu_count


MACHINE = Probe()


@dataclass(frozen=True)
class Sample:
    """The CPU counters when a sample began."""

    began: float  # probe.clock()
    cpu: tuple[int, int]
    own: int


def start_sample(probe: Probe = MACHINE) -> Sample | None:
    try:
        return Sample(probe.clock(), _cpu_ticks(probe.proc_stat()), _own_ticks(probe.own_stat()))
    except (OSError, ValueError, IndexError):
        return None


def busy_cpus(sample_s: float = SAMPLE_S, since: Sample | None = None, probe: Probe = MACHINE) -> float | None:
    """CPUs kept busy by other processes over at least `sample_s` (from /proc/stat, less this process), counted
    from `since` if given (waiting only for what is left of sample_s), else from now; None when the system does
    not say."""
    since = since or start_sample(probe)
    if since is None:
        return None
    probe.sleep(max(0.0, since.began + sample_s - probe.clock()))
    try:
        after, own_after = _cpu_ticks(probe.proc_stat()), _own_ticks(probe.own_stat())
    except (OSError, ValueError, IndexError):
        return None
    total = after[0] - since.cpu[0]
    if total <= 0:
        return None
    cpus = probe.cpu_count() or 1
    busy = (after[1] - since.cpu[1]) - (own_after - since.own)
    return max(0.0, busy / total * cpus)


def choose_wait_policy(environ: dict[str, str] | None = None, since: Sample | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` (default os.environ) before torch starts its threads, when other
    processes keep the CPUs busy and the user has not chosen a policy. Returns the policy set, if any."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return None
    busy = busy_cpus(since=since)
    if busy is None or busy < BUSY_CPUS:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by spawned workers too
    return "PASSIVE"


def _cpu_ticks(proc_stat: str) -> tuple[int, int]:
    """(all ticks, busy ticks) summed over the CPUs, from the text of /proc/stat."""
    fields = [int(v) for v in proc_stat.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), sum(fields[:8]) - idle


def _own_ticks(text: str) -> int:
    # utime and stime of this process (all its threads), fields 14 and 15 of /proc/self/stat
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])
