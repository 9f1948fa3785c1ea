"""run.weights=fp8: the denoiser's Linear weights stored in float8 and computed in bf16, LoRAs exact, the fp8 bytes
never written (restore is bitwise), an fp8 single file loaded as its own bytes, and renders equal to plain diffusers
in bf16 with its Linear weights rounded through fp8 and the LoRA fused by diffusers' own loader.

On CPU torch casts to and from float8_e4m3fn, cuts, concatenates and copies such tensors, but has no matmul or
comparison for them (torch.equal raises): the forward upcasts before F.linear, and the tests compare bytes
(`.view(torch.uint8)`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from batchgen.assets.lora_layers import LoRALayer
from batchgen.config import compose_config
from batchgen.engine.fp8 import STORAGE, Fp8Linear, fp8_state, patch
from batchgen.engine.pipeline import LoraStacks, load_pipeline
from batchgen.plan.lora_state import lora_state
from batchgen.runner import prepare
from batchgen.spec import LoraWeight
from batchgen.tiny import tiny_root
from tests.confs import write_conf
from tests.reference import assert_same_weights_render_alike, render_row

# Pixels (0-255) an fp8 render may differ from the oracle by. Measured: 0 for every job. Both compute in bf16 from
# the same fp8 weights and the same once-rounded patched weights, but batchgen sums a stack's LoRAs in another order
# in fp32 (one bf16 step apart in a rare element) and oneDNN rounds by operand alignment (tests/reference.py), so
# the repository's oracle tolerance holds. fp8 itself is far above it: this tiny model's fp8 render is 32/255 from
# its bf16 one (asserted), so the comparison does tell fp8-rounded weights from others.
MAX_PIXEL_DIFF = 2
WEAK = 0.01  # grain at this weight: its transformer delta is below fp8's resolution everywhere (asserted)
BODY = (
    "  prompts: [a fox in ink style]\n  seeds: [1]\n  steps: 2\n  width: 64\n  height: 64\n  guidance_scale: 3.5\n"
    "  stacks: {none: {}, lora: {__LORA__: 1.0}, weak: {grain: {unet: __WEAK__, text_encoder: 0}}}\n"
)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).clone()


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def flux(tiny_cache: Path):
    plan = prepare(compose_config(["+sweep=next"]), all_assets=True)
    spec = plan.models["tiny_flux"]
    return spec, load_pipeline(spec, "cpu", torch.bfloat16, "fp8")


def test_every_linear_weight_of_the_denoiser_is_fp8_the_rest_bf16(flux) -> None:
    spec, pipe = flux
    plain = load_pipeline(spec, "cpu", torch.bfloat16)
    ours, theirs = _linears(pipe.transformer), _linears(plain.transformer)
    assert ours.keys() == theirs.keys() and len(ours) == 30
    assert all(type(m) is Fp8Linear and m.weight.dtype == STORAGE for m in ours.values())
    # Rounded once from the loaded weight; biases, norms and embeddings as loaded, in bf16.
    assert all(torch.equal(_bytes(ours[k].weight), _bytes(theirs[k].weight.to(STORAGE))) for k in ours)
    state, plain_state = pipe.transformer.state_dict(), plain.transformer.state_dict()
    others = [k for k in state if state[k].dtype != STORAGE]
    assert len(others) == len(state) - 30 and all(state[k].dtype == torch.bfloat16 for k in others)
    assert all(torch.equal(state[k], plain_state[k]) for k in others)
    # diffusers reads the compute dtype (its ModelMixin.dtype), not the first parameter's float8.
    assert pipe.transformer.dtype == torch.bfloat16
    # Text encoders are not the denoiser: untouched.
    assert not any(isinstance(m, Fp8Linear) for m in pipe.text_encoder.modules())


def _state(spec, *loras: tuple[str, float]):
    return lora_state(tuple(LoraWeight(name, w, w) for name, w in loras), spec)


def test_a_lora_never_writes_the_fp8_bytes_and_removing_it_is_bitwise(flux) -> None:
    spec, pipe = flux
    stacks = LoraStacks(pipe, spec)
    modules = {n: m for n, m in _linears(pipe.transformer).items()}
    before = {n: _bytes(m.weight) for n, m in modules.items()}

    def computed() -> dict[str, torch.Tensor]:
        return {n: _bytes(m.compute_weight()) for n, m in modules.items()}

    plain = computed()
    stacks.use(_state(spec, ("grain", 1.0)))
    grain = computed()
    patched = [n for n in modules if "lora_up" in vars(modules[n])]
    assert patched and all(torch.equal(_bytes(modules[n].weight), before[n]) for n in modules)
    assert all(not torch.equal(grain[n], plain[n]) for n in patched)
    stacks.use(_state(spec, ("ink", 0.5), ("pastel", 1.0)))
    assert all(torch.equal(_bytes(modules[n].weight), before[n]) for n in modules)
    stacks.use(_state(spec, ("grain", 1.0)))
    again = computed()
    assert all(torch.equal(again[n], grain[n]) for n in modules)  # A -> B -> A
    stacks.use(_state(spec))
    assert all(torch.equal(_bytes(modules[n].weight), before[n]) for n in modules)
    assert all(not set(vars(m)) & {"lora_up", "lora_down", "patched_weight", "patched_bias"} for m in modules.values())
    restored = computed()
    assert all(torch.equal(restored[n], plain[n]) for n in modules)


def _fp8_linear(weight: torch.Tensor) -> Fp8Linear:
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.bfloat16)
    module.weight = torch.nn.Parameter(weight.to(torch.bfloat16).to(STORAGE), requires_grad=False)
    module.__class__ = Fp8Linear
    return module


def test_lora_choice_figures() -> None:
    """The figures engine/fp8.py and README quote: a FLUX.1-size Linear, weights N(0, 0.02) rounded to fp8, a
    rank-16 LoRA. The patched weight is the same bf16 bits whether held whole (a) or built in the forward from the
    factors (b), half a bf16 step at most from fp32 W8 + ΔW; rounded into fp8 it would be 8 times as far."""
    g = torch.Generator().manual_seed(0)
    module = _fp8_linear(torch.randn(3072, 3072, generator=g) * 0.02)
    up, down = torch.randn(3072, 16, generator=g) * 0.01, torch.randn(16, 3072, generator=g) * 0.01
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(16.0)})
    w8 = module.weight.to(torch.float32)
    reference = w8 + layer.delta(w8)
    held = reference.to(torch.bfloat16)  # (a): the module's weight in bf16 while patched
    patch(module, [(layer, 1.0)])
    built = module.compute_weight()  # (b): fp8 weight + factors, summed in the forward
    assert torch.equal(built.view(torch.uint16), held.view(torch.uint16))
    error = (built.float() - reference).abs().max().item()
    rounded_into_fp8 = (reference.to(STORAGE).float() - reference).abs().max().item()
    assert error == pytest.approx(2.441e-4, rel=1e-3)  # half of bf16's step 2^-11 in [2^-4, 2^-3)
    assert rounded_into_fp8 == pytest.approx(1.951e-3, rel=1e-3) and rounded_into_fp8 > 7.9 * error
    held_bytes = held.numel() * 2
    fp8_bytes = module.weight.numel() + (module.lora_up.numel() + module.lora_down.numel()) * 4
    assert (held_bytes, fp8_bytes) == (18_874_368, 9_437_184 + 393_216)


def test_a_delta_below_fp8_resolution_still_changes_the_weight() -> None:
    g = torch.Generator().manual_seed(1)
    module = _fp8_linear(torch.randn(64, 64, generator=g) * 0.02)
    up, down = torch.full((64, 1), 2.0**-6), torch.full((1, 64), 2.0**-6)  # ΔW = 2^-12 everywhere
    layer = LoRALayer({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)})
    w8 = module.weight.to(torch.float32)
    assert torch.equal((w8 + layer.delta(w8)).to(STORAGE).float(), w8)  # rounded into fp8, the delta vanishes
    plain = module.compute_weight().clone()
    patch(module, [(layer, 1.0)])
    assert (module.compute_weight() != plain).float().mean() > 0.9


def _oracle(
    folder: Path, lora: Path | None, weights: tuple[float, float], row: pd.Series, denoiser: str
) -> np.ndarray:
    """Plain diffusers, no batchgen code: the pipeline in bf16, the denoiser's Linear weights rounded through fp8,
    the LoRA loaded by diffusers and fused at its (denoiser, text encoder) weights. The fuse runs in fp32 and the
    pipeline goes back to bf16 after: each patched weight is rounded to bf16 once, as batchgen computes it (diffusers
    fusing in bf16 rounds the delta and then the sum, one bf16 step apart in places, which this tiny random model
    turns into up to 9/255)."""
    from diffusers import DiffusionPipeline

    extra = {"safety_checker": None, "requires_safety_checker": False} if denoiser == "unet" else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.bfloat16, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    for module in getattr(pipe, denoiser).modules():
        if type(module) is torch.nn.Linear:
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
    if lora is not None:
        pipe.to(torch.float32)
        pipe.load_lora_weights(str(lora), adapter_name="x")
        for component, weight in zip((denoiser, "text_encoder"), weights, strict=True):
            if weight:
                pipe.fuse_lora(components=[component], lora_scale=weight)
        pipe.unload_lora_weights()
        pipe.to(torch.bfloat16)
    return np.asarray(render_row(pipe, row).convert("RGB"), dtype=np.int16)


LORAS = {"tiny_flux": ("grain", "transformer"), "tiny_sd1": ("ink", "unet")}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> dict[str, tuple[Path, pd.DataFrame]]:
    """tiny_flux and tiny_sd1 rendered with run.weights=fp8 (a LoRA, and grain at a weight fp8 could not hold), and
    tiny_flux in plain bf16 for comparison."""
    import os

    from batchgen.cli import main

    folder = tmp_path_factory.mktemp("fp8")
    runs = {}
    before = os.getcwd()
    os.chdir(folder)
    try:
        for model, (lora, _) in LORAS.items():
            body = BODY.replace("__LORA__", lora).replace("__WEAK__", str(WEAK))
            if model != "tiny_flux":
                body = body.replace(", weak: {grain: {unet: 0.01, text_encoder: 0}}", "")
            conf = write_conf(folder / f"conf-{model}", "fp8", body, {model: None})
            for weights, dtype in (("fp8", "auto"), ("auto", "bf16")):
                if model != "tiny_flux" and weights == "auto":
                    continue
                out = folder / "runs" / f"{model}-{weights}"
                args = ["--config-dir", str(conf), "+sweep=fp8", f"run.weights={weights}", f"run.dtype={dtype}"]
                assert main([*args, f"run.out_dir={out}"]) == 0
                runs[f"{model}-{weights}"] = out, pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    finally:
        os.chdir(before)
    return runs


def _image(run: Path, row: pd.Series) -> np.ndarray:
    return np.asarray(Image.open(run / row["image"]).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(LORAS))
def test_renders_equal_diffusers_with_fp8_rounded_weights_and_a_fused_lora(rendered, tiny_cache, model) -> None:
    run, table = rendered[f"{model}-fp8"]
    assert set(table["status"]) == {"ok"} and set(table["dtype"]) == {"fp8"}
    lora, denoiser = LORAS[model]
    root = tiny_root(model, tiny_cache)
    diffs = {}
    for _, row in table.iterrows():
        name, _, weight = row["loras"].partition(":")
        unet, _, text = weight.partition("/")  # batchgen writes a split weight unet/text_encoder
        file = root / "lora" / f"{name}.safetensors" if name else None
        weights = (float(unet or 0), float(text or unet or 0))
        expected = _oracle(root / "main" / model, file, weights, row, denoiser)
        diffs[row["stack"]] = int(np.abs(_image(run, row) - expected).max())
    print(model, "max pixel difference per stack:", diffs)
    assert diffs["none"] == 0  # no LoRA: the very same computation
    assert max(diffs.values()) <= MAX_PIXEL_DIFF
    if model == "tiny_flux":
        bf16_run, bf16_table = rendered["tiny_flux-auto"]
        bf16 = {r["stack"]: _image(bf16_run, r) for _, r in bf16_table.iterrows()}
        assert all(np.abs(_image(run, r) - bf16[r["stack"]]).max() > 8 * MAX_PIXEL_DIFF for _, r in table.iterrows())


@pytest.mark.slow
def test_a_weak_lora_moves_pixels_under_fp8_and_stays_near_bf16(rendered, flux) -> None:
    spec, pipe = flux
    stacks = LoraStacks(pipe, spec)
    stacks.use(lora_state((LoraWeight("grain", WEAK, 0.0),), spec))
    patched = [m for m in pipe.transformer.modules() if "lora_up" in vars(m)]
    for module in patched:  # rounded into fp8 storage, this stack would leave every weight as it was
        w8 = module.weight.float()
        assert torch.equal(torch.addmm(w8, module.lora_up, module.lora_down).to(STORAGE).float(), w8)
    stacks.use(lora_state((), spec))
    run, table = rendered["tiny_flux-fp8"]
    bf16_run, bf16_table = rendered["tiny_flux-auto"]
    fp8 = {row["stack"]: _image(run, row) for _, row in table.iterrows()}
    bf16 = {row["stack"]: _image(bf16_run, row) for _, row in bf16_table.iterrows()}
    effect, bf16_effect = fp8["weak"] - fp8["none"], bf16["weak"] - bf16["none"]
    # Measured: the effect moves pixels by up to 8/255 (mean 0.59) under fp8 and 7/255 (0.52) in bf16, and the weak
    # job is 29/255 from its bf16 render where the job without it is 32/255 (fp8's rounding of the base weights).
    assert np.abs(effect).max() > 0
    assert 0.5 < np.abs(effect).mean() / np.abs(bf16_effect).mean() < 2
    own_gap = np.abs(fp8["none"] - bf16["none"]).max()
    assert np.abs(fp8["weak"] - bf16["weak"]).max() <= own_gap + MAX_PIXEL_DIFF


def test_an_fp8_single_file_loads_as_its_own_bytes(run_cli, tiny_cache: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from batchgen.assets.flux_checkpoint import convert_flux_checkpoint, transformer_keys
    from tests.test_flux_single_file import _files, bfl_state_dict

    folder = tiny_root("tiny_flux", tiny_cache) / "main" / "tiny_flux"
    _, _, rest = _files(folder, tmp_path)
    ours = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    plain = load_pipeline(prepare(compose_config(["+sweep=next"])).models["tiny_flux"], "cpu", torch.bfloat16)
    linear = {f"{n}.weight" for n in _linears(plain.transformer)}
    # As flux1-dev-fp8 was made from the bf16 release: every Linear weight through bf16 into fp8, the rest bf16.
    rounded = {k: v.to(torch.bfloat16).to(STORAGE if k in linear else torch.bfloat16) for k, v in ours.items()}
    file = tmp_path / "flux1-tiny-fp8.safetensors"
    save_file(bfl_state_dict(rounded, double=1, single=1), str(file))

    # The conversion only renames and cuts views: fp8 stays fp8, and fp8_state hands those tensors on, no copy.
    converted = convert_flux_checkpoint(transformer_keys(load_file(str(file))), {k: v.shape for k, v in ours.items()})
    cast = fp8_state(converted, plain.transformer)
    assert all(cast[k] is converted[k] for k in linear)

    models = {
        "folder": f"base: flux\ncheckpoint: {folder}\n",
        "file": f"base: flux\ncheckpoint: {file}\nconfig: {rest}\n",
    }
    conf = write_conf(tmp_path / "conf", "fp8file", BODY.split("  stacks")[0] + "  stacks: {none: {}}\n", models)
    spec = prepare(compose_config(["+sweep=fp8file"], conf)).models["file"]
    pipe = load_pipeline(spec, "cpu", torch.bfloat16, "fp8")
    loaded = {f"{n}.weight": m.weight for n, m in _linears(pipe.transformer).items()}
    assert loaded.keys() == linear
    assert all(w.dtype == STORAGE and torch.equal(_bytes(w), _bytes(rounded[k])) for k, w in loaded.items())
    # The folder, rounded at load, and its fp8 file render alike.
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=fp8file", "run.weights=fp8")
    assert code == 0, err
    table = pd.read_csv("runs/fp8file/manifest.csv", dtype=str, keep_default_na=False)
    images = {r["model"]: Image.open(Path("runs/fp8file") / r["image"]) for _, r in table.iterrows()}
    assert_same_weights_render_alike(images["file"], images["folder"], "fp8 file against its folder under fp8")


def test_lycoris_layers_under_fp8_equal_the_bf16_patcher_on_fp8_rounded_weights(tiny_cache: Path) -> None:
    """LoHa and LoKr have no low-rank product: their modules hold the patched weight in bf16 (engine/fp8.py). It is
    the very weight the ordinary patcher writes into a bf16 model whose Linear weights were rounded through fp8."""
    spec = prepare(compose_config(["+sweep=styles"]), all_assets=True).models["tiny_sd1"]
    pipe = load_pipeline(spec, "cpu", torch.bfloat16, "fp8")
    reference = load_pipeline(spec, "cpu", torch.bfloat16)
    for module in reference.unet.modules():
        if type(module) is torch.nn.Linear:
            module.weight.data = module.weight.data.to(STORAGE).to(torch.bfloat16)
    before = {n: _bytes(m.weight) for n, m in _linears(pipe.unet).items()}
    state = _state(spec, ("hatch", 0.7), ("kron", 0.5))
    stacks = LoraStacks(pipe, spec)
    stacks.use(state)
    LoraStacks(reference, spec).use(state)
    held = [n for n, m in pipe.unet.named_modules() if "patched_weight" in vars(m)]
    assert held
    for name, module in pipe.unet.named_modules():
        theirs = reference.unet.get_submodule(name)
        if isinstance(module, Fp8Linear):
            assert torch.equal(_bytes(module.compute_weight()), _bytes(theirs.weight)), name
        elif isinstance(module, torch.nn.Conv2d):  # not fp8: patched in place as in any bf16 model
            assert torch.equal(_bytes(module.weight), _bytes(theirs.weight)), name
    stacks.use(_state(spec))
    assert all(torch.equal(_bytes(m.weight), before[n]) and not vars(m).keys() & {"patched_weight"}
               for n, m in _linears(pipe.unet).items())  # fmt: skip


@pytest.mark.slow
def test_every_offload_plan_renders_the_same_under_fp8(tiny_cache: Path) -> None:
    from batchgen.engine.worker import Renderer
    from batchgen.engine_options import EngineOptions

    overrides = ["+sweep=next", "sweep.models=[tiny_flux]", "sweep.prompts=[a fox]", "sweep.seeds=[1]"]
    plan = prepare(compose_config([*overrides, "sweep.steps=2", "~sweep.stacks.ink_grain", "~sweep.stacks.pastel"]))
    images = {}
    for offload in ("none", "encoders", "sequential"):
        renderer = Renderer(plan.models, EngineOptions(batch_size=1, offload=offload, weights="fp8"))
        results = list(renderer.render(plan.jobs))
        assert [r.error for r in results] == [""] * len(plan.jobs) == [""] * 3
        images[offload] = {r.job_id: np.asarray(r.image) for r in results}
    assert images["encoders"].keys() == images["none"].keys()
    for offload in ("encoders", "sequential"):
        assert all(np.array_equal(images[offload][j], images["none"][j]) for j in images["none"]), offload
