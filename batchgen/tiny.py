"""The embedded default: deterministic tiny random SD1 and SDXL roots, built on first use.

Each root follows InvokeAI's per-base layout (``main/<name>``, ``embedding/``, ``lora/``) and holds a
random-weight diffusers pipeline with real text widths (768, and 768 + 1280 for SDXL) so that base
detection by vector width works, plus textual inversions in each real file format and kohya LoRAs.
Nothing is downloaded; two builds give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline
    from transformers import CLIPTokenizer

TINY_VERSION = "v1"
TINY_MODELS = ("tiny_sd1", "tiny_sdxl")

# A fixed English word list the tokenizer knows as single tokens; anything else falls back to byte pieces.
_WORDS = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "for", "from", "under", "over",
    "portrait", "drawing", "ink", "style", "cartoon", "photo", "painting", "watercolor", "sketch",
    "pencil", "oil", "pastel", "grain", "grainy", "film", "anime", "pixel", "art", "render", "illustration",
    "cat", "dog", "bird", "horse", "fox", "owl", "man", "woman", "girl", "boy", "king", "queen", "knight",
    "robot", "dragon", "castle", "city", "forest", "mountain", "lake", "river", "sea", "beach", "garden",
    "house", "street", "tree", "flower", "sky", "cloud", "moon", "sun", "star", "night", "day", "rain",
    "snow", "winter", "summer", "red", "blue", "green", "yellow", "black", "white", "golden", "dark",
    "bright", "old", "young", "small", "big", "beautiful", "detailed", "highly", "quality", "best",
    "masterpiece", "lowres", "blurry", "ugly", "simple", "background", "light", "soft", "sharp", "closeup",
)  # fmt: skip
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_SDXL_PAD = "!"  # SDXL's second tokenizer pads with "!" rather than the end token

_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_FFN = 256
_MAX_TOKENS = 77
_EMBEDDING_STD = 0.02  # CLIP's token embedding init; TI vectors use it too, so they look like real tokens
_TIME_EMBED_DIM = 8  # SDXL embeds 6 micro-conditioning numbers, each to this width
# Found by rendering: random cross-attention is near uniform over 77 mostly-padding tokens, so the
# prompt barely shows. Powers of two keep the scaled weights bit-exact.
_CROSS_ATTENTION_LOGIT_GAIN = 8.0
_CROSS_ATTENTION_VALUE_GAIN = 4.0

# (stem, rank, alpha): the same three LoRAs exist for both bases.
_LORAS = (("ink", 4, 2.0), ("grain", 8, 8.0), ("pastel", 2, 1.0))
_LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# Std of the applied LoRA delta at weight 1.0, relative to the std of a freshly initialised weight.
# Found by rendering: clearly visible at 1.0, and 0.5 still visibly smaller.
_LORA_STRENGTH = 0.1
_BASE_VERSION = {"tiny_sd1": "sd_v1", "tiny_sdxl": "sdxl_base_v1-0"}


def cache_root() -> Path:
    """Where batchgen caches built assets: ``$BATCHGEN_CACHE`` or ``~/.cache/batchgen``."""
    env = os.environ.get("BATCHGEN_CACHE")
    return Path(env or "~/.cache/batchgen").expanduser()


def tiny_root(name: str, cache: Path | None = None) -> Path:
    """The root folder of tiny model ``name`` inside ``cache`` (default: :func:`cache_root`)."""
    _check_name(name)
    return (cache or cache_root()) / f"tiny-{TINY_VERSION}" / name


def ensure_tiny(name: str, cache: Path | None = None) -> Path:
    """Return the root of tiny model ``name``, building it first if no complete build exists."""
    target = tiny_root(name, cache)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename (atomic): a crash leaves at most a stray temp folder, and of
    # two concurrent builders one wins the rename while the other finds the target and drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished root should read like any cache folder
    try:
        build_tiny(name, tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny(name: str, dest: Path) -> None:
    """Build the pipeline, textual inversions and LoRAs of tiny model ``name`` into folder ``dest``."""
    import torch

    _check_name(name)
    dest = Path(dest)
    sdxl = name == "tiny_sdxl"
    # Library init draws from the global RNG before we overwrite it; fork so the caller's state survives.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        pipe = _build_pipeline(name, dest / "main" / name, sdxl)
        _write_embeddings(dest / "embedding", name)
        _write_loras(pipe, dest / "lora", name)


def _check_name(name: str) -> None:
    if name not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {name!r}; valid names are: {', '.join(TINY_MODELS)}")


# --- random numbers ------------------------------------------------------------------------------------------------


def _generator(*parts: object) -> torch.Generator:
    import torch

    # crc32 rather than hash(): str hashes are salted per process.
    return torch.Generator("cpu").manual_seed(zlib.crc32("/".join(map(str, parts)).encode()))


def _uniform(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise with the given std, with the same bits on any CPU.

    torch's float samplers (normal_, uniform_) are vectorised per CPU capability and may round differently;
    integer draws from the Mersenne twister plus exactly rounded float64 arithmetic do not.
    """
    import torch

    steps = 1 << 24
    ticks = torch.randint(0, steps, shape, generator=generator, dtype=torch.int64).to(torch.float64)
    unit = (ticks + 0.5) * (2.0 / steps) - 1.0  # exact: in (-1, 1)
    return (unit * (std * math.sqrt(3.0))).to(torch.float32)


