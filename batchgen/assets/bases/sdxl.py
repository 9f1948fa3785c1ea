"""Stable Diffusion XL (base, not the refiner): CLIP-L and OpenCLIP-bigG, 2048-wide cross-attention."""

from batchgen.assets.bases import sd1
from batchgen.assets.bases.record import Base, numbered

BASE = Base(
    name="sdxl",
    label="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    cross_attention_width=2048,
    # The first encoder is CLIP-L, as wide as SD1's; only the second (OpenCLIP bigG) tells SDXL apart.
    text_encoders={"text_encoder": 768, "text_encoder_2": 1280},
    embedding_encoders={"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    encoder_names={"text_encoder": "CLIP-L", "text_encoder_2": "OpenCLIP-bigG"},
    # diffusers reads the penultimate layer of both, not normed, and the second's projected pooled output.
    clip_layer="penultimate",
    pooled_encoder="text_encoder_2",
    checkpoint_text_encoder_prefix="conditioner.embedders.1.model.",
    tokenizer_repos={
        "tokenizer": (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),),
        "tokenizer_2": (("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),),
    },
    kohya_text_encoder_prefixes={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"},
    # 9 input and 9 output blocks
    block_ids={
        12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *numbered("OUT", 6)),
        20: ("BASE", *numbered("IN", 9), "M00", *numbered("OUT", 9)),
    },
    compel_clip_skips=(1,),  # diffusers already reads the penultimate layer, not normed
    # The refiner's only text encoder is OpenCLIP-bigG, stored where the base keeps CLIP-L.
    refused_checkpoint_keys={
        "conditioner.embedders.0.model.text_projection": "an SDXL refiner; batchgen renders base models only"
    },
    defaults=sd1.UNET_DEFAULTS,
    tiny_model="tiny_sdxl",
    tiny_builder="batchgen.tiny.models:build_sdxl_pipeline",
)
