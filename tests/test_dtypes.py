"""The dtype each model computes in (run.dtype, models.X.dtype, the base's auto), the VAE upcast diffusers applies
under fp16, the manifest's dtype column, and the finite check on the latents before the VAE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import pandas as pd
import pytest
import torch

from batchgen.assets.bases import BASES, BY_NAME
from batchgen.engine import worker
from batchgen.engine.pipeline import resolve_dtype
from batchgen.engine.worker import Renderer, latent_fault
from batchgen.engine_options import EngineOptions
from batchgen.spec import Job, LoraState, ModelSpec
from batchgen.tiny import tiny_root

# What run.dtype=auto computes in on a CUDA device: the base's releases as published (FLUX.1 and SD3 overflow fp16).
AUTO_ON_CUDA = {"sd-1": "fp16", "sd-2": "fp16", "sdxl": "fp16", "sd-3": "bf16", "flux": "bf16"}
TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ONE_SD1 = (
    *("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.steps=2", "sweep.prompts=[a castle]", "~sweep.slots.style"),
    *("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.peft", "~sweep.stacks.lycoris"),
)
ONE_FLUX = (
    *("+sweep=next", "sweep.models=[tiny_flux]", "sweep.steps=2", "sweep.prompts=[a castle]", "~sweep.slots.animal"),
    *("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.pastel"),
)


def _table(run: str) -> pd.DataFrame:
    return pd.read_csv(f"runs/{run}/manifest.csv", dtype=str, keep_default_na=False)


def test_auto_is_the_bases_dtype_on_cuda_and_fp32_on_cpu() -> None:
    assert {base.name: base.compute_dtype("auto", "cuda:0") for base in BASES} == AUTO_ON_CUDA
    assert {base.name: base.compute_dtype("auto", "cpu") for base in BASES} == dict.fromkeys(AUTO_ON_CUDA, "fp32")
    for base in BASES:
        assert resolve_dtype("auto", base, "cuda:1") == TORCH[AUTO_ON_CUDA[base.name]]
        assert resolve_dtype("auto", base, "cpu") == torch.float32
        for name, dtype in TORCH.items():  # a name always wins, on any device
            assert base.compute_dtype(name, "cuda:0") == base.compute_dtype(name, "cpu") == name
            assert resolve_dtype(name, base, "cuda:0") == resolve_dtype(name, base, "cpu") == dtype


def test_models_dtype_overrides_run_dtype_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Renderer resolves each model's dtype when it loads it; on "cuda:0" without a GPU the load is stubbed,
    so each job's failed row carries the dtype its model would have loaded in."""
    loaded: dict[str, torch.dtype] = {}

    def no_load(spec: ModelSpec, device: str, dtype: torch.dtype, weights: str = "auto"):
        loaded[spec.name] = dtype
        raise RuntimeError("not loaded")

    monkeypatch.setattr(worker, "load_pipeline", no_load)
    models = {
        "sd1": ModelSpec("sd1", "sd-1", Path("sd1"), ""),
        "flux": ModelSpec("flux", "flux", Path("flux"), ""),
        "sd1_bf16": ModelSpec("sd1_bf16", "sd-1", Path("sd1"), "", dtype="bf16"),
        "flux_auto": ModelSpec("flux_auto", "flux", Path("flux"), "", dtype="auto"),
    }
    jobs = [
        Job(f"{i:016x}", name, "a castle", "", 1, 2, 7.5, 64, 64, lora_state=LoraState())
        for i, name in enumerate(models)
    ]
    expected = {
        "auto": {"sd1": "fp16", "flux": "bf16", "sd1_bf16": "bf16", "flux_auto": "bf16"},
        "fp32": {"sd1": "fp32", "flux": "fp32", "sd1_bf16": "bf16", "flux_auto": "bf16"},
        "fp16": {"sd1": "fp16", "flux": "fp16", "sd1_bf16": "bf16", "flux_auto": "bf16"},
    }
    for run_dtype, dtypes in expected.items():
        renderer = Renderer(models, EngineOptions(dtype=run_dtype, batch_size=1), device="cuda:0")
        results = list(renderer.render(jobs))
        assert [r.error for r in results] == ["RuntimeError: not loaded"] * len(jobs)
        assert {job.model: r.dtype for job, r in zip(jobs, results, strict=True)} == dtypes
        assert loaded == {name: TORCH[dtype] for name, dtype in dtypes.items()}


