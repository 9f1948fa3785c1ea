"""The config schema: typed dataclasses registered in Hydra's ConfigStore, what `--cfg` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


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


@dataclass
class GridConfig:
    # Axes: model, stack, prompt, a prompt slot, seed, steps, guidance_scale, width, height, scheduler, weight:LORA
    x: str = "stack"
    y: str = "prompt"
    z: str | None = None  # sub-grids side by side, one per value


@dataclass
class ReportConfig:
    max_grid_megapixels: float = 64.0  # a larger grid is split into pages


@dataclass
class SweepConfig:
    name: str = MISSING
    models: list[str] = field(default_factory=list)  # empty: every model the sweep selected
    prompts: list[str] = field(default_factory=list)  # and/or prompts_file; at least one prompt in all
    prompts_file: str | None = None  # .txt, one per line, or .csv: prompt[, negative_prompt][, seed], zipped
    slots: dict[str, list[str]] = field(default_factory=dict)
    negative_prompt: str = ""
    # Empty means a single stack with no LoRA; a default `none` here would be merged into every sweep's stacks.
    stacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Scalars or lists (a list is an axis); checked by the planner, which gives better messages than OmegaConf.
    seeds: Any = field(default_factory=lambda: [1])
    steps: Any = 20
    guidance_scale: Any = 7.5
    width: Any = 512
    height: Any = 512
    scheduler: Any = None
    clip_skip: Any = 1  # A1111's count: 1 is the encoder's last layer, 2 the one before (an axis as a list)
    # Words put before the prompt of every job whose stack has that LoRA: {ink: "ink drawing"}; "" adds none.
    lora_triggers: dict[str, str] = field(default_factory=dict)
    add_lora_triggers: bool = False  # also for LoRAs not in lora_triggers, from the file's training metadata
    batch_size: Any = "auto"
    grid: GridConfig = field(default_factory=GridConfig)


@dataclass
class RunConfig:
    out_dir: str = "runs/${sweep.name}"
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the UNet: slower start, faster steps on long GPU sweeps
    max_jobs: int = 10000  # a bigger sweep needs --yes: a typo in an axis should not start a week of rendering
    # Intra-op threads per CPU worker; null: the cores split between workers. CPU pixels depend on it (oneDNN
    # picks convolution kernels by thread count), so fix it to compare runs with different worker counts.
    threads: int | None = None
    # A prompt past the encoder's 77 tokens is chunked as A1111 does; true cuts it there instead, with a warning.
    truncate_prompts: bool = False


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
