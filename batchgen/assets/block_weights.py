"""Per-block LoRA weights as the webui's "LoRA Block Weight" extension (hako-mikan/sd-webui-lora-block-weight)
defines them: the block ids, its built-in presets, how a short vector expands, and which module falls in which block.

The extension names blocks after the original (CompVis / SGM) UNet layout: BASE is the text encoder(s), INnn the
UNet's input_blocks[nn] (input_blocks[0] is conv_in, downsamplers are input blocks of their own), M00 the
middle_block, OUTnn output_blocks[nn] (upsamplers share the output block of their level's last resnet). SD1 and SD2
have input/output blocks 0-11 (26 ids with BASE and M00), SDXL 0-8 (20 ids). The short vectors (17 for SD1/SD2, 12 for
SDXL) name only the blocks a plain attention-only LoRA has keys in.

Facts from the extension (scripts/lora_block_weight.py), kept here because batchgen has no other source for them:
- A vector of any known length is spread onto the 26 ids by block id, and every id it does not name gets 0
  (``to26``): a 17-vector zeroes IN00, IN03, IN06, IN09-IN11 and OUT00-OUT02, which only LoCon-style LoRAs have.
- A module's block is found by substring on its A1111 key (``diffusion_model_input_blocks_4_...`` -> IN04; any key
  containing ``encoder`` or ``transformer_resblocks`` -> BASE). A module no block string matches keeps ratio 1: the
  LoRA's own weight (time_embed, label_emb, out = conv_norm_out/conv_out, the text encoders' embeddings and final
  norm).
- The model type is never consulted: the built-in presets are 17-vectors and an SDXL render applies them by block id
  like any other 17-vector (see ``parse_blocks``).
- FLUX.1 has ids of its own (BLOCKIDFLUX, 61 of them: CLIP, T5, IN, D00-D18, S00-S37, OUT) and one preset, FLUXALL;
  a FLUX module's block comes from its BFL name (``get_flux_blocks``), which ``bases/flux.py`` reads on diffusers'
  names. The extension turns a vector of any other length into a 26-vector even for FLUX, where that means
  nothing: batchgen refuses it, and refuses SD presets on FLUX and FLUXALL on SD.
No torch here: planning resolves the vector, the patcher asks ``module_weight`` per module.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence

from batchgen.assets.bases import BASES, BY_NAME, SD1, flux
from batchgen.assets.text_model import without_level
from batchgen.errors import BatchgenError
from batchgen.settings import did_you_mean

# base -> vector length -> block ids in vector order, as each base module declares them.
BLOCK_IDS: dict[str, Mapping[int, tuple[str, ...]]] = {base.name: base.block_ids for base in BASES if base.block_ids}

# The extension's default presets (DEF_WEIGHT_PRESET), all 17-vectors in the SD1/SD2 order, but FLUXALL.
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}
_PRESET_IDS = SD1.block_ids[17]  # the block ids of every SD preset: the extension's SD1 17-vector
FLUX_PRESETS: dict[str, tuple[float, ...]] = {"FLUXALL": (1,) * len(flux.BLOCK_IDS)}
# Each built-in preset with the ids its vector is written in; it applies to a base that has any of them.
_BUILT_IN: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    **{name: (vector, _PRESET_IDS) for name, vector in PRESETS.items()},
    **{name: (vector, flux.BLOCK_IDS) for name, vector in FLUX_PRESETS.items()},
}

# The extension's special entries (case-sensitive): R and U draw a random weight per image, X... takes the prompt's
# extra weight (X, X+0.5, X-1).
_SPECIAL = re.compile(r"[RU]|X.*")


def long_ids(base: str, where: str = "blocks") -> tuple[str, ...]:
    """The block ids of the full vector for this base (26 for SD1/SD2, 20 for SDXL, 61 for FLUX.1), in vector
    order."""
    lengths = BLOCK_IDS.get(base)
    if lengths is None:
        raise BatchgenError(
            f"{where}: block weights are not defined for base '{base}'; the LoRA Block Weight extension has them for "
            f"{', '.join(BLOCK_IDS)} only: remove blocks: from this LoRA"
        )
    return lengths[max(lengths)]


def parse_blocks(
    value: object, base: str, where: str, user_presets: Mapping[str, str | Sequence[object]] | None = None
) -> tuple[float, ...]:
    """The full per-block vector (``long_ids(base)`` order) for a `blocks:` value: a preset name, the extension's
    comma-separated text ("1,0,0.5,...") or a list of numbers.

    A vector written out (inline or as a user preset) must have one of the base's lengths; a short one expands as the
    extension does, with 0 for the blocks it does not name. A built-in preset is a 17-vector whatever the base: on
    SDXL it applies by block id, as in the extension (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT08 take
    its values; IN00, IN03, IN06 and OUT00-OUT02 get 0).
    """
    ids = long_ids(base, where)
    user_presets = user_presets or {}
    if isinstance(value, str) and "," not in value and not _is_number_text(value.strip()):
        name = value.strip()
        if name in user_presets:
            at = f"{where}: preset '{name}'"
            return _vector(_entries(user_presets[name], at), base, at)
        if name in _BUILT_IN:
            vector, preset_ids = _BUILT_IN[name]
            if set(preset_ids).isdisjoint(ids):
                raise BatchgenError(_foreign_preset(name, base, where, [*user_presets, *_presets_for(base)]))
            return _spread(vector, preset_ids, ids)
        raise BatchgenError(_unknown_preset(name, where, [*user_presets, *_presets_for(base)]))
    return _vector(_entries(value, where), base, where)


def block_of(component: str, path: str, base: str) -> str | None:
    """The block id a module is weighted by, from its pipeline component and diffusers ``named_modules()`` path;
    None for modules the extension leaves at the LoRA's own weight (see the module docstring)."""
    ids = long_ids(base)
    rule = BY_NAME[base].module_block
    block = rule(component, path) if rule else _sd_block(component, path, base)
    return block if block in ids else None


