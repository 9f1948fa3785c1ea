"""Prompt syntax in planning: each text checked under every syntax the sweep renders it with, and what a job_id
hashes of its prompt and negative prompt."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from batchgen.assets.tokens import ChunkCounter
from batchgen.errors import BatchgenError
from batchgen.plan.base_rules import check_base_rules
from batchgen.plan.compel_rules import check_compel
from batchgen.plan.prompts import PromptVariant
from batchgen.prompt_syntax import check, id_part
from batchgen.spec import ModelSpec


def check_syntax(
    prompts: Sequence[PromptVariant],
    negative: str,
    syntaxes: Sequence[str],
    specs: dict[str, ModelSpec],
    settings: dict[str, list[Any]],
) -> list[str]:
    """Errors (raised) and warnings (returned, each once) for every text under every syntax of the sweep."""
    texts = [(p.text, p.where) for p in prompts]
    texts += [(p.negative_prompt, f"{p.where} (its negative prompt)") for p in prompts if p.negative_prompt]
    texts.append((negative, "sweep.negative_prompt"))
    warnings = dict.fromkeys(check_base_rules(texts, specs, settings))
    for syntax in syntaxes:
        for text, where in texts:
            warnings.update(dict.fromkeys(check(text, syntax, where)))
        if syntax == "compel":
            for text, where in texts:
                _check_compel(text, where)
            for spec in specs.values():
                for clip_skip in settings["clip_skip"]:
                    check_compel(spec.base, clip_skip, f"model {spec.name}")
    return list(warnings)


def text_payload(prompt: str, negative: str, setting: dict[str, Any], counter: ChunkCounter) -> dict[str, Any]:
    """The job_id's part for the two texts: each as its parse (a text without syntax: the text itself, so ids from
    before prompt syntax stay), and pad_prompts where it changes pixels: always for parsed texts; for plain ones
    only off, where the two have different chunk counts (before the setting, those were padded)."""
    syntax, steps = setting["prompt_syntax"], setting["steps"]
    out: dict[str, Any] = {
        "prompt": id_part(prompt, syntax, steps),
        "negative_prompt": id_part(negative, syntax, steps),
    }
    if setting["guidance_scale"] <= 1 or setting["truncate_prompts"]:
        # No negative pass, or one chunk each. Not Base.negative_pass: an id rule, kept as ids have hashed it
        # (FLUX.1's jobs, which run no pass, hash pad_prompts as a CFG job would, so their ids stay).
        return out
    if not (isinstance(out["prompt"], str) and isinstance(out["negative_prompt"], str)):
        out["pad_prompts"] = setting["pad_prompts"]
    elif not setting["pad_prompts"] and counter.chunks(out["prompt"]) != counter.chunks(out["negative_prompt"]):
        out["pad_prompts"] = False
    return out


# compel parses these but leaves them to the caller: a LoRA it names would be ignored, an edit dropped.
_COMPEL_UNSUPPORTED = {
    re.compile(r"\b(?:withLora|useLora)\("): "withLora(); choose LoRAs in sweep.stacks or with <lora:name:w> tags",
    re.compile(r"\.swap\("): ".swap(); use prompt_syntax=a1111 and its prompt editing [from:to:when]",
}


def _check_compel(text: str, where: str) -> None:
    for pattern, fix in _COMPEL_UNSUPPORTED.items():
        if pattern.search(text):
            raise BatchgenError(f"{where}: batchgen does not apply compel's {fix}")
