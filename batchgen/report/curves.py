"""Strength curves: per model and LoRA, effect against weight (median over prompts and seeds, min-max band).

One plot per model in plots/; a LoRA with block weights or epochs on an axis gets one curve per preset or epoch.
Only single-LoRA stacks make points: with two LoRAs in a stack there is no one weight to put on the x axis.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from batchgen.cells import parse_loras
from batchgen.report.files import safe_name, write_atomic
from batchgen.report.text import text


@dataclass(frozen=True)
class Point:
    weight: float
    median: float
    low: float
    high: float
    images: int


def curves(table: pd.DataFrame) -> dict[str, dict[str, list[Point]]]:
    """{model: {curve label: points by weight}} from the jobs' latest rows (measured, ok, one LoRA)."""
    effects: dict[tuple[str, str, float], list[float]] = {}
    for _, row in table.iterrows():
        if text(row.get("status")) != "ok" or not text(row.get("effect")):
            continue
        entries = parse_loras(text(row.get("loras")))
        if len(entries) != 1:
            continue
        (entry,) = entries
        label = text(row.get("epoch")) or entry.name
        label += f" te={entry.te_weight}" if entry.te_weight else ""
        label += f" lbw={entry.blocks}" if entry.blocks else ""
        effects.setdefault((text(row["model"]), label, float(entry.unet_weight)), []).append(float(row["effect"]))
    out: dict[str, dict[str, list[Point]]] = {}
    for (model, label, weight), values in sorted(effects.items()):
        point = Point(weight, statistics.median(values), min(values), max(values), len(values))
        out.setdefault(model, {}).setdefault(label, []).append(point)
    return out


def strength_plots(table: pd.DataFrame, run_dir: Path) -> list[Path]:
    """plots/strength-<model>.png for each model with a curve; returns the files written."""
    found = curves(table)
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, whatever the environment says
    from matplotlib import pyplot as plt

    written = []
    for model, lines in found.items():
        figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for label, points in lines.items():
            x = [p.weight for p in points]
            axes.fill_between(x, [p.low for p in points], [p.high for p in points], alpha=0.2)
            axes.plot(x, [p.median for p in points], marker="o", label=label)
        axes.set(xlabel="LoRA weight", ylabel="effect (mean |pixel - reference|, 0-255)", title=model)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = run_dir / "plots" / f"strength-{safe_name(model)}.png"
        write_atomic(path, lambda handle, f=figure: f.savefig(handle, format="png", metadata={"Software": None}))
        plt.close(figure)
        written.append(path)
    return written
