"""SD3.5 and FLUX.1 against the oracle: every image batchgen renders equals what a plain diffusers pipeline renders
for the same job, LoRAs in every layout included (diffusers' own load_lora_weights reads each), batching never
changes pixels, and the patcher restores every weight bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from batchgen.tiny import tiny_root
from tests.confs import SMALL, write_conf
from tests.reference import render_row, render_with_adapters

NO_LORAS = ("~sweep.stacks.ink", "~sweep.stacks.ink_grain", "~sweep.stacks.pastel", "~sweep.stacks.sketch",
            "~sweep.stacks.split")  # fmt: skip
MAX_PIXEL_DIFF = 2  # out of 255: diffusers' adapters add x @ A @ B where batchgen fuses W + B @ A
SWEEP = (
    "+sweep=next",
    "sweep.prompts=['a portrait of a {animal} in ink style']",
    "sweep.slots.animal=[fox]",
    "~sweep.stacks.ink",
    "+sweep.stacks.ink={ink: 1.0}",
    "+sweep.stacks.sketch={sketch: 0.8}",
    "+sweep.stacks.split={grain: {unet: 1.0, text_encoder: 0.5}}",
    "sweep.seeds=[3]",
)


def _reference(pipe, root: Path, row: pd.Series) -> np.ndarray:
    image = render_with_adapters(
        pipe, row, "transformer", lambda name: _readable(root / "lora" / f"{name}.safetensors", pipe.transformer)
    )
    return np.asarray(image, dtype=np.int16)


def _readable(path: Path, transformer) -> Path | dict[str, torch.Tensor]:
    """What diffusers' FLUX loader can read for a file. It reads BFL/ComfyUI names (diffusion_model.double_blocks...)
    only under fal's base_model.model. root with all 57 full-size blocks, so such a file reaches it renamed to kohya's
    (lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight), the tensors its own. Its kohya converter cuts a single
    block's fused linear1 at FLUX.1's full width (3 x 3072 + 12288), so that one layer is cut here by BFL's published
    rule instead (rows [q; k; v; MLP input], the MLP 4x the width), at the tiny model's width; every other layer goes
    through diffusers' own converter."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import load_file

    state = load_file(str(path))
    if not any(key.startswith(("diffusion_model.", "lora_unet_")) for key in state):
        return path
    kohya = {}
    for key, tensor in state.items():
        if key.startswith("diffusion_model."):
            module, suffix = key.removeprefix("diffusion_model.").rsplit(".", 1)
            if suffix == "weight":
                module, kind = module.rsplit(".", 1)
                suffix = {"lora_A": "lora_down", "lora_B": "lora_up"}[kind] + ".weight"
            key = "lora_unet_" + module.replace(".", "_") + "." + suffix
        kohya[key] = tensor.clone()
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    parts = (("attn.to_q", inner), ("attn.to_k", inner), ("attn.to_v", inner), ("proj_mlp", 4 * inner))
    converted = {}
    for i in range(transformer.config.num_single_layers):
        name = f"lora_unet_single_blocks_{i}_linear1"
        down, up = kohya.pop(f"{name}.lora_down.weight"), kohya.pop(f"{name}.lora_up.weight")
        scale = float(kohya.pop(f"{name}.alpha", down.shape[0])) / down.shape[0]
        for (target, _), piece in zip(parts, up.split([r for _, r in parts]), strict=True):
            converted[f"transformer.single_transformer_blocks.{i}.{target}.lora_A.weight"] = down * scale
            converted[f"transformer.single_transformer_blocks.{i}.{target}.lora_B.weight"] = piece
    return {**_convert_kohya_flux_lora_to_diffusers(kohya), **converted}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> tuple[Path, pd.DataFrame]:
    from batchgen.cli import main

    folder = tmp_path_factory.mktemp("mmdit")
    import os

    before = os.getcwd()
    os.chdir(folder)
    try:
        assert main(list(SWEEP)) == 0
    finally:
        os.chdir(before)
    run = folder / "runs" / "next"
    return run, pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False)


