"""The embedded default: deterministic tiny random SD1 and SDXL roots, built on first use.

Each root follows InvokeAI's per-base layout (``main/<name>``, ``embedding/``, ``lora/``) and holds a
random-weight diffusers pipeline with real text widths (768, and 768 + 1280 for SDXL) so that base
detection by vector width works, plus textual inversions in each real file format and LoRAs: kohya LoRAs
(ink, grain, pastel), LyCORIS LoHa (hatch) and LoKr (kron), and a diffusers/PEFT-format LoRA (peft_sketch).
Nothing is downloaded; two builds give byte-identical files. :func:`write_lycoris` writes LoRA files of every
LyCORIS layer type for test corpora.
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

TINY_VERSION = "v2"
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
# LyCORIS layer types in other formats: (stem, kind, extra UNet modules beyond the attention and text linears).
# hatch's 3x3 conv exercises LoHa's flattened conv factors.
_LYCORIS_LORAS = (("hatch", "loha", ("down_blocks.1.resnets.0.conv1",)), ("kron", "lokr", ()))
_LYCORIS_RANK = 4
_LYCORIS_ALPHA = 2.0
_LOKR_FACTOR = 4  # the largest LoKr w1 side; see _kron_split
# (stem, rank, alpha) of the diffusers/PEFT-format LoRA; alpha != rank so that loaders must apply the scaling.
_PEFT_LORA = ("peft_sketch", 4, 8)
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_BASE_VERSION = {"tiny_sd1": "sd_v1", "tiny_sdxl": "sdxl_base_v1-0"}

LYCORIS_KINDS = ("lora", "locon_mid", "loha", "loha_tucker", "lokr", "dora", "full")
KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
# ss_network_args for each kind, as kohya records the --network_args that make LyCORIS train it.
_NETWORK_ARGS = {
    "lora": {"algo": "locon"},
    "locon_mid": {"algo": "locon", "use_tucker": "True"},
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": "True"},
    "lokr": {"algo": "lokr", "factor": str(_LOKR_FACTOR)},
    "dora": {"algo": "locon", "dora_wd": "True"},
    "full": {"algo": "full"},
}


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
            std = _default_std(tuple(module.weight.shape))
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


def write_lycoris(
    path: Path,
    targets: dict[str, dict[str, tuple[int, ...]]],
    kind: str,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    scale: float = _LORA_STRENGTH,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a kohya/LyCORIS LoRA file with layers of type ``kind`` on ``targets``, deterministic from ``seed``.

    ``targets`` maps a kohya prefix (``lora_unet``, ``lora_te``, ``lora_te1``, ``lora_te2``) to {module path:
    weight shape}, shapes being (out, in) for a linear and (out, in, kh, kw) for a conv. Text encoder paths may
    leave out ``text_model.`` as transformers 5 does; keys use kohya's spelling either way:
    ``<prefix>_<path with . as _>.<suffix>``, e.g. ``lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha``.
    Suffixes and shapes per ``kind``, as LyCORIS saves them (r = ``rank``; linears have no kernel dims):

    - ``lora`` (LoCon): ``lora_down.weight`` [r, in, kh, kw], ``lora_up.weight`` [out, r, 1, 1], ``alpha``
    - ``locon_mid``: like ``lora``, but a conv with a kernel over 1x1 gets a Tucker core: ``lora_mid.weight``
      [r, r, kh, kw], ``lora_down.weight`` [r, in, 1, 1], ``lora_up.weight`` [out, r, 1, 1]
    - ``loha``: ``hada_w1_a`` and ``hada_w2_a`` [out, r], ``hada_w1_b`` and ``hada_w2_b`` [r, in*kh*kw], ``alpha``
    - ``loha_tucker``: like ``loha``, but a conv over 1x1 gets ``hada_t1`` and ``hada_t2`` [r, r, kh, kw], with
      ``hada_w*_a`` [r, out] and ``hada_w*_b`` [r, in]
    - ``lokr``: ``lokr_w1`` [a, c], ``lokr_w2_a`` [b, r], ``lokr_w2_b`` [r, d*kh*kw], ``alpha``, where out = a*b,
      in = c*d, and a and c are the largest divisors of out and in that are at most 4 and their square root
      (LyCORIS's ``factor=4`` split)
    - ``dora``: ``lora`` plus ``dora_scale`` [1, in, 1, 1], one magnitude per input channel (LyCORIS's default)
    - ``full``: ``diff`` [the weight's shape] and ``diff_b`` [out]; rank and alpha do not apply

    The applied delta at weight 1.0, alpha/r included, has ``scale`` times the std of a weight initialised like
    torch's Linear and Conv2d (uniform in +-1/sqrt(fan_in)); ``dora_scale`` is the expected column norm of such a
    weight, varied by ``scale``. Each layer draws from its own generator, seeded by ``seed`` and the layer name, so
    adding a target leaves the other layers as they were. The metadata is what kohya's trainer records for
    LyCORIS (``ss_network_module: lycoris.kohya``, dim, alpha, ``ss_network_args``), updated with ``metadata``.
    """
    if kind not in LYCORIS_KINDS:
        raise ValueError(f"Unknown LyCORIS kind {kind!r}; valid kinds are: {', '.join(LYCORIS_KINDS)}")
    unknown = sorted(set(targets) - set(KOHYA_PREFIXES))
    if unknown:
        raise ValueError(f"Unknown kohya prefix {unknown[0]!r}; valid prefixes are: {', '.join(KOHYA_PREFIXES)}")
    header = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps(_NETWORK_ARGS[kind]),
        **(metadata or {}),
    }
    _save_safetensors(_kohya_tensors(targets, kind, rank, alpha, seed, scale), Path(path), header)


