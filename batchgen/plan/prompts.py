"""Prompts: slots filled with the product of their values, A1111's <lora:...> tags read out of the text, LoRA
trigger words put before it, and the TI triggers and LoRAs a sweep's texts mention."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from batchgen.assets.embeddings import TRIGGER_PATTERN
from batchgen.axes import LORA_TAG, with_trigger_words
from batchgen.config import SweepConfig
from batchgen.errors import BatchgenError
from batchgen.plan.prompts_file import PromptRow
from batchgen.plan.stacks import StackState
from batchgen.plan.values import blocks_spec, weights
from batchgen.settings import did_you_mean
from batchgen.spec import LoraWeight, ModelSpec

SLOT_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptVariant:
    template: str
    text: str  # what the text encoder reads: slots filled, <lora:...> tags taken out
    slots: tuple[tuple[str, str], ...]
    loras: tuple[LoraWeight, ...] = ()  # from <lora:...> tags, sorted by name
    negative_prompt: str | None = None  # a prompts_file row's own; None: the sweep's
    seed: int | None = None  # a prompts_file row's own; None: the sweep's seeds
    where: str = "sweep.prompts"  # the config key errors about this prompt name


def expand_prompts(sweep: SweepConfig, file_rows: Sequence[PromptRow] = ()) -> list[PromptVariant]:
    """Fill each prompt's slots with the product of their values; a slot multiplies only prompts using it.

    Prompts from sweep.prompts_file follow sweep.prompts, each with its row's negative prompt and seed."""
    prompts = [*sweep.prompts, *(row.prompt for row in file_rows)]
    own = {len(sweep.prompts) + i: row for i, row in enumerate(file_rows)}
    if not prompts:
        raise BatchgenError("sweep.prompts is empty; give at least one prompt")
    for name, values in sweep.slots.items():
        if not values:
            raise BatchgenError(f"sweep.slots.{name} is empty; give at least one value or remove the slot")
    variants: list[PromptVariant] = []
    for i, template in enumerate(prompts):
        if not isinstance(template, str) or not template.strip():
            raise BatchgenError(f"sweep.prompts[{i}] is empty; write a prompt or remove the entry")
        names = list(dict.fromkeys(SLOT_PATTERN.findall(template)))
        for name in names:
            if name not in sweep.slots:
                raise BatchgenError(
                    f"sweep.prompts[{i}]: slot {{{name}}} is not defined in sweep.slots"
                    f"{did_you_mean(name, list(sweep.slots))}"
                )
        for combo in itertools.product(*(sweep.slots[n] for n in names)):
            filled = dict(zip(names, combo, strict=True))
            text = SLOT_PATTERN.sub(lambda m, f=filled: f.get(m.group(1), m.group(0)), template)
            text, loras = split_lora_tags(text, f"sweep.prompts[{i}]")
            row = own.get(i)
            variants.append(
                PromptVariant(
                    template=template,
                    text=text,
                    slots=tuple(filled.items()),
                    loras=loras,
                    negative_prompt=row.negative_prompt if row else None,
                    seed=row.seed if row else None,
                    where=f"sweep.prompts[{i}]",
                )
            )
    return variants


def unused_slot_warnings(sweep: SweepConfig, prompts: Sequence[PromptVariant]) -> list[str]:
    """Slots no prompt contains multiply nothing, so their values would silently appear nowhere: one warning each."""
    used = {name for prompt in prompts for name, _ in prompt.slots}
    return [
        f"sweep.slots.{name}: no prompt contains {{{name}}}{did_you_mean(name, sorted(used))}, so its values are "
        f"never rendered; put {{{name}}} in a prompt, or remove the slot (~sweep.slots.{name} on the command line)"
        for name in sweep.slots
        if name not in used
    ]


