"""Stable Diffusion 2.x: one OpenCLIP-H text encoder, 1024-wide cross-attention, SD1's UNet layout."""

from batchgen.assets.bases import sd1
from batchgen.assets.bases.record import Base

BASE = Base(
    name="sd-2",
    label="SD2",
    pipeline_class="StableDiffusionPipeline",
    cross_attention_width=1024,
    text_encoders={"text_encoder": 1024},
    embedding_encoders={"clip_l": "text_encoder"},
    encoder_names={"text_encoder": "OpenCLIP-H"},
    checkpoint_text_encoder_prefix="cond_stage_model.model.",
    tokenizer_repos={
        "tokenizer": (
            ("stabilityai/stable-diffusion-2-1", "tokenizer"),
            ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
            ("stabilityai/stable-diffusion-2", "tokenizer"),
        )
    },
    kohya_text_encoder_prefixes=sd1.BASE.kohya_text_encoder_prefixes,
    block_ids=sd1.BLOCK_IDS,
    compel_clip_skips=(1, 2),
    defaults=sd1.UNET_DEFAULTS,
)
