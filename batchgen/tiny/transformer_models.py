"""The tiny FLUX.1-dev and SD3.5 pipelines: random MMDiT transformers at real text widths (CLIP 768/1280, T5 4096)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from batchgen.tiny.models import _text_encoder, tiny_vae
from batchgen.tiny.noise import seeded_generator
from batchgen.tiny.t5 import T5_WIDTH, reinit_except, t5_encoder, write_t5_tokenizer
from batchgen.tiny.tokenizer import EOS, SDXL_PAD, load_tokenizer, write_bpe_files

if TYPE_CHECKING:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

_LATENT_CHANNELS = 16  # FLUX's and SD3's VAEs
_HEAD_WIDTH = 16
_HEADS = 2
_INNER = _HEAD_WIDTH * _HEADS


class _Gains(NamedTuple):
    """Weight gains that make the prompt show. Found by rendering, as the UNet's _sharpen_cross_attention: random
    attention is near uniform and its outputs small beside the image stream, so both prompts rendered nearly alike
    (mean pixel change 0.004 FLUX, 0.013 SD3; T5 alone 0.0005, 0.002). Powers of two keep weights bit-exact."""

    qk_norm: float  # q and k pass RMS norms, so their weights cannot sharpen attention; the norms' scales can
    value: float  # to_v, add_v_proj
    out: float  # to_out, to_add_out
    pooled: float  # the pooled CLIP vector's share of the AdaLN conditioning (time_text_embed.text_embedder)


# Measured (a portrait of a cat / a watercolor painting of a dragon castle at night, 64x64, 4 steps, seed 1, mean
# absolute pixel change on 0..1; a new seed changes ~0.15): FLUX 0.043 (T5 alone 0.033, CLIP alone 0.038); SD3's
# two joint blocks carry text further, so it needs less: 0.069 (T5 alone 0.058, CLIP-L + G alone 0.046).
_FLUX_GAINS = _Gains(qk_norm=4.0, value=8.0, out=4.0, pooled=4.0)
_SD3_GAINS = _Gains(qk_norm=2.0, value=2.0, out=2.0, pooled=2.0)


def _vae(scaling_factor: float, shift_factor: float, seed: str) -> torch.nn.Module:
    flow = {"scaling_factor": scaling_factor, "shift_factor": shift_factor}
    return tiny_vae(seed, _LATENT_CHANNELS, **flow, use_quant_conv=False, use_post_quant_conv=False)


def _reinit_transformer(transformer: torch.nn.Module, seed: str, gains: _Gains) -> None:
    import torch
    from diffusers.models.normalization import RMSNorm

    # The RMS norms (q/k norms) keep their init, ones; reinit does not know them.
    reinit_except(transformer, seeded_generator(seed), (torch.nn.RMSNorm, RMSNorm))
    transformer.time_text_embed.text_embedder.linear_2.weight.mul_(gains.pooled)
    for module in transformer.modules():
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            weight = getattr(getattr(module, name, None), "weight", None)
            if weight is not None:
                weight.mul_(gains.qk_norm)
        for name, gain in (("to_v", gains.value), ("add_v_proj", gains.value), ("to_add_out", gains.out)):
            if isinstance(getattr(module, name, None), torch.nn.Linear):
                getattr(module, name).weight.mul_(gain)
        if isinstance(getattr(module, "to_out", None), torch.nn.ModuleList):
            module.to_out[0].weight.mul_(gains.out)


def _flux_transformer(seed: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=_LATENT_CHANNELS * 4,  # FLUX packs 2x2 latent patches into one token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=_HEAD_WIDTH,
        num_attention_heads=_HEADS,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=768,
        guidance_embeds=True,  # FLUX.1-dev: guidance distilled, guidance_scale is an input
        axes_dims_rope=(4, 6, 6),  # (index, row, column) rotary widths, summing to the head width
    ).eval()
    _reinit_transformer(transformer, seed, _FLUX_GAINS)
    return transformer


def _sd3_transformer(seed: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=8,  # latents of the default 64x64 image
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=_HEAD_WIDTH,
        num_attention_heads=_HEADS,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=_INNER,
        pooled_projection_dim=768 + 1280,
        out_channels=_LATENT_CHANNELS,
        pos_embed_max_size=32,  # room for images up to 512x512 (32 patches of 2 latents of 8 pixels)
        qk_norm="rms_norm",  # SD3.5's
    ).eval()
    _reinit_transformer(transformer, seed, _SD3_GAINS)
    return transformer


def _flow_scheduler(dynamic: bool) -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not dynamic:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    # FLUX.1-dev's scheduler_config: the shift grows with the image's token count.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux_pipeline(name: str, folder: Path) -> FluxPipeline:
    """Build and save a FLUX.1-dev-like pipeline: CLIP-L (pooled) + T5 (sequence) into a 1+1 layer transformer."""
    import torch
    from diffusers import FluxPipeline

    # Library init draws from the global RNG before reinit overwrites it; fork so the caller's state survives.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        tokenizer = load_tokenizer(folder / "tokenizer", EOS)
        tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2")
        pipe = FluxPipeline(
            scheduler=_flow_scheduler(dynamic=True),
            vae=_vae(0.3611, 0.1159, f"{name}/vae"),
            text_encoder=_text_encoder(tokenizer, 768, False, f"{name}/text_encoder"),
            tokenizer=tokenizer,
            text_encoder_2=t5_encoder(tokenizer_2, f"{name}/text_encoder_2"),
            tokenizer_2=tokenizer_2,
            transformer=_flux_transformer(f"{name}/transformer"),
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep our plain BPE files for tools that read those.
    write_bpe_files(folder / "tokenizer")
    return pipe


def build_sd3_pipeline(name: str, folder: Path) -> StableDiffusion3Pipeline:
    """Build and save an SD3.5-like pipeline: CLIP-L + CLIP-G (pooled and sequence) + T5 into a 2 layer MMDiT."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        tokenizer = load_tokenizer(folder / "tokenizer", EOS)
        tokenizer_2 = load_tokenizer(folder / "tokenizer_2", SDXL_PAD)  # CLIP-G pads with "!", as in SDXL
        tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3")
        pipe = StableDiffusion3Pipeline(
            scheduler=_flow_scheduler(dynamic=False),
            vae=_vae(1.5305, 0.0609, f"{name}/vae"),
            text_encoder=_text_encoder(tokenizer, 768, True, f"{name}/text_encoder"),
            tokenizer=tokenizer,
            text_encoder_2=_text_encoder(tokenizer_2, 1280, True, f"{name}/text_encoder_2"),
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5_encoder(tokenizer_3, f"{name}/text_encoder_3"),
            tokenizer_3=tokenizer_3,
            transformer=_sd3_transformer(f"{name}/transformer"),
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_bpe_files(folder / sub)
    return pipe
