"""Typed records that cross module boundaries: plan -> executor -> engine -> manifest.

Nothing here imports torch or Hydra, so every layer can share them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from batchgen.settings import SETTINGS, JobId

# The stack of a reference job that no stack of the sweep renders (sweep.references); the parentheses keep it
# apart from any stack a user can name.
REFERENCE_STACK = "(reference)"
STAGES = ("load", "patch", "encode", "denoise", "decode", "write")  # RenderResult.timings, the `timings` cell


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
    format: str = ""  # the key family (flux | sd3 | kohya | peft), plus the layer types: lora, loha, lokr, dora, full
    # What --list names: the key layout (kohya, PEFT/diffusers, BFL/ComfyUI, XLabs, SGM/ComfyUI; " + " for a mix)
    # and the layer types (LoRA, LoCon, LoHa, LoKr, DoRA, full).
    layout: str = ""
    layer_types: tuple[str, ...] = ()
    base: str | None = None
    rank: int | None = None
    modules: tuple[tuple[str, int], ...] = ()  # (component, modules hit)
    tags: str = ""  # most frequent kohya training tags
    trigger: str = ""  # the file's own trigger words (modelspec.trigger_phrase, else its most frequent tag)
    blocks: tuple[str, ...] = ()  # the LoRA Block Weight ids its modules sit in (for job_id)
    # The same per pipeline component: (component, block ids its modules there sit in), for each component it hits.
    component_blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    epoch: int | None = None  # kohya's ss_epoch: which training epoch the file was saved at
    steps: int | None = None  # kohya's ss_steps: training steps up to that save


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
class ComponentFile:
    """A whole-file VAE or text encoder a model config names (`vae:`, `text_encoders:`), read in place of the
    checkpoint's own component."""

    component: str  # vae | text_encoder | text_encoder_2 | text_encoder_3
    path: Path
    kind: str  # vae | clip | t5: the layout batchgen.assets.component_files reads
    sha256: str


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
    lora_dirs: tuple[Path, ...] = ()  # the folders LoRA names were looked up in (for errors)
    # Whole-file components replacing the checkpoint's own; checkpoint_sha256 then hashes them too.
    components: tuple[ComponentFile, ...] = ()
    dtype: str | None = None  # models.X.dtype, a name of engine_options.DTYPES; None: run.dtype
    # Each offload plan's estimated peak bytes per device kind, from planning (batchgen/plan/memory.py): what a
    # worker chooses from for run.offload=auto once it knows its device's memory. Empty: not planned.
    memory_peaks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    embedding_dirs: tuple[Path, ...] = ()  # the folders and files TIs were looked up in (--watch watches both)

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
    """A LoRA in a stack; a plain weight w is unet=w, text_encoder=w. Its manifest text: batchgen.cells.LoraEntry."""

    name: str
    unet: float
    text_encoder: float
    # LoRA Block Weight: the preset or vector as written (`OUTD`, `1,0,0,...`); "" for none. `blocks` is it
    # resolved for the model's base (the long vector, batchgen.assets.block_weights), set by the planner.
    blocks_spec: str = ""
    blocks: tuple[float, ...] = ()


@dataclass(frozen=True)
class Contribution:
    """What one LoRA file puts into one pipeline component's weights: its weight there and, with block weights, the
    factor of each block its modules in that component sit in, listed only where it is not 1. `sha256`: the file's
    bytes, so that a file rewritten under its name (a trainer's final save over an earlier one) is another state
    for the patcher and every cache ("": not known, as in states built by hand)."""

    lora: str
    weight: float
    blocks: tuple[tuple[str, float], ...] = ()
    sha256: str = ""


@dataclass(frozen=True)
class LoraState:
    """A job's LoRAs as the weights see them: per pipeline component that any of its LoRA files patch, the
    contributions there (sorted by LoRA name, zero weights left out).

    The one definition of "a job's LoRA state", computed by the planner (batchgen.plan.lora_state): the patcher
    writes it, the prompt cache keys text encodings on its text-encoder part, batches, work units and the render
    order group jobs by it. Two jobs with equal states hold bitwise equal weights."""

    components: tuple[tuple[str, tuple[Contribution, ...]], ...] = ()

    def of(self, component: str) -> tuple[Contribution, ...]:
        return dict(self.components).get(component, ())

    def excluding(self, components: Collection[str]) -> LoraState:
        """The part that reaches the other components (the text encoders', without the denoiser)."""
        return LoraState(tuple((c, parts) for c, parts in self.components if c not in components))

    @property
    def loras(self) -> tuple[str, ...]:
        """The LoRA files the state needs loaded, each once, in name order."""
        return tuple(sorted({part.lora for _, parts in self.components for part in parts}))

    @property
    def files(self) -> dict[str, str]:
        """LoRA name -> the sha256 of the file the state holds under it ("" where not known)."""
        return {part.lora: part.sha256 for _, parts in self.components for part in parts}

    def pairs(self) -> dict[tuple[str, str], Contribution]:
        """(component, LoRA) -> contribution: what a switch between two states compares."""
        return {(c, part.lora): part for c, parts in self.components for part in parts}


def _job_fields() -> list[tuple[str, type, Any]]:
    settings = [
        # A setting hashed only off its default came after Job was first written: keyword-only, so that adding one
        # never shifts a positional argument.
        (s.name, s.type, field(default=s.value_default, kw_only=s.job_id is not JobId.ALWAYS))
        for s in SETTINGS
    ]
    return [
        ("job_id", str, field()),
        ("model", str, field()),
        ("prompt", str, field()),
        ("negative_prompt", str, field()),
        *settings,
        ("loras", tuple[LoraWeight, ...], field(default=())),
        # Required, so that no job can reach the engine with LoRAs but no state: batchgen.plan.lora_state builds it.
        ("lora_state", LoraState, field(kw_only=True)),
    ]


Job = make_dataclass(
    "Job",
    _job_fields(),
    frozen=True,
    namespace={
        "__module__": __name__,  # where pickle finds it (workers receive jobs pickled)
        "__doc__": "Everything that determines one image's pixels, plus the model it runs on: each render setting "
        "of batchgen.settings is a field, with its default.",
    },
)


@dataclass
class RenderResult:
    job_id: str
    image: object | None  # a PIL image; typed loosely so this module stays free of heavy imports
    seconds: float
    worker: str
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    degenerate: str = ""  # for a failed image: `nonfinite` when the latents or pixels held NaN or inf
    dtype: str = ""  # what the job computed in (fp16, bf16, fp32); empty when it failed before its model loaded


def format_number(value: float) -> str:
    """Shortest text that reads back as the same float (0.5, 1, 0.75), for labels and the manifest."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
