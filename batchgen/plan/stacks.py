"""LoRA stacks: each stack times the product of its weight lists, a prompt's tagged LoRAs merged in, and the
render order that changes as few LoRAs as possible from one state to the next."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from batchgen.assets.block_weights import parse_blocks
from batchgen.assets.epochs import epoch_label, epoch_order, is_glob, matching
from batchgen.cells import JOIN, LoraEntry, format_loras, stack_label
from batchgen.errors import BatchgenError
from batchgen.plan.values import lora_entries
from batchgen.settings import batch_values
from batchgen.spec import Job, LoraState, LoraWeight, ModelSpec, format_number

UNUSUAL_WEIGHT = 2.0


@dataclass(frozen=True)
class StackState:
    """One point on the LoRA axis: a named stack at one combination of its weights."""

    stack: str  # the sweep's key (`ink_grain`): the manifest's `stack`
    loras: tuple[LoraWeight, ...]  # sorted by name
    globbed: tuple[tuple[str, str], ...] = ()  # (file, pattern) for each LoRA a glob entry matched
    epoch: str = ""  # the matched files' labels: `mylora e4 (760 steps)`

    @property
    def png_label(self) -> str:
        """`none`, or `grain 0.6 + ink 0.5` (split weights as `unet/te`): the stack as a PNG's JSON chunk names it,
        by its content, a file a glob matched by the glob (what the manifest's `stack` held before it held the
        sweep's key; kept so that a job's PNG bytes stay as they were)."""
        patterns = dict(self.globbed)
        return stack_label(
            tuple(dataclasses.replace(LoraEntry.of(lw), name=patterns.get(lw.name, lw.name)) for lw in self.loras)
        )

    @property
    def manifest(self) -> str:
        """The `loras` cell."""
        return format_loras(self.loras)


def expand_stacks(stacks: dict[str, dict[str, Any]]) -> list[StackState]:
    """Each stack times the product of its weight lists; no stacks at all means one empty stack."""
    if not stacks:
        return [StackState(stack="none", loras=())]
    states: list[StackState] = []
    for stack_name, loras in stacks.items():
        loras = loras or {}
        names = sorted(loras)
        options = [lora_entries(loras[name], f"sweep.stacks.{stack_name}.{name}") for name in names]
        for combo in itertools.product(*options):
            pairs = tuple(
                LoraWeight(name, unet, te, blocks) for name, (unet, te, blocks) in zip(names, combo, strict=True)
            )
            states.append(StackState(stack=stack_name, loras=pairs))
    return states


def resolve_globs(state: StackState, spec: ModelSpec) -> list[StackState]:
    """One state per file each glob entry matches in this model's LoRAs, in training order (several globs in a
    stack: their product). A glob matching nothing here stays as it is, and the model skips it as a missing LoRA."""
    globs = [lw for lw in state.loras if is_glob(lw.name)]
    if not globs:
        return [state]
    options = []
    for lw in globs:
        files = epoch_order(f for f in spec.loras if matching(lw.name, [f.name]))
        options.append([(lw, f) for f in files] or [(lw, None)])
    fixed = {lw.name: lw for lw in state.loras if not is_glob(lw.name)}
    out = []
    for combo in itertools.product(*options):
        loras, globbed, labels = dict(fixed), [], []
        for lw, f in combo:
            if f is None:
                loras[lw.name] = lw
                continue
            loras[f.name] = dataclasses.replace(lw, name=f.name)
            globbed.append((f.name, lw.name))
            labels.append(epoch_label(f, lw.name))
        out.append(StackState(state.stack, tuple(loras[n] for n in sorted(loras)), tuple(globbed), JOIN.join(labels)))
    return out


def resolve_blocks(state: StackState, spec: ModelSpec, presets: dict[str, str], where: str) -> StackState:
    """Each LoRA's block weights as the long vector of this model's base; a vector of the wrong length for the
    base is an error here, before any model loads."""
    if not any(lw.blocks_spec for lw in state.loras):
        return state
    loras = tuple(
        dataclasses.replace(lw, blocks=parse_blocks(lw.blocks_spec, spec.base, f"{where}.{lw.name}.blocks", presets))
        if lw.blocks_spec
        else lw
        for lw in state.loras
    )
    return dataclasses.replace(state, loras=loras)


def with_inline(stack: StackState, inline: tuple[LoraWeight, ...]) -> StackState:
    """A stack plus a prompt's tagged LoRAs; a LoRA in both gets the sum, as applying it twice would."""
    if not inline:
        return stack
    merged = {lw.name: lw for lw in stack.loras}
    for lw in inline:
        if lw.name in merged:
            old = merged[lw.name]
            # Rounded so that 0.6 + 0.2 is the same job as a stack of 0.8.
            if old.blocks_spec and lw.blocks_spec and old.blocks_spec != lw.blocks_spec:
                raise BatchgenError(
                    f"LoRA '{lw.name}' has block weights {old.blocks_spec} in its stack and {lw.blocks_spec} in a "
                    "<lora:...> tag; give them in one place"
                )
            lw = LoraWeight(
                lw.name,
                round(old.unet + lw.unet, 6),
                round(old.text_encoder + lw.text_encoder, 6),
                old.blocks_spec or lw.blocks_spec,
                old.blocks or lw.blocks,
            )
        merged[lw.name] = lw
    return dataclasses.replace(stack, loras=tuple(merged[n] for n in sorted(merged)))


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


def render_order(jobs: list[Job]) -> list[Job]:
    """Per model, LoRA states chained so that each differs from the previous in as few LoRA contributions as
    possible.

    A model starts with no LoRA applied, so the chain starts from the empty state; within a state, jobs that can
    share a pipeline call (the same values of the settings that split batches) are made adjacent.
    """
    by_model: dict[str, dict[LoraState, list[Job]]] = {}
    for job in jobs:
        by_model.setdefault(job.model, {}).setdefault(job.lora_state, []).append(job)
    ordered: list[Job] = []
    for states in by_model.values():
        current = LoraState()
        remaining = list(states)
        while remaining:
            nearest = min(remaining, key=lambda state, c=current: _state_distance(c, state))
            remaining.remove(nearest)
            ordered.extend(sorted(states[nearest], key=batch_values))
            current = nearest
    return ordered


def _state_distance(a: LoraState, b: LoraState) -> int:
    """(component, LoRA) contributions that differ between two states: each rewrites the modules it touches."""
    left, right = a.pairs(), b.pairs()
    return sum(1 for key in left.keys() | right.keys() if left.get(key) != right.get(key))
