"""Typed records that cross module boundaries: plan -> executor -> engine -> manifest.

Nothing here imports torch or Hydra, so every layer can share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The manifest's fixed columns, in order; one column per prompt slot follows (other tools read these names).
MANIFEST_COLUMNS = (
    "job_id",
    "status",
    "model",
    "base",
    "prompt",
    "negative_prompt",
    "embeddings",
    "loras",
    "seed",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "scheduler",
    "image",
    "image_sha256",
    "seconds",
    "worker",
    "finished_at",
    "error",
    "stack",
    "prompt_template",
    "timings",  # per-stage seconds of this image, shared costs divided: load=..;patch=..;encode=..;...
    "clip_skip",  # A1111's count: 1 reads the encoder's last layer, 2 the one before
    "lora_triggers",  # `name:words` pairs joined by `;`: what was put before the prompt for the job's LoRAs
)
STAGES = ("load", "patch", "encode", "denoise", "decode", "write")


@dataclass(frozen=True)
class EmbeddingFile:
    trigger: str  # without the angle brackets
    path: Path
    sha256: str = ""  # filled when the file is inspected (only files a sweep uses, or all for --list)
    format: str = ""  # a1111 | diffusers | emb_params | sdxl
    vectors: int = 0
    base: str | None = None


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    sha256: str = ""
    format: str = ""  # kohya | peft, plus the layer types found: lora, loha, lokr, dora, full
    base: str | None = None
    rank: int | None = None
    modules: tuple[tuple[str, int], ...] = ()  # (component, modules hit)
    tags: str = ""  # most frequent kohya training tags
    trigger: str = ""  # the file's own trigger words (modelspec.trigger_phrase, else its most frequent tag)


@dataclass(frozen=True)
class Refused:
    """An asset file not offered to a model, and why. `fatal`: the file is broken, not just for another base."""

    kind: str  # embedding | lora
    name: str
    path: Path
    reason: str
    fatal: bool = False
    base: str | None = None  # set when the file is fine but for another SD version


@dataclass(frozen=True)
class SingleFile:
    """What a single-file checkpoint needs beside its weights to become a diffusers pipeline."""

    config_dir: Path  # diffusers layout: model_index.json and each component's config (batchgen's, or the user's)
    tokenizers: tuple[tuple[str, Path], ...]  # (tokenizer component, folder)
    prediction_type: str | None = None  # overrides the scheduler config's (SD 2.x 768 is v_prediction)


@dataclass(frozen=True)
class ModelSpec:
    """One SD version as the engine needs it: resolved paths, no config objects."""

    name: str
    base: str
    checkpoint: Path
    checkpoint_sha256: str
    embeddings: tuple[EmbeddingFile, ...] = ()
    loras: tuple[LoraFile, ...] = ()
    refused: tuple[Refused, ...] = ()
    # Every (kind, name) found on disk, inspected or not: typo checks and "did you mean" look here.
    discovered: tuple[tuple[str, str], ...] = ()
    listed_triggers: tuple[str, ...] = ()  # TIs the config names file by file (not found in a folder)
    single_file: SingleFile | None = None  # set for an A1111/ComfyUI single file, None for a diffusers folder
    models_root: Path | None = None  # the configured root, scanned by --list for every checkpoint in it
    variant: str | None = None  # a diffusers folder's weight variant (fp16): other weights, other pixels

    @property
    def config_dir(self) -> Path:
        """The folder holding the component configs: the checkpoint itself, or a single file's config folder."""
        return self.single_file.config_dir if self.single_file else self.checkpoint

    def lora(self, name: str) -> LoraFile | None:
        return next((f for f in self.loras if f.name == name), None)

    def embedding(self, trigger: str) -> EmbeddingFile | None:
        return next((f for f in self.embeddings if f.trigger == trigger), None)

    def refusal(self, kind: str, name: str) -> Refused | None:
        return next((r for r in self.refused if r.kind == kind and r.name == name), None)


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA in a stack; a plain weight w is unet=w, text_encoder=w."""

    name: str
    unet: float
    text_encoder: float

    @property
    def label(self) -> str:
        """`name:w`, or `name:unet_w/te_w` for a split weight (the manifest's notation)."""
        if self.unet == self.text_encoder:
            return f"{self.name}:{format_number(self.unet)}"
        return f"{self.name}:{format_number(self.unet)}/{format_number(self.text_encoder)}"


@dataclass(frozen=True)
class Job:
    """Everything that determines one image's pixels, plus the model it runs on."""

    job_id: str
    model: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str = "default"
    loras: tuple[LoraWeight, ...] = ()
    truncate_prompts: bool = False  # cut a text at the encoder's 77 tokens instead of chunking it as A1111 does
    clip_skip: int = 1  # A1111's count (1: the last layer); diffusers' clip_skip is one less


@dataclass
class RenderResult:
    job_id: str
    image: object | None  # a PIL image; typed loosely so this module stays free of heavy imports
    seconds: float
    worker: str
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def format_number(value: float) -> str:
    """Shortest text that reads back as the same float (0.5, 1, 0.75), for labels and the manifest."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
