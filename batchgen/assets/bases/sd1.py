"""Stable Diffusion 1.x: one CLIP-L text encoder, 768-wide cross-attention."""

from batchgen.assets.bases.record import Base, numbered

# The extension's ids for the CompVis UNet with 12 input and 12 output blocks (SD1 and SD2 alike).
BLOCK_IDS = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *numbered("OUT", 12)[3:]),
    26: ("BASE", *numbered("IN", 12), "M00", *numbered("OUT", 12)),
}

# batchgen's steps and guidance for the UNet bases since its first release (A1111's 20 steps, diffusers' SD1 CFG
# 7.5), not diffusers' 50 steps and SDXL's 5.0: sweeps that never named them keep their job_ids and pixels.
UNET_DEFAULTS = {"steps": 20, "guidance_scale": 7.5}

BASE = Base(
    name="sd-1",
    label="SD1",
    pipeline_class="StableDiffusionPipeline",
    cross_attention_width=768,
    text_encoders={"text_encoder": 768},
    embedding_encoders={"clip_l": "text_encoder"},
    encoder_names={"text_encoder": "CLIP-L"},
    checkpoint_text_encoder_prefix="cond_stage_model.transformer.",
    tokenizer_repos={
        "tokenizer": (
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
            ("runwayml/stable-diffusion-v1-5", "tokenizer"),
            ("CompVis/stable-diffusion-v1-4", "tokenizer"),
            ("openai/clip-vit-large-patch14", ""),
        )
    },
    kohya_text_encoder_prefixes={"lora_te_": "text_encoder"},
    block_ids=BLOCK_IDS,
    compel_clip_skips=(1, 2),  # the last layer normed, or the penultimate normed (A1111's clip skip 2)
    defaults=UNET_DEFAULTS,
    tiny_model="tiny_sd1",
    tiny_builder="batchgen.tiny.models:build_sd1_pipeline",
)