def test_the_sweep_renders_every_layout_and_skips_what_a_model_lacks(rendered) -> None:
    _, table = rendered
    # 2 models x (none, ink, ink_grain, pastel, sketch, split); sketch is an XLabs FLUX file tiny_sd3 lacks.
    assert len(table) == 12
    assert table.groupby("model")["status"].apply(sorted).to_dict() == {
        "tiny_flux": ["ok"] * 6,
        "tiny_sd3": ["ok"] * 5 + ["skipped"],
    }
    (skipped,) = table.loc[table["status"] == "skipped", "error"]
    assert skipped == "LoRA 'sketch' not found for model tiny_sd3"
    assert set(table["base"]) == {"sd-3", "flux"}


@pytest.mark.slow
def test_images_equal_plain_diffusers(rendered, tiny_cache: Path) -> None:
    from diffusers import DiffusionPipeline

    run, table = rendered
    diffs = {}
    for model, rows in table.loc[table["status"] == "ok"].groupby("model"):
        root = tiny_root(model, tiny_cache)
        pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for _, row in rows.iterrows():
            ours = np.asarray(Image.open(run / row["image"]).convert("RGB"), dtype=np.int16)
            diffs[(model, row["loras"])] = int(np.abs(ours - _reference(pipe, root, row)).max())
    print("max pixel difference per job:", diffs)
    assert diffs[("tiny_flux", "")] == diffs[("tiny_sd3", "")] == 0  # no LoRA: the very same computation
    assert max(diffs.values()) <= MAX_PIXEL_DIFF, diffs
    # The comparison means something only if every LoRA changes the image.
    images = {(r["model"], r["loras"]): np.asarray(Image.open(run / r["image"]), dtype=np.int16)
              for _, r in table.loc[table["status"] == "ok"].iterrows()}  # fmt: skip
    for (model, loras), image in images.items():
        if loras:
            assert np.abs(image - images[(model, "")]).max() > 8 * MAX_PIXEL_DIFF, (model, loras)


