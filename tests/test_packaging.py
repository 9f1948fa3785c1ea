"""The wheel carries conf/ so a non-editable install finds the packaged configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_conf(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("batchgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"batchgen/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= names
    assert "batchgen/cli.py" in names and "batchgen/plan/jobs.py" in names
    assert "batchgen/report/index.js" in names  # index.html's script, read when the report module loads
    # Single-file checkpoints need the per-base component configs shipped inside the package.
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "batchgen" / "model_configs").rglob("*.json")}
    assert len(shipped) == 29 and shipped <= names  # 16 for SD1, SD2 and SDXL, 6 for FLUX.1, 7 for SD3
