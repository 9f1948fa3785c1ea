"""Config -> validated job table. Pure: no torch, no file reads beyond what ModelSpecs already hold.

Every list in the sweep is an axis. Jobs are expanded model -> LoRA state -> prompt -> seed -> the rest, which
is also the cheapest render order: the most expensive state changes are outermost.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from batchgen.assets.embeddings import TRIGGER_PATTERN
from batchgen.axes import check_grid, with_trigger_words
from batchgen.config import SweepConfig
from batchgen.errors import BatchgenError
from batchgen.prompts_file import PromptRow
from batchgen.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from batchgen.spec import MANIFEST_COLUMNS, Job, LoraWeight, ModelSpec, format_number

MAX_WEIGHT = 10.0
UNUSUAL_WEIGHT = 2.0
SLOT_PATTERN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A1111's extra-network tag: <lora:name>, <lora:name:w>, <lora:name:te_w:unet_w>, <lora:name:te=w:unet=w>.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*)*)>")
SCALAR_AXES = ("seed", "steps", "guidance_scale", "width", "height", "scheduler", "clip_skip")
MAX_CLIP_SKIP = 12  # SD1's encoder has 12 layers; A1111's setting stops there too


@dataclass(frozen=True)
class StackState:
    """One point on the LoRA axis: a named stack at one combination of its weights."""

    stack: str
    loras: tuple[LoraWeight, ...]  # sorted by name

    @property
    def label(self) -> str:
        """`none`, or `ink 0.5 + grain 0.6` (split weights as `unet/te`): grid labels."""
        if not self.loras:
            return "none"
        return " + ".join(lw.label.replace(":", " ", 1) for lw in self.loras)

    @property
    def manifest(self) -> str:
        return ";".join(lw.label for lw in self.loras)


@dataclass(frozen=True)
class PromptVariant:
    template: str
    text: str  # what the text encoder reads: slots filled, <lora:...> tags taken out
    slots: tuple[tuple[str, str], ...]
    loras: tuple[LoraWeight, ...] = ()  # from <lora:...> tags, sorted by name
    negative_prompt: str | None = None  # a prompts_file row's own; None: the sweep's
    seed: int | None = None  # a prompts_file row's own; None: the sweep's seeds


@dataclass(frozen=True)
class Plan:
    table: pd.DataFrame  # one row per combination, skipped ones included, in render order
    jobs: list[Job]  # the rows to render: not skipped, one per job_id, in render order
    slots: list[str]
    models: dict[str, ModelSpec]
    warnings: list[str] = field(default_factory=list)  # unusual but valid input, said before rendering

    def axis_counts(self) -> dict[str, int]:
        columns = ["model", "stack", "prompt", *self.slots, *SCALAR_AXES]
        return {c: int(self.table[c].nunique()) for c in columns}


def build_plan(
    sweep: SweepConfig,
    models: dict[str, ModelSpec],
    file_rows: Sequence[PromptRow] = (),
    truncate_prompts: bool = False,
) -> Plan:
    """Validate the sweep against the models' assets and expand it into the job table."""
    selected = select_models(sweep, list(models))
    specs = {name: models[name] for name in selected}
    prompts = expand_prompts(sweep, file_rows)
    stacks = expand_stacks(sweep.stacks)
    scalars = {
        "seed": _ints(sweep.seeds, "sweep.seeds", minimum=0),
        "steps": _ints(sweep.steps, "sweep.steps", minimum=1),
        "guidance_scale": _floats(sweep.guidance_scale, "sweep.guidance_scale"),
        "width": _sizes(sweep.width, "sweep.width"),
        "height": _sizes(sweep.height, "sweep.height"),
        "scheduler": _schedulers(sweep.scheduler),
        "clip_skip": _clip_skips(sweep.clip_skip),
    }
    _check_batch_size(sweep.batch_size)
    slots = sorted({name for p in prompts for name, _ in p.slots})
    if any(LORA_TAG.search(n or "") for n in (sweep.negative_prompt, *(r.negative_prompt for r in file_rows))):
        raise BatchgenError(
            "sweep.negative_prompt: <lora:...> tags work in prompts only (a negative prompt does not choose weights); "
            "move the tag to the prompt or a stack"
        )
    _check_grid(sweep, slots, sorted({lw.name for p in prompts for lw in p.loras}))
    negatives = sorted({p.negative_prompt for p in prompts if p.negative_prompt is not None})
    _check_names_exist(specs, prompts, sweep.negative_prompt, stacks, negatives)
    _check_lora_triggers(sweep, stacks, prompts, specs)

    rows: list[dict[str, Any]] = []
    for spec, configured, prompt in itertools.product(specs.values(), stacks, prompts):
        stack = _with_inline(configured, prompt.loras)
        added = lora_trigger_words(spec, stack, prompt.text, sweep)
        if added:
            prompt = dataclasses.replace(prompt, text=with_trigger_words(prompt.text, [w for _, w in added]))
        negative = sweep.negative_prompt if prompt.negative_prompt is None else prompt.negative_prompt
        missing = _missing_assets(spec, stack, prompt, negative)
        triggers = _triggers(prompt.text, negative)
        # A prompts_file row's seed goes with its prompt instead of multiplying it by the seeds axis.
        axes = {**scalars, "seed": [prompt.seed]} if prompt.seed is not None else scalars
        for values in itertools.product(*axes.values()):
            scalar = dict(zip(axes, values, strict=True))
            row = _row(spec, stack, prompt, negative, triggers, scalar, missing, truncate_prompts)
            rows.append({**row, "lora_triggers": ";".join(f"{name}:{words}" for name, words in added)})
    table = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *slots, "_job"])
    jobs = render_order(list({job.job_id: job for job in table["_job"] if job is not None}.values()))
    warnings = weight_warnings([*stacks, *(StackState("inline", p.loras) for p in prompts)])
    return Plan(table=table.drop(columns="_job"), jobs=jobs, slots=slots, models=specs, warnings=warnings)