def test_batching_never_changes_pixels(run_cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen.engine.worker import Renderer

    # 4 seeds of one stack share a batch key: batched they render in one pipeline call per model
    calls: list[int] = []
    real_call = Renderer._call

    def counted(pipe, job, generators, embeds):
        calls.append(len(generators))
        return real_call(pipe, job, generators, embeds)

    monkeypatch.setattr(Renderer, "_call", staticmethod(counted))
    seeds = ("sweep.seeds=[3,4,5,6]", "~sweep.stacks.ink_grain", "~sweep.stacks.pastel", "~sweep.stacks.ink")
    tables, sizes = {}, {}
    for size in (4, 1):
        calls.clear()
        code, _, err = run_cli("+sweep=next", *seeds, "sweep.slots.animal=[fox]", "sweep.prompts=[a fox]",
                               f"sweep.batch_size={size}", f"run.out_dir=runs/b{size}")  # fmt: skip
        assert code == 0, err
        tables[size] = pd.read_csv(f"runs/b{size}/manifest.csv", dtype=str, keep_default_na=False)
        sizes[size] = list(calls)
    batched, single = tables[4], tables[1]
    assert len(batched) == 8 and set(batched["status"]) == {"ok"}
    assert sizes == {4: [4, 4], 1: [1] * 8}  # one call of 4 per model, then eight calls of one
    assert dict(zip(single["job_id"], single["image_sha256"], strict=True)) == dict(
        zip(batched["job_id"], batched["image_sha256"], strict=True)
    )


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd3"])
def test_a_stack_sequence_restores_every_weight_bit_for_bit(model: str, tiny_cache: Path) -> None:
    from diffusers import DiffusionPipeline

    from batchgen.assets.architecture import COMPONENTS
    from batchgen.engine.patcher import WeightPatcher, load_lora_layers
    from batchgen.spec import Contribution, LoraState

    root = tiny_root(model, tiny_cache)
    pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
    components = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    before = {(c, k): v.clone() for c, m in components.items() for k, v in m.state_dict().items()}
    patcher = WeightPatcher(components, root / "main" / model, "flux" if model == "tiny_flux" else "sd-3")
    names = sorted(p.stem for p in (root / "lora").glob("*.safetensors"))
    for name in names:
        patcher.add(name, load_lora_layers(root / "lora" / f"{name}.safetensors", components, {}, "cpu"))

    def state(*weights: tuple[str, float, float]) -> LoraState:  # (name, transformer weight, text-encoder weight)
        return LoraState(
            tuple(
                (c, tuple(Contribution(n, w if c == "transformer" else te) for n, w, te in weights))
                for c in sorted(components)
            )
            if weights
            else ()
        )

    stacks = [state((names[0], 1.0, 1.0)), state(*((n, 0.7, 0.3) for n in names)), state()]
    touched = []
    for stack in (*stacks, stacks[1], stacks[0], state()):
        patcher.apply(stack)
        touched.append(patcher.touched_last)
        if stack.components:
            changed = [key for key, v in before.items() if not torch.equal(v, components[key[0]].state_dict()[key[1]])]
            assert changed  # a stack changes weights
    assert min(touched[:2]) > 0
    after = {(c, k): v for c, m in components.items() for k, v in m.state_dict().items()}
    assert all(torch.equal(before[key].view(torch.uint8), after[key].view(torch.uint8)) for key in before)


def test_max_sequence_length_reaches_t5_as_diffusers_reads_it(run_cli, tiny_cache: Path) -> None:
    from diffusers import DiffusionPipeline

    code, _, err = run_cli(*SWEEP, *NO_LORAS, "sweep.max_sequence_length=[0,77]")
    assert code == 0, err
    table = pd.read_csv("runs/next/manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(table["max_sequence_length"]) == ["0", "0", "77", "77"]
    for model, rows in table.groupby("model"):
        root = tiny_root(model, tiny_cache)
        pipe = DiffusionPipeline.from_pretrained(str(root / "main" / model), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        images = {}
        for _, row in rows.iterrows():
            length = int(row["max_sequence_length"])
            theirs = pipe(
                prompt=row["prompt"],
                negative_prompt=row["negative_prompt"],
                num_inference_steps=int(row["steps"]),
                guidance_scale=float(row["guidance_scale"]),
                width=64,
                height=64,
                generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
                **({"max_sequence_length": length} if length else {}),
            ).images[0]
            images[length] = np.asarray(Image.open(Path("runs/next") / row["image"]).convert("RGB"))
            assert np.array_equal(images[length], np.asarray(theirs)), (model, length)
        assert not np.array_equal(images[0], images[77])  # the transformer attends to T5's padding too


def test_png_parameters_say_what_forge_says_for_flux(rendered) -> None:
    run, table = rendered
    params = {}
    for _, row in table.loc[(table["status"] == "ok") & (table["loras"] == "ink:1")].iterrows():
        params[row["model"]] = Image.open(run / row["image"]).text["parameters"].splitlines()[-1]
    assert params["tiny_flux"].startswith(
        "Steps: 4, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 3, Size: 64x64, Model hash: "
    )
    assert params["tiny_sd3"].startswith(
        "Steps: 4, Sampler: Euler, CFG scale: 3.5, Seed: 3, Size: 64x64, Model hash: "
    )


def test_an_sd3_folder_without_t5_renders_as_diffusers_does(run_cli, tmp_path: Path, tiny_cache: Path) -> None:
    from diffusers import DiffusionPipeline

    source = tiny_root("tiny_sd3", tiny_cache) / "main" / "tiny_sd3"
    folder = tmp_path / "sd35-no-t5"
    folder.mkdir()
    for entry in source.iterdir():
        if entry.name not in ("text_encoder_3", "tokenizer_3"):
            (folder / entry.name).symlink_to(entry)
    conf = write_conf(tmp_path / "conf", "not5", SMALL, {"not5": f"base: sd-3\ncheckpoint: {folder}\n"})
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=not5", "sweep.prompts=[a fox]", "sweep.guidance_scale=4")
    assert code == 0, err
    (row,) = pd.read_csv("runs/not5/manifest.csv", dtype=str, keep_default_na=False).to_dict("records")
    pipe = DiffusionPipeline.from_pretrained(str(source), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ours = np.asarray(Image.open(Path("runs/not5") / row["image"]).convert("RGB"))
    assert np.array_equal(ours, np.asarray(render_row(pipe, row)))
    with_t5 = DiffusionPipeline.from_pretrained(str(source), local_files_only=True)
    with_t5.set_progress_bar_config(disable=True)
    assert not np.array_equal(ours, np.asarray(render_row(with_t5, row)))
