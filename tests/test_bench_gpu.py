"""benchmarks/bench_gpu.py: its --tiny CPU run keeps the GPU bench's code path from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = os.environ | {"PYTHONPATH": str(REPO)} | (env or {})
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=1200, cwd=REPO
    )


def test_refuses_without_cuda_in_one_line(tmp_path: Path) -> None:
    done = _run("--out", str(tmp_path / "gpu.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_gpu: no CUDA device (torch.cuda.is_available() is False); use a GPU or --tiny"
    ]
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.slow
def test_tiny_run_measures_all_three_and_checks_pixels(tmp_path: Path) -> None:
    markdown = REPO / "BENCHMARKS.md"
    before = markdown.read_bytes() if markdown.exists() else None
    out = tmp_path / "gpu.json"
    done = _run("--tiny", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tiny"] is True
    assert (results["device"], results["peak_source"], results["peak_tflops"]) == ("cpu", "unknown", None)
    assert results["order"] == ["bare", "strong", "batchgen", "batchgen", "strong", "bare"]
    assert sorted(results["models"]) == ["sd15", "sdxl"]
    for key, r in results["models"].items():
        assert (r["size"], r["steps"], r["states"], r["images_per_state"], r["images"]) == (64, 2, 4, 2, 8), key
        for name in ("bare", "strong", "batchgen"):
            assert r[name]["img_per_s"] > 0 and r[name]["img_per_s_end_to_end"] > 0, (key, name)
            assert len(r[name]["seconds"]) == 2 and r[name]["share_of_peak"] is None, (key, name)
        for other in ("bare", "strong"):
            assert r[f"batchgen_vs_{other}"] == pytest.approx(r["batchgen"]["img_per_s"] / r[other]["img_per_s"])
        flops = r["flops"]
        assert flops["unet_step_cfg"] > 0 and flops["vae_decode"] > 0
        assert flops["per_image"] == pytest.approx(flops["unet_step_cfg"] * 2 + flops["vae_decode"])
        assert r["pixel_check_passed"] is True and 0 <= r["pixel_max_diff"] <= 2, key
    assert f"batchgen / strong {results['models']['sdxl']['batchgen_vs_strong']:.3f}" in done.stdout
    after = markdown.read_bytes() if markdown.exists() else None
    assert after == before  # --tiny never appends to BENCHMARKS.md
