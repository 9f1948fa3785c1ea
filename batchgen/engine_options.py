"""How every worker of a run renders: `run.dtype`, `run.compile`, `run.threads` and `sweep.batch_size`, as one record.

Planning builds it from the config (batchgen/plan/values.py `engine_options`) and the record checks itself, so a bad
value is a one-line config error (exit 2) before any worker starts or model loads; executors and the Renderer take
it whole. Pure: the dtype names are a table here, which the engine maps to torch's (engine/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchgen.errors import BatchgenError
from batchgen.settings import is_int

# run.dtype -> the torch dtype's attribute name; auto: by device (engine/pipeline.py resolve_dtype).
DTYPES: dict[str, str | None] = {"auto": None, "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"  # a key of DTYPES
    compile: bool = False  # torch.compile the denoiser
    threads: int | None = None  # intra-op threads per CPU worker; None: the executor splits the cores
    batch_size: int | str = "auto"  # images per pipeline call, or auto: each worker sizes its own

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            *others, last = DTYPES
            raise BatchgenError(f"run.dtype: {self.dtype!r} is not a dtype; use {', '.join(others)} or {last}")
        if not isinstance(self.compile, bool):
            raise BatchgenError(f"run.compile: {self.compile!r} is not true or false; use run.compile=true or false")
        if self.threads is not None and not (is_int(self.threads) and self.threads >= 1):
            raise BatchgenError(
                f"run.threads={self.threads!r}: give a thread count of at least 1, or null for automatic"
            )
        if self.batch_size != "auto" and not (is_int(self.batch_size) and self.batch_size >= 1):
            raise BatchgenError(f"sweep.batch_size: '{self.batch_size}' is neither 'auto' nor a positive integer")

    @property
    def unit_size(self) -> int:
        """The fewest jobs a work unit holds where it can (executors/units.py): a fixed batch is never cut across
        workers; with auto each worker batches what it is sent."""
        return 1 if self.batch_size == "auto" else int(self.batch_size)
