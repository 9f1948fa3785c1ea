"""Every offload plan renders the pixels of everything resident (engine/placement.py), and the plans that encode
ahead move weights once per run, encode each (text, text-encoder state) once and patch each half of the model only
while it is on the device. On CPU the moves are CPU to CPU: what is tested is the order of patches, encodings and
phases, which a GPU run shares."""

from __future__ import annotations

import numpy as np
import pytest

from batchgen.config import compose_config
from batchgen.engine import placement as placement_module
from batchgen.engine.worker import Renderer
from batchgen.engine_options import EngineOptions
from batchgen.runner import prepare

# Stacks with text-encoder LoRA parts (ink, grain) and a UNet-only weight, so encoders-first meets several
# text-encoder states and denoiser-only switches.
SWEEP = [
    "+sweep=styles", "sweep.seeds=[1]", "sweep.steps=2", "sweep.slots={}", "sweep.references=false",
    "sweep.prompts=['a castle at night', 'a portrait of <alf>']", "~sweep.stacks.lycoris", "~sweep.stacks.peft",
    "+sweep.stacks.unet_only={ink: {unet: 0.7, text_encoder: 0}}",
]  # fmt: skip


def _render(plan, offload: str, batch_size: int = 2, jobs=None) -> tuple[dict[str, np.ndarray], Renderer]:
    jobs = plan.jobs if jobs is None else jobs
    renderer = Renderer(plan.models, EngineOptions(batch_size=batch_size, offload=offload))
    results = list(renderer.render(jobs))
    assert [r.error for r in results] == [""] * len(jobs)
    return {r.job_id: np.asarray(r.image) for r in results}, renderer


@pytest.fixture(scope="module")
def plans(tiny_cache):
    return {model: prepare(compose_config([*SWEEP, f"sweep.models=[{model}]"])) for model in ("tiny_sd1", "tiny_sdxl")}


@pytest.mark.slow
@pytest.mark.parametrize(("model", "count"), [("tiny_sd1", 10), ("tiny_sdxl", 4)])  # SDXL: its pooled encoder
def test_every_plan_renders_the_pixels_of_everything_resident(plans, model: str, count: int) -> None:
    plan = plans[model]
    jobs = plan.jobs[:count]
    resident, _ = _render(plan, "none", jobs=jobs)
    assert len(resident) == count
    for offload in ("encoders", "model", "sequential"):
        pixels, _ = _render(plan, offload, jobs=jobs)
        assert pixels.keys() == resident.keys()
        diff = {j: int(np.abs(pixels[j].astype(int) - resident[j].astype(int)).max()) for j in resident}
        assert set(diff.values()) == {0}, (offload, diff)


def test_encoders_first_encodes_once_and_moves_weights_once_per_phase(plans, monkeypatch) -> None:
    plan = plans["tiny_sd1"]
    phases: list[str] = []
    to_phase = placement_module.Placement.to_phase

    def spy(self, phase):
        if phase != self.phase and self.swaps:
            phases.append(phase)
        return to_phase(self, phase)

    monkeypatch.setattr(placement_module.Placement, "to_phase", spy)
    _, renderer = _render(plan, "encoders")
    # One encode phase for the whole run, then the denoiser holds the device for every batch.
    assert phases == ["encode", "denoise"]
    cache = renderer._loaded.prompts.cache
    states = {(j.prompt, j.negative_prompt, tuple(j.lora_state.excluding(("unet",)).components)) for j in plan.jobs}
    # Each distinct text under each text-encoder state encoded once (prompts and the shared negative prompt).
    te_states = {s for _, _, s in states}
    texts = {j.prompt for j in plan.jobs}
    assert cache.misses == len(te_states) * (len(texts) + 1)
    _, model_plan = _render(plan, "model")
    assert model_plan._loaded.placement.switches >= 3  # encode, denoise, decode at least


def test_a_job_arriving_later_brings_the_encoders_back_for_what_is_missing(plans) -> None:
    plan = plans["tiny_sd1"]
    resident, _ = _render(plan, "none")
    renderer = Renderer(plan.models, EngineOptions(batch_size=2, offload="encoders"))
    first, second = plan.jobs[:4], plan.jobs[4:]
    results = [*renderer.render(first), *renderer.render(second)]
    assert {r.job_id: int(np.abs(np.asarray(r.image).astype(int) - resident[r.job_id]).max()) for r in results} == {
        j.job_id: 0 for j in plan.jobs
    }
    assert renderer._loaded.placement.switches == 4  # encode, denoise, encode again for the second call, denoise


def test_auto_takes_the_plan_the_memory_plan_chooses_for_the_budget(plans) -> None:
    from batchgen.plan.memory import GIB, memory_plan

    plan = plans["tiny_sd1"]
    spec = plan.models["tiny_sd1"]
    peaks = memory_plan(spec, plan.jobs, EngineOptions(batch_size=2), None, "cpu").peaks
    assert peaks["none"] > peaks["encoders"]
    # A budget between the two peaks: everything resident does not fit, encoders-first does.
    gb = (peaks["none"] + peaks["encoders"]) / 2 / GIB
    renderer = Renderer(plan.models, EngineOptions(batch_size=2, gpu_memory_gb=gb))
    results = list(renderer.render(plan.jobs[:2]))
    assert [r.error for r in results] == ["", ""]
    assert renderer._loaded.placement.offload == "encoders"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd3"])
def test_mmdit_plans_render_the_pixels_of_everything_resident(tiny_cache, model: str) -> None:
    # grain patches FLUX.1's text encoders as well as its transformer: two text-encoder states.
    plan = prepare(
        compose_config(
            [
                "+sweep=next", f"sweep.models=[{model}]", "sweep.seeds=[1]", "sweep.steps=2", "sweep.slots={}",
                "sweep.prompts=['a castle at night']", "sweep.references=false", "~sweep.stacks.pastel",
            ]
        )
    )  # fmt: skip
    resident, _ = _render(plan, "none")
    assert len(resident) == 4
    for offload in ("encoders", "model", "sequential"):
        pixels, _ = _render(plan, offload)
        assert {j: int(np.abs(pixels[j].astype(int) - resident[j].astype(int)).max()) for j in resident} == {
            j: 0 for j in resident
        }, offload
