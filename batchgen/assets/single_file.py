"""Single-file checkpoints (A1111 / ComfyUI `.safetensors`): base from the tensor names and shapes, component
configs shipped with batchgen, tokenizers from a local folder or the Hugging Face cache. No torch, no weights read.

A single file holds only weights in the original (CompVis / SGM) layout; diffusers needs a config per component and
the tokenizer files to build a pipeline around them. The configs are facts about each base and ship in
`batchgen/model_configs/<base>/`; the tokenizers (a few MB of vocabulary) do not, and are looked up locally where
each base's module in assets/bases/ says they live.

An SD3 or FLUX.1 file is read for its transformer alone (converted by batchgen: sd3_checkpoint.py,
flux_checkpoint.py), the rest of the pipeline coming from a diffusers folder named by `config:`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchgen.assets.bases import BASES, BY_NAME, checkpoint_base, listing, mmdit_checkpoint_base
from batchgen.assets.component_files import KIND_NAMES, KIND_OF_CLASS, convert_component, file_kinds
from batchgen.assets.safetensors_header import Header
from batchgen.errors import BatchgenError
from batchgen.spec import SingleFile

UNET_PREFIX = "model.diffusion_model."
_PREDICTION_TYPES = ("epsilon", "v_prediction")
# The diffusers transformer of each MMDiT base, for a transformer/config.json without _class_name.


def check_single_file(
    checkpoint: Path,
    header: Header,
    base: str,
    config: str | None,
    tokenizer: str | None,
    prediction_type: str | None,
    where: str,
    given: frozenset[str] = frozenset(),
) -> SingleFile:
    """What the engine needs to build a pipeline around the file; every problem is an error here, before a load.
    `given`: the components the model config names whole files for (vae, text encoders)."""
    unet_bases = [b for b in BASES if b.denoiser == "unet"]
    mmdit = mmdit_checkpoint_base(header.tensors)  # FLUX and SD3 files keep their transformer under UNET_PREFIX too
    if mmdit is not None:
        return _transformer_single_file(checkpoint, header, mmdit, base, config, where, given)
    if not any(key.startswith(UNET_PREFIX) for key in header.tensors):
        if any(key.startswith("unet.") for key in header.tensors):
            raise BatchgenError(
                f"{where}.checkpoint: {checkpoint} holds diffusers-layout keys (unet.*), not an A1111/ComfyUI "
                "checkpoint; save it as a diffusers folder (pipe.save_pretrained) and point at the folder"
            )
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} is not a Stable Diffusion checkpoint this batchgen can read (no UNet "
            f"keys of {listing(b.label for b in unet_bases)}); give a diffusers folder"
        )
    for known in unet_bases:
        for key, reason in known.refused_checkpoint_keys.items():
            if key in header.tensors:
                raise BatchgenError(f"{where}.checkpoint: {checkpoint} is {reason}")
    conv_in = header.tensors.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != 4:
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} has a UNet with {conv_in.shape[1]} input channels (an inpainting or "
            "other special model); batchgen renders text-to-image models with 4"
        )
    found, width = checkpoint_base(header)
    if found is None:
        widths = listing(f"{b.label} ({b.cross_attention_width})" for b in unet_bases)
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} has a UNet with cross-attention width {width}, not one of {widths}; "
            "give a diffusers folder"
        )
    if found != base:
        raise BatchgenError(f"{where}.base: '{base}' but {checkpoint} is {found} (cross-attention {width}); fix base")
    text_prefix = BY_NAME[base].checkpoint_text_encoder_prefix
    if not any(key.startswith(text_prefix) for key in header.tensors):
        raise BatchgenError(
            f"{where}.checkpoint: {checkpoint} holds no {base} text encoder ({text_prefix}*); use a full checkpoint "
            "(UNet, VAE and text encoders in one file)"
        )
    config_dir = _config_dir(config, base, where)
    if prediction_type is not None and prediction_type not in _PREDICTION_TYPES:
        raise BatchgenError(
            f"{where}.prediction_type: '{prediction_type}' is not one of {', '.join(_PREDICTION_TYPES)}"
        )
    if prediction_type is None and "v_pred" in header.tensors:
        prediction_type = "v_prediction"  # the marker key some trainers and A1111 conversions write
    tokenizers = _tokenizers(base, tokenizer, config_dir, where)
    return SingleFile(config_dir=config_dir, tokenizers=tuple(tokenizers.items()), prediction_type=prediction_type)


def _config_dir(config: str | None, base: str, where: str) -> Path:
    """A folder in diffusers' layout holding model_index.json and each component's config.json."""
    folder = Path(config).expanduser() if config else BY_NAME[base].shipped_configs
    if not (folder / "model_index.json").is_file():
        raise BatchgenError(
            f"{where}.config: {folder} has no model_index.json; name a diffusers folder (configs are enough) or "
            "drop config: to use batchgen's own for the base"
        )
    for component, entry in json.loads((folder / "model_index.json").read_text()).items():
        if isinstance(entry, list) and entry[0] in ("diffusers", "transformers") and "tokenizer" not in component:
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            if not (folder / component / name).is_file():
                raise BatchgenError(f"{where}.config: {folder / component / name} is missing; add it")
    return folder


def _tokenizers(base: str, tokenizer: str | None, config_dir: Path, where: str) -> dict[str, Path]:
    """{tokenizer component: folder}, from `tokenizer:`, the config folder, or the Hugging Face cache."""
    repos = BY_NAME[base].tokenizer_repos
    names = list(repos)
    if tokenizer:
        folder = Path(tokenizer).expanduser()
        if _is_tokenizer(folder) and names == ["tokenizer"]:
            return {"tokenizer": folder}
        found = {name: folder / name for name in names}
        missing = [str(path) for path in found.values() if not _is_tokenizer(path)]
        if missing:
            layout = " and ".join(f"{name}/" for name in names)
            raise BatchgenError(
                f"{where}.tokenizer: {missing[0]} holds no tokenizer (vocab.json and merges.txt, or tokenizer.json); "
                f"give a folder with {layout} copied from {repos[names[0]][0][0]}"
            )
        return found
    if all(_is_tokenizer(config_dir / name) for name in names):
        return {name: config_dir / name for name in names}
    found = {}
    for name in names:
        folder = _cached_tokenizer(repos[name])
        if folder is None:
            repo = repos[name][0][0]
            layout = " and ".join(f"{n}/" for n in names)
            raise BatchgenError(
                f"{where}.tokenizer: no {base} tokenizer found offline; copy {layout} of {repo} into a folder and set "
                f"tokenizer: FOLDER in the model's yaml, or fetch it once with "
                f"`hf download {repo} --include '{'tokenizer*' if len(names) > 1 else 'tokenizer'}/*'`"
            )
        found[name] = folder
    return found


def _is_tokenizer(folder: Path) -> bool:
    bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return folder.is_dir() and (bpe or (folder / "tokenizer.json").is_file())


def _cached_tokenizer(candidates: tuple[tuple[str, str], ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for repo, subfolder in candidates:
        for name in ("vocab.json", "tokenizer.json"):
            filename = f"{subfolder}/{name}" if subfolder else name
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str) and _is_tokenizer(Path(hit).parent):
                return Path(hit).parent
    return None


def convert_transformer(base: str, state: Mapping[str, Any], target: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """{diffusers key: tensor} of the transformer in a single file of an MMDiT base (whole-model or transformer
    only, tensors or shape stand-ins), by the converter its record names (Base.single_file_converter); ValueError
    where it does not fit `target`, the configured model's {key: shape}; BatchgenError for a base with none."""
    record = BY_NAME[base]
    if not record.single_file_converter:
        raise BatchgenError(
            f"base '{base}' ({record.label}) has no single-file transformer converter (Base.single_file_converter); "
            "use a diffusers folder for it"
        )
    module_name, function = record.single_file_converter.split(":")
    module = importlib.import_module(module_name)  # only a model read from such a file imports it
    return getattr(module, function)(module.transformer_keys(state), target)


