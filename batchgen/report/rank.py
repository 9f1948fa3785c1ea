"""`batchgen rank RUN_DIR`: which epoch, weight and block preset of each LoRA (or TI) to publish, by the per-image
measures in the manifest (clip_i, dino_i: concept fidelity; clip_t: prompt fidelity; effect).

Per model and per LoRA or TI, one row per state (its label as the grids give it, batchgen.axes): the median and
the range (min, max) over the state's jobs (its prompts x seeds) of each measure, and of each job's gain over its
no-LoRA reference (clip_i - reference_clip_i, dino_i - reference_dino_i, clip_t - the reference job's clip_t).
A job counts under each LoRA of its stack and each TI of its prompt, with its own values: clip_i is one number
per image, the mean over every concept it carries. The `front` marks the states no other state of the same LoRA
beats on both concept fidelity (median clip_i, or dino_i where the LoRA has no clip_i) and prompt fidelity (median
clip_t). Best first: the front, then by the concept-fidelity gain, then by concept fidelity.

Pure pandas on a table of each job's latest row, but for rank_run, which reads the run directory.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from batchgen.cells import format_value, parse_loras, parse_names
from batchgen.errors import BatchgenError
from batchgen.manifest import MANIFEST, read_latest
from batchgen.report.invocations import recorded
from batchgen.report.labels import stack_labels
from batchgen.report.text import text

METRICS = ("clip_t", "clip_i", "dino_i")  # the columns sweep.metrics fills
MEASURES = ("clip_i", "dino_i", "clip_t", "effect")
GAINS = ("clip_i", "dino_i", "clip_t")
# A LoRA job's no-LoRA reference image compared with the same concept images as the job (its own clip_i is empty:
# a reference carries no LoRA). clip_t's reference value is the reference job's own clip_t.
REFERENCE_COLUMNS = {"clip_i": "reference_clip_i", "dino_i": "reference_dino_i"}
LORA, TI = "LoRA", "TI"
_EPOCH_SUFFIX = re.compile(r"[-_. ]*\d*$")  # what a glob's epoch files add to their LoRA's name: `-000004`


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a state's values; NaN where it has none."""

    median: float
    low: float
    high: float

    @property
    def known(self) -> bool:
        return not math.isnan(self.median)


@dataclass(frozen=True)
class RankedState:
    model: str
    kind: str  # LORA or TI
    name: str  # the LoRA (a glob's epoch files by their common name) or the TI's trigger
    state: str  # the stack state's label, as on the grids
    rank: int  # 1 = best, within its model and LoRA
    front: bool
    images: int  # ok jobs in the state
    measures: dict[str, Spread]  # MEASURES
    gains: dict[str, Spread]  # GAINS


@dataclass(frozen=True)
class Group:
    """One model's LoRA or TI: its states best first, the measure its front reads, its reference's medians."""

    model: str
    kind: str
    name: str
    fidelity: str | None  # clip_i, dino_i, or None where it has neither
    reference: dict[str, float]  # GAINS -> the median over its jobs of their reference's value
    states: list[RankedState]


def values(table: pd.DataFrame, column: str) -> pd.Series:
    """A column as floats, NaN for an empty cell and for a column the manifest lacks (a run without metrics)."""
    if column not in table.columns:
        return pd.Series(math.nan, index=table.index, dtype=float)
    return pd.to_numeric(table[column].map(text), errors="coerce").astype(float)


def has_metrics(table: pd.DataFrame) -> bool:
    ok = table[table["status"] == "ok"]
    return any(values(ok, column).notna().any() for column in METRICS)


