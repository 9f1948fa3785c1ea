"""Where the tiny roots live and how they are built: on first use, atomically, into the cache."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from batchgen.assets.bases import BASES
from batchgen.tiny import metric_models
from batchgen.tiny.embeddings import write_embeddings
from batchgen.tiny.loras import write_loras

TINY_VERSION = "v3"  # v3: tiny_sd1 final layer norm with a learned-looking bias (A1111 emphasis)
# Each base record's tiny model (Base.tiny_model, built by its tiny_builder).
_TINY_BASES = {base.tiny_model: base for base in BASES if base.tiny_model}
TINY_MODELS = tuple(_TINY_BASES)
UNET_TINY = tuple(name for name, base in _TINY_BASES.items() if base.denoiser == "unet")
# The MMDiT ones: their pipelines and LoRAs come from transformer_models.py and transformer_loras.py.
TRANSFORMER_TINY = tuple(name for name, base in _TINY_BASES.items() if base.denoiser == "transformer")
# The library releases the saved configs name, whatever release builds them: a folder's content hash is part of every
# job_id, so an upgraded transformers (5.24.0 -> 5.25.0 wrote one different string) would change every tiny job's id.
RECORDED_VERSIONS = {"_diffusers_version": "0.42.1", "transformers_version": "5.24.0"}


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
    return _ensure_built(tiny_root(name, cache), lambda folder: build_tiny(name, folder))


def tiny_metrics_root(cache: Path | None = None) -> Path:
    """The folder of the embedded measures' models and concept images (batchgen.tiny.metric_models)."""
    return (cache or cache_root()) / f"{metric_models.NAME}-{metric_models.VERSION}"


def ensure_tiny_metrics(cache: Path | None = None) -> Path:
    """Return :func:`tiny_metrics_root`, building it first if no complete build exists."""
    return _ensure_built(tiny_metrics_root(cache), metric_models.build_tiny_metrics)


def _ensure_built(target: Path, build: Callable[[Path], None]) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename (atomic): a crash leaves at most a stray temp folder, and of
    # two concurrent builders one wins the rename while the other finds the target and drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished root should read like any cache folder
    try:
        build(tmp)
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

    from batchgen.library_log import settle

    _check_name(name)
    settle()
    dest = Path(dest)
    # Library init draws from the global RNG before we overwrite it; fork so the caller's state survives.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        module, function = _TINY_BASES[name].tiny_builder.split(":")
        pipe = getattr(importlib.import_module(module), function)(name, dest / "main" / name)
        if name in TRANSFORMER_TINY:
            from batchgen.tiny.transformer_loras import write_transformer_loras

            write_transformer_loras(pipe, dest / "lora", name)
        else:
            write_embeddings(dest / "embedding", name)
            write_loras(pipe, dest / "lora", name)
    pin_library_versions(dest)


def pin_library_versions(folder: Path) -> None:
    """Rewrite the release strings in every JSON file under ``folder`` to :data:`RECORDED_VERSIONS`, in place.

    Only the quoted value changes, so the rest of each file keeps the bytes its library wrote.
    """
    for file in sorted(Path(folder).rglob("*.json")):
        text = file.read_text(encoding="utf-8")
        pinned = text
        for key, version in RECORDED_VERSIONS.items():
            pinned = re.sub(rf'("{re.escape(key)}": )"[^"]*"', rf'\1"{version}"', pinned)
        if pinned != text:
            file.write_text(pinned, encoding="utf-8")


def _check_name(name: str) -> None:
    if name not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {name!r}; valid names are: {', '.join(TINY_MODELS)}")
