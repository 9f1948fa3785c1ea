"""What one base declares: the record each module in batchgen/assets/bases/ fills in. No torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Component configs for building a pipeline around a single file, one diffusers-layout folder per base name.
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent.parent / "model_configs"


@dataclass(frozen=True)
class Base:
    name: str  # what model configs write: base: sd-1
    label: str  # how messages name it
    pipeline_class: str  # the diffusers pipeline (model_index.json's _class_name of its shipped configs)
    cross_attention_width: int | None  # what the UNet's cross-attention reads; None: the base has no UNet
    text_encoders: Mapping[str, int]  # pipeline component -> hidden width, in the pipeline's order
    # Single-file checkpoints: the key prefix of the text encoder, and where its tokenizers live in the Hugging Face
    # cache ({tokenizer component: (repo id, subfolder), most common first}).
    checkpoint_text_encoder_prefix: str
    tokenizer_repos: Mapping[str, tuple[tuple[str, str], ...]]
    # LoRA Block Weight: vector length -> block ids in vector order; the longest is the full vector every shorter
    # one expands to. Empty: the extension defines no blocks for the base.
    block_ids: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    # The block a module is in, from its pipeline component and diffusers path (None: outside every block, so it
    # keeps the LoRA's weight). None here: the CompVis UNet rule of block_weights.py, which SD1, SD2 and SDXL share.
    module_block: Callable[[str, str], str | None] | None = None
    # The clip skips (A1111's count) compel has an encoder layer for; empty: compel is not set up for the base.
    compel_clip_skips: tuple[int, ...] = ()
    # A single file holding one of these keys is refused with the reason (a refiner, say).
    refused_checkpoint_keys: Mapping[str, str] = field(default_factory=dict)
    # The pipeline component that denoises: "unet", or "transformer" for the MMDiT/flow-matching bases.
    denoiser: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"  # its diffusers class, when a config does not name it
    # True: the pipeline's own encode_prompt conditions it (T5 included), so A1111 weights, BREAK, schedules,
    # compel and clip skip are refused at planning; False: batchgen's CLIP encoding (engine/prompts.py).
    pipeline_encodes_prompts: bool = False
    # How guidance_scale is read: "cfg" (a negative-prompt pass) or "distilled" (FLUX.1-dev's guidance input; no
    # negative prompt, no second pass).
    guidance: str = "cfg"
    # Text encoders a diffusers folder may leave out (SD3's T5, as diffusers allows), and what each encoder is.
    optional_text_encoders: tuple[str, ...] = ()
    encoder_names: Mapping[str, str] = field(default_factory=dict)
    # How batchgen's CLIP encoding (engine/clip_encoders.py, engine/compel_text.py) reads the encoders, as the base's
    # diffusers pipeline does: "last" (the last layer, normed) or "penultimate" (not normed), and the encoder whose
    # projected pooled output the denoiser also reads ("": none).
    clip_layer: str = "last"
    pooled_encoder: str = ""
    # Textual inversion files: the key of each encoder's vectors -> the pipeline component it extends. The
    # one-encoder formats (string_to_param, emb_params, {token: tensor}) are read as "clip_l" (batchgen.assets.
    # tensors.embedding_vectors). Empty: no TI format is in use for the base.
    embedding_encoders: Mapping[str, str] = field(default_factory=dict)
    # Module names that only this base's LoRAs have (FLUX's single blocks): they tell a transformer LoRA's base.
    lora_block_names: tuple[str, ...] = ()
    # The releases of the base, told apart by their denoiser's config: {variant: config values it has}, the first
    # whose values all match wins (FLUX.1 dev has the guidance input, schnell not).
    variants: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # What a sweep that gives no value renders with (batchgen.assets.defaults): steps and guidance_scale, and
    # max_sequence_length where a release's own differs from its pipeline's. `variant_defaults` overrides them per
    # release (as `variants` names it); a setting declared nowhere takes the settings table's fallback. The size
    # comes from the checkpoint's configs, as diffusers' pipelines compute it.
    defaults: Mapping[str, object] = field(default_factory=dict)
    variant_defaults: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # The denoiser's latent size where its config has none: FluxPipeline fixes its default_sample_size at 128.
    default_sample_size: int | None = None
    # kohya / sd-scripts LoRA key prefixes of the text encoders -> the pipeline component each names; a component's
    # first prefix is the one batchgen's own names use where several spell it (FLUX.1's T5: lora_te2_, lora_te3_).
    kohya_text_encoder_prefixes: Mapping[str, str] = field(default_factory=dict)
    # "module:function" converting the transformer of a single file in the base's original layout (whole model or
    # transformer alone) to diffusers keys: function(module.transformer_keys(state), target shapes). Imported only
    # when such a file is read. Empty: the base has no single-file transformer (a UNet base's file is diffusers').
    single_file_converter: str = ""
    # Schedulers of the base that batchgen.schedulers does not list -> the sampler name A1111 and Forge give them,
    # which its PNG parameters write for `scheduler: default`.
    own_samplers: Mapping[str, str] = field(default_factory=dict)
    # The base's embedded tiny model (conf/model/<tiny_model>.yaml) and the "module:function" that builds its
    # pipeline into a folder, function(name, folder) (batchgen/tiny/build.py); empty: the base has none.
    tiny_model: str = ""
    tiny_builder: str = ""
    # What run.dtype=auto computes in on a CUDA device, as the base's releases are published and diffusers' examples
    # load them: fp16 for the UNet bases, bf16 where activations overflow fp16 (FLUX.1, SD3). CPU: always fp32.
    cuda_dtype: str = "fp16"
    # The T5 tokens the pipeline reads by default (its max_sequence_length, what 0 means); 0: the base has no T5.
    t5_tokens: int = 0

    @property
    def embedding_widths(self) -> tuple[int, ...]:
        """A textual inversion's vector width per text encoder, in the file's key order."""
        return tuple(self.text_encoders[component] for component in self.embedding_encoders.values())

    @property
    def reads_negative_prompt(self) -> bool:
        """Whether any job of the base reads its negative prompt (FLUX.1's distilled guidance never does)."""
        return self.guidance == "cfg"

    def compute_dtype(self, name: str, device: str) -> str:
        """The dtype a run.dtype or models.X.dtype name computes in on a device (a name of engine_options.DTYPES
        but auto): an explicit name wins; auto is the base's cuda_dtype on CUDA and fp32 elsewhere, since CPU half
        precision is slow and imprecise."""
        if name != "auto":
            return name
        return self.cuda_dtype if device.startswith("cuda") else "fp32"

    def negative_pass(self, guidance_scale: float, denoiser_config: Mapping[str, object] | None = None) -> bool:
        """Whether a job runs a negative-prompt (unconditional) pass, as the base's diffusers pipeline decides it:
        classifier-free guidance above 1, never under distilled guidance (FluxPipeline's true_cfg_scale stays 1),
        and never for a UNet that takes the guidance scale as an input (LCM: its config's time_cond_proj_dim).
        Planning, which loads no config, asks without one; the engine passes the loaded denoiser's."""
        if not self.reads_negative_prompt or guidance_scale <= 1:
            return False
        return denoiser_config is None or denoiser_config.get("time_cond_proj_dim") is None

    def variant(self, denoiser_config: Mapping[str, object]) -> str | None:
        """Which release a denoiser config is, None when no variant's values all match."""
        for name, values in self.variants.items():
            if all(denoiser_config.get(key) == value for key, value in values.items()):
                return name
        return None

    def default(self, name: str, variant: str | None) -> object | None:
        """The base's own value of a setting for a release (None: the base declares none)."""
        return {**self.defaults, **self.variant_defaults.get(variant or "", {})}.get(name)

    @property
    def shipped_configs(self) -> Path:
        return SHIPPED_CONFIGS / self.name


def tokenizer_of(component: str) -> str:
    """The tokenizer component of a text encoder component (text_encoder_2 -> tokenizer_2), as diffusers names them."""
    return "tokenizer" + component.removeprefix("text_encoder")


def numbered(prefix: str, count: int) -> tuple[str, ...]:
    """IN00, IN01, ...: the LoRA Block Weight extension's block names."""
    return tuple(f"{prefix}{n:02d}" for n in range(count))