def test_a_bad_models_dtype_is_one_line_before_any_model_loads(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "load_pipeline", lambda *a: pytest.fail("a model was loaded for a bad dtype"))
    code, out, err = run_cli(*ONE_SD1, "models.tiny_sd1.dtype=fp8")
    assert code == 2 and out == ""
    assert (
        err == "batchgen: error: models.tiny_sd1.dtype: 'fp8' is not a dtype; use auto, fp16, bf16 or fp32, or null\n"
    )
    assert not Path("runs").exists()


@pytest.mark.slow
def test_the_manifest_records_the_dtype_each_image_was_rendered_in(run_cli) -> None:
    code, _, err = run_cli(*ONE_SD1, "sweep.seeds=[1]")
    assert code == 0, err
    assert list(_table("styles")[["status", "dtype"]].itertuples(index=False, name=None)) == [("ok", "fp32")]
    code, _, err = run_cli(*ONE_SD1, "sweep.seeds=[1]", "models.tiny_sd1.dtype=bf16", "run.out_dir=runs/bf16")
    assert code == 0, err
    assert list(_table("bf16")[["status", "dtype"]].itertuples(index=False, name=None)) == [("ok", "bf16")]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd3"])
def test_bf16_renders_of_the_mmdit_bases_are_finite(run_cli, model: str) -> None:
    # What run.dtype=auto gives FLUX.1 and SD3 on a GPU, here on the CPU: every image ok, none NaN or black.
    args = ["+sweep=next", f"sweep.models=[{model}]", "sweep.seeds=[1]", "sweep.steps=2", "sweep.slots={}"]
    args += ["sweep.prompts=['a castle at night']", "~sweep.stacks.pastel", f"models.{model}.dtype=bf16"]
    code, _, err = run_cli(*args, f"run.out_dir=runs/{model}")
    assert code == 0, err
    table = _table(model)
    assert len(table) == 4 and set(table["status"]) == {"ok"} and set(table["dtype"]) == {"bf16"}
    assert set(table["degenerate"]) == {"no"}  # measured: neither flat, clipped nor non-finite


# --- the VAE upcast ------------------------------------------------------------------------------------------------


