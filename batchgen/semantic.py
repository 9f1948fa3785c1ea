"""Image and text features from local transformers folders, for clip_t, clip_i and dino_i (sweep.metrics).

Each model is loaded from its folder on first use, with the folder's own processor (resize, crop, normalize and, for
CLIP's text, its tokenizer cutting at the model's token limit), in fp32 on the CPU, so that the numbers are those a
short transformers script gives. Features come back L2-normalized; a cosine is then their dot product:
- clip_t = 100 * max(0, cos(CLIP image features, CLIP text features)) (torchmetrics' CLIPScore),
- clip_i / dino_i = the mean over concept images of cos(image, concept image), with CLIP's image features or the
  DINO model's CLS token (the first token of last_hidden_state).
torch and transformers are imported here only when a model is first used: a run without sweep.metrics never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BATCH = 16  # images or texts per forward pass


def read_image(path: Path) -> Any:
    """The PNG (or concept image) as written, as RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


class _Model:
    """One model folder, loaded on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._loaded: tuple[Any, Any] | None = None

    def loaded(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from batchgen.library_log import settle

            settle()
            self._loaded = self._load()
        return self._loaded

    def _load(self) -> tuple[Any, Any]:
        raise NotImplementedError


class ClipModel(_Model):
    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoProcessor, CLIPModel

        model = CLIPModel.from_pretrained(self.folder, local_files_only=True, dtype=torch.float32).eval()
        return model, AutoProcessor.from_pretrained(self.folder, local_files_only=True)

    def images(self, paths: Sequence[Path]) -> torch.Tensor:
        model, processor = self.loaded()

        def features(chunk: Sequence[Path]) -> torch.Tensor:
            inputs = processor(images=[read_image(p) for p in chunk], return_tensors="pt")
            return _pooled(model.get_image_features(pixel_values=inputs["pixel_values"]))

        return _normalized(_chunked(paths, features))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        model, processor = self.loaded()
        limit = model.config.text_config.max_position_embeddings

        def features(chunk: Sequence[str]) -> torch.Tensor:
            tokens = processor(text=list(chunk), padding=True, truncation=True, max_length=limit, return_tensors="pt")
            return _pooled(
                model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            )

        return _normalized(_chunked(texts, features))


class DinoModel(_Model):
    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoImageProcessor, AutoModel

        model = AutoModel.from_pretrained(self.folder, local_files_only=True, dtype=torch.float32).eval()
        return model, AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)

    def images(self, paths: Sequence[Path]) -> torch.Tensor:
        model, processor = self.loaded()

        def features(chunk: Sequence[Path]) -> torch.Tensor:
            inputs = processor(images=[read_image(p) for p in chunk], return_tensors="pt")
            return model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]

        return _normalized(_chunked(paths, features))


def clip_score(image: torch.Tensor, text: torch.Tensor) -> float:
    """100 * max(0, cos): torchmetrics' CLIPScore of one image and one text, from normalized features."""
    return 100.0 * max(0.0, float(image @ text))


def mean_similarity(image: torch.Tensor, concepts: torch.Tensor) -> float:
    """The mean cosine of one image's normalized features with each row of `concepts`."""
    return float((concepts @ image).mean())


def _chunked(items: Sequence, features) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return torch.cat([features(items[i : i + BATCH]) for i in range(0, len(items), BATCH)]).float()


def _pooled(output: Any) -> torch.Tensor:
    """get_*_features returns the projected tensor (transformers 4) or an output holding it (transformers 5)."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(p=2, dim=-1, keepdim=True)
