"""How every worker of a run renders: `run.dtype`, `run.compile`, `run.threads`, `run.offload`, `run.gpu_memory_gb`,
`run.weights` and `sweep.batch_size`, as one record.

Planning builds it from the config (batchgen/plan/values.py `engine_options`) and the record checks itself, so a bad
value is a one-line config error (exit 2) before any worker starts or model loads; executors and the Renderer take
it whole. Pure: the dtype names are a table here, which the engine maps to torch's (engine/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from batchgen.errors import BatchgenError
from batchgen.settings import is_int

# run.dtype -> the torch dtype's attribute name; auto: by device (engine/pipeline.py resolve_dtype).
DTYPES: dict[str, str | None] = {"auto": None, "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
# run.offload: where each model's components live while it renders (batchgen/plan/memory.py chooses for auto).
OFFLOADS = ("auto", "none", "encoders", "model", "sequential")
# run.weights: `auto` holds every weight in the compute dtype; `fp8` stores the denoiser's linear weights in
# float8 (e4m3) and computes in bf16.
WEIGHTS = ("auto", "fp8")


class _Base(Protocol):
    """What dtype_name asks of a base record (batchgen.assets.bases.record.Base; a shared leaf cannot import it)."""

    def compute_dtype(self, name: str, device: str) -> str: ...


def dtype_name(spec_dtype: str | None, run_dtype: str, device_kind: str, base: _Base) -> str:
    """What a model computes in, as a name (fp16, bf16 or fp32): models.X.dtype over run.dtype, then auto resolved
    for the base on the device kind (cuda: the base's cuda_dtype, cpu: fp32). Planning sizes memory with it; the
    engine's resolve_dtype maps the same name to torch's dtype."""
    return base.compute_dtype(spec_dtype or run_dtype, device_kind)


PLANS = ("none", "encoders", "model", "sequential")  # the offload plans, fastest first


def choose_offload(requested: str, peaks: Mapping[str, int], budget: int | None) -> str:
    """The plan to render with: an explicit one as asked; for auto the fastest whose estimated peak fits the
    budget, `none` without a budget (or without estimates), and `sequential` when none fits (planning refuses that
    where it knows the budget). Shared by planning (batchgen/plan/memory.py) and each worker, which knows its
    device's memory only when it starts."""
    if requested != "auto":
        return requested
    if budget is None or not peaks:
        return "none"
    return next((plan for plan in PLANS if peaks[plan] <= budget), "sequential")


def _choices(values) -> str:
    *others, last = values
    return f"{', '.join(others)} or {last}"


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"  # a key of DTYPES
    compile: bool = False  # torch.compile the denoiser
    threads: int | None = None  # intra-op threads per CPU worker; None: the executor splits the cores
    batch_size: int | str = "auto"  # images per pipeline call, or auto: each worker sizes its own
    offload: str = "auto"  # a name of OFFLOADS
    gpu_memory_gb: float | None = None  # device memory to plan against; None: the device's total (none on CPU)
    weights: str = "auto"  # a name of WEIGHTS

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise BatchgenError(f"run.dtype: {self.dtype!r} is not a dtype; use {_choices(DTYPES)}")
        if not isinstance(self.compile, bool):
            raise BatchgenError(f"run.compile: {self.compile!r} is not true or false; use run.compile=true or false")
        if self.threads is not None and not (is_int(self.threads) and self.threads >= 1):
            raise BatchgenError(
                f"run.threads={self.threads!r}: give a thread count of at least 1, or null for automatic"
            )
        if not isinstance(self.offload, str) or self.offload not in OFFLOADS:
            raise BatchgenError(f"run.offload: {self.offload!r} is not an offload plan; use {_choices(OFFLOADS)}")
        if self.gpu_memory_gb is not None and not (
            isinstance(self.gpu_memory_gb, int | float)
            and not isinstance(self.gpu_memory_gb, bool)
            and self.gpu_memory_gb > 0
        ):
            raise BatchgenError(
                f"run.gpu_memory_gb={self.gpu_memory_gb!r}: give the device memory in GB (such as 24), or null for "
                "the device's own"
            )
        if not isinstance(self.weights, str) or self.weights not in WEIGHTS:
            raise BatchgenError(f"run.weights: {self.weights!r} is not a weight format; use {_choices(WEIGHTS)}")
        if self.batch_size != "auto" and not (is_int(self.batch_size) and self.batch_size >= 1):
            raise BatchgenError(f"sweep.batch_size: '{self.batch_size}' is neither 'auto' nor a positive integer")

    @property
    def unit_size(self) -> int:
        """The fewest jobs a work unit holds where it can (executors/units.py): a fixed batch is never cut across
        workers; with auto each worker batches what it is sent."""
        return 1 if self.batch_size == "auto" else int(self.batch_size)
