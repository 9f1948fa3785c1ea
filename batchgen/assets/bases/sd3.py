"""Stable Diffusion 3 / 3.5 (medium and large): CLIP-L, OpenCLIP-bigG and an optional T5-XXL, a flow-matching
MMDiT with real classifier-free guidance."""

from batchgen.assets.bases.record import Base

BASE = Base(
    name="sd-3",
    label="SD3/SD3.5",
    pipeline_class="StableDiffusion3Pipeline",
    cross_attention_width=None,
    # The two CLIPs' penultimate states (768 + 1280) are zero-padded to T5's 4096 and joined with T5's tokens.
    text_encoders={"text_encoder": 768, "text_encoder_2": 1280, "text_encoder_3": 4096},
    checkpoint_text_encoder_prefix="",
    tokenizer_repos={
        "tokenizer": (("stabilityai/stable-diffusion-3.5-large", "tokenizer"),),
        "tokenizer_2": (("stabilityai/stable-diffusion-3.5-large", "tokenizer_2"),),
        "tokenizer_3": (("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),),
    },
    denoiser="transformer",
    denoiser_class="SD3Transformer2DModel",
    pipeline_encodes_prompts=True,
    # diffusers conditions on zeros where T5 would be: SD3 runs without it, at some cost in prompt following.
    optional_text_encoders=("text_encoder_3",),
    encoder_names={"text_encoder": "CLIP-L", "text_encoder_2": "OpenCLIP-bigG", "text_encoder_3": "T5-XXL"},
    lora_block_names=("joint_blocks",),
    single_file_converter="batchgen.assets.sd3_checkpoint:convert_sd3_checkpoint",
    own_samplers={"FlowMatchEulerDiscreteScheduler": "Euler"},  # the flow-matching Euler, as Forge names it
    tiny_model="tiny_sd3",
    tiny_builder="batchgen.tiny.transformer_models:build_sd3_pipeline",
    # sd-scripts numbers SD3's three encoders.
    kohya_text_encoder_prefixes={
        "lora_te1_": "text_encoder",
        "lora_te2_": "text_encoder_2",
        "lora_te3_": "text_encoder_3",
    },
    # SD3.5 medium adds a second image attention (MMDiT-X) to its first 13 blocks; large and SD3 medium have none.
    variants={
        "3.5 large": {"num_layers": 38, "qk_norm": "rms_norm"},
        "3.5 medium": {"num_layers": 24, "qk_norm": "rms_norm"},
        "3 medium": {"num_layers": 24, "qk_norm": None},
    },
    # StableDiffusion3Pipeline's own (28 steps, guidance 7.0; SD3 medium's model card), and each SD3.5 release's
    # model card on the Hugging Face hub: stabilityai/stable-diffusion-3.5-large 28 steps, guidance 3.5;
    # stable-diffusion-3.5-medium 40 steps, guidance 4.5. A fine-tune with the architecture of one renders with its
    # values; large turbo has large's architecture, so a sweep names its 4 steps and guidance 0 itself.
    defaults={"steps": 28, "guidance_scale": 7.0},
    variant_defaults={
        "3.5 large": {"steps": 28, "guidance_scale": 3.5},
        "3.5 medium": {"steps": 40, "guidance_scale": 4.5},
    },
    cuda_dtype="bf16",
    t5_tokens=256,
)
