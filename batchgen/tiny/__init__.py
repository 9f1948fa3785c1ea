"""The embedded default: deterministic tiny random SD1, SDXL, SD3.5 and FLUX.1 roots, built on first use.

Each root follows InvokeAI's per-base layout (``main/<name>``, ``embedding/``, ``lora/``) and holds a
random-weight diffusers pipeline with real text widths (768, and 768 + 1280 for SDXL) so that base
detection by vector width works, plus textual inversions in each real file format and LoRAs: kohya LoRAs
(ink, grain, pastel), LyCORIS LoHa (hatch) and LoKr (kron), and a diffusers/PEFT-format LoRA (peft_sketch).
The SD3.5 and FLUX.1 roots (a tiny T5 beside the CLIPs, an MMDiT) hold
LoRAs in the layouts trainers write for them (transformer_loras.py). Nothing is downloaded; two builds give
byte-identical files. :func:`write_lycoris` writes LoRA files of every LyCORIS layer type for test corpora.

Modules: build (cache and atomic build), models (UNet pipelines), transformer_models (MMDiT pipelines), tokenizer,
t5 (T5 tokenizer and encoder), embeddings, loras, transformer_loras, noise (bit-stable random weights),
metric_models (a tiny CLIP, DINOv2 and concept folders for sweep.metrics).
"""

from batchgen.tiny.build import (
    TINY_MODELS,
    TINY_VERSION,
    TRANSFORMER_TINY,
    UNET_TINY,
    build_tiny,
    cache_root,
    ensure_tiny,
    ensure_tiny_metrics,
    tiny_metrics_root,
    tiny_root,
)
from batchgen.tiny.loras import KOHYA_PREFIXES, LYCORIS_KINDS, write_lycoris

__all__ = [
    "KOHYA_PREFIXES",
    "LYCORIS_KINDS",
    "TINY_MODELS",
    "TINY_VERSION",
    "TRANSFORMER_TINY",
    "UNET_TINY",
    "build_tiny",
    "cache_root",
    "ensure_tiny",
    "ensure_tiny_metrics",
    "tiny_metrics_root",
    "tiny_root",
    "write_lycoris",
]
