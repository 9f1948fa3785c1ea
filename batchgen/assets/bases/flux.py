"""FLUX.1 (dev and schnell): CLIP-L for the pooled vector, T5-XXL for the sequence, a flow-matching MMDiT."""

from batchgen.assets.bases.record import Base

BASE = Base(
    name="flux",
    label="FLUX.1",
    pipeline_class="FluxPipeline",
    cross_attention_width=None,
    # CLIP-L gives only the pooled 768-vector; T5-XXL (4096) gives the token sequence the transformer attends to.
    text_encoders={"text_encoder": 768, "text_encoder_2": 4096},
    embedding_widths=(),  # no textual inversion format is in use for FLUX
    checkpoint_text_encoder_prefix="",
    tokenizer_repos={
        "tokenizer": (
            ("black-forest-labs/FLUX.1-dev", "tokenizer"),
            ("black-forest-labs/FLUX.1-schnell", "tokenizer"),
        ),
        "tokenizer_2": (
            ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
            ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
        ),
    },
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    pipeline_encodes_prompts=True,
    # dev is guidance-distilled: guidance_scale is an input of the transformer and there is no negative pass.
    # schnell has no guidance input; diffusers then ignores the value.
    guidance="distilled",
    encoder_names={"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"},
    lora_block_names=("double_blocks", "single_blocks", "single_transformer_blocks"),
    variants={"dev": {"guidance_embeds": True}, "schnell": {"guidance_embeds": False}},
    defaults={"steps": 28, "width": 1024, "height": 1024, "guidance_scale": 3.5, "max_sequence_length": 512},
)
