"""PNG bytes with A1111's `parameters` text (so existing readers show them) and the full job as JSON."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from PIL.PngImagePlugin import PngInfo

from batchgen.assets.bases import BY_NAME
from batchgen.assets.safetensors_header import read_header
from batchgen.cells import LBW, LoraEntry, parse_loras, parse_names
from batchgen.columns import JSON_CHUNK
from batchgen.errors import BatchgenError
from batchgen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from batchgen.settings import SETTINGS
from batchgen.spec import LoraFile, ModelSpec

_CHUNK = 1 << 20


# A1111's infotext starts with these keys, in this order; the other settings' keys follow in the table's order.
A1111_FIRST = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model")


def a1111_parameters(row: dict[str, Any], spec: ModelSpec) -> str:
    """Prompt line (LoRAs as <lora:...> tags, as A1111 writes them), negative line, then key: value pairs."""
    loras = parse_loras(row["loras"])
    tags = "".join(f" <lora:{entry.name}:{_a1111_weight(entry)}>" for entry in loras)
    cells = {**row, "scheduler": _sampler(row["scheduler"], spec)}
    fields = [
        (s.a1111.key, s.a1111.text.format_map(cells))
        for s in SETTINGS
        if s.a1111 is not None and not (s.a1111.omit_at_default and s.read(row.get(s.name)) == s.value_default)
    ]
    fields += [("Model hash", spec.checkpoint_sha256[:10]), ("Model", spec.name)]
    first = {key: i for i, key in enumerate(A1111_FIRST)}
    fields.sort(key=lambda item: first.get(item[0], len(first)))  # stable: the rest keep the table's order
    if BY_NAME[spec.base].guidance == "distilled":
        # As Forge writes FLUX.1: no real CFG (scale 1), the transformer's guidance input beside it.
        at = next(i for i, (key, _) in enumerate(fields) if key == "CFG scale")
        fields[at : at + 1] = [("CFG scale", "1"), ("Distilled CFG Scale", fields[at][1])]
    if loras:
        hashes = ", ".join(f"{_alias(e.name)}: {a1111_lora_hash(spec.lora(e.name))}" for e in loras)
        fields.append(("Lora hashes", hashes))
    triggers = parse_names(row["embeddings"])
    if triggers:
        hashes = ", ".join(f"{_alias(t)}: {spec.embedding(t).sha256[:12]}" for t in triggers)
        fields.append(("TI hashes", hashes))
    fields.append(("Version", "batchgen"))
    lines = [row["prompt"] + tags]
    if row["negative_prompt"]:
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def _sampler(scheduler: str, spec: ModelSpec) -> str:
    if scheduler in SCHEDULERS:
        return SCHEDULERS[scheduler].a1111
    if scheduler == DEFAULT_SCHEDULER:
        # "default" means nothing to A1111; name the checkpoint's own scheduler instead when we know it.
        return _checkpoint_sampler(str(spec.config_dir), spec.base) or scheduler
    return scheduler


@functools.lru_cache(maxsize=32)
def _checkpoint_sampler(checkpoint: str, base: str) -> str | None:
    """A1111's name for the scheduler a checkpoint ships: its base's own (Base.own_samplers) or one of
    batchgen.schedulers."""
    try:
        config = json.loads((Path(checkpoint) / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    own = BY_NAME[base].own_samplers
    if config.get("_class_name") in own:
        return own[config["_class_name"]]
    karras = bool(config.get("use_karras_sigmas"))
    for choice in SCHEDULERS.values():
        if choice.cls == config.get("_class_name") and bool(choice.kwargs.get("use_karras_sigmas")) == karras:
            return choice.a1111
    return None


def _quote(value: object) -> object:
    """A1111's infotext quoting: a value with a comma, colon or newline is written as a JSON string."""
    value = str(value)
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _alias(name: str) -> str:
    # A1111 drops these from names in "Lora hashes" and "TI hashes" so the "name: hash, ..." list stays parseable.
    return name.replace(":", "").replace(",", "")


def a1111_lora_hash(lora: LoraFile) -> str:
    """The 12 hex digits A1111 writes for a LoRA (what Civitai calls AutoV3): the file's `sshs_model_hash`
    metadata, else for safetensors the sha256 of the tensor data after the header (kohya's "addnet" hash),
    else the sha256 of the whole file."""
    path = Path(lora.path)
    if path.suffix.lower() != ".safetensors":
        return lora.sha256[:12]
    stat = path.stat()
    return _safetensors_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)[:12]


@functools.lru_cache(maxsize=256)  # keyed by size and mtime: a replaced file is hashed again
def _safetensors_hash(path: str, size: int, mtime_ns: int) -> str:
    try:
        stored = read_header(Path(path)).metadata.get("sshs_model_hash", "")
    except BatchgenError:
        stored = ""
    if stored:
        return stored
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def encode_png(image, parameters: str, job: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text(JSON_CHUNK, json.dumps(job, sort_keys=True, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _a1111_weight(entry: LoraEntry) -> str:
    # A1111 names split multipliers te= and unet=; ours are written unet/te in the manifest. Block weights stay
    # `:lbw=...`, the extension's own tag parameter.
    weight = f"te={entry.te_weight}:unet={entry.unet_weight}" if entry.te_weight else entry.weight
    return f"{weight}{LBW}{entry.blocks}" if entry.blocks else weight