def split_lora_tags(text: str, where: str) -> tuple[str, tuple[LoraWeight, ...]]:
    """The prompt without its <lora:...> tags, and the LoRAs they name (A1111's reading: the first number is the
    text encoder's weight and the unet's too unless a second follows; te= and unet= name them)."""
    found: dict[str, LoraWeight] = {}
    for match in LORA_TAG.finditer(text):
        name, params = match.group(1).strip(), match.group(2).split(":")[1:]
        positional = [p for p in params if "=" not in p]
        named = dict(p.split("=", 1) for p in params if "=" in p)
        if len(positional) > 2 or set(named) - {"te", "unet", "lbw"}:
            raise BatchgenError(
                f"{where}: {match.group(0)} has parameters batchgen does not read; write <lora:{name}:w>, "
                f"<lora:{name}:te=w:unet=w> or <lora:{name}:w:lbw=PRESET>"
            )
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise BatchgenError(
                f"{where}: {match.group(0)} has a weight that is not a number; write <lora:{name}:0.8>"
            ) from None
        for w in (unet, te):
            weights(w, f"{where}: {match.group(0)}")
        if name in found:
            raise BatchgenError(f"{where}: LoRA '{name}' is tagged twice; keep one <lora:{name}:...> tag")
        blocks = blocks_spec(named["lbw"], f"{where}: {match.group(0)}") if "lbw" in named else ""
        found[name] = LoraWeight(name, unet, te, blocks)
    if not found:
        return text, ()
    cleaned = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", text))).strip()
    return cleaned, tuple(found[n] for n in sorted(found))


def check_negative_has_no_tags(sweep: SweepConfig, file_rows: Sequence[PromptRow]) -> None:
    if any(LORA_TAG.search(n or "") for n in (sweep.negative_prompt, *(r.negative_prompt for r in file_rows))):
        raise BatchgenError(
            "sweep.negative_prompt: <lora:...> tags work in prompts only (a negative prompt does not choose weights); "
            "move the tag to the prompt or a stack"
        )


def lora_trigger_words(spec: ModelSpec, stack: StackState, text: str, sweep: SweepConfig) -> list[tuple[str, str]]:
    """(LoRA, words) to put before a prompt, in the stack's order: the configured words, else with
    sweep.add_lora_triggers the file's own; words the prompt already has are not repeated."""
    out = []
    for lw in stack.loras:
        if lw.name in sweep.lora_triggers:
            words = sweep.lora_triggers[lw.name]
        else:
            file = spec.lora(lw.name)
            words = file.trigger if file is not None and sweep.add_lora_triggers else ""
        words = (words or "").strip()
        # Checked against what is already added too: two LoRAs trained on one word need it once.
        seen = with_trigger_words(text, [w for _, w in out])
        if words and not re.search(rf"(?<!\w){re.escape(words)}(?!\w)", seen, flags=re.IGNORECASE):
            out.append((lw.name, words))
    return out


def triggers(*texts: str) -> list[str]:
    """TI triggers in the texts, each once, in order of appearance."""
    found: dict[str, None] = {}
    for text in texts:
        for trigger in TRIGGER_PATTERN.findall(text):
            found.setdefault(trigger)
    return list(found)


def used_assets(sweep: SweepConfig, file_rows: Sequence[PromptRow] = ()) -> tuple[set[str], set[str]]:
    """(LoRA names, triggers) the sweep mentions, so only those files are hashed and read before planning."""
    loras = {name for stack in (sweep.stacks or {}).values() for name in (stack or {})}
    texts = [*sweep.prompts, sweep.negative_prompt, *(v for values in sweep.slots.values() for v in values)]
    texts += list(sweep.lora_triggers.values())
    texts += [t for row in file_rows for t in (row.prompt, row.negative_prompt) if t]
    texts = [t for t in texts if isinstance(t, str)]
    loras |= {m.group(1).strip() for t in texts for m in LORA_TAG.finditer(t)}
    return loras, set(triggers(*(LORA_TAG.sub("", t) for t in texts)))
