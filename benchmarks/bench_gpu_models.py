"""The GPU bench's models: full-size random pipelines from batchgen's shipped configs, the tiny ones for --tiny,
their LoRAs, and FLOPs counted on the meta device. Nothing is downloaded.

A full-size component is built directly on the device in its compute dtype (torch's default dtype set around the
constructor), so FLUX.1-dev's 12B transformer never exists in fp32 or twice in host memory.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_NAMES = ("gpu_a", "gpu_b", "gpu_c", "gpu_d")
LORA_RANK = 16
LORA_ALPHA = 8.0
# SD: kohya files on the UNet's and text encoders' attention projections.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# FLUX.1: diffusers/PEFT files on the transformer's attention (joint blocks' text stream too) and CLIP-L's, the
# modules FLUX LoRA trainers target by default.
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# A LoRA's delta at weight 1 has this share of a default-initialised weight's std: visible, never dominant.
LORA_STRENGTH = 0.1
# FLUX.1 pads T5 to max_sequence_length, 512 in FluxPipeline and in batchgen's default (0: the pipeline's own).
FLUX_TEXT_TOKENS = 512
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Arch:
    """One measured model variant: what it renders and in which precision."""

    key: str  # results key, sweep and model name: sd15, sdxl, flux, flux_fp8
    base: str  # batchgen base and model_configs folder
    tiny: str  # batchgen.tiny model for --tiny
    model: str  # the built model's folder: an fp8 variant renders its bf16 sibling's files
    size: int
    steps: int
    states: int  # the first this many of bench_gpu.STATES
    per_state: int
    guidance: float
    dtype: str  # compute dtype, a key of DTYPES (batchgen's run.dtype name)
    fp8: bool = False  # denoiser weights stored in float8 e4m3: batchgen run.weights=fp8, diffusers layerwise casting
    cards: tuple[int, ...] = ()  # GB of cards to run run.offload=auto for (run.gpu_memory_gb): what fits there
    min_memory_gb: float = 0.0  # device memory below which the diffusers contestants cannot hold it resident
    reserve_s: float = 0.0  # rough H100 seconds for its build, dry run and one run of each contestant
    share_s: float = 0.0  # its share of the time budget, optional runs included (bench_gpu_report.Budget)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_full(arch: Arch, root: Path, device: str) -> None:
    """The base's real architecture, built on the device (full_pipeline), saved as a diffusers folder under
    root/main/<model>, with this bench's LoRAs in root/lora."""
    devices = [device] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(1234)
        pipe = full_pipeline(arch, root / "main" / arch.model, device)
        pipe.save_pretrained(root / "main" / arch.model, safe_serialization=True)
        write_loras(pipe, root / "lora", arch)
    del pipe


def full_pipeline(arch: Arch, folder: Path, device: str):
    """Every component of the base from batchgen's shipped configs, default-initialised on ``device`` in the
    compute dtype (torch's default dtype while it is built: no fp32 copy), and batchgen's tiny tokenizers, which
    are written into ``folder``. On the meta device it builds the same modules without memory (a test does)."""
    import diffusers
    import transformers

    from batchgen.assets.bases.record import SHIPPED_CONFIGS
    from batchgen.tiny.t5 import write_t5_tokenizer
    from batchgen.tiny.tokenizer import EOS, SDXL_PAD, load_tokenizer

    configs = SHIPPED_CONFIGS / arch.base
    index = json.loads((configs / "model_index.json").read_text())
    parts: dict[str, object] = {}
    for name, spec in index.items():
        if name.startswith("tokenizer") and isinstance(spec, list):
            if spec[1].startswith("T5"):
                parts[name] = write_t5_tokenizer(folder / name)  # real T5's pad/eos/unk ids, a small vocabulary
            else:
                parts[name] = load_tokenizer(folder / name, SDXL_PAD if name == "tokenizer_2" else EOS)
    with default_dtype(arch.torch_dtype), torch.device(device):
        for name, spec in index.items():
            if not isinstance(spec, list) or name.startswith("tokenizer") or spec[0] is None:
                continue
            library, cls_name = spec
            cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
            if name == "scheduler":
                with default_dtype(torch.float32), torch.device("cpu"):  # its tables, as a pipeline load makes them
                    parts[name] = cls.from_config(cls.load_config(configs / name))
            elif library == "transformers":
                config = transformers.AutoConfig.from_pretrained(configs / name, local_files_only=True)
                if config.model_type == "clip_text_model":
                    # batchgen's tokenizer has its own special-token ids; the pooled output is read at the eos id.
                    tokenizer = parts["tokenizer_2" if name == "text_encoder_2" else "tokenizer"]
                    config.bos_token_id = tokenizer.bos_token_id
                    config.eos_token_id = tokenizer.eos_token_id
                    config.pad_token_id = tokenizer.pad_token_id
                parts[name] = cls(config).eval()
            else:
                parts[name] = cls.from_config(cls.load_config(configs / name)).eval()
    extra = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    if arch.base == "sd-1":
        parts |= {"safety_checker": None, "feature_extractor": None}
    return getattr(diffusers, index["_class_name"])(**parts, **extra)