def _copy_with_force_upcast(tiny_cache: Path, model: str, dest: Path, force_upcast: bool) -> Path:
    folder = dest / model
    shutil.copytree(tiny_root(model, tiny_cache) / "main" / model, folder)
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": force_upcast}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "base", "force_upcast", "decoded_in"),
    [
        ("tiny_sdxl", "sdxl", True, torch.float32),  # SDXL's own VAE overflows fp16: diffusers decodes in fp32
        ("tiny_sdxl", "sdxl", False, torch.float16),  # an fp16-fix VAE says so in its config
        ("tiny_sd1", "sd-1", True, torch.float16),  # StableDiffusionPipeline never upcasts: neither does batchgen
    ],
)
def test_the_vae_decodes_in_fp32_under_fp16_where_diffusers_upcasts(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model, base, force_upcast, decoded_in
) -> None:
    """batchgen calls the pipeline whole, so SDXL's own upcast (vae.config.force_upcast under fp16) runs on its
    path: the latents and the VAE's weights the decode sees are fp32, and the VAE is fp16 again after the call."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    decode = diffusers.AutoencoderKL.decode

    def spy(self, z, *args, **kwargs):
        seen.append((z.dtype, self.dtype))
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", spy)
    folder = _copy_with_force_upcast(tiny_cache, model, tmp_path, force_upcast)
    renderer = Renderer({model: ModelSpec(model, base, folder, "")}, EngineOptions(dtype="fp16", batch_size=2))
    jobs = [
        Job(f"{seed:016x}", model, "a castle", "blurry", seed, 1, 7.5, 64, 64, lora_state=LoraState())
        for seed in (1, 2)
    ]
    results = list(renderer.render(jobs))
    assert [(r.error, r.dtype) for r in results] == [("", "fp16")] * 2
    assert seen == [(decoded_in, decoded_in)]  # one decode call of the batch (sliced per image inside)
    assert renderer._loaded.pipe.vae.dtype == torch.float16


# --- the finite check before the VAE -------------------------------------------------------------------------------

IN_FP16 = "non-finite latents (NaN/inf) after denoising in fp16"


@pytest.mark.parametrize(
    ("dtype", "base", "key", "message"),
    [
        (
            *("fp16", "flux", "run.dtype"),
            "non-finite latents (NaN/inf) after denoising in fp16; FLUX.1 overflows fp16: use run.dtype=bf16",
        ),
        (
            *("fp16", "sd-3", "models.sd35.dtype"),
            f"{IN_FP16}; SD3/SD3.5 overflows fp16: use models.sd35.dtype=bf16",
        ),
        (
            *("fp16", "sdxl", "run.dtype"),
            f"{IN_FP16}; the model overflowed fp16: use run.dtype=bf16 or fp32",
        ),
        ("bf16", "flux", "run.dtype", "non-finite latents (NaN/inf) after denoising in bf16; use run.dtype=fp32"),
        (
            *("fp32", "sd-1", "run.dtype"),
            "non-finite latents (NaN/inf) after denoising in fp32; the model or a LoRA diverged: try lower LoRA "
            "weights, more steps or another scheduler",
        ),
    ],
)
def test_the_latent_fault_names_the_dtype_and_the_fix(dtype: str, base: str, key: str, message: str) -> None:
    assert latent_fault(dtype, BY_NAME[base], key) == message


def _nan_in_second_image(monkeypatch: pytest.MonkeyPatch, tiny_cache: Path, model: str) -> list[int]:
    """The model's scheduler puts NaN into the second image of each call, at every step; returns the batch sizes
    it stepped."""
    folder = tiny_root(model, tiny_cache) / "main" / model
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    step = cls.step
    sizes: list[int] = []

    def broken(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        sizes.append(latents.shape[0])
        latents[1] = float("nan")
        return out

    monkeypatch.setattr(cls, "step", broken)
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "model", "run", "error"),
    [
        (
            ONE_SD1,
            "tiny_sd1",
            "styles",
            "non-finite latents (NaN/inf) after denoising in fp32; the model or a LoRA diverged: try lower LoRA "
            "weights, more steps or another scheduler",
        ),
        (
            (*ONE_FLUX, "run.dtype=fp16"),
            "tiny_flux",
            "next",
            "non-finite latents (NaN/inf) after denoising in fp16; FLUX.1 overflows fp16: use run.dtype=bf16",
        ),
    ],
)
def test_nonfinite_latents_fail_their_image_and_the_batch_renders_on(
    run_cli, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch, args, model, run, error
) -> None:
    sizes = _nan_in_second_image(monkeypatch, tiny_cache, model)
    code, out, err = run_cli(*args, "sweep.seeds=[1,2]", "sweep.batch_size=2")
    assert code == 1 and "rendered 1, failed 1" in out, err
    assert set(sizes) == {2}  # both images in one pipeline call
    table = _table(run)
    assert list(table["status"]) == ["ok", "failed"]
    assert list(table["error"]) == ["", error]
    assert table["degenerate"][1] == "nonfinite" and table["image"][1] == ""
    assert Path(f"runs/{run}/{table['image'][0]}").is_file()
