"""Checks against the models' assets and the grid: a name found for no model is a typo (exit 2, with "did you
mean"), a name some models lack gives skipped rows with the reason."""

from __future__ import annotations

from collections.abc import Sequence

from batchgen.assets.epochs import is_glob, matching
from batchgen.axes import check_grid
from batchgen.config import SweepConfig
from batchgen.errors import BatchgenError
from batchgen.plan.prompts import LORA_TAG, PromptVariant, triggers
from batchgen.plan.stacks import StackState
from batchgen.settings import did_you_mean
from batchgen.spec import ModelSpec


def missing_assets(spec: ModelSpec, stack: StackState, prompt: PromptVariant, negative: str) -> list[str]:
    """Why this model cannot render this combination: a LoRA or TI it lacks, or has only for another base."""
    missing = []
    for lw in stack.loras:
        if is_glob(lw.name):
            missing.append(f"no LoRA file of model {spec.name} matches '{lw.name}'")
        elif not spec.lora(lw.name):
            refusal = spec.refusal("lora", lw.name)
            missing.append(refusal.reason if refusal else f"LoRA '{lw.name}' not found for model {spec.name}")
    for trigger in triggers(prompt.text, negative):
        if not spec.embedding(trigger):
            refusal = spec.refusal("embedding", trigger)
            missing.append(refusal.reason if refusal else f"embedding <{trigger}> not found for model {spec.name}")
    return missing


def _check_glob(specs: dict[str, ModelSpec], pattern: str, where: str) -> None:
    if any(matching(pattern, [f.name for f in spec.loras]) for spec in specs.values()):
        return
    folders = sorted({str(d) for spec in specs.values() for d in spec.lora_dirs})
    raise BatchgenError(
        f"{where}: '{pattern}' matches no LoRA file in {', '.join(folders) or 'no LoRA folder'}; check the pattern "
        "(a glob over file names without the extension, e.g. mylora-*)"
    )


def check_names_exist(
    specs: dict[str, ModelSpec],
    prompts: list[PromptVariant],
    negative: str,
    stacks: list[StackState],
    file_negatives: Sequence[str] = (),
) -> None:
    """A name found for no selected model is a typo, not a skip; one usable by no selected model (a broken file,
    or one of another base everywhere) would only give skipped rows: both are errors."""
    loras = _known(specs, "lora")
    for state in stacks:
        for lw in state.loras:
            where = f"sweep.stacks.{state.stack}"
            if is_glob(lw.name):
                _check_glob(specs, lw.name, where)
                continue
            _check_not_a_path(lw.name, where, " (such as 'ink') and list their folders in models.NAME.loras")
            _check_usable(specs, "lora", lw.name, where, "stack")
            if lw.name not in loras:
                raise BatchgenError(
                    f"sweep.stacks.{state.stack}: LoRA '{lw.name}' is not found for any model"
                    f"{did_you_mean(lw.name, loras)}; LoRAs found: {', '.join(loras) or 'none'}"
                )
    known = _known(specs, "embedding")
    # Errors name a prompt by its index in sweep.prompts, not among its slot-filled variants.
    index = {template: i for i, template in enumerate(dict.fromkeys(p.template for p in prompts))}
    for prompt in prompts:
        where = f"sweep.prompts[{index[prompt.template]}]"
        for lw in prompt.loras:
            _check_not_a_path(lw.name, where)
            _check_usable(specs, "lora", lw.name, where, "prompt")
            if lw.name not in loras:
                raise BatchgenError(
                    f"{where}: <lora:{lw.name}> is not found for any model{did_you_mean(lw.name, loras)}; "
                    f"LoRAs found: {', '.join(loras) or 'none'}"
                )
    for prompt in prompts:
        i = index[prompt.template]
        for trigger in triggers(prompt.text):
            _check_usable(specs, "embedding", trigger, f"sweep.prompts[{i}]", "prompt")
            if trigger not in known:
                raise BatchgenError(
                    f"sweep.prompts[{i}]: embedding <{trigger}> is not found for any model"
                    f"{did_you_mean(trigger, known, '<{}>')}; triggers found: "
                    f"{', '.join(f'<{t}>' for t in known) or 'none'}"
                )
    for trigger in triggers(negative, *file_negatives):
        _check_usable(specs, "embedding", trigger, "sweep.negative_prompt", "prompt")
        if trigger not in known:
            raise BatchgenError(
                f"sweep.negative_prompt: embedding <{trigger}> is not found for any model"
                f"{did_you_mean(trigger, known, '<{}>')}"
            )


