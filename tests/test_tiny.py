"""The embedded tiny models: deterministic, loadable by diffusers, and their TIs and LoRAs visibly change images;
write_lycoris writes every LyCORIS layer type with LyCORIS's key names and shapes."""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from batchgen.tiny import (
    LYCORIS_KINDS,
    TINY_MODELS,
    TINY_VERSION,
    UNET_TINY,
    build_tiny,
    cache_root,
    ensure_tiny,
    tiny_root,
    write_lycoris,
)
from batchgen.tiny.build import RECORDED_VERSIONS, pin_library_versions
from tests.reference import load_embedding

PROMPT = "a portrait of a cat"
# Mean absolute pixel change (0..1 scale) that counts as "visibly different"; measured changes are 0.03-0.1.
VISIBLE = 0.01
EXPECTED_TIS = {
    "tiny_sd1": ("alf.pt", "cartoona.bin", "grainy.safetensors"),
    "tiny_sdxl": ("alf.safetensors", "cartoona.safetensors"),
}
EXPECTED_LORAS = {"ink": (4, 2.0), "grain": (8, 8.0), "pastel": (2, 1.0)}  # kohya: (rank, alpha)
LYCORIS_LORAS = {"hatch": "loha", "kron": "lokr"}  # rank 4, alpha 2
PEFT_LORA = "peft_sketch"  # rank 4, lora_alpha 8
HATCH_CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
UNET_TARGETS = ("to_k", "to_out.0", "to_q", "to_v")
TEXT_TARGETS = ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")


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


@pytest.fixture(scope="module", params=UNET_TINY)
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


def kohya_modules(pipe) -> dict:
    """Every module of the pipeline by kohya layer name, text encoders in the text_model_ spelling."""
    if hasattr(pipe, "text_encoder_2"):
        models = {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    else:
        models = {"lora_te": pipe.text_encoder}
    names = {}
    for prefix, model in {**models, "lora_unet": pipe.unet}.items():
        for path, module in model.named_modules():
            if prefix != "lora_unet":
                path = "text_model." + path.removeprefix("text_model.")
            names[f"{prefix}_{path.replace('.', '_')}"] = module
    return names


def lora_target_layers(pipe) -> set[str]:
    """kohya names of the layers every tiny LoRA patches: attention projections and text encoder linears."""
    ends = tuple(f"_{t.replace('.', '_')}" for t in (*UNET_TARGETS, *TEXT_TARGETS))
    return {n for n in kohya_modules(pipe) if n.endswith(ends) and ("_attn" in n or n.startswith("lora_te"))}


def group_layers(tensors: dict) -> dict[str, dict]:
    """{layer: {suffix: tensor}} from a kohya state dict."""
    layers: dict[str, dict] = {}
    for key, tensor in tensors.items():
        layer, suffix = key.split(".", 1)
        layers.setdefault(layer, {})[suffix] = tensor
    return layers


def _loha_half(t: dict, index: int):
    import torch

    if f"hada_t{index}" in t:  # Tucker: core [r, r, kh, kw], w_a [r, out], w_b [r, in]
        return torch.einsum("abhw,ao,bi->oihw", t[f"hada_t{index}"], t[f"hada_w{index}_a"], t[f"hada_w{index}_b"])
    return t[f"hada_w{index}_a"] @ t[f"hada_w{index}_b"]


def delta_weight(layer: dict, shape: tuple[int, ...]):
    """ΔW at weight 1.0 by the published formulas, in float64; dora_scale is left out (it needs the weight).

    LoRA/LoCon: up @ down (Tucker: mid contracted with up and down); LoHa: (w1a @ w1b) * (w2a @ w2b);
    LoKr: kron(w1, w2a @ w2b); each times alpha / r. Full: diff as it is.
    """
    import torch

    t = {suffix: tensor.double() for suffix, tensor in layer.items()}
    if "diff" in t:
        return t["diff"].reshape(shape)
    if "lora_mid.weight" in t:
        up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
        product, rank = torch.einsum("mnhw,om,ni->oihw", t["lora_mid.weight"], up, down), down.shape[0]
    elif "lora_down.weight" in t:
        down = t["lora_down.weight"].flatten(1)
        product, rank = t["lora_up.weight"].flatten(1) @ down, down.shape[0]
    elif "hada_w1_a" in t:
        product, rank = _loha_half(t, 1) * _loha_half(t, 2), t["hada_w1_b"].shape[0]
    else:
        product, rank = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]), t["lokr_w2_a"].shape[1]
    return (product * (t["alpha"] / rank)).reshape(shape)


