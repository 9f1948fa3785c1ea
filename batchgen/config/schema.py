"""The config schema: typed dataclasses registered in Hydra's ConfigStore, what `--cfg` prints."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any

from omegaconf import MISSING

from batchgen.settings import in_section


@dataclass
class ModelConfig:
    base: str = MISSING  # sd-1 | sd-2 | sdxl
    checkpoint: str = MISSING  # diffusers folder or single file; relative to <root>/main when root is set
    root: str | None = None  # InvokeAI per-base layout: <root>/main, <root>/embedding, <root>/lora
    embeddings: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    builtin: str | None = None  # an embedded tiny model, built on first use when root is not given
    triggers: dict[str, str] = field(default_factory=dict)  # TI file name -> trigger, where the stem will not do
    variant: str | None = None  # diffusers folders: load the `*.fp16.safetensors` (etc.) weights beside the others
    # Single files only: a diffusers-layout folder of component configs (default: batchgen's for the base), the
    # tokenizer folder (default: the config folder's, else the Hugging Face cache), and the scheduler's prediction
    # type (default: the config's; v_prediction for sd-2, whose 768 models are the common ones).
    config: str | None = None
    tokenizer: str | None = None
    prediction_type: str | None = None
    # Whole-file components read in place of the checkpoint's own, as ComfyUI keeps them: a VAE file (models/vae)
    # and text encoder files by component ({text_encoder: clip_l.safetensors, text_encoder_2: t5xxl.safetensors});
    # relative to root when root is set. Each is built from the config folder's component config.
    vae: str | None = None
    text_encoders: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None  # this model's run.dtype (auto, fp16, bf16, fp32); null: run.dtype


@dataclass
class GridConfig:
    # Axes (batchgen.axes.choices): model, stack, prompt, a prompt slot, each grid setting of batchgen.settings
    # (seed, steps, ...), weight:LORA
    x: str = "stack"
    y: str = "prompt"
    z: str | None = None  # sub-grids side by side, one per value


@dataclass
class MetricsConfig:
    """sweep.metrics: local model folders and concept images for clip_t, clip_i and dino_i; all optional, and
    without them nothing extra loads. Relative paths are read under the builtin set's folder when one is named."""

    builtin: str | None = None  # tiny_metrics: the embedded tiny CLIP, DINOv2 and concept folders, built on first use
    clip: str | None = None  # a transformers CLIPModel folder with its processor -> clip_t, clip_i
    dino: str | None = None  # a transformers DINO/DINOv2 (AutoModel) folder with its image processor -> dino_i
    concepts: dict[str, str] = field(default_factory=dict)  # a LoRA or TI name -> a folder of its training images


@dataclass
class ReportConfig:
    max_grid_megapixels: float = 64.0  # a larger grid is split into pages


def _setting_fields(section: str) -> list[tuple[str, Any, Any]]:
    """The render settings of one section (batchgen.settings). An axis takes a scalar or a list, typed Any: the
    planner checks the values, with better messages than OmegaConf's."""
    out = []
    for s in in_section(section):
        if isinstance(s.default, tuple):  # a list default: each config gets its own
            default = field(default_factory=lambda values=s.default: list(values))
        else:
            default = field(default=s.default)
        out.append((s.field, Any if s.axis else s.type, default))
    return out


SweepConfig = make_dataclass(
    "SweepConfig",
    [
        ("name", str, field(default=MISSING)),
        ("models", list[str], field(default_factory=list)),  # empty: every model the sweep selected
        ("prompts", list[str], field(default_factory=list)),  # and/or prompts_file; at least one prompt in all
        # .txt, one per line, or .csv: prompt[, negative_prompt][, seed], zipped
        ("prompts_file", str | None, field(default=None)),
        ("slots", dict[str, list[str]], field(default_factory=dict)),
        ("negative_prompt", str, field(default="")),
        # Empty means a single stack with no LoRA; a default `none` here would be merged into every sweep's stacks.
        ("stacks", dict[str, dict[str, Any]], field(default_factory=dict)),
        *_setting_fields("sweep"),  # seeds, steps, guidance_scale, ...
        # Words put before the prompt of every job whose stack has that LoRA: {ink: "ink drawing"}; "" adds none.
        ("lora_triggers", dict[str, str], field(default_factory=dict)),
        # Also for LoRAs not in lora_triggers, from the file's training metadata.
        ("add_lora_triggers", bool, field(default=False)),
        # Named LoRA Block Weight vectors for `blocks:` (the extension's user presets): {MYPRESET: "1,0,0,..."}.
        ("block_presets", dict[str, str], field(default_factory=dict)),
        # Render each LoRA job's no-LoRA twin too (same prompt text, seed, settings), so effect and ssim can be
        # measured against it; usually the `none` stack holds them already.
        ("references", bool, field(default=True)),
        ("metrics", MetricsConfig, field(default_factory=MetricsConfig)),
        ("batch_size", Any, field(default="auto")),
        ("grid", GridConfig, field(default_factory=GridConfig)),
    ],
    namespace={"__module__": __name__},
)

RunConfig = make_dataclass(
    "RunConfig",
    [
        ("out_dir", str, field(default="runs/${sweep.name}")),
        ("dtype", str, field(default="auto")),  # auto: each base's on CUDA (bf16 FLUX.1/SD3, fp16 else), fp32 on CPU
        # Where each model's components live while it renders: auto (the fastest plan that fits the device's
        # memory), none (all on the device), encoders (texts encoded first, then the encoders leave), model or
        # sequential (diffusers' CPU offload).
        ("offload", str, field(default="auto")),
        # The device memory plans are made for, in GB; null: the device's total (on CPU: no limit, no plan).
        ("gpu_memory_gb", float | None, field(default=None)),
        # compute: weights in the compute dtype; fp8: the denoiser's linear weights stored in float8 (e4m3).
        ("weights", str, field(default="auto")),
        # torch.compile the UNet: slower start, faster steps on long GPU sweeps.
        ("compile", bool, field(default=False)),
        # A bigger sweep needs --yes: a typo in an axis should not start a week of rendering.
        ("max_jobs", int, field(default=10000)),
        # Intra-op threads per CPU worker; null: the cores split between workers. CPU pixels depend on it (oneDNN
        # picks convolution kernels by thread count), so fix it to compare runs with different worker counts.
        ("threads", int | None, field(default=None)),
        *_setting_fields("run"),  # truncate_prompts
    ],
    namespace={"__module__": __name__},
)


@dataclass
class Config:
    models: dict[str, ModelConfig] = field(default_factory=dict)
    sweep: SweepConfig = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    # Filled from the executor group (conf/executor/*.yaml); each executor types its own keys (executors/registry.py).
    executor: Any = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass(frozen=True)
class Composed:
    """The result of composition: the typed config and what produced it."""

    config: Config
    container: dict[str, Any]  # resolved plain-dict form, for --cfg and the run record
    overrides: list[str]
