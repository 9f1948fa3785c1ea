"""Load a model once, register its textual inversions once, and switch schedulers and LoRA stacks in place."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from unittest import mock

import torch

from batchgen.assets.architecture import COMPONENTS, meta_denoiser
from batchgen.assets.bases import BY_NAME
from batchgen.assets.bases.record import Base, tokenizer_of
from batchgen.assets.tensors import checkpoint_state_dict, embedding_vectors, read_state_dict
from batchgen.engine.components import load_component_files
from batchgen.engine.fp8 import fp8_state, store_fp8
from batchgen.engine.patcher import WeightPatcher, load_lora_layers
from batchgen.engine_options import DTYPES
from batchgen.library_log import settle
from batchgen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from batchgen.spec import LoraState, ModelSpec


def resolve_dtype(name: str, base: Base, device: str) -> torch.dtype:
    """A run.dtype or models.X.dtype name (EngineOptions and model resolution checked it) as torch's dtype for a
    model of `base` on `device`: auto is the base's cuda_dtype on CUDA (bf16 for FLUX.1 and SD3, whose activations
    overflow fp16), fp32 elsewhere."""
    return getattr(torch, DTYPES[base.compute_dtype(name, device)])


def load_pipeline(spec: ModelSpec, device: str, dtype: torch.dtype, weights: str = "auto"):
    """A diffusers pipeline from a local folder or single file; never touches the network. `weights` is
    run.weights: under fp8 the denoiser's Linear weights are stored in fp8 before the model moves (engine/fp8.py)."""
    from diffusers import DiffusionPipeline

    settle()  # the libraries' notices go where batchgen.library_log routes them
    parts = load_component_files(spec, dtype)  # whole-file VAE / text encoders, in place of the checkpoint's own
    denoiser = BY_NAME[spec.base].denoiser
    if spec.single_file is not None:
        if denoiser == "transformer":
            pipe = load_transformer_single_file(spec, dtype, parts, weights)
        else:
            pipe = load_single_file(spec, dtype, parts)
        pipe.set_progress_bar_config(disable=True)
        if weights == "fp8":
            store_fp8(getattr(pipe, denoiser))
        return pipe.to(device)
    index = json.loads((Path(spec.checkpoint) / "model_index.json").read_text())
    extra = {}
    if "safety_checker" in index:
        # A sweep renders many images unattended; the checker would black out some of them at random.
        extra = {"safety_checker": None, "requires_safety_checker": False}
    if spec.variant is not None:
        extra["variant"] = spec.variant
    extra.update(_absent_text_encoders(Path(spec.checkpoint), spec.base))
    extra.update(parts)
    pipe = DiffusionPipeline.from_pretrained(str(spec.checkpoint), dtype=dtype, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    if weights == "fp8":
        store_fp8(getattr(pipe, denoiser))
    return pipe.to(device)


def load_single_file(spec: ModelSpec, dtype: torch.dtype, parts: dict | None = None):
    """An A1111/ComfyUI file through diffusers' converters, around a folder of configs and tokenizers put together
    here: diffusers reads every component's config and tokenizer from one diffusers-layout folder."""
    import diffusers

    single = spec.single_file
    if single is None:
        raise ValueError(f"{spec.checkpoint} is a diffusers folder (from_pretrained), not a single file")
    index = json.loads((single.config_dir / "model_index.json").read_text())
    with tempfile.TemporaryDirectory(prefix="batchgen-single-file-") as tmp:
        folder = Path(tmp)
        shutil.copy(single.config_dir / "model_index.json", folder / "model_index.json")
        for component, entry in index.items():
            source = single.config_dir / component
            if isinstance(entry, list) and "tokenizer" not in component and source.is_dir():
                (folder / component).mkdir()
                for config in source.glob("*.json"):
                    shutil.copy(config, folder / component / config.name)
        for component, tokenizer in single.tokenizers:
            (folder / component).symlink_to(tokenizer.resolve(), target_is_directory=True)
        if single.prediction_type is not None:
            scheduler = folder / "scheduler" / "scheduler_config.json"
            config = json.loads(scheduler.read_text())
            scheduler.write_text(json.dumps({**config, "prediction_type": single.prediction_type}))
        cls = getattr(diffusers, index["_class_name"])
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        extra.update(parts or {})
        with _weights_only(Path(spec.checkpoint)):
            return cls.from_single_file(
                str(spec.checkpoint), config=str(folder), torch_dtype=dtype, local_files_only=True, **extra
            )


def _absent_text_encoders(folder: Path, base: str) -> dict[str, None]:
    """None for each text encoder (and its tokenizer) the base may go without and the folder has not."""
    absent: dict[str, None] = {}
    for component in BY_NAME[base].optional_text_encoders:
        if not (folder / component / "config.json").is_file():
            # A folder without SD3's T5: diffusers conditions on zeros in its place when told it is absent.
            absent[component] = absent[component.replace("text_encoder", "tokenizer")] = None
    return absent


def load_transformer_single_file(
    spec: ModelSpec, dtype: torch.dtype, parts: dict | None = None, weights: str = "auto"
):
    """An SD3 or FLUX.1 transformer file in its original layout, converted by batchgen (assets/sd3_checkpoint.py,
    assets/flux_checkpoint.py), inside the rest of the pipeline from the `config:` folder (planning checked that
    every weight is there at its shape). The conversion renames and cuts views of the file's tensors, so under
    run.weights=fp8 an fp8 file's Linear weights reach the model as its own bytes, never copied to bf16."""
    import diffusers

    from batchgen.assets.single_file import convert_transformer

    single = spec.single_file
    if single is None:
        raise ValueError(f"{spec.checkpoint} is a diffusers folder (from_pretrained), not a single file")
    config = json.loads((single.config_dir / "transformer" / "config.json").read_text())
    transformer = meta_denoiser(config, spec.base)
    target = {key: tuple(value.shape) for key, value in transformer.state_dict().items()}
    state = checkpoint_state_dict(Path(spec.checkpoint))
    converted = convert_transformer(spec.base, state, target)
    if weights == "fp8":
        tensors = fp8_state(converted, transformer)
    else:
        tensors = {k: v.to(dtype) for k, v in converted.items()}
    transformer.load_state_dict(tensors, strict=True, assign=True)
    pipeline = getattr(diffusers, BY_NAME[spec.base].pipeline_class)
    return pipeline.from_pretrained(
        str(single.config_dir),
        transformer=transformer.eval(),
        dtype=dtype,
        local_files_only=True,
        **{**_absent_text_encoders(single.config_dir, spec.base), **(parts or {})},
    )


@contextlib.contextmanager
def _weights_only(checkpoint: Path):
    """A pickled checkpoint reaches diffusers as tensors batchgen unpickled weights-only: diffusers' pipeline
    from_single_file takes only a path and would run its own torch.load on the pickle. Patching the one loader it
    calls keeps its converters; if a diffusers release renames that loader, patch.object fails instead of
    letting diffusers unpickle the file."""
    if checkpoint.suffix.lower() == ".safetensors":
        yield
        return
    import diffusers.loaders.single_file

    state = checkpoint_state_dict(checkpoint)
    handed: list[str] = []

    def load(path, *args, **kwargs):
        if Path(path) != checkpoint:
            raise RuntimeError(f"diffusers asked for {path} while loading {checkpoint}")
        handed.append(str(path))
        return state

    with mock.patch.object(diffusers.loaders.single_file, "load_single_file_checkpoint", load):
        yield
    if not handed:
        # A diffusers that stops calling load_single_file_checkpoint would unpickle the file itself: refuse.
        raise RuntimeError("diffusers loaded the checkpoint without batchgen's weights-only state dict")


def register_embeddings(pipe, spec: ModelSpec) -> None:
    """Add every TI's trigger token(s) to the tokenizer(s) once; prompts without the trigger are unaffected."""
    encoders = BY_NAME[spec.base].embedding_encoders
    for ti in spec.embeddings:
        vectors = embedding_vectors(read_state_dict(ti.path), ti.path)
        for key, tensor in vectors.items():
            pipe.load_textual_inversion(
                tensor,
                token=f"<{ti.trigger}>",
                text_encoder=getattr(pipe, encoders[key]),
                tokenizer=getattr(pipe, tokenizer_of(encoders[key])),
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


class LoraStacks:
    """Switches LoRA stacks by patching weights; each LoRA file is read once, on first use."""

    def __init__(self, pipe, spec: ModelSpec, device: torch.device | None = None) -> None:
        self.spec = spec
        self.device = pipe.device if device is None else device  # where LoRA factors live (engine/placement.py)
        self.components = {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}
        self.unet_config = dict(getattr(pipe, BY_NAME[spec.base].denoiser).config)
        self.patcher = WeightPatcher(self.components, Path(spec.checkpoint), spec.base)
        self.current: LoraState | None = None
        self.loaded: dict[str, str] = {}  # LoRA name -> the sha256 of the file its layers were read from

    def use(self, state: LoraState) -> None:
        if state == self.current:
            return
        for name, sha256 in state.files.items():
            if name not in self.loaded or (sha256 and self.loaded[name] != sha256):
                lora = self.spec.lora(name)  # a later plan's spec (--watch: Renderer.update_models)
                if lora is None:
                    raise KeyError(f"model {self.spec.name} has no LoRA '{name}'; the planner skips such jobs")
                if sha256 and lora.sha256 != sha256:
                    raise RuntimeError(f"LoRA '{name}' ({lora.path}) is not the file its jobs were planned with")
                self.current = None  # replacing a file's layers unsettles the modules that hold them
                self.patcher.add(name, load_lora_layers(lora.path, self.components, self.unet_config, self.device))
                self.loaded[name] = lora.sha256
        self.current = None  # a switch that fails part-way leaves no stack in effect: the next use() must patch
        self.patcher.apply(state)
        self.current = state

    def use_part(self, state: LoraState, components: Collection[str]) -> None:
        """`state` in `components` only; every other component keeps what it holds (it may be off the device
        that holds the LoRA factors, engine/placement.py)."""
        held = self.current or LoraState()
        parts = [(c, p) for c, p in state.components if c in components]
        parts += [(c, p) for c, p in held.components if c not in components]
        self.use(LoraState(tuple(sorted(parts))))
