"""The tiny models' LoRAs (kohya, LyCORIS LoHa/LoKr, diffusers/PEFT) and write_lycoris for test corpora."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.assets.bases import BY_NAME
from batchgen.assets.lora_formats.kohya import ROOTS as KOHYA_ROOTS
from batchgen.assets.text_model import with_level
from batchgen.tiny.noise import default_std, seeded_generator, uniform

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

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
KOHYA_PREFIXES = tuple(root[:-1] for root in KOHYA_ROOTS)  # the UNet bases' (lora_formats/kohya.py)
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
            factors = _layer_tensors(kind, tuple(shape), rank, alpha, scale, seeded_generator("lycoris", seed, layer))
            tensors.update({f"{layer}.{suffix}": tensor for suffix, tensor in factors.items()})
    return tensors


def _kohya_path(prefix: str, path: str) -> str:
    # transformers 5 dropped the text_model wrapper from CLIPTextModel (not from the projection variant); kohya
    # files always name it, and diffusers maps it either way.
    return with_level(path) if prefix.startswith("lora_te") else path


def _layer_tensors(
    kind: str, shape: tuple[int, ...], rank: int, alpha: float, scale: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One layer's tensors by suffix; the delta they apply at weight 1.0 has std ``scale`` * default_std."""
    import torch

    wanted = scale * default_std(shape)
    if kind == "full":
        return {"diff": uniform(shape, wanted, generator), "diff_b": uniform(shape[:1], wanted, generator)}
    # The factors' product before alpha/r scales it.
    tensors = _FACTORS[kind](shape, rank, wanted * rank / alpha, generator)
    if kind == "dora":
        tensors["dora_scale"] = _dora_scale(shape, scale, generator)
    tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def _has_kernel(shape: tuple[int, ...]) -> bool:
    return math.prod(shape[2:]) > 1


# Each factor function draws its tensors so that their product, before alpha/r, has std ``spread``; the
# variance of a sum of r independent products is r times the product of the factors' variances.


def _lora_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    fan_in = math.prod(shape[1:])
    down = uniform((rank, *shape[1:]), 1.0 / math.sqrt(fan_in), generator)
    up = uniform((shape[0], rank, *(1,) * (len(shape) - 2)), spread * math.sqrt(fan_in / rank), generator)
    return {"lora_down.weight": down, "lora_up.weight": up}


def _locon_mid_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    if not _has_kernel(shape):
        return _lora_factors(shape, rank, spread, generator)  # LyCORIS uses a Tucker core only for real kernels
    out, inp, *kernel = shape
    ones = (1,) * len(kernel)
    down = uniform((rank, inp, *ones), 1.0 / math.sqrt(inp), generator)
    mid = uniform((rank, rank, *kernel), 1.0 / math.sqrt(rank * math.prod(kernel)), generator)
    up = uniform((out, rank, *ones), spread * math.sqrt(math.prod(shape[1:]) / rank), generator)
    return {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}


def _loha_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    # Each Hadamard half gets std sqrt(spread); a conv is factored flat, [out, in*kh*kw], as LyCORIS does.
    tensors = {}
    for half in ("hada_w1", "hada_w2"):
        tensors[f"{half}_a"] = uniform((shape[0], rank), math.sqrt(spread), generator)
        tensors[f"{half}_b"] = uniform((rank, math.prod(shape[1:])), 1.0 / math.sqrt(rank), generator)
    return tensors


def _loha_tucker_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    if not _has_kernel(shape):
        return _loha_factors(shape, rank, spread, generator)
    out, inp, *kernel = shape
    tensors = {}
    for index in ("1", "2"):
        tensors[f"hada_t{index}"] = uniform((rank, rank, *kernel), 1.0 / math.sqrt(rank), generator)
        tensors[f"hada_w{index}_a"] = uniform((rank, out), math.sqrt(spread), generator)
        tensors[f"hada_w{index}_b"] = uniform((rank, inp), 1.0 / math.sqrt(rank), generator)
    return tensors


def _lokr_factors(shape: tuple[int, ...], rank: int, spread: float, generator: torch.Generator) -> dict:
    (a, b), (c, d) = _kron_split(shape[0]), _kron_split(shape[1])
    return {
        "lokr_w1": uniform((a, c), 1.0, generator),
        "lokr_w2_a": uniform((b, rank), spread, generator),
        "lokr_w2_b": uniform((rank, d * math.prod(shape[2:])), 1.0 / math.sqrt(rank), generator),
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
    norm = math.sqrt(shape[0] * math.prod(shape[2:])) * default_std(shape)
    return norm + uniform((1, shape[1], *(1,) * (len(shape) - 2)), scale * norm, generator)


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
    roots = BY_NAME["sdxl" if sdxl else "sd-1"].kohya_text_encoder_prefixes
    prefixes = {"unet": "lora_unet", **{component: root[:-1] for root, component in roots.items()}}
    targets: dict[str, dict[str, tuple]] = {}
    for component, path, module in _lora_modules(pipe):
        targets.setdefault(prefixes[component], {})[path] = tuple(module.weight.shape)
    for path in unet_extra:
        targets["lora_unet"][path] = tuple(pipe.unet.get_submodule(path).weight.shape)
    return targets


def write_loras(pipe: DiffusionPipeline, folder: Path, name: str) -> None:
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
        generator = seeded_generator("peft", name, stem, component, path)
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