def render_order(jobs: list[Job]) -> list[Job]:
    """Per model, LoRA states chained so that each differs from the previous in as few LoRAs as possible.

    A model starts with no LoRA applied, so the chain starts from the empty state; within a state, jobs that can
    share a pipeline call (same steps, guidance, size, scheduler) are made adjacent.
    """
    by_model: dict[str, dict[tuple[LoraWeight, ...], list[Job]]] = {}
    for job in jobs:
        by_model.setdefault(job.model, {}).setdefault(job.loras, []).append(job)
    ordered: list[Job] = []
    for states in by_model.values():
        current: tuple[LoraWeight, ...] = ()
        remaining = list(states)
        while remaining:
            nearest = min(remaining, key=lambda state, c=current: _state_distance(c, state))
            remaining.remove(nearest)
            group = states[nearest]
            ordered.extend(sorted(group, key=lambda j: (j.steps, j.guidance_scale, j.width, j.height, j.scheduler)))
            current = nearest
    return ordered


def _state_distance(a: tuple[LoraWeight, ...], b: tuple[LoraWeight, ...]) -> int:
    """LoRAs whose weights differ between two states: each one rewrites all the modules it touches."""
    left = {lw.name: lw for lw in a}
    right = {lw.name: lw for lw in b}
    return sum(1 for name in left.keys() | right.keys() if left.get(name) != right.get(name))


def select_models(sweep: SweepConfig, available: list[str]) -> list[str]:
    if not available:
        raise BatchgenError("no models: the sweep's defaults must select at least one (- /model@models.NAME: NAME)")
    names = list(sweep.models) or available
    for name in names:
        if name not in available:
            raise BatchgenError(
                f"sweep.models: unknown model '{name}'{_did_you_mean(name, available)}; "
                f"the sweep selects {', '.join(available)} (add - /model@models.{name}: {name} to its defaults)"
            )
    if len(set(names)) != len(names):
        raise BatchgenError("sweep.models: a model is listed twice; list each once")
    return names


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
                    f"{_did_you_mean(name, list(sweep.slots))}"
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
                )
            )
    return variants