def build_tiny(arch: Arch, root: Path) -> None:
    """batchgen's tiny pipeline of the same base (its record's builder, without the tiny model's own TIs and
    LoRAs), with this bench's LoRAs."""
    import importlib

    from batchgen.assets.bases import BY_NAME

    module, function = BY_NAME[arch.base].tiny_builder.split(":")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        pipe = getattr(importlib.import_module(module), function)(arch.tiny, root / "main" / arch.model)
        write_loras(pipe, root / "lora", arch)


def write_loras(pipe, folder: Path, arch: Arch) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Distinct LoRAs per model: identical ones could hide a switch's cost.
    offset = {"sd-1": 0, "sdxl": 1000, "flux": 2000}.get(arch.base, 3000)
    if getattr(pipe, "transformer", None) is not None:
        for index, name in enumerate(LORA_NAMES):
            write_peft_lora(pipe, folder / f"{name}.safetensors", offset + index)
        return
    from batchgen.tiny import write_lycoris

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    targets: dict[str, dict[str, tuple[int, ...]]] = {"lora_unet": {}}
    for component, prefix in (("text_encoder", "lora_te1" if sdxl else "lora_te"), ("text_encoder_2", "lora_te2")):
        encoder = getattr(pipe, component, None)
        if encoder is not None:
            targets[prefix] = {
                path: tuple(m.weight.shape)
                for path, m in encoder.named_modules()
                if path.rsplit(".", 1)[-1] in TEXT_TARGETS
            }
    for path, module in pipe.unet.named_modules():
        if (".attn1." in path or ".attn2." in path) and any(path.endswith("." + t) for t in UNET_TARGETS):
            targets["lora_unet"][path] = tuple(module.weight.shape)
    for index, name in enumerate(LORA_NAMES):
        seed = offset + index
        write_lycoris(folder / f"{name}.safetensors", targets, "lora", rank=LORA_RANK, alpha=LORA_ALPHA, seed=seed)


def write_peft_lora(pipe, path: Path, seed: int) -> None:
    """diffusers' save_lora_weights layout (``<component>.<module>.lora_A.weight``, rank and alpha in the adapter
    metadata) on the transformer's and CLIP-L's attention, in bf16 as FLUX trainers save, drawn from ``seed``."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, object] = {}
    for component, targets in (("transformer", TRANSFORMER_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for module_path, module in getattr(pipe, component).named_modules():
            if not module_path.endswith(tuple(f".{t}" for t in targets)):
                continue
            out_width, in_width = module.weight.shape
            # delta = alpha/r * B @ A has std LORA_STRENGTH x a default Linear's (uniform +-1/sqrt(in): 1/sqrt(3 in)).
            down = torch.randn(LORA_RANK, in_width, generator=generator) / in_width**0.5
            wanted = LORA_STRENGTH / (3 * in_width) ** 0.5
            up = torch.randn(out_width, LORA_RANK, generator=generator) * wanted * LORA_RANK**0.5 / LORA_ALPHA
            tensors[f"{component}.{module_path}.lora_A.weight"] = down.to(torch.bfloat16).contiguous()
            tensors[f"{component}.{module_path}.lora_B.weight"] = up.to(torch.bfloat16).contiguous()
        config |= {f"{component}.r": LORA_RANK, f"{component}.lora_alpha": LORA_ALPHA}
        config[f"{component}.target_modules"] = sorted(targets)
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


# --- FLOPs -----------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def count_flops(checkpoint: Path, arch: Arch) -> dict[str, float]:
    """FLOPs of one image at this size: the denoiser's per step (guidance's doubled batch included where the base
    runs a negative pass) and one VAE decode, counted with FlopCounterMode on the meta device from the saved
    configs: no weights are read, and attention is counted as the two matrix products any kernel computes."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    side = arch.size // 8
    with torch.device("meta"):
        denoiser, inputs = _denoiser_inputs(checkpoint, arch, side)
        with FlopCounterMode(display=False) as counter:
            denoiser(**inputs)
        step = float(counter.get_total_flops())
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(checkpoint / "vae"))
        latent = torch.zeros(1, vae.config.latent_channels, side, side)
        with FlopCounterMode(display=False) as counter:
            vae.decode(latent)
        decode = float(counter.get_total_flops())
    return {"denoiser_step": step, "vae_decode": decode, "per_image": step * arch.steps + decode}


def _denoiser_inputs(checkpoint: Path, arch: Arch, side: int) -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if (checkpoint / "transformer").is_dir():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(checkpoint / "transformer"))
        cfg = model.config
        image_tokens = (side // 2) ** 2  # 2x2 latent patches packed into one token
        inputs = {
            "hidden_states": torch.zeros(1, image_tokens, cfg.in_channels),
            "encoder_hidden_states": torch.zeros(1, FLUX_TEXT_TOKENS, cfg.joint_attention_dim),
            "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim),
            "timestep": torch.ones(1),
            "img_ids": torch.zeros(image_tokens, 3),
            "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3),
            "guidance": torch.ones(1) if cfg.guidance_embeds else None,
            "return_dict": False,
        }
        return model, inputs
    model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(checkpoint / "unet"))
    cfg = model.config
    inputs = {
        "sample": torch.zeros(2, cfg.in_channels, side, side),  # the prompt and the negative in one batch
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.zeros(2, 77, cfg.cross_attention_dim),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, pooled), "time_ids": torch.zeros(2, 6)}
    return model, inputs
