"""The tiny FLUX and SD3 pipelines and the tiny T5: loadable offline by diffusers, deterministic, and the prompt (each
text encoder's share of it too) visibly changes the image."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchgen.tiny.t5 import T5_WIDTH, t5_encoder, write_t5_tokenizer
from batchgen.tiny.transformer_models import build_flux_pipeline, build_sd3_pipeline

PROMPT = "a portrait of a cat"
OTHER = "a watercolor painting of a dragon castle at night"
# Mean absolute pixel change (0..1 scale). Measured: FLUX 0.043 for the whole prompt, 0.033 with only T5's changed
# and 0.038 with only CLIP's; SD3 0.069, 0.058 and 0.046. A new seed changes ~0.15.
VISIBLE = 0.02
PARTLY_VISIBLE = 0.01  # one text encoder's share
MIN_STD = 0.05  # measured pixel std 0.15-0.16; a constant or washed-out image would be far below
BUILDERS: dict[str, Callable[[str, Path], Any]] = {"tiny_flux": build_flux_pipeline, "tiny_sd3": build_sd3_pipeline}
GUIDANCE = {"tiny_flux": 3.5, "tiny_sd3": 4.0}
T5_PROMPT_ARG = {"tiny_flux": "prompt_2", "tiny_sd3": "prompt_3"}  # the prompt the T5 encoder reads


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """As in test_tiny: tiny models gain nothing from a second thread, and shared CPUs make OpenMP barriers slow."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp(name) / name
    BUILDERS[name](name, folder)
    return folder


@pytest.fixture(scope="module")
def pipe(folder: Path):
    return load(folder)


def load(folder: Path, **components: Any):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, name: str, prompt: str = PROMPT, **extra: Any) -> np.ndarray:
    """64x64, 4 steps, as float pixels in [0, 1]; "np" output keeps NaNs that PIL conversion would hide."""
    import torch

    generator = torch.Generator("cpu").manual_seed(1)
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=GUIDANCE[name],
        max_sequence_length=64,
        generator=generator,
        output_type="np",
        **extra,
    )
    return out.images[0]


def change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def safetensors_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*.safetensors"))
    }


# --- the pipelines -------------------------------------------------------------------------------------------------


def test_pipeline_classes_and_layout(name: str, folder: Path, pipe) -> None:
    expected = {"tiny_flux": "FluxPipeline", "tiny_sd3": "StableDiffusion3Pipeline"}[name]
    assert type(pipe).__name__ == expected
    t5 = "text_encoder_2" if name == "tiny_flux" else "text_encoder_3"
    assert type(getattr(pipe, t5)).__name__ == "T5EncoderModel"
    assert getattr(pipe, t5).config.d_model == T5_WIDTH == pipe.transformer.config.joint_attention_dim
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    for sub in ("transformer", "vae"):
        assert (folder / sub / "diffusion_pytorch_model.safetensors").is_file()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    # Measured 42 MB (FLUX) and 113 MB (SD3: tiny_sdxl's two CLIPs, 94 MB, plus T5's 15 MB).
    assert size < 128e6


def test_render_is_finite_and_structured(name: str, pipe) -> None:
    image = render(pipe, name)
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > MIN_STD


def test_render_is_reproducible(name: str, pipe) -> None:
    assert np.array_equal(render(pipe, name), render(pipe, name))


def test_prompt_changes_the_image(name: str, pipe) -> None:
    base = render(pipe, name)
    assert change(base, render(pipe, name, OTHER)) > VISIBLE


def test_each_text_encoder_shows(name: str, pipe) -> None:
    base = render(pipe, name)
    t5_arg = T5_PROMPT_ARG[name]
    only_t5 = render(pipe, name, PROMPT, **{t5_arg: OTHER})
    only_clip = render(pipe, name, OTHER, **{t5_arg: PROMPT})  # SD3's CLIP-G prompt_2 defaults to the prompt
    assert change(base, only_t5) > PARTLY_VISIBLE
    assert change(base, only_clip) > PARTLY_VISIBLE


@pytest.mark.parametrize("name", ["tiny_sd3"], indirect=True)  # only SD3's pipeline may drop its T5
def test_sd3_renders_without_t5(folder: Path, name: str, pipe) -> None:
    no_t5 = load(folder, text_encoder_3=None, tokenizer_3=None)
    assert no_t5.text_encoder_3 is None
    image = render(no_t5, name)
    assert np.isfinite(image).all()
    assert image.std() > MIN_STD
    assert change(image, render(pipe, name)) > PARTLY_VISIBLE  # zeros in place of T5's tokens do show


def test_rebuild_is_byte_identical(name: str, folder: Path, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    BUILDERS[name](name, tmp_path / name)
    assert torch.equal(torch.rand(4), expected), "the build must not advance the caller's RNG"
    hashes = safetensors_hashes(folder)
    assert {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(
        hashes
    )
    assert safetensors_hashes(tmp_path / name) == hashes


# --- the tiny T5 ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("t5") / "tokenizer"
    write_t5_tokenizer(folder)
    return folder


def test_t5_tokenizer_loads_offline_with_t5_ids(t5_folder: Path) -> None:
    from transformers import AutoTokenizer, T5TokenizerFast

    for cls in (T5TokenizerFast, AutoTokenizer):
        tokenizer = cls.from_pretrained(t5_folder, local_files_only=True)
        assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
        assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
        assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 2)
        ids = tokenizer(PROMPT).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁portrait", "▁of", "▁a", "▁cat", "</s>"]
        padded = tokenizer(PROMPT, padding="max_length", max_length=8).input_ids
        assert padded == [*ids, 0, 0]


def test_t5_tokenizer_splits_unknown_words(t5_folder: Path) -> None:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(t5_folder, local_files_only=True)
    pieces = tokenizer.tokenize("catdog zebra")
    assert pieces[:2] == ["▁cat", "dog"]
    assert "".join(pieces[2:]) == "▁zebra"
    assert tokenizer.unk_token_id not in tokenizer("catdog zebra, (Sky:1.2)").input_ids
    assert tokenizer.decode(tokenizer("catdog zebra").input_ids, skip_special_tokens=True) == "catdog zebra"


def test_t5_encodings_tell_prompts_apart(t5_folder: Path) -> None:
    import torch
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(t5_folder, local_files_only=True)
    with torch.no_grad():
        encoder = t5_encoder(tokenizer, "test/t5")
        ids = tokenizer([PROMPT, OTHER], padding="max_length", max_length=64, return_tensors="pt").input_ids
        states = encoder(ids).last_hidden_state
    assert states.shape == (2, 64, T5_WIDTH)
    assert torch.isfinite(states).all()
    # Positions 1-4 hold different words: their encodings must be far apart, not one sequence-wide average.
    cosine = torch.nn.functional.cosine_similarity(states[0, 1:5], states[1, 1:5], dim=-1)
    assert cosine.max() < 0.5, cosine
    assert (states[0] - states[1]).abs().mean() > 0.1 * states.abs().mean()