def _kohya_tensors(
    targets: dict[str, dict[str, tuple[int, ...]]], kind: str, rank: int, alpha: float, seed: object, scale: float
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, modules in targets.items():
        for path, shape in modules.items():
            layer = f"{prefix}_{_kohya_path(prefix, path).replace('.', '_')}"
            factors = _layer_tensors(kind, tuple(shape), rank, alpha, scale, _generator("lycoris", seed, layer))
            tensors.update({f"{layer}.{suffix}": tensor for suffix, tensor in factors.items()})
    return tensors


def _kohya_path(prefix: str, path: str) -> str:
    # transformers 5 dropped the text_model wrapper from CLIPTextModel (not from the projection variant); kohya
    # files always name it, and diffusers maps it either way.
    return "text_model." + path.removeprefix("text_model.") if prefix.startswith("lora_te") else path


def _layer_tensors(
    kind: str, shape: tuple[int, ...], rank: int, alpha: float, scale: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One layer's tensors by suffix; the delta they apply at weight 1.0 has std ``scale`` * _default_std."""
    import torch

    wanted = scale * _default_std(shape)
    if kind == "full":
        return {"diff": _uniform(shape, wanted, generator), "diff_b": _uniform(shape[:1], wanted, generator)}
    # The factors' product before alpha/r scales it.
    tensors = _FACTORS[kind](shape, rank, wanted * rank / alpha, generator)
    if kind == "dora":
        tensors["dora_scale"] = _dora_scale(shape, scale, generator)
    tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def _default_std(shape: tuple[int, ...]) -> float:
    """The std of torch's default Linear/Conv2d init, U(+-1/sqrt(fan_in)), for a weight of ``shape``."""
    return 1.0 / math.sqrt(3.0 * math.prod(shape[1:]))


def _has_kernel(shape: tuple[int, ...]) -> bool:
    return math.prod(shape[2:]) > 1


# Each factor function draws its tensors so that their product, before alpha/r, has std ``spread``; the
# variance of a sum of r independent products is r times the product of the factors' variances.


def _lora_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    fan_in = math.prod(shape[1:])
    down = _uniform((rank, *shape[1:]), 1.0 / math.sqrt(fan_in), generator)
    up = _uniform((shape[0], rank, *(1,) * (len(shape) - 2)), spread * math.sqrt(fan_in / rank), generator)
    return {"lora_down.weight": down, "lora_up.weight": up}


def _locon_mid_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    if not _has_kernel(shape):
        return _lora_factors(shape, rank, spread, generator)  # LyCORIS uses a Tucker core only for real kernels
    out, inp, *kernel = shape
    ones = (1,) * len(kernel)
    down = _uniform((rank, inp, *ones), 1.0 / math.sqrt(inp), generator)
    mid = _uniform((rank, rank, *kernel), 1.0 / math.sqrt(rank * math.prod(kernel)), generator)
    up = _uniform((out, rank, *ones), spread * math.sqrt(math.prod(shape[1:]) / rank), generator)
    return {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}


def _loha_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    # Each Hadamard half gets std sqrt(spread); a conv is factored flat, [out, in*kh*kw], as LyCORIS does.
    tensors = {}
    for half in ("hada_w1", "hada_w2"):
        tensors[f"{half}_a"] = _uniform((shape[0], rank), math.sqrt(spread), generator)
        tensors[f"{half}_b"] = _uniform((rank, math.prod(shape[1:])), 1.0 / math.sqrt(rank), generator)
    return tensors


def _loha_tucker_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    if not _has_kernel(shape):
        return _loha_factors(shape, rank, spread, generator)
    out, inp, *kernel = shape
    tensors = {}
    for index in ("1", "2"):
        tensors[f"hada_t{index}"] = _uniform((rank, rank, *kernel), 1.0 / math.sqrt(rank), generator)
        tensors[f"hada_w{index}_a"] = _uniform((rank, out), math.sqrt(spread), generator)
        tensors[f"hada_w{index}_b"] = _uniform((rank, inp), 1.0 / math.sqrt(rank), generator)
    return tensors


def _lokr_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    (a, b), (c, d) = _kron_split(shape[0]), _kron_split(shape[1])
    return {
        "lokr_w1": _uniform((a, c), 1.0, generator),
        "lokr_w2_a": _uniform((b, rank), spread, generator),
        "lokr_w2_b": _uniform((rank, d * math.prod(shape[2:])), 1.0 / math.sqrt(rank), generator),
    }


def _kron_split(dim: int) -> tuple[int, int]:
    """(m, dim // m) with m the largest divisor <= _LOKR_FACTOR and <= sqrt(dim): LyCORIS's factorization.

    A small factor keeps w2's sides above twice the rank, the only case in which LyCORIS stores w2 as a low-rank
    pair rather than in full.
    """
    m = max(f for f in range(1, _LOKR_FACTOR + 1) if dim % f == 0 and f * f <= dim)
    return m, dim // m


def _dora_scale(shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    # About the column norm a default-initialised weight has, so the direction keeps its size, varied so that the
    # magnitudes change too.
    norm = math.sqrt(shape[0] * math.prod(shape[2:])) * _default_std(shape)
    return norm + _uniform((1, shape[1], *(1,) * (len(shape) - 2)), scale * norm, generator)


_FACTORS = {
    "lora": _lora_factors,
    "locon_mid": _locon_mid_factors,
    "loha": _loha_factors,
    "loha_tucker": _loha_tucker_factors,
    "lokr": _lokr_factors,
    "dora": _lora_factors,
}


def _lora_modules(pipe: DiffusionPipeline) -> Iterator[tuple[str, str, torch.nn.Module]]:
    """(component, module path, linear) for every layer the tiny LoRAs patch, in a stable order."""
    for component in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        for path, module in encoder.named_modules():
            if path.rsplit(".", 1)[-1] in _LORA_TEXT_TARGETS:
                yield component, path, module
    for path, module in pipe.unet.named_modules():
        in_attention = ".attn1." in path or ".attn2." in path
        if in_attention and any(path.endswith("." + target) for target in _LORA_UNET_TARGETS):
            yield "unet", path, module


def _kohya_targets(pipe: DiffusionPipeline, unet_extra: tuple[str, ...] = ()) -> dict[str, dict[str, tuple]]:
    """:func:`write_lycoris` targets: the tiny LoRAs' linears plus the UNet modules ``unet_extra``."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prefixes = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2", "unet": "lora_unet"}
    targets: dict[str, dict[str, tuple]] = {}
    for component, path, module in _lora_modules(pipe):
        targets.setdefault(prefixes[component], {})[path] = tuple(module.weight.shape)
    for path in unet_extra:
        targets["lora_unet"][path] = tuple(pipe.unet.get_submodule(path).weight.shape)
    return targets


def _write_loras(pipe: DiffusionPipeline, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"ss_base_model_version": _BASE_VERSION[name]}
    targets = _kohya_targets(pipe)
    for stem, rank, alpha in _LORAS:
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
        tensors = _kohya_tensors(targets, "lora", rank, alpha, f"{name}/{stem}", _LORA_STRENGTH)
        _save_safetensors(tensors, folder / f"{stem}.safetensors", metadata | base)
    for stem, kind, unet_extra in _LYCORIS_LORAS:
        write_lycoris(
            folder / f"{stem}.safetensors",
            _kohya_targets(pipe, unet_extra),
            kind,
            rank=_LYCORIS_RANK,
            alpha=_LYCORIS_ALPHA,
            seed=zlib.crc32(f"{name}/{stem}".encode()),
            metadata=base,
        )
    _write_peft_lora(pipe, folder, name)


def _write_peft_lora(pipe: DiffusionPipeline, folder: Path, name: str) -> None:
    """The LoRA as diffusers' ``save_lora_weights`` writes PEFT state dicts: ``<component>.<module path>.lora_A``.

    Module paths are the models' own (transformers 5: ``text_encoder.encoder...`` but
    ``text_encoder_2.text_model.encoder...``), exactly what ``get_peft_model_state_dict`` gives.
    """
    stem, rank, alpha = _PEFT_LORA
    tensors: dict[str, torch.Tensor] = {}
    for component, path, module in _lora_modules(pipe):
        generator = _generator("peft", name, stem, component, path)
        factors = _layer_tensors("lora", tuple(module.weight.shape), rank, alpha, _LORA_STRENGTH, generator)
        tensors[f"{component}.{path}.lora_A.weight"] = factors["lora_down.weight"]
        tensors[f"{component}.{path}.lora_B.weight"] = factors["lora_up.weight"]
    components = sorted({key.split(".", 1)[0] for key in tensors})
    _save_safetensors(tensors, folder / f"{stem}.safetensors", _peft_metadata(components, rank, alpha))


def _peft_metadata(components: list[str], rank: int, alpha: int) -> dict[str, str]:
    """diffusers' LoRA metadata: each component's LoraConfig kwargs under ``<component>.`` keys, as indented,
    key-sorted JSON, beside safetensors' ``format``.

    Only the kwargs that matter here: a full ``LoraConfig.to_dict()`` holds a local path and the peft version, and
    lists target_modules in set order, which changes from run to run.
    """
    config: dict[str, Any] = {}
    for component in components:
        modules = _LORA_UNET_TARGETS if component == "unet" else _LORA_TEXT_TARGETS
        config |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha}
        config[f"{component}.target_modules"] = sorted(modules)
    return {"format": "pt", _PEFT_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


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
