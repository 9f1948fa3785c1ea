"""The short kill -9 soak (4 random points) that `make test` runs; `make soak` runs 20 (tests/soak.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak import soak


@pytest.mark.slow
def test_four_kill_points_lose_and_duplicate_nothing(tiny_cache: Path, tmp_path: Path) -> None:
    # One model and 2 steps keep it short; make soak runs the whole styles sweep.
    sweep = ("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.steps=2", "executor.devices=2", "run.threads=1")
    summary = soak(4, seed=1, work=tmp_path, cache=tiny_cache, sweep=sweep, longest=6.0)
    assert summary.startswith("soak: 4 kill -9 points (seed 1), 36 jobs each exactly one ok row, "), summary
    assert "before any render 1" in summary.split("kills landed ")[1], summary
