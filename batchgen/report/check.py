"""`batchgen check RUN_DIR`: assertions on a finished run for CI, e.g. every LoRA does something, nothing broke,
every image follows its prompt and looks like its LoRA's training images (clip_t, clip_i, dino_i).

Reads each job's latest row; measurements a run lacks (a reference that landed after its job) are computed in
memory, never written: a check changes nothing in the run directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from batchgen.cells import is_degenerate, parse_loras
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, latest_positions, read_manifest
from batchgen.report.effects import with_measurements
from batchgen.report.invocations import recorded
from batchgen.report.labels import stack_labels
from batchgen.report.rank import values
from batchgen.report.text import text

_LABEL = "_stack_label"  # the row's stack state as grids label it, for the lines naming a job
# A LoRA job takes part in --min-effect when every weight it has (UNet and text encoder) is at least this: at
# lower weights a LoRA may rightly do next to nothing.
MIN_EFFECT_WEIGHT = 0.5
# The metric columns (sweep.metrics) a threshold applies to, and the option naming it.
MIN_METRICS = {"clip_t": "--min-clip-t", "clip_i": "--min-clip-i", "dino_i": "--min-dino-i"}


@dataclass(frozen=True)
class CheckRequest:
    run_dir: Path
    min_effect: float | None = None
    no_degenerate: bool = False
    max_failed: int | None = None
    min_clip_t: float | None = None
    min_clip_i: float | None = None
    min_dino_i: float | None = None

    def minimum(self, column: str) -> float | None:
        """The threshold given for a metric column of MIN_METRICS."""
        return getattr(self, f"min_{column}")


@dataclass(frozen=True)
class CheckResult:
    problems: list[str]  # one line per offending job, then any count that is over its limit
    summary: str

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0


def check_run(request: CheckRequest) -> CheckResult:
    run_dir = Path(request.run_dir)
    _check_request(request, run_dir)
    rows = read_manifest(run_dir)
    latest = with_measurements(rows, run_dir).iloc[latest_positions(rows, run_dir)]
    latest = latest.assign(**{_LABEL: stack_labels(latest).to_numpy()})
    problems: list[str] = []
    said: list[str] = []
    if request.min_effect is not None:
        tested = _lora_jobs(latest)
        if tested.empty:
            raise BatchgenError(
                f"{run_dir}: --min-effect: no ok LoRA job with every weight >= {MIN_EFFECT_WEIGHT} in this run; "
                "check a run with LoRA stacks, or drop --min-effect"
            )
        unmeasured = tested[tested["effect"] == ""]
        if not unmeasured.empty and _references_off(run_dir):
            raise BatchgenError(
                f"{run_dir}: --min-effect needs reference images, and this run was rendered with "
                "sweep.references=false; render it again with sweep.references=true (the default) to add them"
            )
        for _, row in tested.iterrows():
            if not row["effect"]:
                problems.append(
                    f"effect not measured (its reference {row['reference'] or '?'} has no image): {_where(row)}"
                )
            elif float(row["effect"]) < request.min_effect:
                problems.append(f"effect {float(row['effect']):.3f} < {request.min_effect:g}: {_where(row)}")
        said.append(f"{len(tested)} LoRA jobs checked for effect >= {request.min_effect:g}")
    if request.no_degenerate:
        bad = latest[latest["degenerate"].map(is_degenerate).astype(bool)]
        problems += [f"degenerate ({row['degenerate']}): {_where(row)}" for _, row in bad.iterrows()]
        said.append(f"{int((latest['degenerate'] != '').sum())} images checked for degenerate")
    if request.max_failed is not None:
        failed = latest[latest["status"] == "failed"]
        if len(failed) > request.max_failed:
            problems += [f"failed ({row['error']}): {_where(row)}" for _, row in failed.iterrows()]
            problems.append(f"{len(failed)} failed jobs, more than --max-failed {request.max_failed}")
        said.append(f"{len(failed)} failed (at most {request.max_failed})")
    for column, option in MIN_METRICS.items():
        minimum = request.minimum(column)
        if minimum is None:
            continue
        measured = latest.assign(_value=values(latest, column).to_numpy())
        measured = measured[(measured["status"] == "ok") & measured["_value"].notna()]
        if measured.empty:
            raise BatchgenError(
                f"{run_dir}: {option}: no job has a {column} value in this run; set sweep.metrics and run "
                f"`batchgen report {run_dir}` to measure it, or drop {option}"
            )
        problems += [
            f"{column} {row['_value']:.3f} < {minimum:g}: {_where(row)}"
            for _, row in measured.iterrows()
            if row["_value"] < minimum
        ]
        said.append(f"{len(measured)} jobs checked for {column} >= {minimum:g}")
    verdict = f"{len(problems)} problems" if problems else "ok"
    return CheckResult(problems, f"check {run_dir}: {verdict}; {', '.join(said)}")


def _check_request(request: CheckRequest, run_dir: Path) -> None:
    limits = [request.min_effect, request.max_failed, *(request.minimum(column) for column in MIN_METRICS)]
    if not request.no_degenerate and all(limit is None for limit in limits):
        raise BatchgenError(
            "check: nothing to check; give --min-effect N, --no-degenerate, --max-failed N, --min-clip-t N, "
            "--min-clip-i N and/or --min-dino-i N"
        )
    if request.min_effect is not None and not request.min_effect >= 0:
        raise BatchgenError(f"--min-effect {request.min_effect}: give a pixel difference from 0 to 255")
    if request.max_failed is not None and request.max_failed < 0:
        raise BatchgenError(f"--max-failed {request.max_failed}: give a count of 0 or more")
    for column, option in MIN_METRICS.items():
        minimum = request.minimum(column)
        if minimum is not None and not math.isfinite(minimum):
            raise BatchgenError(f"{option} {minimum}: give a number, as the manifest's {column} column holds")
    if not (run_dir / MANIFEST).is_file():
        raise BatchgenError(f"{run_dir}: no {MANIFEST} here; pass a run directory such as runs/styles")


def _lora_jobs(latest: pd.DataFrame) -> pd.DataFrame:
    ok = latest[(latest["status"] == "ok") & (latest["loras"] != "")]
    strong = ok["loras"].map(lambda loras: min(_weights(loras), default=0.0) >= MIN_EFFECT_WEIGHT)
    return ok[strong]


def _weights(loras: str) -> list[float]:
    """Every UNet and text-encoder weight of a `loras` cell (`ink:0.5;grain:1/0.2`)."""
    return [w for entry in parse_loras(loras) for w in entry.weights]


def _references_off(run_dir: Path) -> bool:
    return recorded(run_dir).references is False


def _where(row: pd.Series) -> str:
    return (
        f'model {text(row.get("model"))}, stack {row[_LABEL]}, prompt "{text(row.get("prompt"))}", '
        f"seed {text(row.get('seed'))} (job {text(row.get('job_id'))})"
    )
