"""The block-weight oracle: a LoRA at block vector v renders pixel-equal to a copy of its file whose layers in each
block are scaled by that block's value, rendered without block weights.

The copy's blocks come from the key names by the extension's rule on the original UNet layout (conv_in is IN00,
down_blocks.b's resnet/attention j is IN(1+3b+j), its downsampler IN(3+3b), mid_block M00, up_blocks.b's j is
OUT(3b+j), its upsampler OUT(3b+2), the text encoder's layers BASE), written here from the key text, not through
batchgen's module mapping. Block values are 0, 0.5 and 1: scaling a factor by a power of two is exact, so the two
renders must agree bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from batchgen.assets.block_weights import BLOCK_IDS, parse_blocks
from batchgen.engine.worker import Renderer
from batchgen.engine_options import EngineOptions
from batchgen.plan.lora_state import lora_state
from batchgen.spec import Job, LoraFile, LoraWeight, ModelSpec
from batchgen.tiny.loras import write_lycoris

# The factor of each layer type that scales its delta linearly.
UP = ("lora_up.weight", "lora_B.weight", "hada_w1_a", "lokr_w1")
_UNET = re.compile(r"(down_blocks|up_blocks)[._](\d+)[._](resnets|attentions|downsamplers|upsamplers)[._](\d+)")


def _block(key: str) -> str | None:
    if re.search(r"(lora_te\d?_|text_encoder(_2)?\.)", key):
        return "BASE" if re.search(r"encoder[._]layers", key) else None
    if "mid_block" in key:
        return "M00"
    if re.search(r"conv_in", key):
        return "IN00"
    m = _UNET.search(key)
    if m is None:
        return None
    kind, b, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    if kind == "down_blocks":
        return f"IN{3 + 3 * b:02d}" if part == "downsamplers" else f"IN{1 + 3 * b + j:02d}"
    return f"OUT{3 * b + 2:02d}" if part == "upsamplers" else f"OUT{3 * b + j:02d}"


def _scaled_copy(source: Path, dest: Path, vector: dict[str, float]) -> set[str]:
    with safe_open(source, "pt") as f:
        metadata = f.metadata()  # PEFT files carry their alphas here
    tensors = load_file(source)
    hit = set()
    for key in list(tensors):
        block = _block(key)
        if block is not None and key.endswith(UP):
            tensors[key] = tensors[key] * vector[block]
            hit.add(block)
    save_file(tensors, dest, metadata)
    return hit


def _vector(base: str) -> tuple[float, ...]:
    ids = BLOCK_IDS[base][max(BLOCK_IDS[base])]
    return tuple((1.0, 0.5, 0.0)[i % 3] for i in range(len(ids)))


@pytest.fixture(scope="module", params=["tiny_sd1", "tiny_sdxl"])
def model(request, tiny_cache: Path, tmp_path_factory) -> tuple[str, Path, Path]:
    name = request.param
    folder = next(tiny_cache.glob(f"*/{name}/main/{name}"))
    loras = tmp_path_factory.mktemp(f"{name}-loras")
    for file in next(tiny_cache.glob(f"*/{name}/lora")).glob("*.safetensors"):
        (loras / file.name).write_bytes(file.read_bytes())
    # A LoCon conv layer in a resnet and one in the downsampler's block, beside an attention projection.
    unet = load_file(next(folder.glob("unet/*.safetensors")))
    conv = "down_blocks.0.resnets.0.conv1"
    targets = {conv: tuple(unet[f"{conv}.weight"].shape), "conv_in": tuple(unet["conv_in.weight"].shape)}
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    targets[attn] = tuple(unet[f"{attn}.weight"].shape)
    write_lycoris(loras / "locon.safetensors", {"lora_unet": targets}, "lora", seed=3, scale=4.0)
    return name, folder, loras


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["ink", "peft_sketch", "locon", "hatch", "kron"])
def test_a_block_vector_is_the_file_scaled_block_by_block(model, lora: str) -> None:
    name, folder, loras = model
    base = "sdxl" if "xl" in name else "sd-1"
    vector = _vector(base)
    ids = BLOCK_IDS[base][max(BLOCK_IDS[base])]
    hit = _scaled_copy(
        loras / f"{lora}.safetensors", loras / f"{lora}_scaled.safetensors", dict(zip(ids, vector, strict=True))
    )
    assert {vector[ids.index(b)] for b in hit} - {1.0}, f"{lora}: the vector must change some block it has"
    files = (LoraFile(lora, loras / f"{lora}.safetensors"), LoraFile("scaled", loras / f"{lora}_scaled.safetensors"))
    spec = ModelSpec(name, base, folder, "", loras=files)
    text = ",".join(str(v) for v in vector)

    def job(i: str, lw: LoraWeight) -> Job:
        return Job(
            i * 16,
            name,
            "a castle at night",
            "blurry",
            1,
            3,
            7.5,
            64,
            64,
            loras=(lw,),
            lora_state=lora_state((lw,), spec),
        )

    jobs = [
        job("a", LoraWeight(lora, 1.0, 1.0, text, parse_blocks(text, base, "test"))),
        job("b", LoraWeight("scaled", 1.0, 1.0)),
        job("c", LoraWeight(lora, 1.0, 1.0)),
    ]
    images = {
        r.job_id[0]: np.asarray(r.image) for r in Renderer({name: spec}, EngineOptions(batch_size=1)).render(jobs)
    }
    assert np.array_equal(images["a"], images["b"])
    assert not np.array_equal(images["a"], images["c"])  # the blocks did something


# Text-encoder (BASE) and UNet parts of the vectors rendered in one run, on SD1's 26 blocks; values 0, 0.5 and 1
# scale the copy's factors exactly. P and Q give the UNet blocks different values.
_P = tuple((1.0, 0.5, 0.0)[i % 3] for i in range(25))
_Q = tuple((0.0, 1.0, 0.5)[i % 3] for i in range(25))
ONE_RUN = {"base_half": (0.5, *_P), "base_one": (1.0, *_P), "base_zero": (0.0, *_Q)}
PIXEL_TOLERANCE = 2  # /255: batchgen merges the LoRA into the weights, diffusers adds it beside them


@pytest.mark.slow
def test_vectors_with_different_base_values_in_one_run_each_equal_diffusers_on_a_scaled_copy(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """One Renderer renders ink without block weights (its text-encoder layers at 1), then vectors whose BASE is
    0.5, 1 and 0: each image must equal plain diffusers rendering a copy of the file scaled by that vector.
    A vector's BASE reaches only the text encoder, so a prompt encoding kept from an earlier state of the same
    LoRA (BASE 1 before BASE 0.5) shows here and nowhere in a one-vector run."""
    from diffusers import StableDiffusionPipeline

    from batchgen.config import compose_config
    from batchgen.runner import prepare
    from tests.reference import render_with_adapters

    ids = BLOCK_IDS["sd-1"][26]
    vectors = {"ink_alone": None, **ONE_RUN}
    blocks = ", ".join(f"'{','.join(f'{v:g}' for v in vector)}'" for vector in ONE_RUN.values())
    plan = prepare(
        compose_config(
            [
                "+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.seeds=[1]", "sweep.steps=2", "sweep.slots={}",
                "sweep.prompts=['a castle at night']", "sweep.references=false", "~sweep.stacks.none",
                "~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.lycoris", "~sweep.stacks.peft",
                "+sweep.stacks.alone={ink: 1.0}", f"+sweep.stacks.b={{ink: {{blocks: [{blocks}]}}}}",
            ]
        )
    )  # fmt: skip
    rows = {}
    for row in plan.table.to_dict("records"):
        lbw = row["loras"].partition(":lbw=")[2]
        vector = tuple(float(v) for v in lbw.split(",")) if lbw else None
        rows[next(name for name, v in vectors.items() if v == vector)] = row
    assert sorted(rows) == sorted(vectors) and len(plan.table) == len(vectors), list(plan.table["loras"])
    jobs = {job.job_id: job for job in plan.jobs}
    order = [jobs[rows[name]["job_id"]] for name in vectors]  # ink alone (BASE 1) first, then the vectors in turn
    ours = {name: _pixels(result.image) for name, result in zip(vectors, worker_render(plan, order), strict=True)}

    # The reference: plain diffusers, each vector as a copy of the file, scaled block by block, loaded at 1.
    ink = next(tiny_cache.glob("*/tiny_sd1/lora")) / "ink.safetensors"
    files = {"ink_alone": ink}
    for name, vector in ONE_RUN.items():
        files[name] = tmp_path / f"{name}.safetensors"
        hit = _scaled_copy(ink, files[name], dict(zip(ids, vector, strict=True)))
        assert "BASE" in hit and len(hit) > 3, hit  # the vector reaches the text encoder and several UNet blocks
    pipe = StableDiffusionPipeline.from_pretrained(
        str(next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))), local_files_only=True, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = {
        name: _pixels(render_with_adapters(pipe, rows[name] | {"loras": f"{name}:1"}, "unet", lambda n: str(files[n])))
        for name in vectors
    }
    diffs = {name: int(np.abs(ours[name] - theirs[name]).max()) for name in vectors}
    assert max(diffs.values()) <= PIXEL_TOLERANCE, f"max pixel difference from diffusers per vector: {diffs}"
    # BASE changes the image: the two vectors that differ only there render apart, by more than the tolerance.
    assert np.abs(ours["base_half"] - ours["base_one"]).max() > 4 * PIXEL_TOLERANCE


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def worker_render(plan, jobs: list[Job]) -> list:
    """The jobs rendered in this order by one Renderer, one image per batch, as one worker renders a run."""
    results = list(Renderer(plan.models, EngineOptions(batch_size=1)).render(jobs))
    assert [r.job_id for r in results] == [job.job_id for job in jobs] and all(r.error == "" for r in results)
    return results


# FLUX.1 by the extension's get_flux_blocks on key text: kohya, BFL/ComfyUI, XLabs and diffusers/PEFT names alike.
_FLUX_UP = ("lora_up.weight", "lora_B.weight", ".up.weight")
_FLUX_BLOCK = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks)[._](\d+)[._]")


def _flux_block(key: str) -> str | None:
    if key.startswith(("lora_te1_", "text_encoder.")):
        return "CLIP"
    if key.startswith(("lora_te2_", "lora_te3_", "text_encoder_2.")):
        return "T5"
    if m := _FLUX_BLOCK.search(key):
        return f"{'S' if m.group(1).startswith('single') else 'D'}{int(m.group(2)):02d}"
    return None  # the tiny LoRAs have no embedder or final-layer keys


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["ink", "grain", "pastel", "sketch"])
def test_a_flux_block_vector_is_the_file_scaled_block_by_block(lora: str, tiny_cache: Path, tmp_path: Path) -> None:
    folder = next(tiny_cache.glob("*/tiny_flux/main/tiny_flux"))
    source = next(tiny_cache.glob("*/tiny_flux/lora")) / f"{lora}.safetensors"
    ids = BLOCK_IDS["flux"][61]
    values = dict.fromkeys(ids, 1.0) | {"CLIP": 0.5, "D00": 0.5, "S00": 0.0}
    vector = tuple(values[block] for block in ids)
    tensors = load_file(source)
    with safe_open(source, "pt") as f:
        metadata = f.metadata()
    hit = set()
    for key in tensors:
        block = _flux_block(key)
        if block is not None and key.endswith(_FLUX_UP):
            tensors[key] = tensors[key] * values[block]
            hit.add(block)
    assert "D00" in hit and (lora == "sketch" or "S00" in hit), hit  # XLabs trains double blocks only
    save_file(tensors, tmp_path / "scaled.safetensors", metadata)
    files = (LoraFile(lora, source), LoraFile("scaled", tmp_path / "scaled.safetensors"))
    spec = ModelSpec("tiny_flux", "flux", folder, "", loras=files)
    text = ",".join(str(v) for v in vector)

    def job(i: str, lw: LoraWeight) -> Job:
        return Job(
            i * 16,
            "tiny_flux",
            "a castle at night",
            "",
            1,
            2,
            3.5,
            64,
            64,
            loras=(lw,),
            lora_state=lora_state((lw,), spec),
        )

    jobs = [
        job("a", LoraWeight(lora, 1.0, 1.0, text, parse_blocks(text, "flux", "test"))),
        job("b", LoraWeight("scaled", 1.0, 1.0)),
        job("c", LoraWeight(lora, 1.0, 1.0)),
    ]
    images = {
        r.job_id[0]: np.asarray(r.image)
        for r in Renderer({"tiny_flux": spec}, EngineOptions(batch_size=1)).render(jobs)
    }
    assert np.array_equal(images["a"], images["b"])
    assert not np.array_equal(images["a"], images["c"])  # the blocks did something


def test_meta_sized_rule_agrees_with_the_module_mapping() -> None:
    from batchgen.assets.block_weights import block_of

    cases = {
        "lora_unet_down_blocks_0_attentions_1_proj_in": ("unet", "down_blocks.0.attentions.1.proj_in"),
        "lora_unet_down_blocks_2_downsamplers_0_conv": ("unet", "down_blocks.2.downsamplers.0.conv"),
        "lora_unet_up_blocks_3_attentions_2_proj_out": ("unet", "up_blocks.3.attentions.2.proj_out"),
        "lora_unet_up_blocks_1_upsamplers_0_conv": ("unet", "up_blocks.1.upsamplers.0.conv"),
        "lora_unet_mid_block_resnets_1_conv2": ("unet", "mid_block.resnets.1.conv2"),
        "lora_te_text_model_encoder_layers_3_mlp_fc1": ("text_encoder", "text_model.encoder.layers.3.mlp.fc1"),
    }
    for key, (component, path) in cases.items():
        assert _block(key) == block_of(component, path, "sd-1"), key


@pytest.mark.slow
def test_a_blocks_sweep_from_the_command_line_is_one_grid_per_model(run_cli, tmp_path: Path) -> None:
    import pandas as pd

    code, _, err = run_cli(
        "+sweep=styles", "sweep.seeds=[1,2]", "sweep.prompts=['a castle at night']", "sweep.slots={}",
        "~sweep.stacks.none", "sweep.references=false", "~sweep.stacks.ink", "~sweep.stacks.ink_grain",
        "~sweep.stacks.lycoris",
        "~sweep.stacks.peft", "+sweep.stacks.b={ink: {weight: [0.6, 1.0], blocks: [ALL, OUTD]}}",
        "sweep.grid.x=blocks:ink", "sweep.grid.y=seed", "+sweep.grid.z=weight:ink",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(tmp_path / "runs/styles/manifest.csv", dtype=str, keep_default_na=False)
    assert len(table) == 16 and set(table["status"]) == {"ok"}
    assert sorted(set(table["loras"])) == ["ink:0.6:lbw=ALL", "ink:0.6:lbw=OUTD", "ink:1:lbw=ALL", "ink:1:lbw=OUTD"]
    assert sorted(p.name for p in (tmp_path / "runs/styles/grids").iterdir()) == ["tiny_sd1.png", "tiny_sdxl.png"]
    png = tmp_path / "runs/styles" / table.loc[table["loras"] == "ink:1:lbw=OUTD", "image"].iloc[0]
    from PIL import Image

    assert " <lora:ink:1:lbw=OUTD>" in Image.open(png).text["parameters"].split("\n")[0]