def _reinit(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every random weight with :func:`_uniform` draws of torch's default Linear/Conv scale."""
    import torch

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.copy_(_uniform(tuple(module.weight.shape), _EMBEDDING_STD, generator))
        elif isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            std = 1.0 / math.sqrt(3.0 * module.weight[0].numel())  # torch's U(+-1/sqrt(fan_in))
            for param in (module.weight, module.bias):
                if param is not None:
                    param.copy_(_uniform(tuple(param.shape), std, generator))
        elif not isinstance(module, norms) and any(True for _ in module.parameters(recurse=False)):
            # A new parameterised layer type would keep platform-dependent library init: refuse.
            raise TypeError(f"_reinit does not know how to initialise {path} ({type(module).__name__})")


# --- tokenizer -----------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level map: printable bytes map to themselves, the rest to code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _word_symbols(word: str) -> list[str]:
    byte_map = _bytes_to_unicode()
    chars = [byte_map[b] for b in word.encode()]
    return [*chars[:-1], chars[-1] + "</w>"]


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest rank."""
    unknown = len(ranks)
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, unknown), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == unknown:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token.

    A new merge ranks after all existing ones, so it never changes how an earlier word splits; each word
    only needs merges that join, left to right, the pieces the current merges leave.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_bpe(_word_symbols(word), ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return sorted(ranks, key=ranks.__getitem__)


def _bpe_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    # CLIP's id order: bytes, bytes + "</w>", merge results, then the two special tokens.
    byte_chars = list(_bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in merges), _BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}


def _write_bpe_files(folder: Path) -> None:
    merges = _bpe_merges(_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.dumps(_bpe_vocab(merges), ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _load_tokenizer(folder: Path, pad: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    _write_bpe_files(folder)
    # Without model_max_length the tokenizer pads to a huge sentinel and the pipeline fails.
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token=pad, model_max_length=_MAX_TOKENS)


# --- models --------------------------------------------------------------------------------------------------------


def _text_encoder(tokenizer: CLIPTokenizer, width: int, with_projection: bool, seed: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=_TEXT_FFN,
        projection_dim=width,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act="gelu" if with_projection else "quick_gelu",
        # The pooled output is taken at the first eos_token_id, so it must be the real one.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    _reinit(model, _generator(seed))
    return model


def _unet(sdxl: bool, seed: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {"cross_attention_dim": 768}
    if sdxl:
        extra = {
            "cross_attention_dim": 768 + 1280,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 1280 + 6 * _TIME_EMBED_DIM,
            "use_linear_projection": True,
            "transformer_layers_per_block": (1, 2),
        }
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **extra,
    ).eval()
    _reinit(unet, _generator(seed))
    _sharpen_cross_attention(unet)
    return unet


def _sharpen_cross_attention(unet: torch.nn.Module) -> None:
    # Sharper logits let single tokens (and so textual inversions) win; a stronger value path carries them on.
    for path, module in unet.named_modules():
        if path.endswith("attn2"):
            for linear in (module.to_q, module.to_k):
                linear.weight.mul_(_CROSS_ATTENTION_LOGIT_GAIN)
            for linear in (module.to_v, module.to_out[0]):
                linear.weight.mul_(_CROSS_ATTENTION_VALUE_GAIN)


def _vae(sdxl: bool, seed: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks so that latents are 1/8 of the image, as in real SD.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025 if sdxl else 0.18215,
    ).eval()
    _reinit(vae, _generator(seed))
    return vae


def _scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_pipeline(name: str, folder: Path, sdxl: bool) -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizer = _load_tokenizer(folder / "tokenizer", _EOS)
    common = {
        "vae": _vae(sdxl, f"{name}/vae"),
        "text_encoder": _text_encoder(tokenizer, 768, False, f"{name}/text_encoder"),
        "tokenizer": tokenizer,
        "unet": _unet(sdxl, f"{name}/unet"),
        "scheduler": _scheduler(),
    }
    if sdxl:
        tokenizer_2 = _load_tokenizer(folder / "tokenizer_2", _SDXL_PAD)
        text_encoder_2 = _text_encoder(tokenizer_2, 1280, True, f"{name}/text_encoder_2")
        pipe = StableDiffusionXLPipeline(
            **common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep our plain BPE files for tools that read those.
    for sub in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        _write_bpe_files(folder / sub)
    return pipe


# --- textual inversions --------------------------------------------------------------------------------------------


def _vectors(count: int, width: int, *seed: object) -> torch.Tensor:
    return _uniform((count, width), _EMBEDDING_STD, _generator("embedding", *seed))


def _write_embeddings(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "tiny_sdxl":
        _write_sdxl_embeddings(folder, name)
    else:
        _write_sd1_embeddings(folder, name)


def _write_sd1_embeddings(folder: Path, name: str) -> None:
    import torch
    from safetensors.torch import save_file

    a1111 = {
        # 265 is "*</w>" in CLIP's vocabulary, and in ours, which keeps CLIP's byte order.
        "string_to_token": {"*": 265},
        "string_to_param": {"*": _vectors(1, 768, name, "alf")},
        "name": "alf",
        "step": 100,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
    }
    # torch.save is byte-stable: fixed zip timestamps, and its serialization id is a checksum of the
    # records. The archive's inner folder is the file stem, so the name must not change after saving.
    torch.save(a1111, folder / "alf.pt")
    torch.save({"<cartoona>": _vectors(1, 768, name, "cartoona")[0]}, folder / "cartoona.bin")
    save_file({"emb_params": _vectors(2, 768, name, "grainy")}, folder / "grainy.safetensors")


def _write_sdxl_embeddings(folder: Path, name: str) -> None:
    from safetensors.torch import save_file

    for stem, count in (("alf", 1), ("cartoona", 2)):
        tensors = {
            "clip_l": _vectors(count, 768, name, stem, "clip_l"),
            "clip_g": _vectors(count, 1280, name, stem, "clip_g"),
        }
        save_file(tensors, folder / f"{stem}.safetensors")


# --- LoRAs ---------------------------------------------------------------------------------------------------------


def _lora_targets(pipe: DiffusionPipeline) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(kohya layer name, linear module) for every layer the tiny LoRAs patch, in a stable order."""
    encoders = [("lora_te", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)]
    for prefix, encoder in encoders:
        for path, module in encoder.named_modules():
            if path.rsplit(".", 1)[-1] in _LORA_TEXT_TARGETS:
                # transformers 5 dropped the text_model wrapper from CLIPTextModel (not from the projection
                # variant); kohya files always name it, and diffusers maps it either way.
                layer = "text_model." + path.removeprefix("text_model.")
                yield f"{prefix}_{layer.replace('.', '_')}", module
    for path, module in pipe.unet.named_modules():
        in_attention = ".attn1." in path or ".attn2." in path
        if in_attention and any(path.endswith("." + target) for target in _LORA_UNET_TARGETS):
            yield f"lora_unet_{path.replace('.', '_')}", module


def _kohya_lora(pipe: DiffusionPipeline, name: str, stem: str, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    import torch

    generator = _generator("lora", name, stem)
    # Applied delta is (alpha / rank) * up @ down; with down at std 1/sqrt(in), this up std makes the
    # delta's std _LORA_STRENGTH times that of a default-initialised weight, whatever rank and alpha are.
    up_std = _LORA_STRENGTH * math.sqrt(rank) / (alpha * math.sqrt(3.0))
    state: dict[str, torch.Tensor] = {}
    for layer, module in _lora_targets(pipe):
        out_features, in_features = module.weight.shape
        state[f"{layer}.lora_down.weight"] = _uniform((rank, in_features), 1.0 / math.sqrt(in_features), generator)
        state[f"{layer}.lora_up.weight"] = _uniform((out_features, rank), up_std, generator)
        state[f"{layer}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return state


def _write_loras(pipe: DiffusionPipeline, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, rank, alpha in _LORAS:
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_base_model_version": _BASE_VERSION[name],
        }
        _save_safetensors(_kohya_lora(pipe, name, stem, rank, alpha), folder / f"{stem}.safetensors", metadata)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.torch.save_file with a stable header.

    safetensors writes ``__metadata__`` from a Rust HashMap, whose order changes from run to run; re-serialise
    the header with the metadata sorted (same compact JSON and 8-byte padding; offsets are data-relative).
    """
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + size :])
