"""The embedded default: deterministic tiny random SD1 and SDXL roots, built on first use.

Each root follows InvokeAI's per-base layout (``main/<name>``, ``embedding/``, ``lora/``) and holds a
random-weight diffusers pipeline with real text widths (768, and 768 + 1280 for SDXL) so that base
detection by vector width works, plus textual inversions in each real file format and LoRAs: kohya LoRAs
(ink, grain, pastel), LyCORIS LoHa (hatch) and LoKr (kron), and a diffusers/PEFT-format LoRA (peft_sketch).
Nothing is downloaded; two builds give byte-identical files. :func:`write_lycoris` writes LoRA files of every
LyCORIS layer type for test corpora.

Modules: build (cache and atomic build), models (pipelines), tokenizer, embeddings, loras, noise (bit-stable
random weights).
"""

from batchgen.tiny.build import TINY_MODELS, TINY_VERSION, build_tiny, cache_root, ensure_tiny, tiny_root
from batchgen.tiny.loras import KOHYA_PREFIXES, LYCORIS_KINDS, write_lycoris

__all__ = [
    "KOHYA_PREFIXES",
    "LYCORIS_KINDS",
    "TINY_MODELS",
    "TINY_VERSION",
    "build_tiny",
    "cache_root",
    "ensure_tiny",
    "tiny_root",
    "write_lycoris",
]
