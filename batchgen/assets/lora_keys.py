"""Map the tensor keys of a LoRA file to modules of a diffusers SD pipeline; detect its key format and SD base.

Two key families exist in the wild:

* kohya / LyCORIS (sd-scripts, A1111, ComfyUI): ``<module name>.<tensor>`` where the module name is ``lora_unet_``,
  ``lora_te_`` (SD1/SD2), ``lora_te1_`` or ``lora_te2_`` (SDXL) followed by the module path with ``.`` written as
  ``_``. For SDXL kohya trains its own UNet, whose paths follow the original Stability (SGM) layout
  (``input_blocks.4.1...``), not diffusers' (``down_blocks.1.attentions.0...``).
* diffusers / PEFT: ``unet.<module path>.lora_A.weight``; older diffusers wrote ``lora.down.weight``,
  ``lora_linear_layer.down.weight`` or attention-processor names (``attn1.processor.to_q_lora.down.weight``).

Only tensor shapes are read, so tensors on the meta device, or any object with a ``shape``, work as well.
torch itself is imported only where a tensor must be made, so inspecting a file's header stays torch-free.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchgen.assets.single_file import CROSS_ATTENTION_BASES

if TYPE_CHECKING:
    import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
BASES = ("sd-1", "sd-2", "sdxl")

# The tensor names a kohya/LyCORIS module may carry; PEFT names are normalised to these.
KOHYA_SUFFIXES = frozenset(
    {
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "dora_scale", "diff", "diff_b",
    }
)  # fmt: skip
_KOHYA_ROOTS = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_COMPONENT = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",  # SD1/SD2
    "lora_te1_": "text_encoder",  # SDXL
    "lora_te2_": "text_encoder_2",
}

# diffusers' pipeline save_lora_weights stores the PEFT LoraConfig as JSON under this metadata key, each field
# prefixed with its component ("unet.lora_alpha"); a model's save_lora_adapter writes the fields unprefixed.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# (pattern at the end of a key, normalised suffix); lora_A/lora_B may carry an adapter name (lora_A.default.weight).
_PEFT_SUFFIXES = (
    (re.compile(r"\.lora_A(?:\.\w+)?\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora_B(?:\.\w+)?\.weight$"), "lora_up.weight"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "lora_up.weight"),
    # PEFT's DoRA magnitude is one number per output channel, flat [out]; DoRA layers read its orientation.
    (re.compile(r"\.lora_magnitude_vector(?:\.\w+){0,2}$"), "dora_scale"),
    (re.compile(r"\.alpha$"), "alpha"),
)
# diffusers <= 0.16 saved attention-processor LoRAs: the projection's name is folded into the LoRA's.
_PROCESSOR_KEY = re.compile(
    r"^(?P<parent>.+?)(?:\.processor)?\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight$"
)
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# First path segments that tell a key without a component prefix which model it belongs to.
_UNET_ROOTS = frozenset(
    {
        "conv_in", "time_embedding", "add_embedding", "class_embedding",
        "down_blocks", "mid_block", "up_blocks", "conv_out",
    }
)  # fmt: skip
_TEXT_ROOTS = frozenset({"text_model", "embeddings", "encoder", "final_layer_norm"})
# transformers 5 dropped CLIPTextModel's text_model level (not CLIPTextModelWithProjection's); kohya names keep it.
_TEXT_MODEL_CHILDREN = frozenset({"embeddings", "encoder", "final_layer_norm"})

# SGM (original Stability) names of a diffusers ResnetBlock2D's Linear/Conv modules.
_RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# SGM names of the modules outside the block lists.
_SGM_FIXED: dict[str, tuple[str, Mapping[str, str] | None]] = {
    "conv_in": ("input_blocks.0.0", None),
    "time_embedding.linear_1": ("time_embed.0", None),
    "time_embedding.linear_2": ("time_embed.2", None),
    "add_embedding.linear_1": ("label_emb.0.0", None),
    "add_embedding.linear_2": ("label_emb.0.2", None),
    "conv_out": ("out.2", None),
}

# Base evidence: the width of what cross-attention keys/values read (the text embedding) ...
_CONTEXT_WIDTH_BASES = {width: frozenset({base}) for width, base in CROSS_ATTENTION_BASES.items()}
_CROSS_ATTENTION_INPUTS = ("attn2_to_k", "attn2_to_v")
# ... and each text encoder's hidden width; SDXL's first encoder is CLIP-L, as wide as SD1's.
_TEXT_WIDTH_BASES = {
    "text_encoder": {768: frozenset({"sd-1", "sdxl"}), 1024: frozenset({"sd-2"})},
    "text_encoder_2": {1280: frozenset({"sdxl"})},
}
_TEXT_HIDDEN_INPUTS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")  # fc2 reads the MLP width instead


@dataclass(frozen=True)
class ModuleRef:
    """A Linear or Conv2d module of one pipeline component, by its ``named_modules()`` path."""

    component: str
    path: str


# --- grouping keys by module ---------------------------------------------------------------------------------------


def group_by_module(
    state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """(format, {file module prefix: {normalised suffix: tensor}}); format is "kohya" or "peft".

    kohya prefixes are the file's module names (``lora_unet_...``); peft prefixes are ``<component>.<path>`` with
    ``base_model.model.`` and attention-processor naming removed. PEFT files get an ``alpha`` per module from
    diffusers' adapter metadata, so that alpha / rank is the scale PEFT applies; without it there is no alpha
    (scale 1, which is PEFT's when lora_alpha == r). Raises ValueError naming the first keys it cannot parse.
    """
    keys = list(state_dict)
    fmt = "kohya" if any(isinstance(k, str) and k.startswith(_KOHYA_ROOTS) for k in keys) else "peft"
    parse = _parse_kohya_key if fmt == "kohya" else _parse_peft_key
    groups: dict[str, dict[str, Any]] = {}
    unparsed: list[str] = []
    for key in keys:
        parsed = parse(key) if isinstance(key, str) else None
        if parsed is None:
            unparsed.append(str(key))
            continue
        prefix, suffix = parsed
        tensors = groups.setdefault(prefix, {})
        if suffix in tensors:
            raise ValueError(f"two keys give {suffix} of module {prefix}, the second is {key}")
        tensors[suffix] = state_dict[key]
    if unparsed:
        raise ValueError(
            f"{len(unparsed)} of {len(keys)} keys are not LoRA tensors in a known layout ({fmt} detected), "
            f"e.g. {', '.join(unparsed[:5])}"
        )
    if fmt == "peft" and metadata:
        _add_peft_alphas(groups, _peft_alpha_configs(metadata))
    return fmt, groups


def _parse_kohya_key(key: str) -> tuple[str, str] | None:
    prefix, _, suffix = key.partition(".")
    if prefix.startswith("lora_") and suffix in KOHYA_SUFFIXES:
        return prefix, suffix
    return None


def _parse_peft_key(key: str) -> tuple[str, str] | None:
    processor = _PROCESSOR_KEY.match(key)
    if processor:
        return _parse_processor_key(processor)
    for pattern, suffix in _PEFT_SUFFIXES:
        found = pattern.search(key)
        if found:
            located = _split_component(key[: found.start()])
            return (f"{located[0]}.{located[1]}", suffix) if located else None
    return None


def _parse_processor_key(match: re.Match[str]) -> tuple[str, str] | None:
    located = _split_component(match["parent"])
    if located is None:
        return None
    component, parent = located
    names = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_TEXT
    suffix = "lora_down.weight" if match["kind"] == "down" else "lora_up.weight"
    return f"{component}.{parent}.{names[match['projection']]}", suffix


def _split_component(path: str) -> tuple[str, str] | None:
    """(component, path inside it) from a PEFT module path, with or without a component prefix."""
    for component in COMPONENTS:
        if path.startswith(component + "."):
            return component, path[len(component) + 1 :].removeprefix("base_model.model.")
    path = path.removeprefix("base_model.model.")
    root = path.split(".", 1)[0]
    if root in _UNET_ROOTS:
        return "unet", path
    if root in _TEXT_ROOTS:
        return "text_encoder", path  # a lone text encoder file cannot say which; the first is the usual one
    return None


# --- PEFT alpha from metadata --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeftAlpha:
    lora_alpha: float
    alpha_pattern: Mapping[str, float]
    use_rslora: bool


def _peft_alpha_configs(metadata: Mapping[str, str]) -> dict[str, _PeftAlpha]:
    """{component, or "" for every component: alpha settings} from diffusers' adapter metadata."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"metadata {LORA_ADAPTER_METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"metadata {LORA_ADAPTER_METADATA_KEY} is not a JSON object")
    fields: dict[str, dict[str, Any]] = {}
    for key, value in config.items():
        component, _, field = str(key).rpartition(".")
        if component in ("", *COMPONENTS):
            fields.setdefault(component, {})[field] = value
    configs = {component: _peft_alpha(values) for component, values in fields.items()}
    return {component: alpha for component, alpha in configs.items() if alpha is not None}


def _peft_alpha(fields: Mapping[str, Any]) -> _PeftAlpha | None:
    alpha = fields.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return None
    pattern = fields.get("alpha_pattern")
    return _PeftAlpha(float(alpha), pattern if isinstance(pattern, dict) else {}, bool(fields.get("use_rslora")))


def _add_peft_alphas(groups: dict[str, dict[str, Any]], configs: Mapping[str, _PeftAlpha]) -> None:
    for prefix, tensors in groups.items():
        if "alpha" in tensors or "lora_down.weight" not in tensors:
            continue
        component, _, path = prefix.partition(".")
        config = configs.get(component) or configs.get("")
        if config is None:
            continue
        alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
        if config.use_rslora:
            # rsLoRA scales by alpha / sqrt(r); as alpha / r that is (alpha * sqrt(r)) / r.
            alpha *= math.sqrt(_shape(tensors["lora_down.weight"])[0])
        tensors["alpha"] = _scalar_tensor(alpha)


def _pattern_value(patterns: Mapping[str, Any], path: str, default: float) -> float:
    """PEFT's rule: the first pattern that matches the end of the path, at a segment boundary, wins."""
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", path)
        except re.error:
            matched = None
        if matched and isinstance(value, int | float):
            return float(value)
    return default


def _scalar_tensor(value: float) -> torch.Tensor:
    import torch

    return torch.tensor(value, dtype=torch.float32)


# --- kohya module names --------------------------------------------------------------------------------------------


def kohya_names(
    component: str, module_paths: Iterable[str], unet_config: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """{kohya module name: module path} for one component.

    UNet modules get ``lora_unet_`` + the diffusers path and, given the UNet's config, also the SGM-layout name
    kohya uses for SDXL (other trainers use it for SD1 too). Text encoder modules are named in the ``text_model_``
    spelling whatever the installed transformers calls them: ``lora_te_``/``lora_te1_`` for text_encoder,
    ``lora_te2_`` for text_encoder_2.
    """
    if component == "unet":
        return _unet_kohya_names(module_paths, unet_config)
    if component == "text_encoder":
        return _text_kohya_names(("lora_te", "lora_te1"), module_paths)
    if component == "text_encoder_2":
        return _text_kohya_names(("lora_te2",), module_paths)
    raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")


def _kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_kohya_names(module_paths: Iterable[str], unet_config: Mapping[str, Any] | None) -> dict[str, str]:
    sgm = _sgm_table(unet_config) if unet_config is not None else {}
    names: dict[str, str] = {}
    for path in module_paths:
        names[_kohya_name("lora_unet", path)] = path
        sgm_path = _to_sgm(path, sgm)
        if sgm_path is not None:
            names[_kohya_name("lora_unet", sgm_path)] = path
    return names


def _text_kohya_names(prefixes: tuple[str, ...], module_paths: Iterable[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for path in module_paths:
        spelled = f"text_model.{path}" if path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN else path
        for prefix in prefixes:
            names[_kohya_name(prefix, spelled)] = path
    return names


# --- the SGM layout, derived from a diffusers UNet config ----------------------------------------------------------
# SGM numbers the UNet's parts in build order: input_blocks[0] is conv_in, then per level one input block per resnet
# (slot 0 the resnet, slot 1 its transformer) and, on all but the last level, one holding the downsampler (slot 0,
# conv "op"); middle_block is resnet, transformer, resnet; output_blocks has one block per up resnet, the level's
# last also holding the upsampler after the resnet and transformer (slot 1 or 2, conv "conv").


def _sgm_table(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    """{diffusers path prefix: (SGM path prefix, renames of the modules below it or None to keep them)}."""
    return {**_SGM_FIXED, **_sgm_down_blocks(config), **_sgm_mid_block(config), **_sgm_up_blocks(config)}


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type  # CrossAttnDownBlock2D, AttnUpBlock2D, UNetMidBlock2DCrossAttn, ...


def _layers_per_block(config: Mapping[str, Any], count: int) -> list[int]:
    layers = config.get("layers_per_block", 2)
    return [int(layers)] * count if isinstance(layers, int) else [int(n) for n in layers]


def _sgm_down_blocks(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    types = list(config["down_block_types"])
    table: dict[str, tuple[str, Mapping[str, str] | None]] = {}
    index = 1  # input_blocks.0 is conv_in
    for block, (block_type, layers) in enumerate(zip(types, _layers_per_block(config, len(types)), strict=True)):
        for layer in range(layers):
            table[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{index}.0", _RESNET_TO_SGM)
            if _has_attention(block_type):
                table[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{index}.1", None)
            index += 1
        if block < len(types) - 1:
            table[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", None)
            index += 1
    return table


def _sgm_mid_block(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    block_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if block_type is None:
        return {}
    if not _has_attention(block_type):
        return {f"mid_block.resnets.{i}": (f"middle_block.{i}", _RESNET_TO_SGM) for i in range(2)}
    return {
        "mid_block.resnets.0": ("middle_block.0", _RESNET_TO_SGM),
        "mid_block.attentions.0": ("middle_block.1", None),
        "mid_block.resnets.1": ("middle_block.2", _RESNET_TO_SGM),
    }


def _sgm_up_blocks(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    types = list(config["up_block_types"])
    # Up blocks mirror the down blocks and have one resnet more, for the skip from each down block's downsampler.
    per_block = list(reversed(_layers_per_block(config, len(types))))
    table: dict[str, tuple[str, Mapping[str, str] | None]] = {}
    index = 0
    for block, (block_type, layers) in enumerate(zip(types, per_block, strict=True)):
        attention = _has_attention(block_type)
        for layer in range(layers + 1):
            table[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{index}.0", _RESNET_TO_SGM)
            if attention:
                table[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{index}.1", None)
            index += 1
        if block < len(types) - 1:
            slot = 2 if attention else 1
            table[f"up_blocks.{block}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", None)
    return table


def _to_sgm(path: str, table: Mapping[str, tuple[str, Mapping[str, str] | None]]) -> str | None:
    """The SGM path of a diffusers module path, or None for modules SGM names differently or not at all."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        entry = table.get(".".join(parts[:cut]))
        if entry is None:
            continue
        sgm_prefix, renames = entry
        rest = ".".join(parts[cut:])
        if renames is not None:
            renamed = renames.get(rest)
            if renamed is None:
                return None
            rest = renamed
        return f"{sgm_prefix}.{rest}" if rest else sgm_prefix
    return None


# --- mapping groups to modules -------------------------------------------------------------------------------------


def map_to_modules(
    groups: Mapping[str, Mapping[str, Any]],
    fmt: str,
    modules: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Mapping[str, Any] | None,
) -> tuple[dict[ModuleRef, dict[str, Any]], list[str]]:
    """({ModuleRef: suffix dict}, unmapped file prefixes).

    ``modules`` is {component: {module path: weight shape}} of the model's Linear and Conv2d modules. A prefix is
    unmapped when it names no module or its tensors cannot make a delta of the module's shape. Raises ValueError
    when two prefixes name the same module (say a diffusers and an SGM name), which no trainer writes.
    """
    if fmt == "kohya":
        names = _kohya_lookup(modules, unet_config)
        locate = names.get
    elif fmt == "peft":

        def locate(prefix: str) -> ModuleRef | None:
            return _locate_peft(prefix, modules)

    else:
        raise ValueError(f"unknown LoRA key format {fmt!r}; expected kohya or peft")
    mapped: dict[ModuleRef, dict[str, Any]] = {}
    owners: dict[ModuleRef, str] = {}
    unmapped: list[str] = []
    for prefix, tensors in groups.items():
        ref = locate(prefix)
        if ref is None or not _fits(tensors, modules[ref.component][ref.path]):
            unmapped.append(prefix)
            continue
        if ref in mapped:
            raise ValueError(f"{owners[ref]} and {prefix} both patch {ref.component} module {ref.path}")
        mapped[ref] = dict(tensors)
        owners[ref] = prefix
    return mapped, unmapped


def _kohya_lookup(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], unet_config: Mapping[str, Any] | None
) -> dict[str, ModuleRef]:
    lookup: dict[str, ModuleRef] = {}
    for component in COMPONENTS:
        if component not in modules:
            continue
        config = unet_config if component == "unet" else None
        for name, path in kohya_names(component, modules[component], config).items():
            lookup[name] = ModuleRef(component, path)
    return lookup


def _locate_peft(prefix: str, modules: Mapping[str, Mapping[str, tuple[int, ...]]]) -> ModuleRef | None:
    located = _split_component(prefix)
    if located is None:
        return None
    component, path = located
    paths = modules.get(component, {})
    # A file written against either transformers spelling of CLIPTextModel fits a model in the other.
    for candidate in (path, path.removeprefix("text_model."), f"text_model.{path}"):
        if candidate in paths:
            return ModuleRef(component, candidate)
    return None


# --- shapes --------------------------------------------------------------------------------------------------------


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _fits(tensors: Mapping[str, Any], weight_shape: tuple[int, ...]) -> bool:
    out_dim, in_flat = _delta_dims(tensors)
    return out_dim in (None, weight_shape[0]) and in_flat in (None, math.prod(weight_shape[1:]))


def _delta_dims(tensors: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(output width, input width times kernel size) of the delta a module's tensors make, None where unknown."""
    if "lora_down.weight" in tensors or "lora_up.weight" in tensors:
        return _lora_dims(tensors)
    if "hada_w1_a" in tensors and "hada_w1_b" in tensors:
        return _hada_dims(tensors)
    if any(name.startswith("lokr_") for name in tensors):
        return _lokr_dims(tensors)
    if "diff" in tensors:
        shape = _shape(tensors["diff"])
        return shape[0], math.prod(shape[1:])
    if "diff_b" in tensors:
        return _shape(tensors["diff_b"])[0], None
    return None, None


def _lora_dims(tensors: Mapping[str, Any]) -> tuple[int | None, int | None]:
    # up [out, r(, 1, 1)]; down [r, in(, kh, kw)], or with a Tucker core: down [r, in, 1, 1], mid [r, r, kh, kw].
    up, down, mid = (tensors.get(name) for name in ("lora_up.weight", "lora_down.weight", "lora_mid.weight"))
    out_dim = _shape(up)[0] if up is not None else None
    if down is None:
        return out_dim, None
    kernel = math.prod(_shape(mid)[2:]) if mid is not None else 1
    return out_dim, math.prod(_shape(down)[1:]) * kernel


def _hada_dims(tensors: Mapping[str, Any]) -> tuple[int, int]:
    # Plain: w1_a [out, r], w1_b [r, in*kh*kw]. Tucker: t1 [r, r, kh, kw], w1_a [r, out], w1_b [r, in].
    w1_a, w1_b = _shape(tensors["hada_w1_a"]), _shape(tensors["hada_w1_b"])
    core = tensors.get("hada_t1")
    if core is None:
        return w1_a[0], w1_b[1]
    return w1_a[1], w1_b[1] * math.prod(_shape(core)[2:])


def _lokr_dims(tensors: Mapping[str, Any]) -> tuple[int | None, int | None]:
    # ΔW = kron(w1, w2): widths multiply.
    first = _lokr_factor(tensors, "lokr_w1", None)
    second = _lokr_factor(tensors, "lokr_w2", "lokr_t2")
    if first is None or second is None:
        return None, None
    return first[0] * second[0], first[1] * second[1]


def _lokr_factor(tensors: Mapping[str, Any], name: str, core_name: str | None) -> tuple[int, int] | None:
    """(out, in*kernel) of one Kronecker factor: full, a @ b, or with a Tucker core (a [r, out], b [r, in])."""
    if name in tensors:
        shape = _shape(tensors[name])
        return shape[0], math.prod(shape[1:])
    a, b = tensors.get(f"{name}_a"), tensors.get(f"{name}_b")
    if a is None or b is None:
        return None
    core = tensors.get(core_name) if core_name else None
    if core is None:
        return _shape(a)[0], math.prod(_shape(b)[1:])
    return _shape(a)[1], _shape(b)[1] * math.prod(_shape(core)[2:])


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{path: weight shape} of every nn.Linear and nn.Conv2d (works on the meta device)."""
    import torch

    return {
        path: tuple(module.weight.shape)
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }


# --- base detection ------------------------------------------------------------------------------------------------


def detect_base(groups: Mapping[str, Mapping[str, Any]], fmt: str) -> str | None:
    """The base ("sd-1", "sd-2", "sdxl") from the widths the file's layers read; None if they don't decide or agree.

    Evidence: what cross-attention keys/values read (768, 1024, 2048), the text encoders' hidden widths, and the
    presence of a second text encoder (only SDXL has one). A 768-wide text encoder alone reads as SD1.
    """
    candidates = set(BASES)
    informed = False
    for allowed in _base_evidence(groups, fmt):
        candidates &= allowed
        informed = True
    if not informed or not candidates:
        return None
    if len(candidates) == 1:
        return next(iter(candidates))
    return "sd-1" if candidates == {"sd-1", "sdxl"} else None


def _base_evidence(groups: Mapping[str, Mapping[str, Any]], fmt: str) -> Iterator[frozenset[str]]:
    """For each layer that says anything about the base, the set of bases it allows."""
    for prefix, tensors in groups.items():
        component = _group_component(prefix, fmt)
        if component == "text_encoder_2" or prefix.startswith("lora_te1_"):
            yield frozenset({"sdxl"})
        if component is None or not tensors:
            continue
        name = prefix.replace(".", "_")
        width = _delta_dims(tensors)[1]
        if width is None:
            continue
        if component == "unet" and name.endswith(_CROSS_ATTENTION_INPUTS):
            yield _CONTEXT_WIDTH_BASES.get(width, frozenset())
        elif component != "unet" and name.endswith(_TEXT_HIDDEN_INPUTS):
            yield _TEXT_WIDTH_BASES[component].get(width, frozenset())


def _group_component(prefix: str, fmt: str) -> str | None:
    if fmt == "kohya":
        return next((c for root, c in _KOHYA_COMPONENT.items() if prefix.startswith(root)), None)
    located = _split_component(prefix)
    return located[0] if located else None