def jobs(table: pd.DataFrame, concepts: Collection[str] | None = None) -> pd.DataFrame:
    """One row per (ok job, LoRA or TI it carries): model, kind, name, state, job_id, epoch, lora (its entry in the
    `loras` cell, for a LoRA), loras (how many the job has), order (the job's place in `table`), each measure, gain
    and reference value.
    `table`: each job's latest row. `concepts`: the names sweep.metrics.concepts gave images; a TI without images is
    left out (a TI used throughout a sweep would repeat its LoRAs' rows), None: every TI."""
    labels = stack_labels(table)
    clip_t_of = dict(zip(table["job_id"], values(table, "clip_t"), strict=True))
    measured = {column: values(table, column) for column in (*MEASURES, *REFERENCE_COLUMNS.values())}
    families = _families(table)
    records = []
    for order, (index, row) in enumerate(table.iterrows()):
        if text(row.get("status")) != "ok":
            continue
        job = {
            "model": text(row.get("model")),
            "state": labels[index],
            "job_id": text(row.get("job_id")),
            "epoch": text(row.get("epoch")),
            "order": order,
            "loras": len(parse_loras(row.get("loras"))),
            **{column: measured[column][index] for column in MEASURES},
        }
        for column, reference in REFERENCE_COLUMNS.items():
            job[f"reference_{column}"] = measured[reference][index]
        job["reference_clip_t"] = clip_t_of.get(text(row.get("reference")), math.nan)
        for column in GAINS:
            job[f"{column}_gain"] = job[column] - job[f"reference_{column}"]
        carried: dict[tuple[str, str], str] = {}
        for entry in parse_loras(row.get("loras")):
            carried.setdefault((LORA, families.get((text(row.get("stack")), entry.name), entry.name)), entry.text)
        for trigger in parse_names(row.get("embeddings")):
            if concepts is None or trigger in concepts:
                carried.setdefault((TI, trigger), "")
        records += [{**job, "kind": kind, "name": name, "lora": lora} for (kind, name), lora in carried.items()]
    columns = ["model", "kind", "name", "state", "job_id", "epoch", "lora", "loras", "order", *MEASURES]
    columns += [f"reference_{c}" for c in GAINS] + [f"{c}_gain" for c in GAINS]
    return pd.DataFrame(records, columns=columns)


def rank(table: pd.DataFrame, concepts: Collection[str] | None = None) -> list[Group]:
    """Every model's LoRAs and TIs with their states ranked; models in the table's order, LoRAs before TIs, each
    kind by name; a LoRA or TI none of whose jobs has a metric is left out. `table`: each job's latest row
    (manifest.read_latest)."""
    per_job = jobs(table, concepts)
    groups = []
    keys = ["model", "kind", "name"]
    model_order = {m: i for i, m in enumerate(dict.fromkeys(per_job["model"]))}
    ordered = sorted(per_job.groupby(keys, sort=False), key=lambda g: (model_order[g[0][0]], g[0][1] != LORA, g[0][2]))
    for (model, kind, name), rows in ordered:
        if rows[list(METRICS)].notna().any(axis=None):  # a model rendered without metrics has nothing to rank by
            groups.append(_group(model, kind, name, rows))
    return groups


class _Measured(NamedTuple):
    state: str
    images: int
    first: int  # where its first job sits in the table: the last tie-break, so the order is the grids'
    measures: dict[str, Spread]
    gains: dict[str, Spread]


def _group(model: str, kind: str, name: str, rows: pd.DataFrame) -> Group:
    states = [
        _Measured(
            state,
            len(found),
            int(found["order"].min()),
            {column: _spread(found[column]) for column in MEASURES},
            {column: _spread(found[f"{column}_gain"]) for column in GAINS},
        )
        for state, found in rows.groupby("state", sort=False)
    ]
    fidelity = next((c for c in ("clip_i", "dino_i") if any(s.measures[c].known for s in states)), None)
    axes = [c for c in (fidelity, "clip_t") if c is not None and any(s.measures[c].known for s in states)]
    points = [tuple(s.measures[c].median for c in axes) for s in states]
    front = [bool(axes) and _on_front(point, points) for point in points]

    def key(i: int) -> tuple:
        gain = states[i].gains[fidelity].median if fidelity else math.nan
        value = states[i].measures[fidelity].median if fidelity else math.nan
        return (not front[i], _descending(gain), _descending(value), states[i].first)

    ranked = [
        RankedState(model, kind, name, s.state, place, front[i], s.images, s.measures, s.gains)
        for place, i in enumerate(sorted(range(len(states)), key=key), start=1)
        for s in (states[i],)
    ]
    reference = {column: _median(rows[f"reference_{column}"]) for column in GAINS}
    return Group(model, kind, name, fidelity, reference, ranked)


def _on_front(point: tuple[float, ...], points: list[tuple[float, ...]]) -> bool:
    """Pareto: no other point is at least as good on every axis and better on one; a point missing a value is not
    on it."""
    if any(math.isnan(v) for v in point):
        return False
    for other in points:
        if any(math.isnan(v) for v in other):
            continue
        if all(o >= p for o, p in zip(other, point, strict=True)) and other != point:
            return False
    return True


def _spread(series: pd.Series) -> Spread:
    known = series.dropna()
    if known.empty:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(float(known.median()), float(known.min()), float(known.max()))


