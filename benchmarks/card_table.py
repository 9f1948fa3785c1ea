"""Which card renders what: README's table, computed by batchgen's own memory plan (batchgen/plan/memory.py).

    python benchmarks/card_table.py                 # print the table (README's "Will it fit?" holds its output)
    python benchmarks/card_table.py --write-shapes  # regenerate tests/fixtures/*_shapes.json (imports torch)

Each model is the full-size release as the shipped configs describe it (batchgen/model_configs/): its components
are written as safetensors files whose headers declare every tensor of the configs (the shape fixtures, built on the
meta device by --write-shapes) over sparse data, so nothing is held in memory or on disk, and batchgen reads their
sizes as it reads a real download's. Each is planned with memory_plan as a render on CUDA plans it: run.dtype=auto,
run.offload=auto, run.gpu_memory_gb set to the card's GiB, one job at the model's own defaults (its size, guidance,
T5 length; a negative pass where its guidance runs one), batch 1. tests/test_card_table.py checks that README's
table is this script's output, so it follows the estimator.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from batchgen.assets.bases import BY_NAME  # noqa: E402
from batchgen.assets.bases.record import SHIPPED_CONFIGS  # noqa: E402
from batchgen.assets.defaults import model_defaults  # noqa: E402
from batchgen.engine_options import EngineOptions  # noqa: E402
from batchgen.plan.memory import GIB, MemoryPlan, gb, memory_plan  # noqa: E402
from batchgen.spec import Job, LoraState, ModelSpec  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
CARDS = (8, 12, 16, 24, 32, 80)  # GiB, as run.gpu_memory_gb reads them
WEIGHT_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
DEFAULTS = ("width", "height", "steps", "guidance_scale", "max_sequence_length")


@dataclass(frozen=True)
class Model:
    label: str
    base: str  # its shipped configs: batchgen/model_configs/<base>
    shapes: str  # tests/fixtures/<shapes>: every component's tensor names and shapes
    weights: str = "auto"  # run.weights


MODELS = (
    Model("SD1.5", "sd-1", "sd15_shapes.json"),
    Model("SDXL", "sdxl", "sdxl_shapes.json"),
    Model("SD3.5 large", "sd-3", "sd35_large_shapes.json"),
    Model("FLUX.1-dev", "flux", "flux1_dev_shapes.json"),
    Model("FLUX.1-dev, fp8 weights", "flux", "flux1_dev_shapes.json", weights="fp8"),
)


def write_safetensors(path: Path, rows: list, dtype: str = "BF16") -> None:
    """A safetensors file with a real header over sparse data: full size on paper, no blocks on disk."""
    header, offset = {}, 0
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
    for key, shape in rows:
        size = math.prod(shape) * itemsize
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def sparse_model(base: str, shapes: str, folder: Path, name: str = "m") -> ModelSpec:
    """The release of `base` as a diffusers folder under `folder`: the shipped configs and sparse weight files."""
    shutil.copytree(SHIPPED_CONFIGS / base, folder, dirs_exist_ok=True)
    index = json.loads((folder / "model_index.json").read_text())
    for component, rows in json.loads((FIXTURES / shapes).read_text()).items():
        write_safetensors(folder / component / WEIGHT_FILES[index[component][0]], rows)
    return ModelSpec(name=name, base=base, checkpoint=folder, checkpoint_sha256="")


def default_job(spec: ModelSpec) -> Job:
    """One job at the model's own settings, as a sweep that gives none renders it."""
    own = model_defaults(spec, DEFAULTS)
    return Job("0" * 16, spec.name, "a fox", "", 1, lora_state=LoraState(), **own)


def plan(spec: ModelSpec, job: Job, gib: int, weights: str = "auto") -> MemoryPlan:
    return memory_plan(spec, [job], EngineOptions(gpu_memory_gb=gib, weights=weights), gib * GIB, "cuda")


def cell(p: MemoryPlan) -> str:
    return f"{p.offload} {gb(p.peak_bytes)}" if p.fits else f"no: {p.offload} needs {gb(p.peak_bytes)}"


def rows(folder: Path) -> list[str]:
    specs: dict[str, tuple[ModelSpec, Job]] = {}
    out = []
    for model in MODELS:
        if model.base not in specs:
            spec = sparse_model(model.base, model.shapes, folder / model.base)
            specs[model.base] = (spec, default_job(spec))
        spec, job = specs[model.base]
        plans = [plan(spec, job, gib, model.weights) for gib in CARDS]
        guidance = "negative pass" if BY_NAME[model.base].negative_pass(job.guidance_scale) else "no negative pass"
        shape = f"{job.width}x{job.height}, {guidance}"
        dtype = plans[0].dtype + (", fp8 weights" if model.weights == "fp8" else "")
        out.append(f"| {model.label} | {shape} | {dtype} | " + " | ".join(cell(p) for p in plans) + " |")
    return out


def table() -> str:
    """README's markdown table: per model, the plan auto picks on each card and its estimated peak."""
    head = "| model | size, guidance | dtype | " + " | ".join(f"{gib} GB" for gib in CARDS) + " |"
    rule = "| --- | --- | --- | " + " | ".join("---" for _ in CARDS) + " |"
    with tempfile.TemporaryDirectory(prefix="card-table-") as tmp:
        return "\n".join([head, rule, *rows(Path(tmp))]) + "\n"


def write_shapes(folder: Path = FIXTURES) -> None:
    """Every fixture of MODELS into `folder`, from the shipped configs built on the meta device (imports torch,
    diffusers, transformers). T5's encoder.embed_tokens is tied to shared.weight, which the releases save once."""
    from batchgen.assets.architecture import meta_component, meta_denoiser

    for shapes, base in sorted({(m.shapes, m.base) for m in MODELS}):
        configs = SHIPPED_CONFIGS / base
        index = json.loads((configs / "model_index.json").read_text())
        denoiser = BY_NAME[base].denoiser
        models = {denoiser: meta_denoiser(json.loads((configs / denoiser / "config.json").read_text()), base)}
        for component in (*BY_NAME[base].text_encoders, "vae"):
            models[component] = meta_component(configs, component, *index[component])
        tables = []
        for component, module in models.items():
            state = module.state_dict()
            state.pop("encoder.embed_tokens.weight", None)
            lines = ",\n".join(f"    [{json.dumps(k)}, {json.dumps(list(v.shape))}]" for k, v in state.items())
            tables.append(f'  "{component}": [\n{lines}\n  ]')
        (folder / shapes).write_text("{\n" + ",\n".join(tables) + "\n}\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-shapes"]:
        write_shapes()
    elif sys.argv[1:]:
        sys.exit("usage: python benchmarks/card_table.py [--write-shapes]")
    else:
        print(table(), end="")
