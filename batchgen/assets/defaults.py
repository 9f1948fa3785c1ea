"""A model's own render settings: what a sweep that gives no value renders with. No torch: reads JSON configs.

The size is what diffusers' pipeline would pick for the checkpoint: the denoiser config's sample_size (FLUX.1's
pipeline fixes 128, its config has none) times the VAE's scale, 2 ** (len(vae block_out_channels) - 1): 512 for
SD1.5, 768 for SD2's v-models, 1024 for SDXL, SD3.5 and FLUX.1. Steps, guidance and T5 length come from the base
record, per release (`Base.variants`: FLUX.1-dev or schnell, SD3.5 large or medium).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import Base
from batchgen.errors import BatchgenError
from batchgen.settings import SETTINGS
from batchgen.spec import ModelSpec

SIZE = ("width", "height")
_FALLBACKS = {s.name: s.fallback for s in SETTINGS if s.model_own}
_KEYS = {s.name: s.key for s in SETTINGS}


def model_defaults(spec: ModelSpec, names: Collection[str]) -> dict[str, Any]:
    """The model's own value of each named setting (each a `Setting.model_own` one); configs are read only for
    what is asked, so a sweep that gives a size needs no readable config."""
    base = BY_NAME[spec.base]
    unknown = set(names) - set(_FALLBACKS)
    if unknown:
        raise ValueError(f"no model default for {sorted(unknown)}: only settings with a fallback have one")
    out: dict[str, Any] = {}
    sized = [name for name in names if name in SIZE]
    if sized:
        out.update(zip(SIZE, default_size(spec, base, sized), strict=True))
    rest = [name for name in names if name not in SIZE]
    if rest:
        variant = base.variant(_config(spec, base.denoiser, rest)) if base.variants else None
        for name in rest:
            own = base.default(name, variant)
            out[name] = _FALLBACKS[name] if own is None else own
    return {name: out[name] for name in names}


def default_size(spec: ModelSpec, base: Base, names: Collection[str] = SIZE) -> tuple[int, int]:
    """(width, height) as the base's diffusers pipeline computes them when called without a size."""
    if base.default_sample_size is not None:
        sample: Any = base.default_sample_size  # FluxPipeline's own; it reads no sample_size from the config
    else:
        sample = _config(spec, base.denoiser, names).get("sample_size")
    channels = _config(spec, "vae", names).get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise _unreadable(spec, "vae", "it has no block_out_channels", names)
    scale = 2 ** (len(channels) - 1)
    # A UNet's sample_size may be [height, width], as diffusers' StableDiffusionPipeline reads it.
    height, width = sample if isinstance(sample, list) and len(sample) == 2 else (sample, sample)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise _unreadable(spec, base.denoiser, f"its sample_size {sample!r} is no positive integer", names)
    return width * scale, height * scale


def _config(spec: ModelSpec, component: str, names: Collection[str]) -> dict[str, Any]:
    path = spec.config_dir / component / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise _unreadable(spec, component, "cannot be read", names) from None
    except ValueError:
        raise _unreadable(spec, component, "is not valid JSON", names) from None
    if not isinstance(config, dict):
        raise _unreadable(spec, component, "is not a JSON object", names)
    return config


def _unreadable(spec: ModelSpec, component: str, why: str, names: Collection[str]) -> BatchgenError:
    keys = ", ".join(_KEYS[name] for name in names)
    return BatchgenError(
        f"models.{spec.name}: {spec.config_dir / component / 'config.json'} {why}, and the sweep leaves {keys} to "
        f"the model; give {'it' if len(names) == 1 else 'them'} in the sweep, or complete the model's configs"
    )