def _median(series: pd.Series) -> float:
    known = series.dropna()
    return float(known.median()) if not known.empty else math.nan


def _descending(value: float) -> tuple[bool, float]:
    return (math.isnan(value), -value if not math.isnan(value) else 0.0)


def _families(table: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(stack, LoRA file) -> the LoRA it is an epoch of: a glob's files (the names that vary between a stack's
    epoch states) count as one LoRA, named by their common start (`mylora` for mylora-000004 and mylora)."""
    names: dict[str, list[set[str]]] = {}
    for stack, loras, epoch in zip(table["stack"], table["loras"], table["epoch"], strict=True):
        if text(epoch):
            names.setdefault(text(stack), []).append({entry.name for entry in parse_loras(loras)})
    out = {}
    for stack, found in names.items():
        varying = set().union(*found) - set.intersection(*found)
        prefix = os.path.commonprefix(sorted(varying))
        family = _EPOCH_SUFFIX.sub("", prefix) or prefix
        for name in varying:
            out[(stack, name)] = family or name
    return out


# --- output: a table to read, CSV for machines ---------------------------------------------------------------------

_DIGITS = {"clip_i": 3, "dino_i": 3, "clip_t": 2, "effect": 2}
NOTE = (
    "median [min, max] over each state's jobs (prompts x seeds); gain: the median over those jobs of the job's value",
    "minus its no-LoRA reference's; front *: no other state of the same LoRA has both higher concept fidelity and",
    "higher clip_t; best first: the front, then by concept-fidelity gain; a job with several LoRAs or TIs counts",
    "under each",
)


def csv_columns() -> list[str]:
    columns = ["model", "kind", "name", "rank", "front", "state", "images"]
    columns += [f"{c}_{part}" for c in MEASURES for part in ("median", "min", "max")]
    columns += [f"{c}_gain_{part}" for c in GAINS for part in ("median", "min", "max")]
    return columns


def to_csv(groups: Iterable[Group]) -> str:
    """One line per state, CSV_COLUMNS; numbers as the manifest writes them, empty where there is none."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_columns())
    for group in groups:
        for s in group.states:
            cells = [s.model, s.kind, s.name, s.rank, "true" if s.front else "false", s.state, s.images]
            for spread in [*(s.measures[c] for c in MEASURES), *(s.gains[c] for c in GAINS)]:
                cells += [_number(v) for v in (spread.median, spread.low, spread.high)]
            writer.writerow([format_value(c) for c in cells])
    return buffer.getvalue()


def to_text(groups: list[Group], run_dir: Path) -> str:
    """A table per model and LoRA; the measures and gains no state has are left out."""
    states = [s for g in groups for s in g.states]
    shown = [c for c in MEASURES if any(s.measures[c].known for s in states)]
    gains = {c for c in GAINS if any(s.gains[c].known for s in states)}
    lines = [f"rank {run_dir}:", *(f"  {line}" for line in NOTE)]
    for group in groups:
        lines += ["", _heading(group, gains)]
        head = ["rank", "front", "state", "images"]
        for column in shown:
            head += [column, *(["gain"] if column in gains else [])]
        rows = [head]
        for s in group.states:
            cells = [str(s.rank), "*" if s.front else "", s.state, str(s.images)]
            for column in shown:
                cells.append(_range(s.measures[column], _DIGITS[column]))
                if column in gains:
                    gain = s.gains[column].median
                    cells.append("" if math.isnan(gain) else f"{gain:+.{_DIGITS[column]}f}")
            rows.append(cells)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _heading(group: Group, gains: set[str]) -> str:
    front = f"front: {group.fidelity} vs clip_t" if group.fidelity else "front: clip_t"
    reference = [
        f"{c} {group.reference[c]:.{_DIGITS[c]}f}" for c in GAINS if c in gains and not math.isnan(group.reference[c])
    ]
    said = f"; reference (no LoRA): {', '.join(reference)}" if reference else ""
    return f"{group.model}, {group.kind} {group.name} ({front}{said})"


def _range(spread: Spread, digits: int) -> str:
    if not spread.known:
        return ""
    return f"{spread.median:.{digits}f} [{spread.low:.{digits}f}, {spread.high:.{digits}f}]"


def _number(value: float) -> float | None:
    # 6 decimals: more than CLIP's or DINO's cosines carry, fewer than a difference's float noise (0.19280000000000003)
    return None if math.isnan(value) else round(value, 6)


