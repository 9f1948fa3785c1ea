"""The memory plan (batchgen/plan/memory.py) from component sizes read off safetensors headers
(batchgen/assets/component_sizes.py), and what --dry-run and a render say with it.

FLUX.1-dev is sized at full size without memory or disk: its four components are written as safetensors files whose
headers declare the release's tensors (tests/fixtures/flux1_dev_shapes.json, every key and shape of the shipped
configs built on the meta device; regenerate with `python tests/test_memory_plan.py`) and whose data is a sparse
file. The release's parameter counts: transformer 11,901,408,320 (23.8 GB in bf16, as its files), T5-XXL
4,762,310,656 (9.5 GB; shared.weight saved once), CLIP-L 123,060,480, VAE 83,819,683.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import SHIPPED_CONFIGS
from batchgen.assets.component_sizes import model_sizes
from batchgen.engine_options import EngineOptions, dtype_name
from batchgen.errors import BatchgenError
from batchgen.plan.memory import GIB, check_fits, gb, memory_plan
from batchgen.spec import ComponentFile, Job, LoraState, ModelSpec, SingleFile
from batchgen.tiny import tiny_root

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from card_table import write_safetensors  # noqa: E402  (the sparse-file writer the card table uses too)

SHAPES = Path(__file__).parent / "fixtures" / "flux1_dev_shapes.json"
PARAMS = {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656}
PARAMS["vae"] = 83_819_683


def write_sharded(folder: Path, stem: str, rows: list, shards: int) -> None:
    """As the release shards its transformer and T5: numbered files and an index naming each key's file."""
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = rows[i::shards]
        write_safetensors(folder / name, part)
        weight_map |= {key: name for key, _ in part}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def flux1_dev(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    folder = tmp_path_factory.mktemp("flux1-dev")
    shutil.copytree(SHIPPED_CONFIGS / "flux", folder, dirs_exist_ok=True)
    shapes = json.loads(SHAPES.read_text())
    write_sharded(folder / "transformer", "diffusion_pytorch_model", shapes["transformer"], 3)
    write_sharded(folder / "text_encoder_2", "model", shapes["text_encoder_2"], 2)
    write_safetensors(folder / "text_encoder" / "model.safetensors", shapes["text_encoder"])
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", shapes["vae"])
    return ModelSpec(name="flux1", base="flux", checkpoint=folder, checkpoint_sha256="")


def flux_job(width: int = 1024, height: int = 1024) -> Job:
    return Job("0" * 16, "flux1", "a fox", "", 1, 28, 3.5, width, height, lora_state=LoraState())


def plan_for(spec: ModelSpec, gib: float, weights: str = "auto", offload: str = "auto"):
    options = EngineOptions(gpu_memory_gb=gib, weights=weights, offload=offload)
    return memory_plan(spec, [flux_job()], options, int(gib * GIB), "cuda")


def test_flux1_dev_components_are_sized_from_their_headers(flux1_dev: ModelSpec) -> None:
    sizes = model_sizes(flux1_dev)
    assert {c.component: c.params for c in sizes.components} == PARAMS
    assert [c.role for c in sizes.components] == ["denoiser", "text_encoder", "text_encoder", "vae"]
    transformer = sizes.components[0]
    assert transformer.device_bytes("bf16") == 23_802_816_640  # the release's 23.8 GB
    # Every 2-D weight of the transformer is a Linear; fp8 stores those in one byte, the rest (biases, norms) stay.
    assert transformer.linear_params == 11_898_322_944
    assert transformer.device_bytes("bf16", fp8_linears=True) == 11_898_322_944 + 2 * 3_085_376
    assert transformer.largest_linear == 18432 * 3072  # a double block's modulation (norm1.linear)
    assert sizes.components[2].device_bytes("bf16") == 9_524_621_312
    # transformers keeps T5's wo projections in fp32 under fp16: 24 of 4096 x 10240.
    assert sizes.components[2].fp32_params == 24 * 4096 * 10240
    assert sizes.components[2].device_bytes("fp16") == 9_524_621_312 + 2 * 24 * 4096 * 10240


@pytest.mark.parametrize(
    ("gib", "weights", "chosen"),
    [
        (24, "auto", "model"),  # encoders first needs the 23.8 GB transformer, the VAE and its decode at once
        (32, "auto", "encoders"),
        (80, "auto", "none"),
        (12, "auto", "sequential"),
        (16, "fp8", "encoders"),
        (24, "fp8", "none"),  # 11.1 GB of fp8 transformer + 8.9 GB of T5 + the decode's 2.0 GB + 1 GB reserve
    ],
)
def test_auto_takes_the_fastest_plan_that_fits_flux1_dev(flux1_dev: ModelSpec, gib: int, weights: str, chosen: str):
    plan = plan_for(flux1_dev, gib, weights)
    assert (plan.offload, plan.fits, plan.dtype) == (chosen, True, "bf16")
    faster = ("none", "encoders", "model", "sequential")[: ("none", "encoders", "model", "sequential").index(chosen)]
    assert all(plan.peaks[p] > gib * GIB for p in faster)
    assert plan.peak_bytes == plan.peaks[chosen] <= gib * GIB


def test_the_flux1_dev_estimate_term_by_term(flux1_dev: ModelSpec) -> None:
    plan = plan_for(flux1_dev, 24)
    # 1024x1024: 64x64 packed latent tokens + 512 T5 + 77 tokens, at 3072 wide, 17 tensors, bf16, no negative pass
    assert plan.activation_bytes == 17 * (4096 + 512 + 77) * 3072 * 2
    assert plan.decode_bytes == 8 * 128 * 1024 * 1024 * 2  # one image through the VAE's full-resolution stage
    assert plan.text_bytes == 8 * 512 * 4096 * 2
    weights = 23_802_816_640 + 246_120_960 + 9_524_621_312 + 167_639_366
    assert plan.peaks["none"] == weights + plan.decode_bytes + GIB
    assert plan.peaks["encoders"] == 23_802_816_640 + 167_639_366 + plan.decode_bytes + GIB
    assert plan.peaks["model"] == 23_802_816_640 + plan.activation_bytes + GIB
    assert (gb(plan.peaks["none"]), gb(plan.peaks["encoders"]), gb(plan.peaks["model"])) == (
        "34.4 GB",
        "25.3 GB",
        "23.6 GB",
    )
    # Without a budget (CPU, no run.gpu_memory_gb) the plan is `none`, and it fits.
    cpu = memory_plan(flux1_dev, [flux_job()], EngineOptions(), None, "cpu")
    assert (cpu.offload, cpu.fits, cpu.dtype, cpu.reserve_bytes) == ("none", True, "fp32", 0)
    # fp8 weights compute in bf16 whatever run.dtype says (engine/fp8.py), on CPU too.
    fp8 = memory_plan(flux1_dev, [flux_job()], EngineOptions(weights="fp8", dtype="fp32"), None, "cpu")
    assert (fp8.dtype, fp8.components[0].bytes) == ("bf16", 11_898_322_944 + 2 * 3_085_376)


def test_an_explicit_plan_that_cannot_fit_is_one_line_naming_what_fits(flux1_dev: ModelSpec) -> None:
    with pytest.raises(BatchgenError) as e:
        check_fits(plan_for(flux1_dev, 24, offload="none"))
    assert str(e.value) == (
        "model flux1: run.offload=none needs 34.4 GB, more than the 24.0 GB planned for (run.gpu_memory_gb); "
        "run.offload=model fits, or run.weights=fp8 with run.offload=none"
    )
    with pytest.raises(BatchgenError) as e:
        check_fits(plan_for(flux1_dev, 20, offload="encoders"))
    assert str(e.value).endswith("; run.offload=sequential fits, or run.weights=fp8 with run.offload=encoders")
    with pytest.raises(BatchgenError) as e:
        check_fits(plan_for(flux1_dev, 2))
    assert str(e.value) == (
        "model flux1: even run.offload=sequential needs 3.2 GB, more than the 2.0 GB planned for (run.gpu_memory_gb); "
        "render fewer images per call (sweep.batch_size) or smaller ones (sweep.width, sweep.height)"
    )
    check_fits(plan_for(flux1_dev, 24, offload="model"))  # fits: nothing raised


def test_a_unet_batches_its_guidance_pairs_and_sdxl_decodes_in_fp32_under_fp16(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    shutil.copytree(SHIPPED_CONFIGS / "sdxl", folder)
    for component, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")]:
        write_safetensors(folder / component / f"{name}.safetensors", [["w.weight", [5, 5]]], "F16")
    for component in ("text_encoder", "text_encoder_2"):
        write_safetensors(folder / component / "model.safetensors", [["w.weight", [5, 5]]], "F16")
    spec = ModelSpec(name="xl", base="sdxl", checkpoint=folder, checkpoint_sha256="")
    jobs = [Job(f"{i:016x}", "xl", "a fox", "", i, 20, 7.5, 1024, 1024, lora_state=LoraState()) for i in range(3)]
    fp16 = memory_plan(spec, jobs, EngineOptions(batch_size=2), None, "cuda")
    # Two images per call, each with its negative pass: 4 rows of 128x128 latents at 320 channels.
    assert (fp16.batch_size, fp16.activation_bytes) == (2, 28 * 4 * 128 * 128 * 320 * 2)
    # diffusers' SDXL pipeline upcasts its force_upcast VAE to fp32 for the decode, weights and all.
    assert (fp16.components[-1].bytes, fp16.decode_bytes) == (25 * 4, 8 * 128 * 1024 * 1024 * 4)
    bf16 = memory_plan(spec, jobs, EngineOptions(batch_size=2, dtype="bf16"), None, "cuda")
    assert (bf16.components[-1].bytes, bf16.decode_bytes) == (25 * 2, 8 * 128 * 1024 * 1024 * 2)
    # A guidance scale of 1 runs no negative pass: half the rows.
    once = [Job("0" * 16, "xl", "a fox", "", 1, 20, 1.0, 1024, 1024, lora_state=LoraState())] * 2
    assert memory_plan(spec, once, EngineOptions(batch_size=2), None, "cuda").activation_bytes == 28 * 2 * 128**2 * 640


def test_dtype_name_is_the_rule_resolve_dtype_follows() -> None:
    flux, sd1 = BY_NAME["flux"], BY_NAME["sd-1"]
    assert dtype_name(None, "auto", "cuda", flux) == "bf16"
    assert dtype_name(None, "auto", "cuda", sd1) == "fp16"
    assert dtype_name(None, "auto", "cpu", flux) == "fp32"
    assert dtype_name("fp16", "bf16", "cuda", flux) == "fp16"  # models.X.dtype over run.dtype
    assert dtype_name(None, "fp32", "cuda", sd1) == "fp32"


def test_a_variant_a_bin_and_whole_files_are_sized_as_diffusers_would_load_them(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(SHIPPED_CONFIGS / "sd-1", folder)
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.safetensors", [["a.weight", [8, 8]]], "F32")
    write_safetensors(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors", [["a.weight", [4, 4]]], "F16")
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", [["v.weight", [2, 3]]])
    spec = ModelSpec(name="m", base="sd-1", checkpoint=folder, checkpoint_sha256="", variant="fp16")
    sizes = {c.component: c for c in model_sizes(spec).components}
    assert sizes["unet"].params == 16  # the variant's file, not the plain one
    assert (sizes["text_encoder"].device_bytes("fp16"), sizes["text_encoder"].note) == (
        1000,
        "text_encoder sized by its file size (.bin)",
    )
    # A whole-file VAE replaces the folder's; only its VAE part counts (a ComfyUI file holds more).
    whole = tmp_path / "ae.safetensors"
    write_safetensors(whole, [["vae.encoder.conv_in.weight", [4, 3, 3, 3]], ["text_encoders.x.weight", [9, 9]]])
    spec = ModelSpec(
        name="m",
        base="sd-1",
        checkpoint=folder,
        checkpoint_sha256="",
        components=(ComponentFile("vae", whole, "vae", ""),),
    )
    assert {c.component: c.params for c in model_sizes(spec).components}["vae"] == 108


def test_single_files_are_split_by_their_key_prefixes(tmp_path: Path, tiny_cache: Path) -> None:
    sdxl = tmp_path / "sdxl.safetensors"
    rows = [
        ["model.diffusion_model.input_blocks.0.0.weight", [320, 4, 3, 3]],
        ["first_stage_model.decoder.conv_in.weight", [512, 4, 3, 3]],
        ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", [768]],
        ["conditioner.embedders.1.model.ln_final.weight", [1280]],
        ["model_ema.decay", []],  # neither a component nor counted
    ]
    write_safetensors(sdxl, rows)
    config = SingleFile(config_dir=SHIPPED_CONFIGS / "sdxl", tokenizers=())
    spec = ModelSpec(name="x", base="sdxl", checkpoint=sdxl, checkpoint_sha256="", single_file=config)
    assert {c.component: c.params for c in model_sizes(spec).components} == {
        "unet": 320 * 4 * 9,
        "text_encoder": 768,
        "text_encoder_2": 1280,
        "vae": 512 * 4 * 9,
    }
    # A FLUX.1 file in ComfyUI's layout: its transformer as the converter reads it, the rest from config:.
    flux = tmp_path / "flux.safetensors"
    rows = [
        ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", [48, 16]],
        ["model.diffusion_model.img_in.weight", [16, 64]],
        ["vae.decoder.conv_in.weight", [8, 4, 3, 3]],
        ["text_encoders.t5xxl.transformer.shared.weight", [100, 16]],
    ]
    write_safetensors(flux, rows)
    rest = tiny_root("tiny_flux", tiny_cache) / "main" / "tiny_flux"
    config = SingleFile(config_dir=rest, tokenizers=())
    spec = ModelSpec(name="f", base="flux", checkpoint=flux, checkpoint_sha256="", single_file=config)
    folder = ModelSpec(name="f", base="flux", checkpoint=rest, checkpoint_sha256="")
    sizes, own = model_sizes(spec).components, model_sizes(folder).components
    assert sizes[0].params == 48 * 16 + 16 * 64
    assert sizes[1:] == own[1:]


def _dry_run(run_cli, *args: str) -> tuple[int, str, str]:
    sweep = ["+sweep=next", "sweep.models=[tiny_flux]", "sweep.max_sequence_length=77", "sweep.seeds=[1]"]
    return run_cli(*sweep, "--dry-run", *args)


def test_the_dry_run_prints_each_models_memory_plan(run_cli) -> None:
    code, out, err = _dry_run(run_cli, "run.gpu_memory_gb=0.04")
    assert code == 0, err
    assert out.split("memory of each model:\n")[1] == (
        "  tiny_flux  fp32: transformer 0.9 MB, text_encoder 23.8 MB, text_encoder_2 14.8 MB, vae 0.3 MB, "
        "LoRAs 0.6 MB;\n"
        "             activations 0.4 MB (batch 4), decode 1.0 MB\n"
        # The tiny encoders outweigh the tiny transformer: only sequential, one module at a time, fits.
        "             plan sequential (run.offload=auto): estimated peak 14.3 MB, planned against 41.0 MB "
        "(run.gpu_memory_gb)\n"
    )
    code, out, err = _dry_run(run_cli)
    assert code == 0, err
    assert out.split("memory of each model:\n")[1].splitlines()[-2:] == [
        "             plan none (run.offload=auto): estimated peak 50.0 MB, no limit on CPU",
        "             (run.gpu_memory_gb=24 plans for a 24 GB card)",
    ]


def test_an_explicit_plan_that_cannot_fit_stops_a_dry_run_and_a_render_before_loading(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchgen.engine import worker

    monkeypatch.setattr(worker, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    line = (
        "batchgen: error: model tiny_flux: run.offload=none needs 50.0 MB, more than the 41.0 MB planned for "
        "(run.gpu_memory_gb); run.offload=sequential fits, or run.weights=fp8 with run.offload=none\n"
    )
    assert _dry_run(run_cli, "run.gpu_memory_gb=0.04", "run.offload=none") == (2, "", line)
    args = ["+sweep=next", "sweep.models=[tiny_flux]", "sweep.max_sequence_length=77", "sweep.seeds=[1]"]
    out_dir = tmp_path / "out"
    code, out, err = run_cli(*args, f"run.out_dir={out_dir}", "run.gpu_memory_gb=0.04", "run.offload=none")
    assert (code, err) == (2, line)
    assert not out_dir.exists()


def _write_shapes() -> None:
    """Regenerate SHAPES from the shipped FLUX.1 configs (imports torch, diffusers and transformers)."""
    from batchgen.assets.architecture import meta_component, meta_denoiser

    folder = SHIPPED_CONFIGS / "flux"
    index = json.loads((folder / "model_index.json").read_text())
    config = json.loads((folder / "transformer" / "config.json").read_text())
    models = {"transformer": meta_denoiser(config, "flux")}
    for component in ("text_encoder", "text_encoder_2", "vae"):
        models[component] = meta_component(folder, component, *index[component])
    tables = []
    for component, model in models.items():
        state = model.state_dict()
        state.pop("encoder.embed_tokens.weight", None)  # T5's, tied to shared.weight: the release saves it once
        rows = ",\n".join(f"    [{json.dumps(k)}, {json.dumps(list(v.shape))}]" for k, v in state.items())
        tables.append(f'  "{component}": [\n{rows}\n  ]')
    SHAPES.write_text("{\n" + ",\n".join(tables) + "\n}\n")


if __name__ == "__main__":
    _write_shapes()