def split_lora_tags(text: str, where: str) -> tuple[str, tuple[LoraWeight, ...]]:
    """The prompt without its <lora:...> tags, and the LoRAs they name (A1111's reading: the first number is the
    text encoder's weight and the unet's too unless a second follows; te= and unet= name them)."""
    found: dict[str, LoraWeight] = {}
    for match in LORA_TAG.finditer(text):
        name, params = match.group(1).strip(), match.group(2).split(":")[1:]
        positional = [p for p in params if "=" not in p]
        named = dict(p.split("=", 1) for p in params if "=" in p)
        if len(positional) > 2 or set(named) - {"te", "unet"}:
            raise BatchgenError(
                f"{where}: {match.group(0)} has parameters batchgen does not read; write <lora:{name}:w> or "
                f"<lora:{name}:te=w:unet=w>"
            )
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise BatchgenError(
                f"{where}: {match.group(0)} has a weight that is not a number; write <lora:{name}:0.8>"
            ) from None
        for w in (unet, te):
            _weights(w, f"{where}: {match.group(0)}")
        if name in found:
            raise BatchgenError(f"{where}: LoRA '{name}' is tagged twice; keep one <lora:{name}:...> tag")
        found[name] = LoraWeight(name, unet, te)
    if not found:
        return text, ()
    cleaned = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", text))).strip()
    return cleaned, tuple(found[n] for n in sorted(found))


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


def _with_inline(stack: StackState, inline: tuple[LoraWeight, ...]) -> StackState:
    """A stack plus a prompt's tagged LoRAs; a LoRA in both gets the sum, as applying it twice would."""
    if not inline:
        return stack
    merged = {lw.name: lw for lw in stack.loras}
    for lw in inline:
        if lw.name in merged:
            old = merged[lw.name]
            # Rounded so that 0.6 + 0.2 is the same job as a stack of 0.8.
            lw = LoraWeight(lw.name, round(old.unet + lw.unet, 6), round(old.text_encoder + lw.text_encoder, 6))
        merged[lw.name] = lw
    return StackState(stack=stack.stack, loras=tuple(merged[n] for n in sorted(merged)))


def expand_stacks(stacks: dict[str, dict[str, Any]]) -> list[StackState]:
    """Each stack times the product of its weight lists; no stacks at all means one empty stack."""
    if not stacks:
        return [StackState(stack="none", loras=())]
    states: list[StackState] = []
    for stack_name, loras in stacks.items():
        loras = loras or {}
        names = sorted(loras)
        options = [_weights(loras[name], f"sweep.stacks.{stack_name}.{name}") for name in names]
        for combo in itertools.product(*options):
            weights = tuple(LoraWeight(name, unet, te) for name, (unet, te) in zip(names, combo, strict=True))
            states.append(StackState(stack=stack_name, loras=weights))
    return states


