"""A diffusers folder's weight variant (`variant: fp16`): loaded as diffusers loads it, its own job ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.confs import SMALL, write_conf
from tests.reference import render_row


@pytest.fixture(scope="module")
def variant_folder(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 pipeline saved twice into one folder: fp32 files, and fp16 files whose UNet output is negated
    (so the two sets give clearly different images and a test can tell which one was loaded)."""
    from diffusers import DiffusionPipeline

    source = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    folder = tmp_path_factory.mktemp("variant") / "sd1"
    pipe = DiffusionPipeline.from_pretrained(str(source), local_files_only=True)
    pipe.save_pretrained(folder)
    with torch.no_grad():
        pipe.unet.conv_out.weight.neg_()
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder


def _sweep(conf: Path, folder: Path, variant: str | None) -> None:
    line = f"variant: {variant}\n" if variant else ""
    write_conf(conf, "v", "  prompts: ['a castle']\n" + SMALL, {"v": f"base: sd-1\ncheckpoint: {folder}\n{line}"})


def test_the_fp16_variant_renders_what_diffusers_loads(run_cli, tmp_path: Path, variant_folder: Path) -> None:
    from diffusers import DiffusionPipeline

    tables, images = {}, {}
    for variant in (None, "fp16"):
        conf = tmp_path / f"conf-{variant}"
        _sweep(conf, variant_folder, variant)
        code, _, err = run_cli("--config-dir", str(conf), "+sweep=v", f"run.out_dir=runs/{variant}")
        assert code == 0, err
        run = tmp_path / "runs" / str(variant)
        tables[variant] = pd.read_csv(run / "manifest.csv", dtype=str, keep_default_na=False).iloc[0]
        images[variant] = np.asarray(Image.open(run / tables[variant]["image"]).convert("RGB"), dtype=np.int16)
    assert tables[None]["job_id"] != tables["fp16"]["job_id"]  # other weights: another job
    reference = DiffusionPipeline.from_pretrained(
        str(variant_folder), variant="fp16", torch_dtype=torch.float32, local_files_only=True
    )
    reference.set_progress_bar_config(disable=True)
    theirs = np.asarray(render_row(reference, tables["fp16"]), dtype=np.int16)
    assert int(np.abs(images["fp16"] - theirs).max()) <= 2
    assert int(np.abs(images[None] - theirs).max()) > 30  # the fp32 files were not the ones loaded


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            "bf16",
            "models.v.variant: {folder} has no 'bf16' weights (no */*.bf16.safetensors); remove variant or "
            "add those files",
        ),
        ("../x", "models.v.variant: '../x' is not a variant name; write one such as fp16"),
    ],
)
def test_a_missing_variant_is_an_error_before_loading(
    cli, tmp_path: Path, variant_folder: Path, variant: str, message: str
) -> None:
    _sweep(tmp_path / "conf", variant_folder, variant)
    code, _, err = cli("--config-dir", str(tmp_path / "conf"), "+sweep=v", "--dry-run")
    assert (code, err.strip()) == (2, "batchgen: error: " + message.format(folder=variant_folder))
