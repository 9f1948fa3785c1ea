"""Deterministic local models, LoRAs and batchgen config folders for the benchmark; nothing is downloaded.

Every model lives in an InvokeAI-style root (``main/<name>``, ``embedding/``, ``lora/``), the layout batchgen reads
through a model file's ``root:`` key, so the benchmark drives batchgen exactly as a user would.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from batchgen.tiny import build_tiny, write_lycoris

LORA_RANK = 16
LORA_ALPHA = 8.0  # kohya's common alpha = rank / 2, so the loaders' alpha/rank scaling is exercised
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TINY = "tiny_sd1"


@dataclass(frozen=True)
class State:
    """One LoRA stack state: its sweep stack name and {LoRA name: weight} (weights apply to UNet and TE)."""

    name: str
    loras: dict[str, float] = field(default_factory=dict)

    def key(self) -> frozenset[tuple[str, float]]:
        return frozenset(self.loras.items())


@dataclass(frozen=True)
class Job:
    state: State
    prompt: str
    seed: int


def quiet_libraries() -> None:
    """The contestants' libraries without their notices and progress bars: the bench prints its own table."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()


def expand_jobs(states: list[State], prompts: list[str], seeds: list[int]) -> list[Job]:
    # State outermost, then prompt, then seed: batchgen's own render order, so batches line up with bare's.
    return [Job(s, p, seed) for s in states for p in prompts for seed in seeds]


def lora_targets(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """write_lycoris targets: every UNet attention linear and every text-encoder attention/MLP linear."""
    targets: dict[str, dict[str, tuple[int, ...]]] = {"lora_unet": {}, "lora_te": {}}
    for path, module in text_encoder.named_modules():
        if path.rsplit(".", 1)[-1] in TEXT_TARGETS:
            targets["lora_te"][path] = tuple(module.weight.shape)
    for path, module in unet.named_modules():
        in_attention = ".attn1." in path or ".attn2." in path
        if in_attention and any(path.endswith("." + target) for target in UNET_TARGETS):
            targets["lora_unet"][path] = tuple(module.weight.shape)
    return targets


def _to_fp16(path: Path) -> None:
    """Rewrite a LoRA in fp16, as kohya's trainer saves by default (save_precision=fp16) and most published files
    are: a loader that widens factors to fp32 then holds twice the file's size."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(path), metadata=metadata)


def write_loras(folder: Path, targets: dict, names: list[str], seed_prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        # Distinct seeds: identical LoRAs would let a content-addressed cache hide the cost of a switch.
        seed = sum(map(ord, seed_prefix)) * 1000 + index
        write_lycoris(path, targets, "lora", rank=LORA_RANK, alpha=LORA_ALPHA, seed=seed)
        _to_fp16(path)
        paths.append(path)
    return paths


def build_w1_root(root: Path, lora_names: list[str]) -> Path:
    """batchgen's tiny SD1 model and its TIs, with the tiny LoRAs replaced by rank-16 ones on all attention linears."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    build_tiny(TINY, root)
    # The tiny build's own LoRAs (rank 2-8, LyCORIS kinds diffusers cannot load) are not part of this workload.
    shutil.rmtree(root / "lora")
    checkpoint = root / "main" / TINY
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder", local_files_only=True)
    write_loras(root / "lora", lora_targets(unet, text_encoder), lora_names, "w1")
    return root


def build_sd1_root(
    root: Path,
    name: str,
    tokenizer_dir: Path,
    lora_names: list[str],
    *,
    full_size: bool,
    seed: int = 1234,
) -> Path:
    """An SD1-architecture pipeline with seeded random weights, saved as a diffusers folder, plus its LoRAs.

    ``full_size``: SD1.5's exact UNet, text encoder and VAE shapes (for the GPU workload, saved in fp16); otherwise
    the CPU compute-bound model: a 3-level UNet (128, 256, 256) with 2 layers per block and cross-attention at the
    two upper levels, a 4-layer CLIP text encoder of width 768, and a 4-block VAE so that latents are 1/8 of the image.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    # fork_rng: library init draws from the global RNG; the caller's generator state must not depend on the build.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if full_size:
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            text_layers, vae_channels, vae_layers, vae_size = 12, (128, 256, 512, 512), 2, 512
        else:
            unet = UNet2DConditionModel(
                sample_size=32,
                layers_per_block=2,
                block_out_channels=(128, 256, 256),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=768,
                attention_head_dim=8,
            )
            text_layers, vae_channels, vae_layers, vae_size = 4, (32, 64, 128, 128), 1, 256
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=text_layers,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=vae_channels,
            layers_per_block=vae_layers,
            latent_channels=4,
            sample_size=vae_size,
        )
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if full_size:
            pipe.to(torch.float16)  # what a real SD1.5 fp16 checkpoint holds; halves the files
        pipe.save_pretrained(root / "main" / name, safe_serialization=True)
        write_loras(root / "lora", lora_targets(unet, text_encoder), lora_names, name)
    return root


def write_config_dir(config_dir: Path, model: str, root: Path, checkpoint: str, sweeps: dict[str, dict]) -> Path:
    """A --config-dir with model/<model>.yaml and one sweep/<name>.yaml per entry of ``sweeps``."""
    (config_dir / "model").mkdir(parents=True, exist_ok=True)
    (config_dir / "sweep").mkdir(parents=True, exist_ok=True)
    model_cfg = {"base": "sd-1", "root": str(root.resolve()), "checkpoint": checkpoint}
    (config_dir / "model" / f"{model}.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    for name, sweep in sweeps.items():
        body = yaml.safe_dump({"defaults": [{f"/model@models.{model}": model}], "sweep": sweep}, sort_keys=False)
        (config_dir / "sweep" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return config_dir


def sweep_body(name: str, states: list[State], prompts: list[str], seeds: list[int], **scalars: object) -> dict:
    """A sweep: section with one stack per state, so batchgen renders exactly the given states (no reference jobs:
    every contestant renders the same images)."""
    stacks = {state.name: dict(state.loras) for state in states}
    body = {"name": name, "prompts": list(prompts), "stacks": stacks, "seeds": list(seeds), **scalars}
    return body | {"references": False}
