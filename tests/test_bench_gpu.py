"""benchmarks/bench_gpu.py: its pure parts with fixed inputs, the full-size models built on the meta device, and its
--tiny CPU run, which keeps the GPU bench's code path from rotting (no GPU has run it yet)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu.py"
# The bench's modules import each other by name, as the script does from its own folder.
sys.path.insert(0, str(REPO / "benchmarks"))
report = importlib.import_module("bench_gpu_report")


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


def test_unknown_model_is_one_line() -> None:
    done = _run("--tiny", "--only", "sd15,flux2", env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "bench_gpu: --only flux2: no such model; use sd15, sdxl, flux, flux_fp8"
    ]


def test_dense_peak_per_gpu_name() -> None:
    names = {
        "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.0),
        "NVIDIA H100 PCIe": ("H100 PCIe", 756.0),
        "NVIDIA H100 NVL": ("H100 NVL", 835.0),
        "NVIDIA H200": ("H200 SXM", 989.0),
        "NVIDIA H200 NVL": ("H200 NVL", 835.0),
        "NVIDIA A100-SXM4-80GB": ("A100", 312.0),
        "NVIDIA L40S": ("L40S", 362.0),
        "NVIDIA L4": ("L4", 121.0),
        "NVIDIA GeForce RTX 4090": ("RTX 4090", 165.0),
        "NVIDIA L40": ("unknown GPU", None),
        "Tesla T4": ("unknown GPU", None),
    }
    assert {name: report.peak_for(name) for name in names} == names


def test_dry_run_estimate_read_leniently() -> None:
    # batchgen's own lines (plan/memory.py: GB = 2**30 bytes, MB below 0.1 GB), then other spellings.
    text = (
        "memory of each model:\n"
        "  flux       bf16: transformer 22.2 GB, text_encoder 0.2 GB, text_encoder_2 8.9 GB, vae 0.2 GB\n"
        "             plan encoders (run.offload=auto): estimated peak 23.9 GB, fits 24.0 GB\n"
    )
    assert report.estimated_peak_gb(text, "flux") == 23.9
    assert report.chosen_plan(text, "flux") == "encoders"
    assert report.estimated_peak_gb("  tiny_sd1 plan none: estimated peak 28.2 MB", "tiny_sd1") == 28.2 / 1024
    assert report.estimated_peak_gb("peak: 3 GiB\nsdxl: peak 7.5 GiB", "sdxl") == 7.5  # the model's line first
    assert report.estimated_peak_gb("jobs: 8 to render\nweights 12 GB", "flux") is None  # no peak: n/a
    assert report.chosen_plan("estimated peak 3 GB", "flux") is None


def test_budget_shares_time_between_models_and_passes_unused_time_on() -> None:
    now = [100.0]
    budget = report.Budget(480.0, clock=lambda: now[0])
    budget.share([("sd15", 60.0), ("sdxl", 100.0), ("flux", 200.0), ("flux_fp8", 120.0)])
    assert budget.ends == {"sd15": 60.0, "sdxl": 160.0, "flux": 360.0, "flux_fp8": 480.0}
    now[0] += 40.0  # sd15 at 40 s: a 20 s plan run still ends within its share, a 21 s one does not
    assert budget.skip_reason("sd15", "plan model", 20.0) is None
    assert budget.skip_reason("sd15", "plan model", 21.0) == "plan model (about 21 s; 20 s left of sd15's share)"
    assert budget.skip_reason("sdxl", "plan model", 120.0) is None  # what sd15 leaves passes on
    now[0] += 400.0  # 440 s in: flux overran its share; a model needs its reserve from what is left
    assert (
        budget.skip_reason("flux", "the repeat of bare", 5.0)
        == "the repeat of bare (about 5 s; 0 s left of flux's share)"
    )
    assert budget.start_reason(40.0) is None
    assert budget.start_reason(41.0) == "about 41 s needed, 40 s of the 480 s budget left"
    unlimited = report.Budget(float("inf"), clock=lambda: now[0])
    unlimited.share([("sd15", 1.0)])
    assert unlimited.skip_reason("sd15", "anything", 1e9) is None and unlimited.start_reason(1e9) is None


def _results() -> dict:
    contestant = {"img_per_s": 2.0, "img_per_s_end_to_end": 1.0, "peak_gb": 33.95, "achieved_tflops": 400.0,
                  "share_of_peak": 0.4044}  # fmt: skip
    plan = {"img_per_s": 1.5, "img_per_s_end_to_end": 0.75, "peak_gb": 20.0, "reserved_gb": 21.5,
            "estimated_peak_gb": 23.9, "chosen": "encoders", "pixel_max_diff_vs_none": 0}  # fmt: skip
    model = {
        "label": "FLUX.1-dev fp8", "precision": "bf16 + fp8 weights", "size": 512, "steps": 8, "states": 4,
        "images_per_state": 2, "images": 8, "flops": {"per_image": 1.745e14},
        "bare": contestant, "strong": contestant, "batchgen": contestant | {"img_per_s": 3.0},
        "batchgen_vs_bare": 1.5, "batchgen_vs_strong": 1.5, "batchgen_vs_bare_end_to_end": 1.0,
        "batchgen_vs_strong_end_to_end": 1.0, "pixel_max_diff": 15, "pixel_check_passed": None,
        "pixel_tolerance": None, "pixel_note": "they differ",
        "plans": {"none": plan | {"chosen": "none", "estimated_peak_gb": None}, "auto@24": plan},
        "skipped_runs": ["the repeat of bare (about 30 s; 20 s left of flux_fp8's share)"],
    }  # fmt: skip
    return {
        "command": "make bench-gpu", "device": "NVIDIA H100 80GB HBM3", "device_memory_gb": 79.2,
        "peak_source": "H100 SXM", "peak_tflops": 989.0, "torch": "2.13.0", "date": "2027-01-02 03:04:05 +0000",
        "budget_s": 480.0, "bench_seconds": 471.4, "models": {"flux_fp8": model},
        "skipped": {"sdxl": "needs about 16 GB resident for the diffusers contestants; the GPU has 8.0 GB"},
    }  # fmt: skip


def test_markdown_names_command_and_gpu_for_every_table() -> None:
    lines = report.markdown_section(_results()).splitlines()
    assert lines[1] == "## GPU 2027-01-02 03:04:05 +0000: `make bench-gpu` on NVIDIA H100 80GB HBM3"
    assert lines[3].startswith("`make bench-gpu` (raw figures in `runs/bench/gpu.json`) on NVIDIA H100 80GB HBM3 ")
    assert "over H100 SXM 989 TFLOP/s dense bf16/fp16." in lines[3]
    assert "bench wall 471 s of a 480 s budget" in lines[3]
    assert "flux_fp8 FLUX.1-dev fp8 512x512, 8 steps, 4 LoRA states x 2 images" in lines[3]
    rows = [line for line in lines if line.startswith("| flux_fp8 ")]
    assert rows == [
        "| flux_fp8 | bf16 + fp8 weights | bare | 2.000 | 1.000 | 34 | 400.0 | 40.4% | 1.500 |",
        "| flux_fp8 | bf16 + fp8 weights | strong | 2.000 | 1.000 | 34 | 400.0 | 40.4% | 1.500 |",
        "| flux_fp8 | bf16 + fp8 weights | batchgen | 3.000 | 1.000 | 34 | 400.0 | 40.4% |  |",
        "| flux_fp8 | bf16 + fp8 weights | none | 1.500 | 0.750 | 20 | 21.5 | n/a |  |",
        "| flux_fp8 | bf16 + fp8 weights | auto for 24 GB: encoders | 1.500 | 0.750 | 20 | 21.5 | 23.9 | max 0/255 |",
    ]
    plans_caption = next(line for line in lines if line.startswith("Offload plans"))
    assert "on NVIDIA H100 80GB HBM3" in plans_caption
    assert lines[-2:] == [
        "- flux_fp8: pixels vs strong: max 15/255 (not checked: they differ); skipped the repeat of bare (about 30 s;"
        " 20 s left of flux_fp8's share)",
        "- sdxl: skipped: needs about 16 GB resident for the diffusers contestants; the GPU has 8.0 GB",
    ]


@pytest.mark.slow
def test_full_size_models_build_on_meta_and_count_their_flops(tmp_path: Path) -> None:
    """What `make bench-gpu` builds on the GPU, built on the meta device from the shipped configs: every component
    in the compute dtype, the schedulers on the host in fp32; FLOPs per image at the bench's sizes and steps."""
    import torch

    bench = importlib.import_module("bench_gpu")
    models = importlib.import_module("bench_gpu_models")
    from batchgen.assets.bases.record import SHIPPED_CONFIGS

    by_key = {arch.key: arch for arch in bench.FULL}
    parameters = {
        "sd15": {"text_encoder": 123060480, "unet": 859520964, "vae": 83653863},
        "sdxl": {"text_encoder": 123060480, "text_encoder_2": 694659840, "unet": 2567463684, "vae": 83653863},
        "flux": {"text_encoder": 123060480, "text_encoder_2": 4762310656, "transformer": 11901408320,
                 "vae": 83819683},
    }  # fmt: skip
    for key, counts in parameters.items():
        arch = by_key[key]
        pipe = models.full_pipeline(arch, tmp_path / key, "meta")
        modules = {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
        assert {n: sum(p.numel() for p in c.parameters()) for n, c in modules.items()} == counts, key
        assert {p.dtype for c in modules.values() for p in c.parameters()} == {arch.torch_dtype}, key
        assert {p.device.type for c in modules.values() for p in c.parameters()} == {"meta"}, key
    # SDXL at 1024x1024 with a guidance pair; FLUX.1-dev at 512x512, one row, T5's 512 tokens.
    sdxl = models.count_flops(SHIPPED_CONFIGS / "sdxl", by_key["sdxl"])
    assert sdxl == {"denoiser_step": 13522472796160.0, "vae_decode": 10470392594432.0,
                    "per_image": 13522472796160.0 * 20 + 10470392594432.0}  # fmt: skip
    flux = models.count_flops(SHIPPED_CONFIGS / "flux", by_key["flux"])
    assert flux == {"denoiser_step": 21502600151040.0, "vae_decode": 2514971787264.0,
                    "per_image": 21502600151040.0 * 8 + 2514971787264.0}  # fmt: skip


@pytest.mark.slow
def test_tiny_run_measures_contestants_and_plans_and_checks_pixels(tmp_path: Path) -> None:
    """The bench on CPU with the tiny SD1 (fp32) and FLUX.1 (bf16 compute, fp8 weights: batchgen's run.weights=fp8
    against diffusers' layerwise casting): each contestant once, every offload plan, auto planned for 24 GB."""
    markdown = REPO / "BENCHMARKS.md"
    before = markdown.read_bytes() if markdown.exists() else None
    out = tmp_path / "gpu.json"
    done = _run("--tiny", "--only", "sd15,flux_fp8", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["tiny"] is True
    assert results["command"].endswith("bench_gpu.py --tiny --only sd15,flux_fp8 --out " + str(out))
    assert (results["device"], results["peak_source"], results["peak_tflops"]) == ("cpu", "unknown", None)
    assert (results["order"], results["plans"]) == (["bare", "strong", "batchgen"], ["none", "encoders", "model"])
    assert (sorted(results["models"]), results["skipped"], results["failed"]) == (["flux_fp8", "sd15"], {}, [])
    for key, r in results["models"].items():
        assert (r["size"], r["steps"], r["states"], r["images_per_state"], r["images"]) == (64, 2, 2, 1, 2), key
        for name in ("bare", "strong", "batchgen"):
            assert r[name]["img_per_s"] > 0 and r[name]["img_per_s_end_to_end"] > 0, (key, name)
            assert len(r[name]["seconds"]) == 1 and r[name]["share_of_peak"] is None, (key, name)
            assert r[name]["peak_gb"] is None, (key, name)  # no device memory on CPU
        for other in ("bare", "strong"):
            assert r[f"batchgen_vs_{other}"] == pytest.approx(r["batchgen"]["img_per_s"] / r[other]["img_per_s"])
        flops = r["flops"]
        assert flops["denoiser_step"] > 0 and flops["vae_decode"] > 0
        assert flops["per_image"] == pytest.approx(flops["denoiser_step"] * 2 + flops["vae_decode"])
        assert r["skipped_runs"] == []  # no budget under --tiny
        plans = r["plans"]
        assert sorted(plans) == sorted(["none", "encoders", "model", *(["auto@24"] if key == "flux_fp8" else [])])
        assert plans["none"]["seconds"] == r["batchgen"]["seconds"]
        for plan, entry in plans.items():
            assert entry["pixel_max_diff_vs_none"] == 0 and entry["pixel_check_passed"] is True, (key, plan)
            # The dry run prints an estimate per plan (plan/memory.py); the bench reads it, in GB.
            assert 0 < entry["estimated_peak_gb"] < 1, (key, plan)
        assert plans["none"]["chosen"] == "none" and plans["encoders"]["chosen"] == "encoders"
    assert results["models"]["flux_fp8"]["plans"]["auto@24"]["planned_gb"] == 24.0
    assert results["models"]["flux_fp8"]["plans"]["auto@24"]["chosen"] == "none"  # CPU, tiny: everything fits
    sd15 = results["models"]["sd15"]
    assert [sd15[k] for k in ("dtype", "weights", "pixel_tolerance", "pixel_check_passed")] == [
        "fp32",
        "auto",
        2,
        True,
    ]
    assert 0 <= sd15["pixel_max_diff"] <= 2
    fp8 = results["models"]["flux_fp8"]
    assert [fp8[k] for k in ("dtype", "weights", "pixel_tolerance", "pixel_check_passed")] == [
        "bf16",
        "fp8",
        None,
        None,
    ]
    assert "not checked: diffusers' layerwise casting keeps FLUX.1's modulation Linears in bf16" in done.stdout
    assert f"batchgen / strong {sd15['batchgen_vs_strong']:.3f}" in done.stdout
    after = markdown.read_bytes() if markdown.exists() else None
    assert after == before  # --tiny never appends to BENCHMARKS.md
