"""The `executor` config group's choices: name -> the executor class, imported only when that name is chosen.

Each executor module declares its options dataclass (the keys of conf/executor/NAME.yaml) as the class's `options`.
Classes are named by module path so that a run imports only the executor it uses, and importing an executor module
imports neither Ray nor submitit (start-up time).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from batchgen.engine_options import EngineOptions
from batchgen.errors import BatchgenError
from batchgen.executors.base import Executor

EXECUTORS = {
    "local": "batchgen.executors.local:LocalExecutor",
    "ray": "batchgen.executors.ray_executor:RayExecutor",
    "slurm": "batchgen.executors.slurm:SlurmExecutor",
}


def executor_class(name: str) -> Any:
    path = EXECUTORS.get(name)
    if path is None:
        raise BatchgenError(f"executor={name}: unknown executor; use one of {', '.join(EXECUTORS)}")
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def executor_options(raw: Any) -> Any:
    """The executor section typed by its name; an unknown name or key is a config error naming the choices."""
    if not isinstance(raw, dict):
        *others, last = (f"executor={name}" for name in EXECUTORS)
        choices = f"{', '.join(others)} or {last}"
        raise BatchgenError(f"executor: {raw!r} is not a section; choose {choices}")
    name = raw.get("name", "local")
    schema = executor_class(name).options
    known = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in known:
            raise BatchgenError(f"executor.{key}: not a setting of executor={name}; it takes {', '.join(known)}")
    return schema(**raw)


def make_executor(raw: Any, engine: EngineOptions) -> Executor:
    """The chosen executor, its settings checked (a config error here comes before anything is written), rendering
    with `engine` (planning's `engine_options`, already checked)."""
    options = executor_options(raw)
    return executor_class(options.name)(options, engine)
