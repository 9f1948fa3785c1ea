"""The facts at the top of index.html, computed from the run directory alone so `batchgen report` shows them too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from batchgen.cells import in_stage_order, parse_timings
from batchgen.report.invocations import invocations, latest_invocation
from batchgen.report.text import text

STATUSES = ("ok", "failed", "skipped", "pending")


@dataclass(frozen=True)
class RunSummary:
    facts: list[tuple[str, str]]
    config_yaml: str  # the latest invocation's composed config; "" when none was recorded
    invocations: int


def status_counts(table: pd.DataFrame) -> dict[str, int]:
    """Jobs per status; a job with no recorded status is pending."""
    statuses = table["status"].map(text).replace("", "pending") if "status" in table.columns else pd.Series()
    counts = {status: int((statuses == status).sum()) for status in STATUSES}
    for other, count in statuses[~statuses.isin(STATUSES)].value_counts().items():
        counts[str(other)] = int(count)
    return counts


def _stage_totals(table: pd.DataFrame) -> dict[str, float]:
    """Seconds per stage over the shown jobs whose latest row is ok (manifest `timings`: load=..;encode=..)."""
    if "timings" not in table.columns or "status" not in table.columns:
        return {}
    totals: dict[str, float] = {}
    for cell in table.loc[table["status"].map(text) == "ok", "timings"]:
        for stage, seconds in parse_timings(text(cell)).items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return in_stage_order(totals)


def _render_time(table: pd.DataFrame) -> str:
    if "seconds" not in table.columns or "status" not in table.columns:
        return ""
    ok = table[table["status"].map(text) == "ok"]
    seconds = pd.to_numeric(ok["seconds"], errors="coerce").dropna()
    if seconds.empty:
        return ""
    return f"{seconds.sum():.1f} s for {len(seconds)} images ({seconds.mean():.2f} s per image)"


def _finished(table: pd.DataFrame) -> str:
    if "finished_at" not in table.columns:
        return ""
    stamps = sorted(v for v in table["finished_at"].map(text) if v)
    if not stamps:
        return ""
    return stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} .. {stamps[-1]}"


def summarise(table: pd.DataFrame, run_dir: Path) -> RunSummary:
    """Sweep, overrides, job counts per status and timings of the run as the table shows it."""
    latest = latest_invocation(run_dir)
    sweep = latest.recorded.sweep_name if latest else ""
    counts = status_counts(table)
    facts = [
        ("sweep", text(sweep) or Path(run_dir).resolve().name),
        ("run directory", str(run_dir)),
        ("invocations", str(len(invocations(run_dir)))),
        ("latest overrides", " ".join(latest.overrides) if latest else "(not recorded)"),
        ("jobs", f"{len(table)}: " + ", ".join(f"{n} {status}" for status, n in counts.items())),
        ("render time", _render_time(table)),
        ("stages", ", ".join(f"{s} {v:.2f} s" for s, v in _stage_totals(table).items())),
        ("finished", _finished(table)),
    ]
    config_yaml = yaml.safe_dump(latest.config, sort_keys=False, allow_unicode=True) if latest else ""
    return RunSummary([(k, v) for k, v in facts if v], config_yaml, len(invocations(run_dir)))
