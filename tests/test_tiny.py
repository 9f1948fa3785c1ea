"""The embedded tiny models: deterministic, loadable by diffusers, and their TIs and LoRAs visibly change images."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from batchgen import tiny
from batchgen.tiny import TINY_MODELS, TINY_VERSION, build_tiny, cache_root, ensure_tiny, tiny_root

PROMPT = "a portrait of a cat"
# Mean absolute pixel change (0..1 scale) that counts as "visibly different"; measured changes are 0.03-0.1.
VISIBLE = 0.01
EXPECTED_TIS = {
    "tiny_sd1": ("alf.pt", "cartoona.bin", "grainy.safetensors"),
    "tiny_sdxl": ("alf.safetensors", "cartoona.safetensors"),
}
EXPECTED_LORAS = {"ink": (4, 2.0), "grain": (8, 8.0), "pastel": (2, 1.0)}


# --- fixtures and helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on shared CI vCPUs an OpenMP barrier waiting for a
    descheduled sibling made renders 30x slower at times; one thread keeps this module's runtime stable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=TINY_MODELS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def root(name: str, tiny_cache: Path) -> Path:
    """The session's cached build (made by ensure_tiny in conftest)."""
    return tiny_root(name, tiny_cache)


@dataclass(frozen=True)
class Build:
    dest: Path
    seconds: float
    rng_untouched: bool  # the caller's global torch RNG draws the same numbers as without the build