def _sd_block(component: str, path: str, base: str) -> str | None:
    if component in BY_NAME[base].text_encoders:
        # A1111 keys the encoder layers "..._text_model_encoder_layers_..." (CLIP) or "..._transformer_resblocks_..."
        # (OpenCLIP): both match BASE. The embeddings, final norm and projection match neither. transformers 5 drops
        # CLIPTextModel's text_model level (not CLIPTextModelWithProjection's): either spelling is the same module.
        inner = without_level(path)
        return "BASE" if inner.split(".", 1)[0] == "encoder" else None
    if component != "unet":
        raise ValueError(f"block_of: unknown component {component!r}")
    return _unet_block(path)


def module_weight(vector: Sequence[float], base: str, component: str, path: str) -> float:
    """The factor the block vector puts on this module's LoRA delta: its block's weight, 1.0 outside every block."""
    ids = long_ids(base)
    if len(vector) != len(ids):
        raise ValueError(f"module_weight: a {base} block vector has {len(ids)} weights, not {len(vector)}")
    block = block_of(component, path, base)
    return 1.0 if block is None else float(vector[ids.index(block)])


# --- parsing -------------------------------------------------------------------------------------------------------


def _entries(value: object, where: str) -> list[object]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    if isinstance(value, list | tuple):
        return list(value)
    raise BatchgenError(
        f"{where}: blocks is {type(value).__name__} {value!r}; give a preset name, comma-separated weights "
        "('1,0,0,...') or a list of numbers"
    )


def _vector(entries: list[object], base: str, where: str) -> tuple[float, ...]:
    lengths = BLOCK_IDS[base]
    ids = lengths.get(len(entries))
    if ids is None:
        other = [name for name, known in BLOCK_IDS.items() if len(entries) in known]
        layout = f" ({len(entries)} is the {'/'.join(other)} count)" if other else ""
        full = max(lengths)
        counts = [f"{n} ({_ranges(lengths[n]) if n == full else ', '.join(lengths[n])})" for n in sorted(lengths)]
        raise BatchgenError(f"{where}: {len(entries)} block weights for {base}{layout}; give {' or '.join(counts)}")
    values = [_number(entry, i, block, where) for i, (entry, block) in enumerate(zip(entries, ids, strict=True), 1)]
    return _spread(tuple(values), ids, lengths[max(lengths)])


