"""PNG bytes with A1111's `parameters` text (so existing readers show them) and the full job as JSON."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL.PngImagePlugin import PngInfo

from batchgen.schedulers import SCHEDULERS
from batchgen.spec import ModelSpec

JSON_CHUNK = "batchgen"


def a1111_parameters(row: dict[str, Any], spec: ModelSpec) -> str:
    """Prompt line (LoRAs as <lora:...> tags, as A1111 writes them), negative line, then key: value pairs."""
    loras = [entry.split(":", 1) for entry in row["loras"].split(";") if entry]
    tags = "".join(f" <lora:{name}:{_a1111_weight(weight)}>" for name, weight in loras)
    scheduler = row["scheduler"]
    sampler = SCHEDULERS[scheduler].a1111 if scheduler in SCHEDULERS else scheduler
    fields = [
        ("Steps", row["steps"]),
        ("Sampler", sampler),
        ("CFG scale", row["guidance_scale"]),
        ("Seed", row["seed"]),
        ("Size", f"{row['width']}x{row['height']}"),
        ("Model hash", spec.checkpoint_sha256[:10]),
        ("Model", spec.name),
    ]
    if loras:
        hashes = ", ".join(f"{name}: {spec.lora(name).sha256[:12]}" for name, _ in loras)
        fields.append(("Lora hashes", f'"{hashes}"'))
    triggers = [t for t in row["embeddings"].split(";") if t]
    if triggers:
        hashes = ", ".join(f"{t}: {spec.embedding(t).sha256[:12]}" for t in triggers)
        fields.append(("TI hashes", f'"{hashes}"'))
    fields.append(("Version", "batchgen"))
    lines = [row["prompt"] + tags]
    if row["negative_prompt"]:
        lines.append(f"Negative prompt: {row['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def encode_png(image, parameters: str, job: dict[str, Any]) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text(JSON_CHUNK, json.dumps(job, sort_keys=True, default=str))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _a1111_weight(weight: str) -> str:
    # A1111 names split multipliers te= and unet=; ours are written unet/te in the manifest.
    if "/" in weight:
        unet, te = weight.split("/", 1)
        return f"te={te}:unet={unet}"
    return weight