# --- the trade-off plot's data: one curve per LoRA through its weights or epochs -------------------------------------


@dataclass(frozen=True)
class TradeoffPoint:
    label: str  # the weight or epoch, written beside the point
    clip_t: float
    clip_i: float


@dataclass(frozen=True)
class Curve:
    label: str  # the LoRA, with its text-encoder weight, block weights or (across epochs) weight where it has one
    points: list[TradeoffPoint]  # by weight, or by epoch in training order
    reference: TradeoffPoint | None  # the no-LoRA reference's medians over the same jobs


def tradeoff_curves(table: pd.DataFrame) -> dict[str, list[Curve]]:
    """{model: curves} of median clip_i against median clip_t, from the jobs of single-LoRA stacks (with two LoRAs
    there is no one weight or epoch to follow); only points with both measures. A LoRA with epochs has one curve
    per weight through its epochs, else one through its weights; per text-encoder weight and block weights."""
    if not all(values(table, column).notna().any() for column in ("clip_i", "clip_t")):
        return {}  # a run without metrics (most runs) pays no more than this look
    per_job = jobs(table, concepts=())
    per_job = per_job[per_job["loras"] == 1]
    out: dict[str, list[Curve]] = {}
    for (model, name), rows in per_job.groupby(["model", "name"], sort=False):
        entries = {index: parse_loras(cell)[0] for index, cell in rows["lora"].items()}
        by_epoch = bool(rows["epoch"].ne("").any())
        several = len({e.unet_weight for e in entries.values()}) > 1
        curves: dict[tuple[str, ...], list[int]] = {}
        for index, e in entries.items():
            key = (
                e.unet_weight if by_epoch and several else "",
                f"te={e.te_weight}" if e.te_weight else "",
                f"lbw={e.blocks}" if e.blocks else "",
            )
            curves.setdefault(key, []).append(index)
        for key, indices in curves.items():
            curve = _curve(" ".join([name, *(k for k in key if k)]), rows.loc[indices], entries, by_epoch, name)
            if curve.points:
                out.setdefault(model, []).append(curve)
    return out


def _curve(label: str, rows: pd.DataFrame, entries: dict, by_epoch: bool, name: str) -> Curve:
    steps: dict[tuple, list[int]] = {}  # where a point sits on the curve -> its jobs
    marks: dict[tuple, str] = {}
    for index, row in rows.iterrows():
        if by_epoch:
            # a glob's files in training order, which is the order the planner lists them in (the table's); a
            # state without an epoch label (the final file in a stack of its own) last
            epoch = row["epoch"]
            at = (epoch == "", int(rows.loc[rows["epoch"] == epoch, "order"].min()))
            marks[at] = epoch.removeprefix(name).strip() or epoch or entries[index].name
        else:
            at = (float(entries[index].unet_weight),)
            marks[at] = entries[index].unet_weight
        steps.setdefault(at, []).append(index)
    points = []
    for at in sorted(steps):
        found = rows.loc[steps[at]]
        clip_t, clip_i = _median(found["clip_t"]), _median(found["clip_i"])
        if not (math.isnan(clip_t) or math.isnan(clip_i)):
            points.append(TradeoffPoint(marks[at], clip_t, clip_i))
    reference = TradeoffPoint("reference", _median(rows["reference_clip_t"]), _median(rows["reference_clip_i"]))
    known = not (math.isnan(reference.clip_t) or math.isnan(reference.clip_i))
    return Curve(label, points, reference if known else None)


# --- batchgen rank RUN_DIR ----------------------------------------------------------------------------------------


def rank_run(run_dir: Path) -> list[Group]:
    """The run's ranking; a one-line error (exit 2) for a run with no metrics or nothing to rank."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise BatchgenError(f"{run_dir}: no {MANIFEST} here; pass a run directory such as runs/styles")
    table = read_latest(run_dir)
    if not has_metrics(table):
        raise BatchgenError(
            f"{run_dir}: {MANIFEST} has no clip_t, clip_i or dino_i values to rank by; set sweep.metrics (a CLIP "
            f"and/or DINO model folder, each LoRA's or TI's training images) and run `batchgen report {run_dir}`"
        )
    groups = rank(table, recorded(run_dir).concepts)
    if not groups:
        raise BatchgenError(f"{run_dir}: no ok job with a LoRA, or a TI given images in sweep.metrics.concepts")
    return groups
