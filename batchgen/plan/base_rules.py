"""What a base cannot render, refused at planning so that no job fails mid-run. No torch here.

SD3 and FLUX encode their prompts through the pipeline (T5 beside CLIP): batchgen passes each text as written, so
A1111 weights, BREAK and prompt editing, compel and clip skip have nothing to act on, and their flow-matching
scheduler is the only one that fits them. Silently dropping any of those would give images that do not show what
the sweep asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchgen.assets.bases import BY_NAME
from batchgen.errors import BatchgenError
from batchgen.prompt_syntax import plain_text
from batchgen.schedulers import DEFAULT_SCHEDULER
from batchgen.spec import ModelSpec


def check_base_rules(
    texts: Sequence[tuple[str, str]], specs: dict[str, ModelSpec], settings: dict[str, list[Any]]
) -> list[str]:
    """Raise BatchgenError for the first setting or text a selected model's base cannot render; `texts` are
    (text, config key) pairs. Returns warnings for settings no selected model reads."""
    warnings = []
    lengths = [length for length in settings["max_sequence_length"] if length]
    if lengths and not any(BY_NAME[spec.base].pipeline_encodes_prompts for spec in specs.values()):
        names = ", ".join(f"{spec.name} is {BY_NAME[spec.base].label}" for spec in specs.values())
        warnings.append(
            f"sweep.max_sequence_length: {lengths[0]} has no effect here: no model of this sweep has T5 to read it "
            f"({names}); its jobs render as at 0"
        )
    for spec in specs.values():
        base = BY_NAME[spec.base]
        if not base.pipeline_encodes_prompts:
            continue
        model = f"model {spec.name} is {base.label}"
        for scheduler in settings["scheduler"]:
            if scheduler != DEFAULT_SCHEDULER:
                raise BatchgenError(
                    f"sweep.scheduler: '{scheduler}' cannot render {spec.name} ({base.label}), whose flow-matching "
                    f"scheduler is its own; use {DEFAULT_SCHEDULER}, or a sweep without {spec.name}"
                )
        for clip_skip in settings["clip_skip"]:
            if clip_skip != 1:
                raise BatchgenError(
                    f"sweep.clip_skip: {clip_skip}, but {model}, whose pipeline encodes its prompts itself; use 1"
                )
        for syntax in settings["prompt_syntax"]:
            for text, where in texts:
                if any(plain_text(text, syntax, steps) is None for steps in settings["steps"]):
                    raise BatchgenError(
                        f"{where}: '{text}' uses {syntax} syntax, but {model}, whose pipeline reads each text as "
                        "written (no weights, BREAK or prompt editing); set sweep.prompt_syntax=plain to pass it "
                        "as written, or remove the syntax"
                    )
    return warnings
