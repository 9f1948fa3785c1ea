"""Faults while running: a full or read-only disk, no network, a bug; and warnings for unusual but valid input."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import pytest

from batchgen.manifest import sha256_file

# The prompts replace the styles sweep's, so its {style} slot goes too (no prompt left to fill: a warning).
ONE_MODEL = (
    "+sweep=styles",
    "sweep.models=[tiny_sd1]",
    "sweep.steps=2",
    "sweep.prompts=[a castle]",
    "~sweep.slots.style",
)
NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris")
SMALL = (*ONE_MODEL, *NO_LORAS, "sweep.seeds=[1,2,3,4,5]", "sweep.batch_size=1")


def test_a_full_disk_stops_the_run_with_the_manifest_valid_and_the_next_run_resumes(
    run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchgen.engine import writer

    real = writer.atomic_write
    calls = []

    def fills_up(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) > 2:
            # what the kernel raises, half way through the temp file
            path.with_name(f".{path.name}.{os.getpid()}.tmp").write_bytes(data[:10])
            raise OSError(28, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(writer, "atomic_write", fills_up)
    code, _, err = run_cli(*SMALL)
    assert code == 1
    failing = calls[2]
    assert err.splitlines()[-1] == (
        f"batchgen: error: cannot write {failing} (No space left on device); free space or fix the output folder, "
        "then run the same command again (2 images recorded so far are kept)"
    )
    assert "Traceback" not in err
    table = pd.read_csv("runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    assert list(table["status"]) == ["ok", "ok"]
    assert all(sha256_file(Path("runs/styles") / r.image) == r.image_sha256 for r in table.itertuples())
    assert not Path("runs/styles/.batchgen/lock").exists()
    monkeypatch.setattr(writer, "atomic_write", real)
    code, out, _ = run_cli(*SMALL)
    assert code == 0 and "rendered 3, failed 0, skipped 0, already done 2" in out
    assert not list(Path("runs/styles").glob("**/.*.tmp"))


def test_a_read_only_run_directory_is_refused_before_any_model_loads(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen.engine import worker

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith("lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(worker, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = run_cli(*SMALL)
    assert code == 2
    assert err == (
        "batchgen: error: run.out_dir runs/styles is not writable (Read-only file system); fix its permissions or "
        "disk, or choose another run.out_dir\n"
    )
    assert not Path("runs/styles/manifest.csv").exists()


def test_the_styles_sweep_renders_with_the_network_blocked(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted by a batchgen run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    few_stacks = ("~sweep.stacks.lycoris", "~sweep.stacks.peft", "~sweep.stacks.ink_grain")
    code, out, err = run_cli("+sweep=styles", "sweep.seeds=[1]", "sweep.steps=2", *few_stacks)
    assert code == 0, err
    assert "rendered 18, failed 0, skipped 0" in out  # 2 models x 3 stack states x 3 prompts
    assert attempts == []


def test_a_bug_is_one_line_with_the_traceback_kept(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen import runner

    def broken(*args, **kwargs):
        raise ValueError("an unexpected\nmulti-line failure")

    monkeypatch.setattr(runner, "build_plan", broken)
    code, _, err = run_cli(*SMALL)
    assert code == 1
    prefix = "batchgen: internal error: ValueError: an unexpected multi-line failure (traceback in "
    assert err.startswith(prefix) and err.endswith("; please report it)\n") and err.count("\n") == 1
    report = Path(err[len(prefix) :].split(";")[0])
    assert "Traceback" in report.read_text() and 'raise ValueError("an unexpected' in report.read_text()
    report.unlink()


def test_unusual_but_valid_input_warns_and_goes_on(run_cli, tiny_cache: Path) -> None:
    from batchgen.tiny import tiny_root

    alf = tiny_root("tiny_sd1", tiny_cache) / "embedding" / "alf.pt"
    args = (*ONE_MODEL, *NO_LORAS, "+sweep.stacks.hot={ink: 2.5}", f"models.tiny_sd1.embeddings=[{alf}]", "--dry-run")
    code, out, err = run_cli(*args)
    assert code == 0
    assert err == (
        "batchgen: warning: sweep.stacks.hot.ink: weight 2.5 is beyond ±2; most LoRAs give noise there\n"
        "batchgen: warning: models.tiny_sd1.embeddings: <alf> is never used by a prompt of this sweep\n"
    )
    assert "jobs: 4 to render in total" in out  # 2 stacks x the 2 seeds of styles
