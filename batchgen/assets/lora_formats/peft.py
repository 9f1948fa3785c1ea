"""diffusers / PEFT keys: ``unet.<module path>.lora_A.weight`` (``text_encoder.``, ``text_encoder_2.``, or no
component prefix at all); older diffusers wrote ``lora.down.weight``, ``lora_linear_layer.down.weight`` or
attention-processor names (``attn1.processor.to_q_lora.down.weight``). Suffixes are normalised to the kohya names
the layer types own, and the module prefix is ``<component>.<path>``. PEFT keeps alpha in its config, which
diffusers stores in the file's metadata; it becomes each module's ``alpha``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from batchgen.assets.architecture import COMPONENTS, ModuleRef
from batchgen.assets.text_model import CHILDREN, LEVEL, spellings

# diffusers' pipeline save_lora_weights stores the PEFT LoraConfig as JSON under this metadata key, each field
# prefixed with its component ("unet.lora_alpha"); a model's save_lora_adapter writes the fields unprefixed.
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# (pattern at the end of a key, layer suffix); lora_A/lora_B may carry an adapter name (lora_A.default.weight).
_SUFFIXES = (
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
_TEXT_ROOTS = CHILDREN | {LEVEL[:-1]}


def recognises(keys: Iterable[object]) -> bool:
    """PEFT/diffusers is what a file is read as when no other family claims its keys."""
    return True


def layout_of(key: str) -> str:
    """The layout a key of this family is written in (--list); older diffusers names are read as PEFT's."""
    return "PEFT/diffusers"


def parse_key(key: str) -> tuple[str, str] | None:
    """(``<component>.<path>``, layer suffix), or None for a key that is no PEFT/diffusers LoRA tensor."""
    processor = _PROCESSOR_KEY.match(key)
    if processor:
        return _parse_processor_key(processor)
    for pattern, suffix in _SUFFIXES:
        found = pattern.search(key)
        if found:
            located = split_component(key[: found.start()])
            return (f"{located[0]}.{located[1]}", suffix) if located else None
    return None


def _parse_processor_key(match: re.Match[str]) -> tuple[str, str] | None:
    located = split_component(match["parent"])
    if located is None:
        return None
    component, parent = located
    names = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_TEXT
    suffix = "lora_down.weight" if match["kind"] == "down" else "lora_up.weight"
    return f"{component}.{parent}.{names[match['projection']]}", suffix


def split_component(path: str) -> tuple[str, str] | None:
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


def component_of(prefix: str) -> tuple[str, bool] | None:
    """(component, numbers two text encoders) of a ``<component>.<path>`` prefix; PEFT never numbers them."""
    located = split_component(prefix)
    return None if located is None else (located[0], False)


def locator(
    modules: Mapping[str, Mapping[str, tuple[int, ...]]], unet_config: Mapping[str, Any] | None
) -> Callable[[str], ModuleRef | None]:
    """The module a ``<component>.<path>`` prefix names; PEFT paths are diffusers' own, so the UNet config is not
    needed."""

    def locate(prefix: str) -> ModuleRef | None:
        located = split_component(prefix)
        if located is None:
            return None
        component, path = located
        paths = modules.get(component, {})
        # A file written against either transformers spelling of CLIPTextModel fits a model in the other.
        for candidate in spellings(path):
            if candidate in paths:
                return ModuleRef(component, candidate)
        return None

    return locate


# --- alpha from metadata -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PeftAlpha:
    lora_alpha: float
    alpha_pattern: Mapping[str, float]
    use_rslora: bool


def add_alphas(groups: dict[str, dict[str, Any]], metadata: Mapping[str, str]) -> None:
    """Give each LoRA module the alpha diffusers' adapter metadata says, so that alpha / rank is the scale PEFT
    applies; without metadata there is no alpha (scale 1, which is PEFT's when lora_alpha == r)."""
    configs = _alpha_configs(metadata)
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
            alpha *= math.sqrt(tuple(tensors["lora_down.weight"].shape)[0])
        tensors["alpha"] = _scalar_like(tensors["lora_down.weight"], alpha)


def _alpha_configs(metadata: Mapping[str, str]) -> dict[str, _PeftAlpha]:
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


@dataclass(frozen=True)
class _Scalar:
    """alpha beside shape-only stand-ins (inspection reads headers, not tensors), so inspecting needs no torch."""

    value: float
    shape: tuple[int, ...] = ()

    def __float__(self) -> float:
        return self.value


def _scalar_like(down: Any, value: float) -> Any:
    if not hasattr(down, "dtype"):
        return _Scalar(value)
    import torch  # the factors are tensors, so torch is loaded already

    return torch.tensor(value, dtype=torch.float32)