def patch_with_formulas(pipe, path: Path) -> int:
    """Add every layer's ΔW of a kohya/LyCORIS file to the pipeline's weights; returns the layer count."""
    import torch
    from safetensors.torch import load_file

    modules = kohya_modules(pipe)
    layers = group_layers(load_file(path))
    with torch.no_grad():
        for layer, tensors in layers.items():
            weight = modules[layer].weight
            weight += delta_weight(tensors, tuple(weight.shape)).to(weight.dtype)
    return len(layers)


def file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


# --- paths and names (no torch) ------------------------------------------------------------------------------------


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert tiny_root("tiny_sd1") == tmp_path / "c" / f"tiny-{TINY_VERSION}" / "tiny_sd1"
    assert tiny_root("tiny_sdxl", tmp_path) == tmp_path / "tiny-v3" / "tiny_sdxl"


def test_cache_root_default_is_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATCHGEN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "batchgen"


@pytest.mark.parametrize("call", [tiny_root, ensure_tiny, lambda n: build_tiny(n, Path("unused"))])
def test_unknown_name_lists_valid_names(call) -> None:
    with pytest.raises(ValueError, match="tiny_sd1, tiny_sdxl, tiny_sd3, tiny_flux$"):
        call("tiny_sd4")


def test_import_does_not_load_torch() -> None:
    code = "import sys, batchgen.tiny; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- ensure_tiny's build-once, crash and race handling (fake builds) ---------------------------------------------


def fake_build(name: str, dest: Path) -> None:
    (dest / "main" / name).mkdir(parents=True)
    (dest / "marker").write_text("built")


def test_ensure_tiny_builds_into_env_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny.build, "build_tiny", fake_build)
    root = ensure_tiny("tiny_sd1")
    assert root == tmp_path / f"tiny-{TINY_VERSION}" / "tiny_sd1"
    assert (root / "marker").read_text() == "built"
    assert sorted(p.name for p in root.parent.iterdir()) == ["tiny_sd1"]  # no temp folder left


def test_ensure_tiny_crash_leaves_no_partial_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(name: str, dest: Path) -> None:
        (dest / "half").write_text("written before the crash")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny.build, "build_tiny", crash)
    with pytest.raises(RuntimeError, match="boom"):
        ensure_tiny("tiny_sdxl", tmp_path)
    assert list((tmp_path / f"tiny-{TINY_VERSION}").iterdir()) == []
    monkeypatch.setattr(tiny.build, "build_tiny", fake_build)
    assert (ensure_tiny("tiny_sdxl", tmp_path) / "marker").exists()


def test_ensure_tiny_keeps_a_concurrent_winner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    target = tiny_root("tiny_sd1", tmp_path)

    def lose_race(name: str, dest: Path) -> None:
        fake_build(name, dest)
        fake_build(name, target)  # another process finishes first
        (target / "marker").write_text("winner")

    monkeypatch.setattr(tiny.build, "build_tiny", lose_race)
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
    stems = [*EXPECTED_LORAS, *LYCORIS_LORAS, PEFT_LORA]
    assert sorted(p.name for p in (root / "lora").iterdir()) == sorted(f"{s}.safetensors" for s in stems)
    for sub in ("unet", "vae", "text_encoder"):
        assert len(list((main / sub).glob("*.safetensors"))) == 1
    assert not list(main.rglob("*.bin"))  # pipeline weights only as safetensors


