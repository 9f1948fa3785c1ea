"""Config values -> checked Python values: the render settings (batchgen.settings), LoRA weights, engine options."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from batchgen.assets.defaults import model_defaults
from batchgen.config import RunConfig, SweepConfig
from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.settings import SETTINGS, as_list, is_number
from batchgen.spec import ModelSpec, format_number

MAX_WEIGHT = 10.0


def setting_values(sections: dict[str, Any]) -> dict[str, list[Any]]:
    """Each render setting's checked values, read from its config key (`sweep.seeds`); more than one: an axis.
    [None]: the config leaves it to each model (`model_values` resolves it)."""
    out = {}
    for s in SETTINGS:
        value = getattr(sections[s.section], s.field)
        out[s.name] = [None] if value is None and s.model_own else s.check(value, s.key)
    return out


def model_values(settings: dict[str, list[Any]], spec: ModelSpec) -> dict[str, list[Any]]:
    """The sweep's values for one model: each setting the sweep leaves to the model takes the model's own."""
    own = model_defaults(spec, [name for name, values in settings.items() if values == [None]])
    return {name: [own[name]] if name in own else values for name, values in settings.items()}


def merged_values(per_model: Iterable[dict[str, list[Any]]], settings: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Every value each setting takes in some model, in first-seen order (what the sweep-wide checks read)."""
    models = list(per_model)
    merged = {name: list(dict.fromkeys(v for m in models for v in m[name])) for name in settings}
    return {name: merged[name] or values for name, values in settings.items()}


def engine_options(sweep: SweepConfig, run: RunConfig) -> EngineOptions:
    """How every worker renders (run.dtype, .compile, .threads, .offload, .gpu_memory_gb, .weights and
    sweep.batch_size); the record checks each value, so a bad one is a config error before any worker starts."""
    return EngineOptions(
        dtype=run.dtype,
        compile=run.compile,
        threads=run.threads,
        batch_size=sweep.batch_size,
        offload=run.offload,
        gpu_memory_gb=run.gpu_memory_gb,
        weights=run.weights,
    )


def lora_entries(value: Any, key: str) -> list[tuple[float, float, str]]:
    """(unet, text encoder, block weights) per point of a stack entry's axis. A point is a weight, or a mapping
    with `weight` (default 1) or `unet` + `text_encoder`, and optionally `blocks` (a LoRA Block Weight preset or
    vector, resolved per model later); a list of points, or a list under `weight` or `blocks`, is an axis."""
    out: list[tuple[float, float, str]] = []
    for v in as_list(value, key):
        if isinstance(v, dict) and "blocks" in v:
            rest = {k: x for k, x in v.items() if k != "blocks"}
            if "weight" in rest and set(rest) != {"weight"}:
                raise BatchgenError(f"{key}: give weight or unet + text_encoder, not both")
            points = weights(rest.get("weight", 1.0) if "unet" not in rest else rest, key)
            specs = [blocks_spec(b, key) for b in as_list(v["blocks"], f"{key}.blocks")]
            out += [(unet, te, spec) for unet, te in points for spec in specs]
        elif isinstance(v, dict) and set(v) == {"weight"}:
            out += [(unet, te, "") for unet, te in weights(v["weight"], key)]
        else:
            out += [(unet, te, "") for unet, te in weights(v, key)]
    return out


def blocks_spec(value: Any, key: str) -> str:
    """A preset name or a vector as the extension writes it (`1,0,0.5,...`), as text; checked per base later."""
    if isinstance(value, list | tuple):
        if not all(is_number(x) for x in value):
            raise BatchgenError(f"{key}.blocks: {value} is not a list of numbers; write a preset name or numbers")
        return ",".join(format_number(x) for x in value)
    if isinstance(value, str) and value.strip():
        return ",".join(part.strip() for part in value.split(",")) if "," in value else value.strip()
    if is_number(value):
        return format_number(value)
    raise BatchgenError(f"{key}.blocks: '{value}' is neither a preset name nor a vector; e.g. OUTD or \"1,0,0,...\"")


def weights(value: Any, key: str) -> list[tuple[float, float]]:
    """(unet, text encoder) weights. A weight is a number or {unet: w, text_encoder: w}; a list of them is an axis."""
    out: list[tuple[float, float]] = []
    for v in as_list(value, key):
        if is_number(v):
            out.append((float(v), float(v)))
        elif isinstance(v, dict) and set(v) == {"unet", "text_encoder"} and all(is_number(x) for x in v.values()):
            out.append((float(v["unet"]), float(v["text_encoder"])))
        else:
            raise BatchgenError(
                f"{key}: weight '{v}' is not a number; write a number, a list of numbers, "
                "{unet: w, text_encoder: w} or {weight: w, blocks: PRESET}"
            )
    for pair in out:
        for w in pair:
            if not -MAX_WEIGHT <= w <= MAX_WEIGHT:  # also refuses nan and inf
                raise BatchgenError(
                    f"{key}: weight {format_number(w)} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; LoRA weights are "
                    "usually between -2 and 2"
                )
    return out
