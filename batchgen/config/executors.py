"""The executor section's schemas: each executor has its own fields, typed once the config is composed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from batchgen.errors import BatchgenError


@dataclass
class LocalExecutorConfig:
    name: str = "local"
    devices: Any = "auto"  # auto | N | [0, 2]


@dataclass
class RayExecutorConfig:
    name: str = "ray"
    address: str | None = None  # null starts a local Ray; auto (`ray start --head`); ray://host:10001
    actors: Any = "auto"  # auto (one per GPU, else one per cpus_per_actor CPUs) | N
    cpus_per_actor: int = 1
    shared_fs: bool = False  # actors write PNGs into run.out_dir themselves (every node mounts it)


# Each executor has its own fields, so `executor` is typed here rather than by one schema for all of them.
EXECUTOR_SCHEMAS = {"local": LocalExecutorConfig, "ray": RayExecutorConfig}


def executor_config(raw: Any) -> LocalExecutorConfig | RayExecutorConfig:
    """The executor section typed by its name; an unknown name or key is a config error naming the choices."""
    if not isinstance(raw, dict):
        raise BatchgenError(f"executor: {raw!r} is not a section; choose executor=local or executor=ray")
    name = raw.get("name", "local")
    schema = EXECUTOR_SCHEMAS.get(name)
    if schema is None:
        raise BatchgenError(f"executor={name}: unknown executor; use one of {', '.join(EXECUTOR_SCHEMAS)}")
    known = [f.name for f in dataclasses.fields(schema)]
    for key in raw:
        if key not in known:
            raise BatchgenError(f"executor.{key}: not a setting of executor={name}; it takes {', '.join(known)}")
    return schema(**raw)
