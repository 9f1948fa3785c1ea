"""The benchmark's pure parts (benchmarks/bench_report.py): run order, spreads, verdicts, rows. No rendering."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"
_SPEC = importlib.util.spec_from_file_location("bench_report", _PATH)
report = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_report"] = report  # dataclasses resolve their module through sys.modules
_SPEC.loader.exec_module(report)


def test_palindrome_order_gives_equal_runs_and_mirrored_pairs():
    order = report.palindrome_order(["A", "B", "C"], 3)
    assert [name for name, _ in order] == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert [number for _, number in order] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert report.palindrome_order(["A", "B"], 2) == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]
    assert report.palindrome_order(["A", "B"], 1) == [("A", 1), ("B", 1)]


def test_spread_median_min_max_and_text():
    spread = report.Spread.of([6.3, 5.6, 5.9])
    assert (spread.median, spread.low, spread.high) == (5.9, 5.6, 6.3)
    assert spread.text("s", 1) == "median 5.9 s (5.6-6.3)"
    assert report.Spread.of([2.0, 4.0]).median == 3.0
    assert report.Spread.of([1.23456]).text("", 4) == "median 1.2346"
    assert math.isnan(report.Spread.of([]).median)


def test_paired_ratios_need_equal_run_counts():
    assert report.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="unequal run counts 2 and 1"):
        report.paired_ratios([2.0, 3.0], [1.0])


def test_verdicts_against_targets():
    assert report.verdict("w1.vs_bare", 1.05) == "met"
    assert report.verdict("w1.vs_bare", 1.0501) == "not met"
    assert report.verdict("scale.ray_efficiency", 0.9) == "met"
    assert report.verdict("scale.ray_efficiency", 0.89) == "not met"
    assert report.verdict("startup.dry_run_s", 8.7) == "not met"
    assert report.verdict("w1.vs_naive", 5.5) == "reported"
    assert report.verdict("memory.ratio_100", float("nan")) == "not measured"
    assert report.target_text("w2.overhead") == "<= 1.1"
    assert report.target_text("w1.vs_naive") == "-"
    assert list(report.TARGETS) == [
        "w1.vs_bare",
        "w1.vs_strong",
        "w1.vs_naive",
        "w1.switch_share",
        "w2.overhead",
        "w2.switch_share",
        "memory.ratio_100",
        "scale.local_efficiency",
        "scale.ray_efficiency",
        "scale.ceiling_efficiency",
        "startup.dry_run_s",
    ]
    assert report.verdict("scale.ceiling_efficiency", 0.5) == "reported"


def test_markdown_row_names_its_command():
    row = report.figure_row("w2.overhead", report.Spread(1.0168, 0.99, 1.1001), "batchgen 71 s", report.FULL_COMMAND)
    assert row == ("w2.overhead", "median 1.0168 (0.9900-1.1001)", "<= 1.1", "met", "batchgen 71 s", "`make bench`")
    startup = report.figure_row("startup.dry_run_s", report.Spread(8.7, 8.1, 9.4), "3 runs", report.QUICK_COMMAND)
    assert startup[1:4] == ("median 8.70 s (8.10-9.40)", "<= 3", "not met")
    table = report.markdown_table(report.FIGURE_HEADER, [row])
    assert table.splitlines() == [
        "| figure | median (min-max) | target |  | from | command |",
        "|---|---|---|---|---|---|",
        "| w2.overhead | median 1.0168 (0.9900-1.1001) | <= 1.1 | met | batchgen 71 s | `make bench` |",
    ]
    assert startup[-1] == "`python benchmarks/bench.py --quick`"
