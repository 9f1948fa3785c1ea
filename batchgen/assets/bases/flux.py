"""FLUX.1 (dev and schnell): CLIP-L for the pooled vector, T5-XXL for the sequence, a flow-matching MMDiT."""

import re

from batchgen.assets.bases.record import Base, numbered

# The LoRA Block Weight extension's FLUX.1 ids (its BLOCKIDFLUX, 61): the two text encoders, the input embedders,
# the 19 double and 38 single blocks, the final layer.
BLOCK_IDS = ("CLIP", "T5", "IN", *numbered("D", 19), *numbered("S", 38), "OUT")

_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)(?:\.|$)")
# The extension matches "_in" and "final_layer" in BFL names: img_in, txt_in, time_in, vector_in and guidance_in are
# diffusers' x_embedder, context_embedder and time_text_embed; final_layer is norm_out's linear and proj_out.
_INPUTS = ("x_embedder", "context_embedder", "time_text_embed")
_OUTPUTS = ("norm_out", "proj_out")


def module_block(component: str, path: str) -> str | None:
    """The extension's block for a FLUX.1 module (its get_flux_blocks, read on diffusers' names): every layer of
    CLIP-L is CLIP, of T5 is T5; double block n is Dnn, single block n Snn."""
    if component in ("text_encoder", "text_encoder_2"):
        return "CLIP" if component == "text_encoder" else "T5"
    if match := _BLOCK.match(path):
        return f"{'D' if match[1] == 'transformer_blocks' else 'S'}{int(match[2]):02d}"
    top = path.split(".", 1)[0]
    return "IN" if top in _INPUTS else "OUT" if top in _OUTPUTS else None


BASE = Base(
    name="flux",
    label="FLUX.1",
    pipeline_class="FluxPipeline",
    cross_attention_width=None,
    # CLIP-L gives only the pooled 768-vector; T5-XXL (4096) gives the token sequence the transformer attends to.
    text_encoders={"text_encoder": 768, "text_encoder_2": 4096},
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
    single_file_converter="batchgen.assets.flux_checkpoint:convert_flux_checkpoint",
    own_samplers={"FlowMatchEulerDiscreteScheduler": "Euler"},  # the flow-matching Euler, as Forge names it
    tiny_model="tiny_flux",
    tiny_builder="batchgen.tiny.transformer_models:build_flux_pipeline",
    # sd-scripts writes lora_te3_ for T5, other trainers lora_te2_; lora_te_ is CLIP-L as in SD1.
    kohya_text_encoder_prefixes={
        "lora_te1_": "text_encoder",
        "lora_te2_": "text_encoder_2",
        "lora_te_": "text_encoder",
        "lora_te3_": "text_encoder_2",
    },
    block_ids={len(BLOCK_IDS): BLOCK_IDS},
    module_block=module_block,
    variants={"dev": {"guidance_embeds": True}, "schnell": {"guidance_embeds": False}},
    # FluxPipeline's own and FLUX.1-dev's model card: 28 steps, guidance 3.5, T5's 512 tokens. schnell's card runs
    # it at 4 steps, guidance 0 (it has no guidance input) and max_sequence_length 256, the length it was
    # distilled with.
    defaults={"steps": 28, "guidance_scale": 3.5},
    variant_defaults={"schnell": {"steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}},
    default_sample_size=128,  # FluxPipeline's: 1024 pixels with the VAE's factor 8; its config has no sample_size
    cuda_dtype="bf16",
    t5_tokens=512,
)