def _number(entry: object, position: int, block: str, where: str) -> float:
    at = f"{where}: block weight {position} ({block})"
    if isinstance(entry, numbers.Real) and not isinstance(entry, bool):
        number = float(entry)
    elif isinstance(entry, str) and _is_number_text(entry):
        number = float(entry)
    elif isinstance(entry, str) and _SPECIAL.fullmatch(entry):
        raise BatchgenError(
            f"{at} is '{entry}': the extension's random (R, U) and inherited (X) weights are not supported; "
            "give a number"
        )
    else:
        raise BatchgenError(f"{at} is {entry!r}, not a number")
    if not math.isfinite(number):
        raise BatchgenError(f"{at} is {entry!r}; give a finite number")
    return number


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _spread(values: tuple[float, ...], ids: tuple[str, ...], target: tuple[str, ...]) -> tuple[float, ...]:
    """The extension's to26: each value to its block id; target ids the vector does not name get 0."""
    by_id = dict(zip(ids, values, strict=True))
    return tuple(float(by_id.get(block, 0.0)) for block in target)


def _presets_for(base: str) -> list[str]:
    ids = long_ids(base)
    return [name for name, (_, preset_ids) in _BUILT_IN.items() if not set(preset_ids).isdisjoint(ids)]


def _foreign_preset(name: str, base: str, where: str, known: list[str]) -> str:
    owners = [b for b, lengths in BLOCK_IDS.items() if not set(_BUILT_IN[name][1]).isdisjoint(lengths[max(lengths)])]
    return f"{where}: preset '{name}' is for {', '.join(owners)}, not {base}; presets for {base}: {', '.join(known)}"


def _unknown_preset(name: str, where: str, known: list[str]) -> str:
    # Preset names are case-sensitive in the extension; a case slip is the likeliest typo.
    folded = [option for option in known if option.lower() == name.lower()]
    if folded:
        hint = f" (did you mean '{folded[0]}'?)"
    else:
        hint = did_you_mean(name, known) or did_you_mean(name.upper(), known)
    return f"{where}: unknown block weight preset '{name}'{hint}; presets: {', '.join(known)}"


def _ranges(ids: tuple[str, ...]) -> str:
    """BASE, IN00-IN11, M00, OUT00-OUT11 (or FLUX's CLIP, T5, IN, D00-D18, S00-S37, OUT): the long vectors named
    compactly for messages."""
    parts: list[str] = []
    for block in ids:
        prefix = block.rstrip("0123456789")
        if parts and parts[-1].startswith(prefix) and prefix in ("IN", "OUT", "D", "S"):
            parts[-1] = f"{parts[-1].split('-')[0]}-{block}"
        else:
            parts.append(block)
    return ", ".join(parts)


# --- UNet paths ----------------------------------------------------------------------------------------------------

# The original layout numbers each down level's two resnets (with their transformers) and, on all but the last level,
# its downsampler as three input blocks after conv_in; each up level's three resnets as three output blocks, the
# upsampler inside the last. The extension's ids assume this layout (layers_per_block 2), as SD1, SD2 and SDXL have.
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.|$)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.|$)")


def _unet_block(path: str) -> str | None:
    if path == "conv_in" or path.startswith("conv_in."):
        return "IN00"  # input_blocks.0.0 in the original layout
    if path == "mid_block" or path.startswith("mid_block."):
        return "M00"
    if match := _DOWN.match(path):
        level, kind, layer = int(match[1]), match[2], int(match[3])
        return f"IN{3 + 3 * level if kind == 'downsamplers' else 1 + 3 * level + layer:02d}"
    if match := _UP.match(path):
        level, kind, layer = int(match[1]), match[2], int(match[3])
        return f"OUT{3 * level + (2 if kind == 'upsamplers' else layer):02d}"
    return None
