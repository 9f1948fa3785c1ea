"""Shared fixtures: one build of the embedded tiny models per test session, in a temporary cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from batchgen.tiny import TINY_MODELS, ensure_tiny

# A few hundred generated cases in `make test`, the same ones every run (derandomized: a CI failure reproduces);
# `make fuzz` runs HYPOTHESIS_PROFILE=fuzz for many more, freshly drawn.
settings.register_profile("ci", max_examples=60, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("fuzz", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BATCHGEN_CACHE for the whole session, with every tiny model built."""
    cache = tmp_path_factory.mktemp("batchgen-cache")
    previous = os.environ.get("BATCHGEN_CACHE")
    os.environ["BATCHGEN_CACHE"] = str(cache)
    for name in TINY_MODELS:
        ensure_tiny(name, cache)
    yield cache
    if previous is None:
        os.environ.pop("BATCHGEN_CACHE", None)
    else:
        os.environ["BATCHGEN_CACHE"] = previous


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Call batchgen's entry point in-process from a fresh working folder; returns (exit code, stdout, stderr)."""
    from batchgen.cli import main

    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture
def run_cli(tiny_cache: Path, cli):
    """`cli` with the embedded tiny models built (BATCHGEN_CACHE set for the session)."""
    return cli
