"""sweep.metrics checked at planning, before any model loads: its folders (batchgen.assets.metric_models) and its
concept names, each a LoRA or TI of a selected model (a LoRA's epochs, `mylora-000004`, count as `mylora`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batchgen.assets.metric_models import MetricFolders, MetricModels, concept_of, folder, metric_models, notes
from batchgen.config import MetricsConfig
from batchgen.errors import BatchgenError
from batchgen.settings import did_you_mean
from batchgen.spec import ModelSpec

BUILTINS = ("tiny_metrics",)  # batchgen.tiny.metric_models: a tiny CLIP, DINOv2 and concept folders


def check_metrics(
    config: MetricsConfig, specs: dict[str, ModelSpec], builtin_root: Callable[[str], Path]
) -> tuple[MetricModels | None, list[str]]:
    """The checked folders (None without sweep.metrics) and warnings. `builtin_root(name)` builds a builtin set on
    first use and returns its folder, where relative paths are then read."""
    root = None
    if config.builtin is not None:
        if config.builtin not in BUILTINS:
            close = did_you_mean(config.builtin, list(BUILTINS))
            raise BatchgenError(
                f"sweep.metrics.builtin: '{config.builtin}' is no builtin set{close}; use {', '.join(BUILTINS)}, or "
                "null with your own folders"
            )
        root = builtin_root(config.builtin)
    for name, value in config.concepts.items():
        if folder(value) is None:
            raise BatchgenError(
                f"sweep.metrics.concepts.{name}: no folder given; give a folder of its training images"
            )
    folders = MetricFolders(
        clip=folder(config.clip, root),
        dino=folder(config.dino, root),
        concepts={str(name): folder(value, root) for name, value in config.concepts.items()},
    )
    models = metric_models(folders)
    if models is None:
        return None, []
    check_concept_names([c.name for c in models.concepts], specs)
    return models, notes(models)


def check_concept_names(names: list[str], specs: dict[str, ModelSpec]) -> None:
    loras = sorted({n for s in specs.values() for k, n in s.discovered if k == "lora"} | _lora_names(specs))
    triggers = sorted({n for s in specs.values() for k, n in s.discovered if k == "embedding"})
    for name in names:
        if name in triggers or any(concept_of(lora, [name]) for lora in loras):
            continue
        known = sorted({*loras, *triggers})
        raise BatchgenError(
            f"sweep.metrics.concepts.{name}: no LoRA or TI of the sweep's models is named '{name}'"
            f"{did_you_mean(name, known)}; name a LoRA (its file stem) or a TI trigger; found: "
            f"{', '.join(known) or 'none'}"
        )


def _lora_names(specs: dict[str, ModelSpec]) -> set[str]:
    return {f.name for s in specs.values() for f in s.loras}
