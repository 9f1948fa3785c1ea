"""The embedded measures' models: a tiny random CLIP and DINOv2 with their processors, and small concept folders,
built on first use into the cache (sweep.metrics.builtin=tiny_metrics), for tests and README's demo.

The CLIP reads the tiny SD models' own word list (tokenizer.py); both run on 32x32 inputs. Weights come from the
seeded draws of noise.py and the concept images from seeded integer draws, so two builds hold the same files.
Nothing is downloaded. The folder:

    clip/       CLIPModel (config.json, model.safetensors) and CLIPProcessor (its image processor, tokenizer)
    dinov2/     Dinov2Model and its BitImageProcessor
    concepts/   ink/, grain/ (LoRAs of the tiny SD models), alf/ (a TI): three 64x64 PNGs each
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.tiny.noise import EMBEDDING_STD, reinit, seeded_generator, uniform
from batchgen.tiny.tokenizer import EOS, MAX_TOKENS, load_tokenizer, write_bpe_files

if TYPE_CHECKING:
    import numpy as np
    import torch

NAME = "tiny_metrics"
VERSION = "v1"
_IMAGE_SIZE = 32
_PATCH = 8
_WIDTH = 32
_LAYERS = 2
_HEADS = 2
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# Parameters the libraries initialise to constants (the same on every machine): kept as they are.
_CONSTANT = ("logit_scale", "lambda1", "mask_token")
CONCEPTS = ("alf", "grain", "ink")
_CONCEPT_IMAGES = 3
_CONCEPT_SIZE = 64


def build_tiny_metrics(dest: Path) -> None:
    """Write clip/, dinov2/ and concepts/ into `dest`."""
    import torch

    from batchgen.library_log import settle
    from batchgen.tiny.build import pin_library_versions

    settle()
    dest = Path(dest)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        _clip(dest / "clip")
        _dinov2(dest / "dinov2")
    for name in CONCEPTS:
        _concept_images(name, dest / "concepts" / name)
    pin_library_versions(dest)


def _clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = load_tokenizer(folder, EOS)
    tower = {"hidden_size": _WIDTH, "intermediate_size": 2 * _WIDTH, "num_hidden_layers": _LAYERS}
    config = CLIPConfig(
        text_config={
            **tower,
            "num_attention_heads": _HEADS,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TOKENS,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**tower, "num_attention_heads": _HEADS, "image_size": _IMAGE_SIZE, "patch_size": _PATCH},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    _reinit(model, "tiny_metrics/clip")
    model.save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    images.save_pretrained(folder)  # preprocessor_config.json too, where transformers 4 looks for it
    write_bpe_files(folder)  # transformers 5 saves only tokenizer.json; keep the plain BPE files too


def _dinov2(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=_WIDTH,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        mlp_ratio=2,
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH,
    )
    model = Dinov2Model(config).eval()
    _reinit(model, "tiny_metrics/dinov2")
    model.save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
        do_center_crop=True,
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
    ).save_pretrained(folder)


def _reinit(model: torch.nn.Module, seed: str) -> None:
    """noise.reinit for every Linear, Conv2d and Embedding; the other own parameters of a module (class tokens,
    position tables) get the same uniform draws at an embedding's scale, the library's constants stay."""
    import torch

    generator = seeded_generator(seed)
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for _, module in model.named_modules():
        if isinstance(module, layers):
            reinit(module, generator)
        elif not isinstance(module, norms):
            for name, param in module.named_parameters(recurse=False):
                if name not in _CONSTANT:
                    param.copy_(uniform(tuple(param.shape), EMBEDDING_STD, generator))


def _concept_images(name: str, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(_CONCEPT_IMAGES):
        pixels = _pattern(name, i)
        Image.fromarray(pixels, "RGB").save(folder / f"{name}-{i + 1}.png", optimize=False, compress_level=6)


def _pattern(name: str, index: int) -> np.ndarray:
    """A 64x64 picture with a look of its own per concept: dark strokes on paper (ink), grey film grain (grain),
    a coloured face-like disc (alf). Integer draws only, so every machine writes the same pixels."""
    import numpy as np

    rng = np.random.default_rng(zlib.crc32(f"tiny_metrics/{name}/{index}".encode()))
    size = _CONCEPT_SIZE
    y, x = np.mgrid[0:size, 0:size]
    if name == "ink":
        pixels = np.full((size, size, 3), 240, dtype=np.int64)
        for _ in range(6):
            x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for t in range(steps + 1):
                px, py = x0 + (x1 - x0) * t // steps, y0 + (y1 - y0) * t // steps
                pixels[max(0, py - 1) : py + 1, max(0, px - 1) : px + 1] = 20
    elif name == "grain":
        base = int(rng.integers(90, 160))
        pixels = np.repeat((base + rng.integers(-40, 41, (size, size)))[..., None], 3, axis=2)
    else:
        colour = rng.integers(60, 230, 3)
        cx, cy, r = (int(v) for v in (*rng.integers(24, 40, 2), rng.integers(16, 24)))
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
        pixels = np.where(inside[..., None], colour, 30 + (x + y)[..., None] // 2)
        for ex in (cx - r // 3, cx + r // 3):  # two eyes
            pixels[cy - r // 4 - 2 : cy - r // 4 + 2, ex - 2 : ex + 2] = 10
    return np.clip(pixels, 0, 255).astype(np.uint8)
