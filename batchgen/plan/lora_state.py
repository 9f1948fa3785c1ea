"""A job's LoRA state: what each of its LoRA files puts into each pipeline component, block weights applied.

Computed once here, from the stack and the inspected files, and read by everything that asks "do these two jobs
hold the same weights?": the patcher, the prompt cache (its text-encoder part), batches, work units and the render
order. Anything that reaches a component's weights is in it, so a cache keyed on it cannot confuse two jobs.
"""

from __future__ import annotations

from batchgen.assets.bases import BY_NAME
from batchgen.assets.block_weights import long_ids
from batchgen.spec import Contribution, LoraFile, LoraState, LoraWeight, ModelSpec


def lora_state(loras: tuple[LoraWeight, ...], spec: ModelSpec) -> LoraState:
    """The state of a stack on this model; every LoRA in it must be one of the model's inspected files."""
    denoiser = BY_NAME[spec.base].denoiser
    by_component: dict[str, list[Contribution]] = {}
    for lw in sorted(loras, key=lambda lw: lw.name):
        file = spec.lora(lw.name)
        if file is None:
            raise ValueError(f"lora_state: model {spec.name} has no LoRA '{lw.name}'; skipped jobs have no state")
        for component, blocks in _component_blocks(file, spec.base):
            weight = lw.unet if component == denoiser else lw.text_encoder
            if weight == 0.0:  # W0 + 0 * dW is W0: the component holds nothing of this file
                continue
            factors = effective_blocks(lw, blocks, spec.base)
            contribution = Contribution(lw.name, weight, tuple(factors.items()), file.sha256)
            by_component.setdefault(component, []).append(contribution)
    return LoraState(tuple(sorted((c, tuple(parts)) for c, parts in by_component.items())))


def effective_blocks(lw: LoraWeight, blocks: tuple[str, ...], base: str) -> dict[str, float]:
    """The block factors that change something: of the blocks given (those a file's modules sit in), each whose
    weight is not 1. A preset and its vector, and an all-ones vector and none, come out the same."""
    if not lw.blocks:
        return {}
    values = dict(zip(long_ids(base), lw.blocks, strict=True))
    return {block: values[block] for block in blocks if values[block] != 1.0}


def _component_blocks(file: LoraFile, base: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(component, block ids) for each component the file patches. A file not inspected (described by hand) is
    taken to reach every component in every block: over-keying costs a cache miss, never a wrong hit."""
    if file.component_blocks:
        return file.component_blocks
    record = BY_NAME[base]
    blocks = file.blocks or (long_ids(base) if record.block_ids else ())
    return tuple((component, blocks) for component in [*record.text_encoders, record.denoiser])