def test_two_builds_are_byte_identical(name: str, root: Path, second_build: Build) -> None:
    print(f"build_tiny({name!r}) took {second_build.seconds:.2f}s")  # shown by -rP; no bound: shared CPUs vary 30x
    first, second = file_hashes(root), file_hashes(second_build.dest)
    assert len(first) >= 15
    assert list(first) == list(second)
    assert first == second


@pytest.mark.parametrize("model", TINY_MODELS)
def test_saved_configs_name_the_recorded_library_releases(model: str, tiny_cache: Path) -> None:
    found = {}
    for file in tiny_root(model, tiny_cache).rglob("*.json"):
        found |= {k: v for k, v in json.loads(file.read_text()).items() if k in RECORDED_VERSIONS}
    assert found == RECORDED_VERSIONS  # whatever transformers/diffusers built them: job_ids hash these bytes


def test_pinning_a_version_keeps_the_other_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    written = '{\n  "_class_name": "X",\n  "_diffusers_version": "9.9.9",\n  "n":  1}\n'
    (tmp_path / "a" / "config.json").write_text(written)
    (tmp_path / "b.txt").write_text('"transformers_version": "9"')
    pin_library_versions(tmp_path)
    assert (tmp_path / "a" / "config.json").read_text() == written.replace("9.9.9", "0.42.1")
    assert (tmp_path / "b.txt").read_text() == '"transformers_version": "9"'


def test_build_leaves_the_global_rng_alone(second_build: Build) -> None:
    assert second_build.rng_untouched