@pytest.fixture(scope="module")
def second_build(name: str, tmp_path_factory: pytest.TempPathFactory) -> Build:
    """An independent build_tiny into a fresh folder, timed."""
    import torch

    dest = tmp_path_factory.mktemp(f"second-{name}")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    start = time.perf_counter()
    build_tiny(name, dest)
    seconds = time.perf_counter() - start
    return Build(dest, seconds, torch.equal(torch.rand(4), expected))


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def load_pipe(root: Path, name: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(root / "main" / name, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str = PROMPT, seed: int = 1) -> np.ndarray:
    """64x64, 4 steps, as float pixels in [0, 1]; "np" output keeps NaNs that PIL conversion would hide."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, num_inference_steps=4, width=64, height=64, generator=generator, output_type="np")
    return out.images[0]


def change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect Python warnings and WARNING+ records of the libraries that report dropped or unexpected keys."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(f"warning: {w.message}" for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def assert_pooled_at_first_eos(pipe, prompt: str) -> None:
    """Pooled text output sits at the end token even when TI tokens have ids above it (the legacy argmax bug)."""
    import torch

    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if hasattr(pipe, "text_encoder_2"):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    for tokenizer, encoder in pairs:
        text = pipe.maybe_convert_prompt(prompt, tokenizer)  # expands multi-vector triggers
        ids = tokenizer(text, padding="max_length", return_tensors="pt").input_ids
        assert ids.max() > tokenizer.eos_token_id  # the TI token
        eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        with torch.no_grad():
            out = encoder(ids)
        hidden = out.last_hidden_state[0, eos]
        pooled = out.text_embeds[0] if hasattr(out, "text_embeds") else out.pooler_output[0]
        expected = encoder.text_projection(hidden) if hasattr(out, "text_embeds") else hidden
        torch.testing.assert_close(pooled, expected)


def lora_layer_count(pipe, adapter: str) -> int:
    """How many modules peft patched with ``adapter``."""
    modules = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return sum(
        1
        for model in modules
        if model is not None
        for module in model.modules()
        if adapter in getattr(module, "lora_A", {})
    )


def attention_projection_count(pipe) -> int:
    """UNet attention projections plus text encoder attention and MLP linears: what the tiny LoRAs target."""
    unet = [
        p for p, _ in pipe.unet.named_modules() if ".attn" in p and p.endswith(("to_q", "to_k", "to_v", "to_out.0"))
    ]
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    text = [p for e in encoders if e is not None for p, _ in e.named_modules() if p.endswith(targets)]
    return len(unet) + len(text)


# --- paths and names (no torch) ------------------------------------------------------------------------------------


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert tiny_root("tiny_sd1") == tmp_path / "c" / f"tiny-{TINY_VERSION}" / "tiny_sd1"
    assert tiny_root("tiny_sdxl", tmp_path) == tmp_path / "tiny-v1" / "tiny_sdxl"


def test_cache_root_default_is_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATCHGEN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "batchgen"


@pytest.mark.parametrize("call", [tiny_root, ensure_tiny, lambda n: build_tiny(n, Path("unused"))])
def test_unknown_name_lists_valid_names(call) -> None:
    with pytest.raises(ValueError, match="tiny_sd1, tiny_sdxl"):
        call("tiny_sd3")


def test_import_does_not_load_torch() -> None:
    code = "import sys, batchgen.tiny; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- ensure_tiny's build-once, crash and race handling (fake builds) ---------------------------------------------


def fake_build(name: str, dest: Path) -> None:
    (dest / "main" / name).mkdir(parents=True)
    (dest / "marker").write_text("built")


def test_ensure_tiny_builds_into_env_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    root = ensure_tiny("tiny_sd1")
    assert root == tmp_path / "tiny-v1" / "tiny_sd1"
    assert (root / "marker").read_text() == "built"
    assert sorted(p.name for p in root.parent.iterdir()) == ["tiny_sd1"]  # no temp folder left


def test_ensure_tiny_crash_leaves_no_partial_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(name: str, dest: Path) -> None:
        (dest / "half").write_text("written before the crash")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "build_tiny", crash)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_tiny("tiny_sdxl", tmp_path)
    assert list((tmp_path / "tiny-v1").iterdir()) == []
    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    assert (ensure_tiny("tiny_sdxl", tmp_path) / "marker").exists()


def test_ensure_tiny_keeps_a_concurrent_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tiny_root("tiny_sd1", tmp_path)

    def lose_race(name: str, dest: Path) -> None:
        fake_build(name, dest)
        fake_build(name, target)  # another process finishes first
        (target / "marker").write_text("winner")

    monkeypatch.setattr(tiny, "build_tiny", lose_race)
    assert ensure_tiny("tiny_sd1", tmp_path) == target
    assert (target / "marker").read_text() == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny_sd1"]


# --- real builds ---------------------------------------------------------------------------------------------------


def test_root_layout(name: str, root: Path) -> None:
    main = root / "main" / name
    expected_main = {"model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"}
    if name == "tiny_sdxl":
        expected_main |= {"text_encoder_2", "tokenizer_2"}
    assert {p.name for p in main.iterdir()} == expected_main
    assert tuple(sorted(p.name for p in (root / "embedding").iterdir())) == EXPECTED_TIS[name]
    assert sorted(p.name for p in (root / "lora").iterdir()) == sorted(f"{s}.safetensors" for s in EXPECTED_LORAS)
    for sub in ("unet", "vae", "text_encoder"):
        assert len(list((main / sub).glob("*.safetensors"))) == 1
    assert not list(main.rglob("*.bin"))  # pipeline weights only as safetensors


def test_two_builds_are_byte_identical(name: str, root: Path, second_build: Build) -> None:
    print(f"build_tiny({name!r}) took {second_build.seconds:.2f}s")  # shown by -rP; no bound: shared CPUs vary 30x
    first, second = file_hashes(root), file_hashes(second_build.dest)
    assert len(first) >= 15
    assert list(first) == list(second)
    assert first == second


def test_build_leaves_the_global_rng_alone(second_build: Build) -> None:
    assert second_build.rng_untouched


def test_ensure_tiny_second_call_does_not_rebuild(
    name: str, root: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tiny_cache))
    before = {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}
    start = time.perf_counter()
    assert ensure_tiny(name) == ensure_tiny(name, tiny_cache) == root
    assert time.perf_counter() - start < 0.5
    assert {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]} == before
    assert sorted(p.name for p in root.parent.iterdir()) == sorted(TINY_MODELS)


def test_tokenizer_files_load_alone(name: str, root: Path, tmp_path: Path) -> None:
    """vocab.json + merges.txt alone make a working CLIP tokenizer whose ids agree with the text encoders."""
    import json

    from transformers import CLIPTokenizer

    main = root / "main" / name
    for sub in ("tokenizer", "tokenizer_2") if name == "tiny_sdxl" else ("tokenizer",):
        for file in ("vocab.json", "merges.txt"):
            shutil.copy(main / sub / file, tmp_path / file)
        plain = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
        saved = CLIPTokenizer.from_pretrained(main / sub, local_files_only=True)
        vocab = json.loads((main / sub / "vocab.json").read_text())
        assert vocab["*</w>"] == 265  # CLIP's id, which A1111 files record
        assert vocab["<|endoftext|>"] == len(vocab) - 1 == saved.eos_token_id == plain.eos_token_id
        for word in ("portrait", "watercolor", "castle", "robot", "night", "of", "a"):
            assert plain.tokenize(word) == saved.tokenize(word) == [f"{word}</w>"]
        prompt = "a watercolor painting of a robot in the city at night"
        assert plain(prompt).input_ids == saved(prompt).input_ids
        assert saved(prompt).input_ids[0] == saved.bos_token_id
        assert saved.model_max_length == 77
    pad = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    for sub, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if (main / encoder).exists():
            config = json.loads((main / encoder / "config.json").read_text())
            assert config["vocab_size"] == len(vocab)
            assert config["eos_token_id"] == len(vocab) - 1
            assert config["bos_token_id"] == len(vocab) - 2
            assert config["pad_token_id"] == vocab[pad[sub]]
            assert config["hidden_size"] == (1280 if encoder == "text_encoder_2" else 768)


def test_pipeline_loads_and_renders(name: str, root: Path) -> None:
    import torch

    pipe = load_pipe(root, name)
    expected = "StableDiffusionXLPipeline" if name == "tiny_sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected
    assert pipe.unet.config.cross_attention_dim == (2048 if name == "tiny_sdxl" else 768)
    assert pipe.vae_scale_factor == 8
    generator = torch.Generator("cpu").manual_seed(1)
    image = pipe(PROMPT, num_inference_steps=4, width=64, height=64, generator=generator, output_type="pil").images[0]
    assert image.size == (64, 64)
    first, again, other_seed = render(pipe), render(pipe), render(pipe, seed=2)
    assert np.isfinite(first).all()
    assert first.std() > 0.1  # not a flat image
    assert np.array_equal(first, again)
    assert change(first, other_seed) > 5 * VISIBLE
    assert change(first, render(pipe, "a drawing of a dog")) > VISIBLE


def test_textual_inversion_files(name: str, root: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = root / "embedding"
    if name == "tiny_sd1":
        a1111 = torch.load(folder / "alf.pt", weights_only=True)
        assert a1111["string_to_token"] == {"*": 265}
        assert a1111["string_to_param"]["*"].shape == (1, 768)
        assert (a1111["name"], a1111["step"], a1111["sd_checkpoint"]) == ("alf", 100, None)
        assert torch.load(folder / "cartoona.bin", weights_only=True)["<cartoona>"].shape == (768,)
        assert load_file(folder / "grainy.safetensors")["emb_params"].shape == (2, 768)
    else:
        for stem, count in (("alf", 1), ("cartoona", 2)):
            tensors = load_file(folder / f"{stem}.safetensors")
            assert {k: tuple(v.shape) for k, v in tensors.items()} == {"clip_l": (count, 768), "clip_g": (count, 1280)}


def test_textual_inversion_norms_match_token_embeddings(name: str, root: Path) -> None:
    """TI vectors look like real tokens to the text encoder: about the same length as its embedding rows."""
    from safetensors.torch import load_file

    main = root / "main" / name
    tables = {}
    for encoder in ("text_encoder", "text_encoder_2") if name == "tiny_sdxl" else ("text_encoder",):
        weights = load_file(main / encoder / "model.safetensors")
        table = next(v for k, v in weights.items() if k.endswith("token_embedding.weight"))
        tables[table.shape[1]] = float(table.norm(dim=1).mean())
    vectors = []
    for path in sorted((root / "embedding").glob("*.safetensors")):
        vectors.extend(load_file(path).values())
    assert vectors
    for tensor in vectors:
        ratio = tensor.norm(dim=-1) / tables[tensor.shape[-1]]
        assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_textual_inversions_load_and_change_the_image(name: str, root: Path) -> None:
    from safetensors.torch import load_file

    for file in EXPECTED_TIS[name]:
        trigger = f"<{Path(file).stem}>"
        prompt = f"a portrait of {trigger} cat"
        pipe = load_pipe(root, name)
        before = render(pipe, prompt)
        path = root / "embedding" / file
        if name == "tiny_sdxl":
            tensors = load_file(path)
            pipe.load_textual_inversion(
                tensors["clip_l"], token=trigger, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                tensors["clip_g"], token=trigger, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        else:
            pipe.load_textual_inversion(str(path), token=trigger)
        assert trigger in pipe.tokenizer.get_vocab()
        assert_pooled_at_first_eos(pipe, prompt)
        after = render(pipe, prompt)
        assert np.isfinite(after).all()
        assert change(before, after) > VISIBLE, file


def test_lora_files_are_kohya(name: str, root: Path) -> None:
    from safetensors import safe_open

    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_") if name == "tiny_sdxl" else ("lora_unet_", "lora_te_")
    for stem, (rank, alpha) in EXPECTED_LORAS.items():
        with safe_open(root / "lora" / f"{stem}.safetensors", "pt") as f:
            assert f.metadata() == {
                "ss_network_module": "networks.lora",
                "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha),
                "ss_base_model_version": "sdxl_base_v1-0" if name == "tiny_sdxl" else "sd_v1",
            }
            keys = set(f.keys())
            layers = {k.split(".")[0] for k in keys}
            assert keys == {
                f"{layer}.{part}" for layer in layers for part in ("lora_down.weight", "lora_up.weight", "alpha")
            }
            assert all(layer.startswith(prefixes) for layer in layers)
            assert all(any(layer.startswith(prefix) for layer in layers) for prefix in prefixes)
            q = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
            te = prefixes[1] + "text_model_encoder_layers_1_mlp_fc2"
            assert f.get_tensor(f"lora_unet_{q}.lora_down.weight").shape == (rank, 64)
            assert f.get_tensor(f"lora_unet_{q}.lora_up.weight").shape == (64, rank)
            assert f.get_tensor(f"{te}.lora_down.weight").shape == (rank, 256)
            assert f.get_tensor(f"{te}.alpha").item() == alpha
            assert f.get_tensor(f"{te}.lora_up.weight").abs().max() > 0


def test_loras_load_without_dropped_keys_and_change_the_image(name: str, root: Path) -> None:
    from safetensors import safe_open

    for stem in EXPECTED_LORAS:
        path = root / "lora" / f"{stem}.safetensors"
        pipe = load_pipe(root, name)
        targets = attention_projection_count(pipe)
        before = render(pipe)
        with captured_warnings() as messages:
            pipe.load_lora_weights(path, adapter_name=stem)
        assert messages == []
        with safe_open(path, "pt") as f:
            layers = sum(1 for k in f.keys() if k.endswith(".lora_down.weight"))
        assert lora_layer_count(pipe, stem) == layers == targets
        pipe.set_adapters([stem], adapter_weights=[1.0])
        full = render(pipe)
        pipe.set_adapters([stem], adapter_weights=[0.0])
        off = render(pipe)
        assert np.isfinite(full).all() and full.std() > 0.1
        assert change(before, full) > 2 * VISIBLE, stem
        assert change(before, off) < 1e-3, stem
