"""Load a model once, register its textual inversions once, and switch schedulers and LoRA stacks in place."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from batchgen.assets.tensors import embedding_vectors, read_state_dict
from batchgen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from batchgen.spec import LoraWeight, ModelSpec


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere: CPU half precision is slow and imprecise."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return table[name]


def quiet_libraries() -> None:
    """diffusers and transformers draw their own progress bars and warn about choices we make on purpose
    (no safety checker, no torchvision); batchgen reports progress itself."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()


def load_pipeline(spec: ModelSpec, device: str, dtype: torch.dtype):
    """A diffusers pipeline from a local folder; never touches the network."""
    from diffusers import DiffusionPipeline

    quiet_libraries()
    index = json.loads((Path(spec.checkpoint) / "model_index.json").read_text())
    extra = {}
    if "safety_checker" in index:
        # A sweep renders many images unattended; the checker would black out some of them at random.
        extra = {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(str(spec.checkpoint), dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def register_embeddings(pipe, spec: ModelSpec) -> None:
    """Add every TI's trigger token(s) to the tokenizer(s) once; prompts without the trigger are unaffected."""
    encoders = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}
    for ti in spec.embeddings:
        vectors = embedding_vectors(read_state_dict(ti.path), ti.path)
        for key, tensor in vectors.items():
            encoder_name, tokenizer_name = encoders[key]
            pipe.load_textual_inversion(
                tensor,
                token=f"<{ti.trigger}>",
                text_encoder=getattr(pipe, encoder_name),
                tokenizer=getattr(pipe, tokenizer_name),
            )


class SchedulerSwitch:
    """Keeps the checkpoint's own scheduler config so every named scheduler derives from it."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.original = pipe.scheduler
        self.current = DEFAULT_SCHEDULER

    def use(self, name: str) -> None:
        if name == self.current:
            return
        if name == DEFAULT_SCHEDULER:
            self.pipe.scheduler = self.original
        else:
            import diffusers

            choice = SCHEDULERS[name]
            cls = getattr(diffusers, choice.cls)
            self.pipe.scheduler = cls.from_config(self.original.config, **choice.kwargs)
        self.current = name


class DiffusersLoras:
    """LoRA stacks through diffusers' PEFT adapters: each file loaded once, stacks switched by set_adapters."""

    def __init__(self, pipe, spec: ModelSpec) -> None:
        self.pipe = pipe
        self.spec = spec
        self.loaded: set[str] = set()
        self.current: tuple[LoraWeight, ...] | None = None

    def use(self, stack: tuple[LoraWeight, ...]) -> None:
        if stack == self.current:
            return
        for lw in stack:
            self._load(lw.name)
        if not stack:
            if self.loaded:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([lw.name for lw in stack], adapter_weights=[self._weights(lw) for lw in stack])
        self.current = stack

    def _load(self, name: str) -> None:
        if name in self.loaded:
            return
        lora = self.spec.lora(name)
        assert lora is not None, f"planner let an unknown LoRA through: {name}"
        # Read here rather than by diffusers so pickles go through weights_only loading.
        state_dict = read_state_dict(lora.path)
        with warnings.catch_warnings():
            # PEFT warns on every adapter after the first; several adapters per model is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.pipe.load_lora_weights(state_dict, adapter_name=name)
        self.loaded.add(name)

    def _weights(self, lw: LoraWeight) -> dict[str, float]:
        parts = self.pipe.get_list_adapters()
        weights = {}
        for component, adapters in parts.items():
            if lw.name in adapters:
                weights[component] = lw.unet if component in ("unet", "transformer") else lw.text_encoder
        return weights