def test_ensure_tiny_second_call_does_not_rebuild(
    name: str, root: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHGEN_CACHE", str(tiny_cache))
    before = {p: p.stat().st_mtime_ns for p in [root, *root.rglob("*")]}
    monkeypatch.setattr(tiny.build, "build_tiny", lambda *_: pytest.fail("built again"))
    assert ensure_tiny(name) == ensure_tiny(name, tiny_cache) == root
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

    for file in EXPECTED_TIS[name]:
        trigger = f"<{Path(file).stem}>"
        prompt = f"a portrait of {trigger} cat"
        pipe = load_pipe(root, name)
        before = render(pipe, prompt)
        load_embedding(pipe, root / "embedding" / file, trigger)
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


def test_lycoris_files_have_kohya_names_and_lycoris_shapes(name: str, root: Path) -> None:
    pipe = load_pipe(root, name)
    modules = kohya_modules(pipe)
    suffixes = {
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
    }
    for stem, kind in LYCORIS_LORAS.items():
        shapes, metadata = file_shapes(root / "lora" / f"{stem}.safetensors")
        args = {"algo": kind, "factor": "4"} if kind == "lokr" else {"algo": kind}
        assert metadata == {
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps(args),
            "ss_network_dim": "4",
            "ss_network_alpha": "2.0",
            "ss_base_model_version": "sdxl_base_v1-0" if name == "tiny_sdxl" else "sd_v1",
        }
        layers = group_layers(shapes)
        expected = lora_target_layers(pipe) | ({HATCH_CONV} if stem == "hatch" else set())
        assert set(layers) == expected
        for layer, parts in layers.items():
            assert set(parts) == suffixes[kind], layer
            assert parts["alpha"] == ()
            out, *rest = modules[layer].weight.shape
            fan_in = math.prod(rest)
            if kind == "loha":
                assert parts["hada_w1_a"] == parts["hada_w2_a"] == (out, 4)
                assert parts["hada_w1_b"] == parts["hada_w2_b"] == (4, fan_in)  # a conv's is flattened
            else:
                (a, c), (b, rank), (rank_b, d) = parts["lokr_w1"], parts["lokr_w2_a"], parts["lokr_w2_b"]
                assert (a * b, c * d, rank, rank_b) == (out, fan_in, 4, 4)
                assert 1 < a <= 4 and 1 < c <= 4
        assert stem != "hatch" or layers[HATCH_CONV]["hada_w1_b"] == (4, 32 * 3 * 3)


@pytest.mark.parametrize("stem", sorted(LYCORIS_LORAS))
def test_lycoris_files_applied_by_the_published_formulas_change_the_image(name: str, root: Path, stem: str) -> None:
    pipe = load_pipe(root, name)
    before = render(pipe)
    patch_with_formulas(pipe, root / "lora" / f"{stem}.safetensors")
    after = render(pipe)
    assert np.isfinite(after).all() and after.std() > 0.1
    assert change(before, after) > 2 * VISIBLE, stem


def test_hatch_conv_alone_changes_the_image(name: str, root: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    conv_only = tmp_path / "conv.safetensors"
    tensors = load_file(root / "lora" / "hatch.safetensors")
    save_file({k: v for k, v in tensors.items() if k.startswith(HATCH_CONV + ".")}, conv_only)
    pipe = load_pipe(root, name)
    before = render(pipe)
    assert patch_with_formulas(pipe, conv_only) == 1
    assert change(before, render(pipe)) > VISIBLE / 2  # measured 0.008 (SDXL) and 0.03 (SD1)


def test_formula_patch_matches_diffusers_on_a_kohya_lora(name: str, root: Path) -> None:
    """The formulas the tests patch LyCORIS files with give diffusers' image for a plain LoRA."""
    path = root / "lora" / "ink.safetensors"
    loaded = load_pipe(root, name)
    loaded.load_lora_weights(path, adapter_name="ink")
    patched = load_pipe(root, name)
    assert patch_with_formulas(patched, path) == attention_projection_count(patched)
    assert change(render(loaded), render(patched)) < 1e-4


def test_peft_lora_is_what_diffusers_writes(name: str, root: Path) -> None:
    """Same keys and shapes as peft's own state dict of the same LoraConfig, metadata as save_lora_weights packs it."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    shapes, metadata = file_shapes(root / "lora" / f"{PEFT_LORA}.safetensors")
    components = ["unet", "text_encoder", *(["text_encoder_2"] if name == "tiny_sdxl" else [])]
    assert metadata.keys() == {"format", LORA_ADAPTER_METADATA_KEY} and metadata["format"] == "pt"
    config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert metadata[LORA_ADAPTER_METADATA_KEY] == json.dumps(config, indent=2, sort_keys=True)
    assert config == {
        f"{component}.{key}": value
        for component in components
        for key, value in {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": list(UNET_TARGETS if component == "unet" else TEXT_TARGETS),
        }.items()
    }
    pipe = load_pipe(root, name)
    expected = {}
    for component in components:
        kwargs = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(f"{component}.")}
        model = inject_adapter_in_model(LoraConfig(**kwargs), getattr(pipe, component))
        state = get_peft_model_state_dict(model)
        expected |= {f"{component}.{key}": tuple(tensor.shape) for key, tensor in state.items()}
    assert shapes == expected
    assert len(shapes) == 2 * attention_projection_count(pipe)


def test_peft_lora_loads_with_its_alpha_and_changes_the_image(name: str, root: Path) -> None:
    pipe = load_pipe(root, name)
    before = render(pipe)
    with captured_warnings() as messages:
        pipe.load_lora_weights(root / "lora" / f"{PEFT_LORA}.safetensors", adapter_name=PEFT_LORA)
    assert messages == []
    assert lora_layer_count(pipe, PEFT_LORA) == attention_projection_count(pipe)
    models = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    scalings = {
        module.scaling[PEFT_LORA]
        for model in models
        if model is not None
        for module in model.modules()
        if PEFT_LORA in getattr(module, "scaling", {})
    }
    assert scalings == {8 / 4}  # lora_alpha / r from the metadata, not the alpha = r default
    pipe.set_adapters([PEFT_LORA], adapter_weights=[1.0])
    full = render(pipe)
    pipe.set_adapters([PEFT_LORA], adapter_weights=[0.0])
    off = render(pipe)
    assert np.isfinite(full).all() and full.std() > 0.1
    assert change(before, full) > 2 * VISIBLE
    assert change(before, off) < 1e-3


# --- write_lycoris (no pipeline) -----------------------------------------------------------------------------------

SMALL_TARGETS = {
    "lora_unet": {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (64, 768),
        "down_blocks.1.resnets.0.conv1": (64, 32, 3, 3),
        "down_blocks.1.resnets.0.conv_shortcut": (64, 32, 1, 1),
    },
    "lora_te1": {"encoder.layers.0.mlp.fc1": (256, 768)},  # transformers 5 path; the key gets text_model_
}
LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
POINTWISE = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
TEXT = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
SMALL_SHAPES = {LINEAR: (64, 768), CONV: (64, 32, 3, 3), POINTWISE: (64, 32, 1, 1), TEXT: (256, 768)}


def _hada(a: tuple[int, ...], b: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": a, "hada_w2_b": b}


def _kron(w1: tuple[int, ...], w2_a: tuple[int, ...], w2_b: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}


_LORA_SHAPES = {
    LINEAR: {"lora_down.weight": (4, 768), "lora_up.weight": (64, 4)},
    CONV: {"lora_down.weight": (4, 32, 3, 3), "lora_up.weight": (64, 4, 1, 1)},
    POINTWISE: {"lora_down.weight": (4, 32, 1, 1), "lora_up.weight": (64, 4, 1, 1)},
    TEXT: {"lora_down.weight": (4, 768), "lora_up.weight": (256, 4)},
}
_LOHA_SHAPES = {
    LINEAR: _hada((64, 4), (4, 768)),
    CONV: _hada((64, 4), (4, 32 * 3 * 3)),
    POINTWISE: _hada((64, 4), (4, 32)),
    TEXT: _hada((256, 4), (4, 768)),
}
# Per kind and layer, {suffix: shape} at rank 4; every kind but full also has a 0-d alpha.
EXPECTED_SHAPES = {
    "lora": _LORA_SHAPES,
    "locon_mid": _LORA_SHAPES
    | {CONV: {"lora_down.weight": (4, 32, 1, 1), "lora_mid.weight": (4, 4, 3, 3), "lora_up.weight": (64, 4, 1, 1)}},
    "loha": _LOHA_SHAPES,
    "loha_tucker": _LOHA_SHAPES | {CONV: _hada((4, 64), (4, 32)) | {"hada_t1": (4, 4, 3, 3), "hada_t2": (4, 4, 3, 3)}},
    "lokr": {  # factor 4: 64 = 4 * 16, 768 = 4 * 192, 256 = 4 * 64, 32 = 4 * 8
        LINEAR: _kron((4, 4), (16, 4), (4, 192)),
        CONV: _kron((4, 4), (16, 4), (4, 8 * 3 * 3)),
        POINTWISE: _kron((4, 4), (16, 4), (4, 8)),
        TEXT: _kron((4, 4), (64, 4), (4, 192)),
    },
    "dora": {
        LINEAR: _LORA_SHAPES[LINEAR] | {"dora_scale": (1, 768)},
        CONV: _LORA_SHAPES[CONV] | {"dora_scale": (1, 32, 1, 1)},
        POINTWISE: _LORA_SHAPES[POINTWISE] | {"dora_scale": (1, 32, 1, 1)},
        TEXT: _LORA_SHAPES[TEXT] | {"dora_scale": (1, 768)},
    },
    "full": {layer: {"diff": shape, "diff_b": shape[:1]} for layer, shape in SMALL_SHAPES.items()},
}
NETWORK_ARGS = {
    "lora": {"algo": "locon"},
    "locon_mid": {"algo": "locon", "use_tucker": "True"},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": "True"},
    "lokr": {"algo": "lokr", "factor": "4"},
    "dora": {"algo": "locon", "dora_wd": "True"},
    "full": {"algo": "full"},
}


def test_expected_shapes_cover_every_kind() -> None:
    assert set(EXPECTED_SHAPES) == set(NETWORK_ARGS) == set(LYCORIS_KINDS)


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_write_lycoris_keys_shapes_and_metadata(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.safetensors"
    write_lycoris(path, SMALL_TARGETS, kind, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    shapes, metadata = file_shapes(path)
    alpha = {} if kind == "full" else {"alpha": ()}
    assert shapes == {
        f"{layer}.{suffix}": shape
        for layer, suffixes in EXPECTED_SHAPES[kind].items()
        for suffix, shape in (suffixes | alpha).items()
    }
    assert metadata == {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_network_args": json.dumps(NETWORK_ARGS[kind]),
        "ss_base_model_version": "sdxl_base_v1-0",
    }


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_write_lycoris_delta_size_follows_scale(kind: str, tmp_path: Path) -> None:
    """The applied ΔW has std scale * the default init std, whatever the layer type, rank and alpha."""
    from safetensors.torch import load_file

    path = tmp_path / "x.safetensors"
    write_lycoris(path, SMALL_TARGETS, kind, rank=4, alpha=1.0, scale=0.2, seed=5)
    for layer, tensors in group_layers(load_file(path)).items():
        shape = SMALL_SHAPES[layer]
        default_std = 1 / math.sqrt(3 * math.prod(shape[1:]))
        ratio = float(delta_weight(tensors, shape).std()) / (0.2 * default_std)
        assert 0.6 < ratio < 1.6, (layer, ratio)
        if kind == "dora":  # about the column norms of a default weight, varied by scale
            norm = math.sqrt(shape[0] * math.prod(shape[2:])) * default_std
            magnitudes = tensors["dora_scale"].double() / norm
            assert 0.9 < float(magnitudes.mean()) < 1.1 and 0.15 < float(magnitudes.std()) < 0.25


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_write_lycoris_is_byte_identical_per_seed(kind: str, tmp_path: Path) -> None:
    first, again, other = (tmp_path / f"{n}.safetensors" for n in ("first", "again", "other"))
    write_lycoris(first, SMALL_TARGETS, kind, seed=3)
    write_lycoris(again, SMALL_TARGETS, kind, seed=3)
    write_lycoris(other, SMALL_TARGETS, kind, seed=4)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()


def test_write_lycoris_layers_do_not_depend_on_other_targets(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    write_lycoris(tmp_path / "all.safetensors", SMALL_TARGETS, "loha", seed=3)
    # With or without text_model. in the path: the same layer.
    text_only = {"lora_te1": {"text_model.encoder.layers.0.mlp.fc1": (256, 768)}}
    write_lycoris(tmp_path / "text.safetensors", text_only, "loha", seed=3)
    every = load_file(tmp_path / "all.safetensors")
    alone = load_file(tmp_path / "text.safetensors")
    assert alone.keys() == {k for k in every if k.startswith(TEXT + ".")}
    assert all(alone[k].equal(every[k]) for k in alone)


def test_write_lycoris_rejects_unknown_kind_and_prefix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora, locon_mid, loha, loha_tucker, lokr, dora, full"):
        write_lycoris(tmp_path / "x.safetensors", SMALL_TARGETS, "oft")
    with pytest.raises(ValueError, match="'lora_vae'.*lora_unet, lora_te, lora_te1, lora_te2"):
        write_lycoris(tmp_path / "x.safetensors", {"lora_vae": {"conv_in": (8, 3, 3, 3)}}, "lora")
    assert not (tmp_path / "x.safetensors").exists()