def check_lora_triggers(
    sweep: SweepConfig, stacks: list[StackState], prompts: list[PromptVariant], specs: dict[str, ModelSpec]
) -> None:
    """Configured trigger words name a LoRA the sweep uses and hold plain text (TI triggers allowed)."""
    used = sorted({lw.name for s in stacks for lw in s.loras} | {lw.name for p in prompts for lw in p.loras})
    known = _known(specs, "embedding")
    for name, words in sweep.lora_triggers.items():
        where = f"sweep.lora_triggers.{name}"
        if name not in used:
            raise BatchgenError(
                f"{where}: LoRA '{name}' is in no stack or prompt of this sweep{did_you_mean(name, used)}; "
                f"LoRAs used: {', '.join(used) or 'none'}"
            )
        if not isinstance(words, str):
            raise BatchgenError(f"{where}: '{words}' is not text; write the trigger words as a string")
        if LORA_TAG.search(words):
            raise BatchgenError(f"{where}: a <lora:...> tag is not a trigger word; put the LoRA in a stack")
        for trigger in triggers(words):
            if trigger not in known:
                raise BatchgenError(
                    f"{where}: embedding <{trigger}> is not found for any model{did_you_mean(trigger, known, '<{}>')}"
                )


def check_sweep_grid(sweep: SweepConfig, slots: list[str], inline: list[str]) -> None:
    # The report draws the grids; batchgen.axes holds the one list of axis names both check against.
    loras = sorted({name for stack in (sweep.stacks or {}).values() for name in (stack or {})} | set(inline))
    check_grid(sweep.grid.x, sweep.grid.y, sweep.grid.z, slots, loras)


def _check_not_a_path(name: str, where: str, fix: str = "") -> None:
    """LoRAs are named by file stem and looked up in the model's folders; a path would bypass that lookup."""
    if "/" in name or "\\" in name or name.startswith(".."):
        raise BatchgenError(f"{where}: LoRA name '{name}' is a path; name LoRAs by file stem{fix}")


def _check_usable(specs: dict[str, ModelSpec], kind: str, name: str, where: str, place: str) -> None:
    usable = any((s.lora(name) if kind == "lora" else s.embedding(name)) for s in specs.values())
    if usable:
        return
    refusals = [r for s in specs.values() if (r := s.refusal(kind, name)) is not None]
    broken = next((r for r in refusals if r.fatal), None)
    if broken is not None:
        raise BatchgenError(broken.reason)
    bases = {r.base for r in refusals if r.base}
    if refusals and len(bases) == 1:
        base = bases.pop()
        label = f"LoRA '{name}'" if kind == "lora" else f"embedding <{name}>"
        models = ", ".join(f"{s.name} is {s.base}" for s in specs.values())
        fix = f"or render {'an' if base[0] in 'as' else 'a'} {base} model"
        raise BatchgenError(
            f"{where}: {label} is {base}, and no model of this sweep is ({models}); remove it from the {place} {fix}"
        )


def _known(specs: dict[str, ModelSpec], kind: str) -> list[str]:
    """Names on disk for any model, usable or refused for another base: those give skipped jobs, not errors."""
    names = {n for s in specs.values() for k, n in s.discovered if k == kind}
    names |= {f.name for s in specs.values() for f in s.loras} if kind == "lora" else set()
    names |= {f.trigger for s in specs.values() for f in s.embeddings} if kind == "embedding" else set()
    return sorted(names)
