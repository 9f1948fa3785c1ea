"""The benchmark's pure parts: run order, medians with spread, targets and verdicts, table rows.

No torch, no rendering: tests/test_bench.py imports this module directly so that none of it can rot unnoticed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# key -> (comparison, bound); a None comparison is reported without a target.
TARGETS: dict[str, tuple[str | None, float | None]] = {
    "w1.vs_bare": ("<=", 1.05),
    "w1.vs_strong": (">=", 1.25),
    "w1.vs_naive": (None, None),
    "w1.switch_share": ("<=", 0.05),
    "w2.overhead": ("<=", 1.10),
    "w2.switch_share": ("<=", 0.05),
    "memory.ratio_100": ("<=", 1.10),
    "scale.local_efficiency": (">=", 0.90),
    "scale.ray_efficiency": (">=", 0.90),
    "scale.ceiling_efficiency": (None, None),
    "startup.dry_run_s": ("<=", 3.0),
}
FULL_COMMAND = "make bench"
QUICK_COMMAND = "python benchmarks/bench.py --quick"
MEMORY_COMMAND = "python benchmarks/bench.py --only memory"
SCALING_COMMAND = "python benchmarks/bench.py --only scaling"
FIGURE_HEADER = ["figure", "median (min-max)", "target", "", "from", "command"]


def palindrome_order(names: list[str], repeats: int) -> list[tuple[str, int]]:
    """(contestant, run number) in A B C C B A A B C ... order: each pair of repeats gives every contestant one
    early and one late slot, so a drift in machine speed favours nobody; every contestant runs `repeats` times."""
    order = []
    for i in range(repeats):
        order += [(name, i + 1) for name in (names if i % 2 == 0 else names[::-1])]
    return order


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(statistics.median(values), min(values), max(values))

    def text(self, unit: str = "", digits: int = 2) -> str:
        """`median 5.90 s (5.60-6.30)`; one value only prints no range."""
        suffix = f" {unit}" if unit else ""
        median = f"median {self.median:.{digits}f}{suffix}"
        if self.low == self.high:
            return median
        return f"{median} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def paired_ratios(top: list[float], bottom: list[float]) -> list[float]:
    """Run i of one contestant over run i of the other: with palindrome order the two ran next to each other, so
    each ratio saw the same machine state."""
    if len(top) != len(bottom):
        raise ValueError(f"unequal run counts {len(top)} and {len(bottom)}: sampling must be the same for both")
    return [a / b for a, b in zip(top, bottom, strict=True)]


def verdict(key: str, value: float) -> str:
    comparison, bound = TARGETS[key]
    if value != value:  # NaN: not measured
        return "not measured"
    if comparison is None or bound is None:
        return "reported"
    met = value >= bound if comparison == ">=" else value <= bound
    return "met" if met else "not met"


def target_text(key: str) -> str:
    comparison, bound = TARGETS[key]
    return "-" if comparison is None else f"{comparison} {bound:g}"


def figure_row(key: str, spread: Spread, detail: str, command: str) -> tuple[str, str, str, str, str, str]:
    # Four decimals on ratios: 1.1001 against a 1.10 bound must not print as a "not met" 1.100.
    digits = 2 if key == "startup.dry_run_s" else 4
    unit = "s" if key == "startup.dry_run_s" else ""
    return (key, spread.text(unit, digits), target_text(key), verdict(key, spread.median), detail, f"`{command}`")


def markdown_table(header: list[str], rows: list[list[str]] | list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
