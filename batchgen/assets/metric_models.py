"""sweep.metrics' local folders: a CLIP model, a DINO model and each concept's training images, checked on disk
before anything loads (one line naming the key and the fix), and which concepts a job carries.

Pure file checks: config.json is read, image headers are opened with Pillow; no torch, no transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from batchgen.errors import BatchgenError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What a model folder needs besides config.json: its weights in one of transformers' layouts.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_CLIP_TYPES = ("clip",)  # a CLIPModel: both towers (clip_vision_model / clip_text_model folders hold one)
# DINO (v1 is a ViTModel), DINOv2 (with or without registers) and DINOv3's ViT: their CLS token is the first token.
_DINO_TYPES = ("dinov2", "dinov2_with_registers", "vit", "dinov3_vit")
_FIX_CLIP = "give a local transformers CLIPModel folder (hf download openai/clip-vit-large-patch14 --local-dir DIR)"
_FIX_DINO = "give a local transformers DINO or DINOv2 folder (hf download facebook/dinov2-small --local-dir DIR)"
# kohya's trainer saves a LoRA's epochs as NAME-000004; the concept NAME covers them.
_EPOCH_SUFFIX = r"[-_.]\d+"


@dataclass(frozen=True)
class Concept:
    name: str  # a LoRA name or a TI trigger
    folder: Path
    images: tuple[Path, ...]  # every image under the folder, sorted by path


@dataclass(frozen=True)
class MetricModels:
    """sweep.metrics, checked: None where not given."""

    clip: Path | None = None
    dino: Path | None = None
    concepts: tuple[Concept, ...] = ()

    def carried(self, loras: Iterable[str], triggers: Iterable[str]) -> tuple[Concept, ...]:
        """The concepts a job carries, each once, by name: its LoRAs' and its TIs'. A LoRA file takes the concept of
        its own name, else of its name without a trainer's epoch suffix (`mylora-000004` -> `mylora`)."""
        by_name = {c.name: c for c in self.concepts}
        found = {name: by_name[name] for name in triggers if name in by_name}
        for lora in loras:
            concept = concept_of(lora, by_name)
            if concept is not None:
                found[concept] = by_name[concept]
        return tuple(found[name] for name in sorted(found))


def concept_of(lora: str, names: Iterable[str]) -> str | None:
    """The concept name that covers LoRA file `lora`: its own name, else the name its epoch suffix extends."""
    names = set(names)
    if lora in names:
        return lora
    return next((n for n in sorted(names) if re.fullmatch(re.escape(n) + _EPOCH_SUFFIX, lora)), None)


@dataclass(frozen=True)
class MetricFolders:
    """The folders as given, resolved (`~` expanded, a relative path under the builtin set's folder or the working
    directory); `where` names each in errors: `sweep.metrics.clip`, `--clip`, `--concept ink`."""

    clip: Path | None = None
    dino: Path | None = None
    concepts: dict[str, Path] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)  # clip, dino, or a concept's name -> its key


def folder(value: str | None, root: Path | None = None) -> Path | None:
    """A configured path: None or "" for none, `~` expanded, a relative one read under `root` (a builtin set's
    folder) when given, else the working directory."""
    if value is None or str(value) == "":
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() or root is None else root / path


def metric_models(folders: MetricFolders) -> MetricModels | None:
    """The folders checked; None when none is given."""
    if folders.clip is None and folders.dino is None and not folders.concepts:
        return None
    where = {"clip": "sweep.metrics.clip", "dino": "sweep.metrics.dino"} | folders.where
    return MetricModels(
        clip=_model_folder(folders.clip, where["clip"], _CLIP_TYPES, "CLIP", _FIX_CLIP, tokenizer=True),
        dino=_model_folder(folders.dino, where["dino"], _DINO_TYPES, "DINO", _FIX_DINO, tokenizer=False),
        concepts=tuple(
            _concept(name, path, where.get(name, f"sweep.metrics.concepts.{name}"))
            for name, path in folders.concepts.items()
        ),
    )


def notes(models: MetricModels, where: str = "sweep.metrics") -> list[str]:
    """Settings that measure nothing: said as warnings, since the run is still valid."""
    out = []
    if models.concepts and models.clip is None and models.dino is None:
        out.append(f"{where}.concepts: no CLIP or DINO model to compare with; give {where}.clip and/or {where}.dino")
    if models.dino is not None and not models.concepts:
        out.append(f"{where}.dino: no concepts, so dino_i stays empty; give {where}.concepts (NAME: folder)")
    return out


def _model_folder(
    folder: Path | None, where: str, types: tuple[str, ...], kind: str, fix: str, tokenizer: bool
) -> Path | None:
    if folder is None:
        return None
    if not folder.is_dir():
        raise BatchgenError(f"{where}: {folder} is not a folder; {fix}")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise BatchgenError(f"{where}: {folder} has no readable config.json; {fix}") from None
    if model_type not in types:
        raise BatchgenError(
            f"{where}: {folder} holds a {model_type or 'model without a model_type'} model (config.json), not "
            f"{kind} ({', '.join(types)}); {fix}"
        )
    if not any((folder / name).is_file() for name in _WEIGHTS):
        raise BatchgenError(f"{where}: {folder} has no weights ({' or '.join(_WEIGHTS[::2])}); {fix}")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise BatchgenError(
            f"{where}: {folder} has no preprocessor_config.json (its image processor); copy it from the model's "
            "repository into the folder"
        )
    has_tokenizer = (folder / "tokenizer.json").is_file() or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if tokenizer and not has_tokenizer:
        raise BatchgenError(
            f"{where}: {folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); copy them from the "
            "model's repository into the folder"
        )
    return folder


def _concept(name: str, folder: Path, where: str) -> Concept:
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise BatchgenError(f"{where}: {folder} is not a folder; give the folder of {name}'s training images")
    images = tuple(sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not images:
        raise BatchgenError(
            f"{where}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put {name}'s training images there"
        )
    for image in images:
        try:
            with Image.open(image):
                pass
        except (OSError, UnidentifiedImageError):
            raise BatchgenError(f"{where}: {image} is not an image Pillow can read; remove it or replace it") from None
    return Concept(name, folder, images)