def job_id(payload: dict[str, Any]) -> str:
    """16 hex digits over what changes the pixels: content hashes, never names or order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row(
    spec: ModelSpec,
    stack: StackState,
    prompt: PromptVariant,
    negative: str,
    triggers: list[str],
    scalar: dict[str, Any],
    missing: list[str],
    truncate_prompts: bool = False,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "checkpoint": spec.checkpoint_sha256,
        "prompt": prompt.text,
        "negative_prompt": negative,
        **{k: scalar[k] for k in ("seed", "steps", "width", "height", "scheduler")},
        "guidance_scale": float(scalar["guidance_scale"]),
    }
    if scalar["clip_skip"] != 1:
        payload["clip_skip"] = scalar["clip_skip"]  # absent at the default, so ids from before the option stay
    if truncate_prompts:
        payload["truncate_prompts"] = True  # a long prompt cut, not chunked: other pixels (absent when off)
    job: Job | None = None
    if missing:
        # Skipped jobs still need a stable id; the names stand in for the files that do not exist.
        payload["missing"] = sorted(missing)
        payload["loras"] = sorted([lw.name, lw.unet, lw.text_encoder] for lw in stack.loras)
        payload["embeddings"] = sorted(triggers)
    else:
        payload["embeddings"] = sorted(spec.embedding(t).sha256 for t in triggers)
        payload["loras"] = sorted([spec.lora(lw.name).sha256, lw.unet, lw.text_encoder] for lw in stack.loras)
    jid = job_id(payload)
    if not missing:
        job = Job(
            job_id=jid,
            model=spec.name,
            prompt=prompt.text,
            negative_prompt=negative,
            loras=stack.loras,
            truncate_prompts=truncate_prompts,
            **scalar,
        )
    return {
        "job_id": jid,
        "status": "skipped" if missing else "",
        "model": spec.name,
        "base": spec.base,
        "prompt": prompt.text,
        "negative_prompt": negative,
        "embeddings": ";".join(triggers),
        "loras": stack.manifest,
        **scalar,
        "image": "",
        "image_sha256": "",
        "seconds": None,
        "worker": "",
        "finished_at": "",
        "error": "; ".join(missing),
        "stack": stack.label,
        "prompt_template": prompt.template,
        **dict(prompt.slots),
        "_job": job,
    }


def used_assets(sweep: SweepConfig, file_rows: Sequence[PromptRow] = ()) -> tuple[set[str], set[str]]:
    """(LoRA names, triggers) the sweep mentions, so only those files are hashed and read before planning."""
    loras = {name for stack in (sweep.stacks or {}).values() for name in (stack or {})}
    texts = [*sweep.prompts, sweep.negative_prompt, *(v for values in sweep.slots.values() for v in values)]
    texts += list(sweep.lora_triggers.values())
    texts += [t for row in file_rows for t in (row.prompt, row.negative_prompt) if t]
    texts = [t for t in texts if isinstance(t, str)]
    loras |= {m.group(1).strip() for t in texts for m in LORA_TAG.finditer(t)}
    return loras, set(_triggers(*(LORA_TAG.sub("", t) for t in texts)))


def _triggers(*texts: str) -> list[str]:
    found: dict[str, None] = {}
    for text in texts:
        for trigger in TRIGGER_PATTERN.findall(text):
            found.setdefault(trigger)
    return list(found)


def _missing_assets(spec: ModelSpec, stack: StackState, prompt: PromptVariant, negative: str) -> list[str]:
    """Why this model cannot render this combination: a LoRA or TI it lacks, or has only for another base."""
    missing = []
    for lw in stack.loras:
        if not spec.lora(lw.name):
            refusal = spec.refusal("lora", lw.name)
            missing.append(refusal.reason if refusal else f"LoRA '{lw.name}' not found for model {spec.name}")
    for trigger in _triggers(prompt.text, negative):
        if not spec.embedding(trigger):
            refusal = spec.refusal("embedding", trigger)
            missing.append(refusal.reason if refusal else f"embedding <{trigger}> not found for model {spec.name}")
    return missing


def _check_names_exist(
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
            if "/" in lw.name or "\\" in lw.name or lw.name.startswith(".."):
                raise BatchgenError(
                    f"{where}: LoRA name '{lw.name}' is a path; name LoRAs by file stem (such as 'ink') and list "
                    "their folders in models.NAME.loras"
                )
            _check_usable(specs, "lora", lw.name, where, "stack")
            if lw.name not in loras:
                raise BatchgenError(
                    f"sweep.stacks.{state.stack}: LoRA '{lw.name}' is not found for any model"
                    f"{_did_you_mean(lw.name, loras)}; LoRAs found: {', '.join(loras) or 'none'}"
                )
    triggers = _known(specs, "embedding")
    # Errors name a prompt by its index in sweep.prompts, not among its slot-filled variants.
    index = {template: i for i, template in enumerate(dict.fromkeys(p.template for p in prompts))}
    for prompt in prompts:
        where = f"sweep.prompts[{index[prompt.template]}]"
        for lw in prompt.loras:
            if "/" in lw.name or "\\" in lw.name or lw.name.startswith(".."):
                raise BatchgenError(f"{where}: LoRA name '{lw.name}' is a path; name LoRAs by file stem")
            _check_usable(specs, "lora", lw.name, where, "prompt")
            if lw.name not in loras:
                raise BatchgenError(
                    f"{where}: <lora:{lw.name}> is not found for any model{_did_you_mean(lw.name, loras)}; "
                    f"LoRAs found: {', '.join(loras) or 'none'}"
                )
    for prompt in prompts:
        i = index[prompt.template]
        for trigger in _triggers(prompt.text):
            _check_usable(specs, "embedding", trigger, f"sweep.prompts[{i}]", "prompt")
            if trigger not in triggers:
                raise BatchgenError(
                    f"sweep.prompts[{i}]: embedding <{trigger}> is not found for any model"
                    f"{_did_you_mean(trigger, triggers, '<{}>')}; triggers found: "
                    f"{', '.join(f'<{t}>' for t in triggers) or 'none'}"
                )
    for trigger in _triggers(negative, *file_negatives):
        _check_usable(specs, "embedding", trigger, "sweep.negative_prompt", "prompt")
        if trigger not in triggers:
            raise BatchgenError(
                f"sweep.negative_prompt: embedding <{trigger}> is not found for any model"
                f"{_did_you_mean(trigger, triggers, '<{}>')}"
            )


def _check_lora_triggers(
    sweep: SweepConfig, stacks: list[StackState], prompts: list[PromptVariant], specs: dict[str, ModelSpec]
) -> None:
    """Configured trigger words name a LoRA the sweep uses and hold plain text (TI triggers allowed)."""
    used = sorted({lw.name for s in stacks for lw in s.loras} | {lw.name for p in prompts for lw in p.loras})
    known = _known(specs, "embedding")
    for name, words in sweep.lora_triggers.items():
        where = f"sweep.lora_triggers.{name}"
        if name not in used:
            raise BatchgenError(
                f"{where}: LoRA '{name}' is in no stack or prompt of this sweep{_did_you_mean(name, used)}; "
                f"LoRAs used: {', '.join(used) or 'none'}"
            )
        if not isinstance(words, str):
            raise BatchgenError(f"{where}: '{words}' is not text; write the trigger words as a string")
        if LORA_TAG.search(words):
            raise BatchgenError(f"{where}: a <lora:...> tag is not a trigger word; put the LoRA in a stack")
        for trigger in _triggers(words):
            if trigger not in known:
                raise BatchgenError(
                    f"{where}: embedding <{trigger}> is not found for any model{_did_you_mean(trigger, known, '<{}>')}"
                )


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
        raise BatchgenError(
            f"{where}: {label} is {base}, and no model of this sweep is ({models}); remove it from the {place} "
            f"or render an {base} model"
        )


def _known(specs: dict[str, ModelSpec], kind: str) -> list[str]:
    """Names on disk for any model, usable or refused for another base: those give skipped jobs, not errors."""
    names = {n for s in specs.values() for k, n in s.discovered if k == kind}
    names |= {f.name for s in specs.values() for f in s.loras} if kind == "lora" else set()
    names |= {f.trigger for s in specs.values() for f in s.embeddings} if kind == "embedding" else set()
    return sorted(names)


def _check_grid(sweep: SweepConfig, slots: list[str], inline: list[str]) -> None:
    # The report draws the grids; batchgen.axes holds the one list of axis names both check against.
    loras = sorted({name for stack in (sweep.stacks or {}).values() for name in (stack or {})} | set(inline))
    check_grid(sweep.grid.x, sweep.grid.y, sweep.grid.z, slots, loras)


def _check_batch_size(value: Any) -> None:
    if value == "auto" or (_is_int(value) and value >= 1):
        return
    raise BatchgenError(f"sweep.batch_size: '{value}' is neither 'auto' nor a positive integer")


def _as_list(value: Any, key: str) -> list[Any]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise BatchgenError(f"{key} is empty; give at least one value")
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _ints(value: Any, key: str, minimum: int) -> list[int]:
    values = _as_list(value, key)
    for v in values:
        if not _is_int(v) or v < minimum:
            raise BatchgenError(f"{key}: '{v}' is not an integer >= {minimum}")
    return [int(v) for v in values]


def _floats(value: Any, key: str) -> list[float]:
    values = _as_list(value, key)
    for v in values:
        if not _is_number(v):
            raise BatchgenError(f"{key}: '{v}' is not a number")
    return [float(v) for v in values]


def _sizes(value: Any, key: str) -> list[int]:
    values = _ints(value, key, minimum=8)
    for v in values:
        if v % 8:
            raise BatchgenError(f"{key}: {v} is not a multiple of 8; use {v - v % 8} or {v - v % 8 + 8}")
    return values


def _schedulers(value: Any) -> list[str]:
    values = _as_list(DEFAULT_SCHEDULER if value is None else value, "sweep.scheduler")
    for v in values:
        if v != DEFAULT_SCHEDULER and v not in SCHEDULERS:
            raise BatchgenError(
                f"sweep.scheduler: unknown scheduler '{v}'{_did_you_mean(str(v), list(SCHEDULERS))}; "
                f"choose one of: {', '.join(SCHEDULERS)}"
            )
    return [str(v) for v in values]


def _clip_skips(value: Any) -> list[int]:
    values = _ints(value, "sweep.clip_skip", minimum=1)
    for v in values:
        if v > MAX_CLIP_SKIP:
            raise BatchgenError(
                f"sweep.clip_skip: {v} skips more layers than SD's text encoders have; use 1 to {MAX_CLIP_SKIP} "
                "(A1111's count: 1 is no skip, 2 is the usual for anime models)"
            )
    return values


def _weights(value: Any, key: str) -> list[tuple[float, float]]:
    """A weight is a number or {unet: w, text_encoder: w}; a list of them is an axis."""
    out: list[tuple[float, float]] = []
    for v in _as_list(value, key):
        if _is_number(v):
            out.append((float(v), float(v)))
        elif isinstance(v, dict) and set(v) == {"unet", "text_encoder"} and all(_is_number(x) for x in v.values()):
            out.append((float(v["unet"]), float(v["text_encoder"])))
        else:
            raise BatchgenError(
                f"{key}: weight '{v}' is not a number; write a number, a list of numbers, "
                "or {unet: w, text_encoder: w}"
            )
    for pair in out:
        for w in pair:
            if not -MAX_WEIGHT <= w <= MAX_WEIGHT:  # also refuses nan and inf
                raise BatchgenError(
                    f"{key}: weight {format_number(w)} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; LoRA weights are "
                    "usually between -2 and 2"
                )
    return out


def weight_warnings(stacks: list[StackState]) -> list[str]:
    """Valid but unusual: weights past 2 mostly give noise; said once per LoRA and weight."""
    seen: dict[tuple[str, str, float], None] = {}
    for state in stacks:
        for lw in state.loras:
            for w in {lw.unet, lw.text_encoder}:
                if abs(w) > UNUSUAL_WEIGHT:
                    seen.setdefault((state.stack, lw.name, w))
    return [
        f"sweep.stacks.{stack}.{name}: weight {format_number(w)} is beyond ±{UNUSUAL_WEIGHT:g}; most LoRAs give "
        "noise there"
        for stack, name, w in seen
    ]


def _did_you_mean(name: str, options: list[str], fmt: str = "'{}'") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""
