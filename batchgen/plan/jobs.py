"""Config -> the job table: every combination of model, LoRA state, prompt and setting values, one row each.

Every list in the sweep is an axis. Jobs are expanded model -> LoRA state -> prompt -> seed -> the rest, which
is also the cheapest render order: the most expensive state changes are outermost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from batchgen.assets.bases import BY_NAME
from batchgen.assets.metric_models import MetricModels
from batchgen.assets.tokens import ChunkCounter
from batchgen.axes import state_labels, with_trigger_words
from batchgen.cells import format_names, format_triggers
from batchgen.columns import MANIFEST_COLUMNS, PNG_STACK
from batchgen.config import RunConfig, SweepConfig
from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.plan.checks import check_lora_triggers, check_names_exist, check_sweep_grid, missing_assets
from batchgen.plan.lora_state import effective_blocks, lora_state
from batchgen.plan.memory import MemoryPlan
from batchgen.plan.prompts import (
    PromptVariant,
    check_negative_has_no_tags,
    expand_prompts,
    lora_trigger_words,
    triggers,
    unused_slot_warnings,
)
from batchgen.plan.prompts_file import PromptRow
from batchgen.plan.stacks import (
    StackState,
    expand_stacks,
    render_order,
    resolve_blocks,
    resolve_globs,
    weight_warnings,
    with_inline,
)
from batchgen.plan.syntax import check_syntax, text_payload
from batchgen.plan.values import engine_options, merged_values, model_values, setting_values
from batchgen.settings import AXES, SETTINGS, did_you_mean, job_id_payload
from batchgen.spec import REFERENCE_STACK, Job, LoraWeight, ModelSpec

COLUMN_SETTINGS = tuple(s.name for s in SETTINGS if s.column_after is not None)


@dataclass(frozen=True)
class Plan:
    table: pd.DataFrame  # one row per combination, skipped ones included, in render order
    jobs: list[Job]  # the rows to render: not skipped, one per job_id, in render order
    slots: list[str]
    models: dict[str, ModelSpec]
    warnings: list[str] = field(default_factory=list)  # unusual but valid input, said before rendering
    references_added: int = 0  # reference jobs no stack renders, added by sweep.references
    # Per model, each setting's values, those the sweep leaves to the model resolved (--dry-run prints them).
    settings: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    engine: EngineOptions = EngineOptions()  # how every worker renders (run.dtype, run.compile, ...), checked
    # Per model, its memory plan for the device the run renders on (runner.prepare fills it; --dry-run prints it).
    memory: dict[str, MemoryPlan] = field(default_factory=dict)
    metrics: MetricModels | None = None  # sweep.metrics, checked (runner.prepare fills it); None: not measured

    def axis_counts(self) -> dict[str, int]:
        columns = ["model", "stack", *(["epoch"] if self.table["epoch"].ne("").any() else []), "prompt"]
        counts = {c: int(self.table[c].nunique()) for c in [*columns, *self.slots]}
        # Per model: two models' own steps are one value each, not an axis of two.
        counts.update({c: int(self.table.groupby("model")[c].nunique().max()) for c in AXES})
        if "epoch" in counts:  # a reference job has no epoch: "" is not one more
            counts["epoch"] = int(self.table["epoch"].loc[self.table["epoch"] != ""].nunique())
        # A stack's states, as a grid with prompts on an axis has columns: `ink 0.5` and `ink 1` are two, though
        # `stack` holds `ink` for both.
        counts["stack"] = len(set(state_labels(self.table.to_dict("records"), self.slots, ["prompt"])))
        return counts


def build_plan(
    sweep: SweepConfig,
    models: dict[str, ModelSpec],
    file_rows: Sequence[PromptRow] = (),
    run: RunConfig | None = None,
) -> Plan:
    """Validate the sweep against the models' assets and expand it into the job table."""
    selected = select_models(sweep, list(models))
    specs = {name: models[name] for name in selected}
    prompts = expand_prompts(sweep, file_rows)
    stacks = expand_stacks(sweep.stacks)
    run = RunConfig() if run is None else run
    settings = setting_values({"sweep": sweep, "run": run})
    per_model = {name: model_values(settings, spec) for name, spec in specs.items()}  # null: the model's own
    engine = engine_options(sweep, run)
    slots = sorted({name for p in prompts for name, _ in p.slots})
    check_negative_has_no_tags(sweep, file_rows)
    check_sweep_grid(sweep, slots, sorted({lw.name for p in prompts for lw in p.loras}))
    negatives = sorted({p.negative_prompt for p in prompts if p.negative_prompt is not None})
    check_names_exist(specs, prompts, sweep.negative_prompt, stacks, negatives)
    check_lora_triggers(sweep, stacks, prompts, specs)
    every = merged_values(per_model.values(), settings)
    syntax_warnings = check_syntax(prompts, sweep.negative_prompt, every["prompt_syntax"], specs, every)
    counters = {name: ChunkCounter(spec) for name, spec in specs.items()}

    rows: list[dict[str, Any]] = []
    references: dict[str, dict[str, Any]] = {}  # job_id -> row of each LoRA job's no-LoRA twin
    resolved = [(spec, state) for spec in specs.values() for c in stacks for state in resolve_globs(c, spec)]
    for (spec, configured), prompt in itertools.product(resolved, prompts):
        # A tag's block weights are checked for the base first, so that an error names the prompt, not the stack.
        tagged = resolve_blocks(StackState("inline", prompt.loras), spec, sweep.block_presets, prompt.where)
        stack = resolve_blocks(with_inline(configured, tagged.loras), spec, sweep.block_presets, _where(configured))
        added = lora_trigger_words(spec, stack, prompt.text, sweep)
        if added:
            prompt = dataclasses.replace(prompt, text=with_trigger_words(prompt.text, [w for _, w in added]))
        negative = sweep.negative_prompt if prompt.negative_prompt is None else prompt.negative_prompt
        if not BY_NAME[spec.base].reads_negative_prompt:
            # FLUX.1 never reads one: jobs that differ only there are one job, recorded and hashed without it.
            negative = ""
        missing = missing_assets(spec, stack, prompt, negative)
        used = triggers(prompt.text, negative)
        # A prompts_file row's seed goes with its prompt instead of multiplying it by the seeds axis.
        own = per_model[spec.name]
        axes = {**own, "seed": [prompt.seed]} if prompt.seed is not None else own
        for values in itertools.product(*axes.values()):
            setting = dict(zip(axes, values, strict=True))
            texts = text_payload(prompt.text, negative, setting, counters[spec.name])
            if setting["max_sequence_length"] and BY_NAME[spec.base].pipeline_encodes_prompts:
                texts["max_sequence_length"] = setting["max_sequence_length"]  # only T5 reads it
            row = _row(spec, stack, prompt, negative, used, setting, missing, texts)
            rows.append({**row, "lora_triggers": format_triggers(added)})
            if sweep.references and row["reference"] and row["reference"] not in references:
                twin = _row(spec, StackState("none", ()), prompt, negative, used, setting, [], texts)
                if twin["job_id"] != row["reference"]:  # the two payloads are built apart: keep them in step
                    raise RuntimeError(f"reference of {row['job_id']}: {twin['job_id']} != {row['reference']}")
                references[twin["job_id"]] = {
                    **twin,
                    "stack": REFERENCE_STACK,
                    PNG_STACK: REFERENCE_STACK,
                    "lora_triggers": "",
                }
    planned = {row["job_id"] for row in rows}
    added_references = [row for job_id, row in references.items() if job_id not in planned]
    rows += added_references
    table = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, *slots, PNG_STACK, "_job"])
    jobs = render_order(list({job.job_id: job for job in table["_job"] if job is not None}.values()))
    warnings = weight_warnings([*stacks, *(StackState("inline", p.loras) for p in prompts)]) + syntax_warnings
    warnings += unused_slot_warnings(sweep, prompts)
    return Plan(
        table=table.drop(columns="_job"),
        jobs=jobs,
        slots=slots,
        models=specs,
        warnings=warnings,
        references_added=len(added_references),
        settings=per_model,
        engine=engine,
    )


