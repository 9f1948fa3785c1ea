"""The tiny pipelines: random CLIP text encoders, UNet, VAE and DDIM at real text widths."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.assets import text_model
from batchgen.tiny.noise import reinit, seeded_generator, uniform
from batchgen.tiny.tokenizer import EOS, MAX_TOKENS, SDXL_PAD, load_tokenizer, write_bpe_files

if TYPE_CHECKING:
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline
    from transformers import CLIPTokenizer

_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_FFN = 256
_TIME_EMBED_DIM = 8  # SDXL embeds 6 micro-conditioning numbers, each to this width
# Found by rendering: random cross-attention is near uniform over 77 mostly-padding tokens, so the
# prompt barely shows. Powers of two keep the scaled weights bit-exact.
_CROSS_ATTENTION_LOGIT_GAIN = 8.0
_CROSS_ATTENTION_VALUE_GAIN = 4.0
_FINAL_NORM_MEAN = -0.125  # a power of two: the sum with the uniform draws rounds the same everywhere


def _text_encoder(tokenizer: CLIPTokenizer, width: int, with_projection: bool, seed: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=_TEXT_FFN,
        projection_dim=width,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu" if with_projection else "quick_gelu",
        # The pooled output is taken at the first eos_token_id, so it must be the real one.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()
    reinit(model, seeded_generator(seed))
    return model


def _learned_final_norm(encoder: torch.nn.Module, seed: str) -> None:
    """A bias with a mean away from 0 on the final layer norm, which SD1 reads: real CLIP's is learned, and A1111's
    emphasis divides by the mean of the normed output, which the default init (bias 0) makes exactly 0."""
    norm = text_model.inner(encoder).final_layer_norm
    norm.bias.copy_(uniform(tuple(norm.bias.shape), 0.1, seeded_generator(seed)) + _FINAL_NORM_MEAN)


def _unet(sdxl: bool, seed: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {"cross_attention_dim": 768}
    if sdxl:
        extra = {
            "cross_attention_dim": 768 + 1280,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 1280 + 6 * _TIME_EMBED_DIM,
            "use_linear_projection": True,
            "transformer_layers_per_block": (1, 2),
        }
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        **extra,
    ).eval()
    reinit(unet, seeded_generator(seed))
    _sharpen_cross_attention(unet)
    return unet


def _sharpen_cross_attention(unet: torch.nn.Module) -> None:
    # Sharper logits let single tokens (and so textual inversions) win; a stronger value path carries them on.
    for path, module in unet.named_modules():
        if path.endswith("attn2"):
            for linear in (module.to_q, module.to_k):
                linear.weight.mul_(_CROSS_ATTENTION_LOGIT_GAIN)
            for linear in (module.to_v, module.to_out[0]):
                linear.weight.mul_(_CROSS_ATTENTION_VALUE_GAIN)


def tiny_vae(seed: str, latent_channels: int = 4, **config: Any) -> torch.nn.Module:
    """The tiny VAE of every base; `config` adds what a base's VAE has of its own (scaling, shift, no quant convs)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks so that latents are 1/8 of the image, as in the real models.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        **config,
    ).eval()
    reinit(vae, seeded_generator(seed))
    return vae


def _scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_sd1_pipeline(name: str, folder: Path) -> DiffusionPipeline:
    return build_pipeline(name, folder, sdxl=False)


def build_sdxl_pipeline(name: str, folder: Path) -> DiffusionPipeline:
    return build_pipeline(name, folder, sdxl=True)


def build_pipeline(name: str, folder: Path, sdxl: bool) -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizer = load_tokenizer(folder / "tokenizer", EOS)
    common = {
        "vae": tiny_vae(f"{name}/vae", scaling_factor=0.13025 if sdxl else 0.18215),
        "text_encoder": _text_encoder(tokenizer, 768, False, f"{name}/text_encoder"),
        "tokenizer": tokenizer,
        "unet": _unet(sdxl, f"{name}/unet"),
        "scheduler": _scheduler(),
    }
    if not sdxl:
        _learned_final_norm(common["text_encoder"], f"{name}/text_encoder/final_layer_norm")
    if sdxl:
        tokenizer_2 = load_tokenizer(folder / "tokenizer_2", SDXL_PAD)
        text_encoder_2 = _text_encoder(tokenizer_2, 1280, True, f"{name}/text_encoder_2")
        pipe = StableDiffusionXLPipeline(
            **common, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep our plain BPE files for tools that read those.
    for sub in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        write_bpe_files(folder / sub)
    return pipe
