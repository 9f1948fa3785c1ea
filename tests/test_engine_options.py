"""EngineOptions: every bad value is one config error naming its key, and each dtype name is one torch knows."""

from __future__ import annotations

import pytest

from batchgen.config import RunConfig, SweepConfig
from batchgen.engine_options import DTYPES, EngineOptions
from batchgen.errors import BatchgenError
from batchgen.plan.values import engine_options


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": "fp8"}, "run.dtype: 'fp8' is not a dtype; use auto, fp16, bf16 or fp32"),
        ({"dtype": "FP16"}, "run.dtype: 'FP16' is not a dtype; use auto, fp16, bf16 or fp32"),
        ({"dtype": None}, "run.dtype: None is not a dtype; use auto, fp16, bf16 or fp32"),
        ({"compile": "yes"}, "run.compile: 'yes' is not true or false; use run.compile=true or false"),
        ({"compile": 1}, "run.compile: 1 is not true or false; use run.compile=true or false"),
        ({"threads": 0}, "run.threads=0: give a thread count of at least 1, or null for automatic"),
        ({"threads": True}, "run.threads=True: give a thread count of at least 1, or null for automatic"),
        ({"threads": 1.5}, "run.threads=1.5: give a thread count of at least 1, or null for automatic"),
        ({"batch_size": 0}, "sweep.batch_size: '0' is neither 'auto' nor a positive integer"),
        ({"batch_size": "big"}, "sweep.batch_size: 'big' is neither 'auto' nor a positive integer"),
    ],
)
def test_a_bad_value_is_one_line_naming_its_key(changes: dict, message: str) -> None:
    with pytest.raises(BatchgenError) as caught:
        EngineOptions(**changes)
    assert str(caught.value) == message


def test_planning_builds_it_from_the_run_and_sweep_sections() -> None:
    sweep = SweepConfig(name="s", batch_size=3)
    run = RunConfig(dtype="bf16", compile=True, threads=2)
    assert engine_options(sweep, run) == EngineOptions(dtype="bf16", compile=True, threads=2, batch_size=3)
    assert engine_options(SweepConfig(name="s"), RunConfig()) == EngineOptions()


@pytest.mark.parametrize(("batch_size", "unit"), [("auto", 1), (1, 1), (5, 5)])
def test_a_fixed_batch_is_the_smallest_work_unit(batch_size, unit: int) -> None:
    assert EngineOptions(batch_size=batch_size).unit_size == unit


def test_every_dtype_name_is_a_torch_dtype() -> None:
    import torch

    from batchgen.assets.bases import BY_NAME
    from batchgen.engine.pipeline import resolve_dtype

    sd1 = BY_NAME["sd-1"]
    assert {name: resolve_dtype(name, sd1, "cpu") for name in DTYPES} == {
        "auto": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp32": torch.float32,
    }
    assert resolve_dtype("auto", sd1, "cuda:1") == torch.float16
