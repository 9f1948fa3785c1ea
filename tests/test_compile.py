"""run.compile: the denoiser is compiled once per model, and a LoRA switch compiles nothing, because the patcher
writes weights in place (same storage, shape and dtype, so dynamo's guards still hold); the compiled render's pixels
are the uncompiled one's. Under run.weights=fp8 the stack rides beside the fp8 weights (engine/fp8.py): switching
weights, or back to no LoRA, compiles nothing, and a new set of patched modules, or the first new rank, compiles
once.

torch.compile is given dynamo's counting backend, which runs the captured graphs eagerly: CPU needs no C++ compiler,
and what is counted is dynamo's frames, which a recompile adds to whatever the backend."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from batchgen.config import compose_config
from batchgen.engine.worker import Renderer
from batchgen.engine_options import EngineOptions
from batchgen.runner import prepare

pytestmark = pytest.mark.slow  # each model compiles once: 20-40 s on 2 cores

SWEEP = ["sweep.seeds=[1]", "sweep.steps=2", "sweep.slots={}", "sweep.references=false", "sweep.prompts=['a castle']"]


def _jobs(model: str) -> tuple[dict[str, object], dict]:
    """The model's jobs by their LoRAs as the manifest writes them ('' for none), and the plan's models."""
    sweep = "+sweep=next" if model == "tiny_flux" else "+sweep=styles"
    plan = prepare(compose_config([sweep, f"sweep.models=[{model}]", *SWEEP]))
    return {";".join(f"{lw.name}:{lw.unet}" for lw in job.loras): job for job in plan.jobs}, plan.models


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CompileCounter:
    counter = CompileCounter()
    torch._dynamo.reset()  # nothing compiled by an earlier test counts here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    return counter


def _render(renderer: Renderer, job) -> np.ndarray:
    (result,) = renderer.render([job])
    assert result.error == ""
    return np.asarray(result.image)


def _frames_per_job(model: str, order: list[str], counter: CompileCounter, weights: str = "auto"):
    """Render `order` one job at a time in one compiled Renderer: {job: frames compiled so far} after each, and
    whether every image equals the uncompiled Renderer's."""
    jobs, models = _jobs(model)
    compiled = Renderer(models, EngineOptions(batch_size=1, compile=True, weights=weights))
    plain = Renderer(models, EngineOptions(batch_size=1, weights=weights))
    frames, same = [], []
    for key in order:
        image = _render(compiled, jobs[key])
        frames.append((key, counter.frame_count))
        same.append(np.array_equal(image, _render(plain, jobs[key])))
    return frames, all(same)


@pytest.mark.parametrize(
    ("model", "stacks"),
    [
        # kohya LoRA, two weights, a LoRA pair, PEFT, and LoHa + LoKr (patched in fp32 in place, as any other)
        ("tiny_sd1", ["", "ink:0.5", "ink:1.0", "grain:0.6;ink:0.8", "peft_sketch:0.8", "hatch:0.7;kron:0.5"]),
        ("tiny_flux", ["", "pastel:1.0", "ink:0.5", "ink:1.0", "grain:0.6;ink:0.8"]),
    ],
)
def test_a_lora_switch_compiles_nothing(model: str, stacks: list[str], counter: CompileCounter) -> None:
    frames, same = _frames_per_job(model, [*stacks, *stacks], counter)
    first = frames[0][1]
    assert first >= 1  # the denoiser was compiled, by the first job
    assert frames == [(key, first) for key in [*stacks, *stacks]]
    assert same


def test_under_fp8_weights_and_removal_compile_nothing_a_new_module_set_once(counter: CompileCounter) -> None:
    stacks = ["", "pastel:1.0", "ink:0.5", "ink:1.0", "grain:0.6;ink:0.8", ""]
    frames, same = _frames_per_job("tiny_flux", [*stacks, *stacks], counter, weights="fp8")
    counts = [count for _, count in frames]
    # pastel patches a set of modules none did (one more frame), ink a new rank (one more, after which the rank is
    # dynamic); ink at another weight, ink with grain (same modules, a larger rank) and none again: nothing.
    assert counts[:6] == [counts[0], counts[0] + 1, counts[0] + 2, counts[0] + 2, counts[0] + 2, counts[0] + 2]
    assert counts[6:] == [counts[5]] * 6  # every stack seen once: switching among them compiles nothing
    assert same
