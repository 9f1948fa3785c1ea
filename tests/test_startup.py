"""A dry run plans without torch, diffusers or transformers: module tables from config files in plain Python, a
pickle's shapes read once per file version and remembered in the hash cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from batchgen.assets.architecture import model_architecture, module_shapes
from batchgen.assets.hashing import HashCache
from batchgen.assets.loras import lora_shapes
from batchgen.assets.module_table import clip_text_shapes, unet_shapes

CONFIGS = Path(__file__).resolve().parent.parent / "batchgen" / "model_configs"
HEAVY = ("torch", "diffusers", "transformers", "safetensors.torch")


def _checkpoints(tiny_cache: Path) -> list[Path]:
    tiny = sorted(p for p in tiny_cache.glob("tiny-*/*/main/*") if (p / "unet" / "config.json").is_file())
    assert [p.name for p in tiny] == ["tiny_sd1", "tiny_sdxl"]
    return [CONFIGS / "sd-1", CONFIGS / "sd-2", CONFIGS / "sdxl", *tiny]


def _meta_unet(config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return module_shapes(UNet2DConditionModel.from_config(config))


def test_unet_tables_equal_the_meta_build_path_for_path_in_order(tiny_cache: Path) -> None:
    for checkpoint in _checkpoints(tiny_cache):
        config = json.loads((checkpoint / "unet" / "config.json").read_text())
        expected = _meta_unet(config)
        assert list(unet_shapes(config).items()) == list(expected.items()), checkpoint


def test_clip_tables_equal_the_meta_build(tiny_cache: Path) -> None:
    checked = 0
    for checkpoint in _checkpoints(tiny_cache):
        for component in ("text_encoder", "text_encoder_2"):
            path = checkpoint / component / "config.json"
            if not path.is_file():
                continue
            config = json.loads(path.read_text())
            projected = config["architectures"] == ["CLIPTextModelWithProjection"]
            cls = CLIPTextModelWithProjection if projected else CLIPTextModel
            with torch.device("meta"):
                expected = module_shapes(cls(CLIPTextConfig(**config)))
            assert list(clip_text_shapes(config, projected).items()) == list(expected.items()), path
            checked += 1
    assert checked == 7


UNKNOWN = [
    {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
    {"class_embed_type": "timestep"},
    {"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
    {"cross_attention_dim": [32, 32]},
]


def _tiny_sd1_unet(tiny_cache: Path) -> dict:
    source = next(p for p in _checkpoints(tiny_cache) if p.name == "tiny_sd1")
    return json.loads((source / "unet" / "config.json").read_text())


@pytest.mark.parametrize("change", UNKNOWN)
def test_a_layout_the_table_does_not_know_gives_no_table(tiny_cache: Path, change: dict) -> None:
    assert unet_shapes(_tiny_sd1_unet(tiny_cache) | change) is None


@pytest.mark.parametrize("change", UNKNOWN[:2])  # diffusers builds these two with the rest of tiny_sd1's config
def test_a_layout_the_table_does_not_know_falls_back_to_the_meta_build(
    tiny_cache: Path, tmp_path: Path, change: dict
) -> None:
    config = _tiny_sd1_unet(tiny_cache) | change
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "unet").mkdir(parents=True)
    (checkpoint / "unet" / "config.json").write_text(json.dumps(config))
    (checkpoint / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    arch = model_architecture(checkpoint, "sd-1")
    expected = _meta_unet(config)
    assert list(arch.modules["unet"].items()) == list(expected.items())
    assert "class_embedding.linear_1" in expected or "mid_block.attentions.0.add_k_proj" in expected


def test_a_pickles_shapes_are_read_once_per_file_version(tmp_path: Path) -> None:
    path = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.alpha": torch.tensor(4.0)}, path)
    cache = HashCache(tmp_path / "hashes.json")
    first = lora_shapes(path, cache)
    cache.save()
    again = HashCache(tmp_path / "hashes.json")
    assert again.memo(path, "shapes", lambda p: pytest.fail("read again")) == {
        "lora_unet_x.lora_down.weight": [4, 8],
        "lora_unet_x.alpha": [],
    }
    assert lora_shapes(path, again) == first
    assert {k: v.shape for k, v in first[0].items()} == {
        "lora_unet_x.lora_down.weight": (4, 8),
        "lora_unet_x.alpha": (),
    }
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 8)}, path)  # a new version is read anew
    os.utime(path, ns=(1, 1))
    assert lora_shapes(path, again)[0]["lora_unet_x.lora_down.weight"].shape == (2, 8)


def test_a_dry_run_of_the_styles_sweep_imports_no_torch_once_its_pickles_are_known(
    tiny_cache: Path, tmp_path: Path
) -> None:
    code = (
        "import sys; from batchgen.cli import main; code = main(['+sweep=styles', '--dry-run']); "
        f"print('heavy:', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)"
    )
    env = os.environ | {"BATCHGEN_CACHE": str(tiny_cache)}
    for _ in range(2):  # the first run may read the tiny models' .pt embedding with torch
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
    assert "jobs: 72 to render in total, 72 new, 0 already done, 0 skipped" in result.stdout
    assert result.stdout.splitlines()[-1] == "heavy: []"


ONE_IMAGE = ("+sweep=styles", "sweep.models=[tiny_sd1]", "sweep.seeds=[1]", "sweep.steps=1", "sweep.slots={}")
OUR_LINES = ("styles: ", "render: ", "stages: ", "batchgen: warning: ")


@pytest.mark.slow
def test_a_first_run_on_a_fresh_machine_prints_only_batchgens_lines(tmp_path: Path) -> None:
    # A fresh cache: the tiny model is built (libraries write shards with progress bars, transformers notes that
    # torchvision is missing) and rendered; none of that reaches the console unless --verbose.
    args = [*ONE_IMAGE, "sweep.prompts=['a castle']", "~sweep.stacks.lycoris", "~sweep.stacks.peft"]
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_VERBOSITY", "_PROGRESS_BARS"))}
    quiet = subprocess.run(
        [sys.executable, "-m", "batchgen.cli", *args],
        cwd=tmp_path, env=env | {"BATCHGEN_CACHE": str(tmp_path / "quiet")}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    lines = [line for line in (quiet.stdout + quiet.stderr).splitlines() if line]
    assert lines and all(line.startswith(OUR_LINES) for line in lines), lines
    loud = subprocess.run(
        [sys.executable, "-m", "batchgen.cli", *args, "--dry-run", "--verbose"],
        cwd=tmp_path, env=env | {"BATCHGEN_CACHE": str(tmp_path / "loud")}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    assert "Writing model shards" in loud.stderr or "[transformers]" in loud.stderr