def _transformer_single_file(
    checkpoint: Path, header: Header, found: str, base: str, config: str | None, where: str, given: frozenset[str]
) -> SingleFile:
    """An MMDiT transformer in its original layout (FLUX.1's BFL, SD3's SGM), alone or in a ComfyUI whole-model
    file. Its text encoders and VAE come from `config:`, a diffusers folder of the base (the file's own copies of
    them, if any, are not read): they are the same for every fine-tune of a base, and a folder of them is what
    diffusers users already have."""
    record = BY_NAME[found]
    if base != found:
        raise BatchgenError(f"{where}.base: '{base}' but {checkpoint} is a {record.label} checkpoint; fix base")
    example = record.tokenizer_repos["tokenizer"][0][0]  # the base's reference release
    fix = (
        f"give config: a diffusers {record.label} folder with its text encoders, tokenizers and VAE (its "
        f"transformer/ needs only config.json), e.g. {example} downloaded without transformer/*.safetensors"
    )
    if not config:
        raise BatchgenError(f"{where}.config: {checkpoint} is read for {record.label}'s transformer alone; {fix}")
    folder = Path(config).expanduser()
    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        raise BatchgenError(f"{where}.config: {index_path} is missing or not JSON; {fix}") from None
    if index.get("_class_name") != record.pipeline_class:
        raise BatchgenError(
            f"{where}.config: {folder} is a {index.get('_class_name')} folder, not a {record.pipeline_class}; {fix}"
        )
    for component in ("transformer", "vae", "scheduler"):
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        if not (folder / component / name).is_file():
            raise BatchgenError(f"{where}.config: {folder / component / name} is missing; {fix}")
    if "vae" not in given and not any((folder / "vae").glob("*.safetensors")):
        raise BatchgenError(f"{where}.config: {folder / 'vae'} has no weights (*.safetensors); {fix}")
    for component in record.text_encoders:
        present = (folder / component / "config.json").is_file()
        if present and component not in given and not _has_weights(folder / component):
            raise BatchgenError(
                f"{where}.config: {folder / component} has no weights (*.safetensors); add them, or name its file in "
                f"{where}.text_encoders.{component}"
            )
    _check_transformer_layout(checkpoint, header, base, folder / "transformer" / "config.json", where)
    return SingleFile(config_dir=folder, tokenizers=())


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def check_component_file(component: str, path: Path, header: Header, config_dir: Path, base: str, where: str) -> str:
    """The kind (vae, clip, t5) of a whole-file VAE or text encoder that fits the component the model's config
    folder describes, read from the file's header; every mismatch is an error naming `where`, before a load."""
    from batchgen.assets.architecture import meta_component  # lazy: only a model naming such files builds one
    from batchgen.assets.loras import Shape

    index_path = config_dir / "model_index.json"
    entry = json.loads(index_path.read_text()).get(component)
    class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    kind = KIND_OF_CLASS.get(class_name or "")
    if kind is None:
        raise BatchgenError(
            f"{where}: this model's {component} is {class_name or 'absent'} ({index_path}); batchgen reads whole "
            f"files of {listing(sorted(KIND_OF_CLASS))} components"
        )
    if not (config_dir / component / "config.json").is_file():
        raise BatchgenError(f"{where}: {config_dir / component / 'config.json'} is missing; the file is built from it")
    shapes = {key: Shape(tuple(info.shape)) for key, info in header.tensors.items()}
    found = file_kinds(list(shapes))
    if found and kind not in found:
        raise BatchgenError(
            f"{where}: {path} holds {listing(KIND_NAMES[k] for k in found)}, not {KIND_NAMES[kind]}; give the file "
            f"of this model's {component} ({class_name})"
        )
    model = meta_component(config_dir, component, entry[0], class_name)
    target = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    try:
        convert_component(kind, shapes, target)
    except ValueError as e:
        label = BY_NAME[base].label
        raise BatchgenError(f"{where}: {path}: {e}; is it {label}'s {component} ({class_name})?") from None
    return kind


def _check_transformer_layout(checkpoint: Path, header: Header, base: str, config: Path, where: str) -> None:
    """Every weight of the configured transformer is in the file at its shape, read from the header: a file that
    does not fit fails here, not after minutes of loading."""
    from batchgen.assets.architecture import meta_denoiser  # lazy: only an MMDiT single file builds one
    from batchgen.assets.loras import Shape

    model = meta_denoiser(json.loads(config.read_text()), base)
    target = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    try:
        shapes = {key: Shape(tuple(info.shape)) for key, info in header.tensors.items()}
        convert_transformer(base, shapes, target)
    except ValueError as e:
        raise BatchgenError(f"{where}.checkpoint: {checkpoint}: {e}; is {config} this model's config?") from None
