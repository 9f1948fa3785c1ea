"""Engine guarantees: each model loaded once, TIs registered once, each LoRA file read once per process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from batchgen.assets import tensors
from batchgen.config import compose_config
from batchgen.engine import pipeline, worker
from batchgen.runner import prepare


@pytest.mark.slow
def test_models_tis_and_loras_load_once(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    composed = compose_config(["+sweep=styles", "sweep.steps=2"])
    plan = prepare(composed)
    loads: Counter[str] = Counter()
    reads: Counter[str] = Counter()
    real_load, real_read = pipeline.load_pipeline, pipeline.read_state_dict

    def counting_load(spec, device, dtype, weights="auto"):
        loads[spec.name] += 1
        return real_load(spec, device, dtype, weights)

    def counting_read(path):
        reads[Path(path).name if "lora" not in Path(path).parts else f"lora/{Path(path).name}"] += 1
        return real_read(path)

    monkeypatch.setattr(worker, "load_pipeline", counting_load)
    monkeypatch.setattr(pipeline, "read_state_dict", counting_read)  # TIs
    monkeypatch.setattr(tensors, "read_state_dict", counting_read)  # LoRAs, read by assets.loras.read_lora_layers
    renderer = worker.Renderer(plan.models)
    # Interleave models on purpose: the renderer still sees them grouped because the plan orders jobs by model.
    results = list(renderer.render(plan.jobs))
    assert len(results) == 72 and all(r.error == "" for r in results)
    assert loads == {"tiny_sd1": 1, "tiny_sdxl": 1}
    lora_reads = {k: v for k, v in reads.items() if k.startswith("lora/")}
    # every LoRA of the sweep is used by both models: one read per model root
    names = ("ink", "grain", "peft_sketch", "hatch", "kron")
    assert lora_reads == {f"lora/{name}.safetensors": 2 for name in names}
    ti_reads = {k: v for k, v in reads.items() if not k.startswith("lora/")}
    assert sum(ti_reads.values()) == len(plan.models["tiny_sd1"].embeddings) + len(plan.models["tiny_sdxl"].embeddings)
    assert all(v == 1 for v in ti_reads.values())
