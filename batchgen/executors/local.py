"""The local executor: render in this process on one device (CPU, or the first CUDA device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.spec import Job, ModelSpec


@dataclass(frozen=True)
class ExecutorRequest:
    jobs: list[Job]
    rows: dict[str, dict[str, Any]]  # job_id -> the job's manifest row before rendering
    models: dict[str, ModelSpec]
    run_dir: Path
    dtype: str
    devices: Any
    batch_size: int | str = "auto"
    compile_unet: bool = False


def pick_device(devices: Any) -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if isinstance(devices, list) and devices:
        return f"cuda:{devices[0]}"
    return "cuda:0"


def run_local(request: ExecutorRequest, manifest, on_row: Callable[[dict[str, Any]], None]) -> dict[str, int]:
    """Render every job; rows reach the manifest through the writer thread. Returns load counts per model."""
    from batchgen.engine.worker import Renderer
    from batchgen.engine.writer import ImageWriter

    renderer = Renderer(
        request.models,
        device=pick_device(request.devices),
        dtype=request.dtype,
        batch_size=request.batch_size,
        compile_unet=request.compile_unet,
    )
    writer = ImageWriter(request.run_dir, manifest, request.models, on_row=on_row)
    try:
        for result in renderer.render(request.jobs):
            writer.submit(request.rows[result.job_id], result)
    finally:
        writer.close()
    return renderer.load_count
