"""What each `batchgen` invocation recorded under RUN_DIR/.batchgen/<time>/ (manifest.record_invocation), read back
for the report: the composed config as it was, and the few settings the report steps go by, typed.

The report cannot import the config schema (the layers go one way), and a run directory may come from an older
batchgen or a hand-edited file: a key that is absent or not of its type reads as not recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_STAMP = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


@dataclass(frozen=True)
class RecordedMetrics:
    """sweep.metrics as recorded: paths as written, read under the builtin set's folder when one is named."""

    builtin: str | None = None
    clip: str | None = None
    dino: str | None = None
    concepts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, metrics: Any) -> RecordedMetrics | None:
        if not isinstance(metrics, dict):
            return None
        concepts = metrics.get("concepts")
        return cls(
            builtin=_text(metrics.get("builtin")),
            clip=_text(metrics.get("clip")),
            dino=_text(metrics.get("dino")),
            concepts={str(k): str(v) for k, v in concepts.items() if v} if isinstance(concepts, dict) else {},
        )


@dataclass(frozen=True)
class Recorded:
    """The settings of an invocation that `batchgen report` and `batchgen check` read."""

    sweep_name: str = ""
    grid_x: str | None = None  # sweep.grid
    grid_y: str | None = None
    grid_z: str | None = None
    max_grid_megapixels: Any = None  # report.max_grid_megapixels, checked where it is used (axes)
    references: bool | None = None  # sweep.references
    concepts: tuple[str, ...] | None = None  # the names sweep.metrics.concepts gives images; None: no sweep.metrics
    metrics: RecordedMetrics | None = None  # sweep.metrics; None: not recorded

    @classmethod
    def of(cls, config: dict[str, Any]) -> Recorded:
        sweep = _section(config, "sweep")
        grid = _section(sweep, "grid")
        name = sweep.get("name")
        return cls(
            sweep_name="" if name is None else str(name),
            grid_x=str(grid["x"]) if grid.get("x") else None,
            grid_y=str(grid["y"]) if grid.get("y") else None,
            grid_z=None if grid.get("z") is None else str(grid["z"]),
            max_grid_megapixels=_section(config, "report").get("max_grid_megapixels"),
            references=sweep.get("references") if isinstance(sweep.get("references"), bool) else None,
            concepts=_concepts(sweep.get("metrics")),
            metrics=RecordedMetrics.of(sweep.get("metrics")),
        )


@dataclass(frozen=True)
class Invocation:
    """What one `batchgen` invocation recorded under .batchgen/<time>/."""

    folder: Path
    config: dict  # the composed config as recorded: shown in index.html as it is
    overrides: list[str]

    @property
    def recorded(self) -> Recorded:
        return Recorded.of(self.config)


def invocations(run_dir: Path) -> list[Path]:
    """Invocation folders, oldest first (`<time>` then `<time>-2`, `-3`, ... within one second)."""
    root = Path(run_dir) / ".batchgen"
    found = []
    for folder in root.iterdir() if root.is_dir() else ():
        match = _STAMP.match(folder.name)
        if match and folder.is_dir():
            found.append(((match.group(1), int(match.group(2) or 1)), folder))
    return [folder for _, folder in sorted(found)]


def latest_invocation(run_dir: Path) -> Invocation | None:
    """The newest invocation whose config.yaml reads as a mapping, or None."""
    for folder in reversed(invocations(run_dir)):
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            overrides = yaml.safe_load((folder / "overrides.yaml").read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(overrides, list):
            return Invocation(folder, config, [str(o) for o in overrides])
    return None


def recorded(run_dir: Path) -> Recorded:
    """The latest invocation's settings; all unrecorded when there is none."""
    latest = latest_invocation(run_dir)
    return Recorded() if latest is None else latest.recorded


def _concepts(metrics: Any) -> tuple[str, ...] | None:
    if not isinstance(metrics, dict):
        return None
    concepts = metrics.get("concepts")
    return tuple(str(name) for name in concepts) if isinstance(concepts, dict) else ()


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}