def select_models(sweep: SweepConfig, available: list[str]) -> list[str]:
    if not available:
        raise BatchgenError("no models: the sweep's defaults must select at least one (- /model@models.NAME: NAME)")
    names = list(sweep.models) or available
    for name in names:
        if name not in available:
            raise BatchgenError(
                f"sweep.models: unknown model '{name}'{did_you_mean(name, available)}; "
                f"the sweep selects {', '.join(available)} (add - /model@models.{name}: {name} to its defaults)"
            )
    if len(set(names)) != len(names):
        raise BatchgenError("sweep.models: a model is listed twice; list each once")
    return names


def job_id(payload: dict[str, Any]) -> str:
    """16 hex digits over what changes the pixels: content hashes, never names or order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _where(state: StackState) -> str:
    return f"sweep.stacks.{state.stack}" if state.stack != "inline" else "sweep.prompts"


def _lora_payload(lw: LoraWeight, spec: ModelSpec) -> list:
    """What a LoRA contributes to job_id: its file, weights and, with block weights, the weight of each block its
    modules sit in where that is not 1. A preset and its vector are one job; so are an all-ones vector and none."""
    file = spec.lora(lw.name)
    entry: list[Any] = [file.sha256, lw.unet, lw.text_encoder]
    effective = effective_blocks(lw, file.blocks, spec.base)
    if effective:
        entry.append(effective)
    return entry


def _row(
    spec: ModelSpec,
    stack: StackState,
    prompt: PromptVariant,
    negative: str,
    used: list[str],
    setting: dict[str, Any],
    missing: list[str],
    texts: dict[str, Any],
) -> dict[str, Any]:
    payload: dict[str, Any] = {"checkpoint": spec.checkpoint_sha256, **texts, **job_id_payload(setting)}
    job: Job | None = None
    if missing:
        # Skipped jobs still need a stable id; the names stand in for the files that do not exist.
        payload["missing"] = sorted(missing)
        payload["loras"] = sorted([lw.name, lw.unet, lw.text_encoder, lw.blocks_spec] for lw in stack.loras)
        payload["embeddings"] = sorted(used)
    else:
        payload["embeddings"] = sorted(spec.embedding(t).sha256 for t in used)
        payload["loras"] = sorted(_lora_payload(lw, spec) for lw in stack.loras)
    jid = job_id(payload)
    # The twin without LoRAs: the same payload with none (prompt text as encoded, trigger words included).
    reference = job_id({**payload, "loras": []}) if stack.loras and not missing else ""
    if not missing:
        job = Job(
            job_id=jid,
            model=spec.name,
            prompt=prompt.text,
            negative_prompt=negative,
            loras=stack.loras,
            lora_state=lora_state(stack.loras, spec),
            **setting,
        )
    return {
        "job_id": jid,
        "status": "skipped" if missing else "",
        "model": spec.name,
        "base": spec.base,
        "prompt": prompt.text,
        "negative_prompt": negative,
        "embeddings": format_names(used),
        "loras": stack.manifest,
        **{name: setting[name] for name in COLUMN_SETTINGS},
        "image": "",
        "image_sha256": "",
        "seconds": None,
        "worker": "",
        "finished_at": "",
        "error": "; ".join(missing),
        "stack": stack.stack,
        PNG_STACK: stack.png_label,
        "epoch": stack.epoch,
        "reference": reference,
        "prompt_template": prompt.template,
        **dict(prompt.slots),
        "_job": job,
    }
