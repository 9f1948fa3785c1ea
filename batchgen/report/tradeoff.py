"""Trade-off plots: per model, concept fidelity (clip_i) against prompt fidelity (clip_t), one curve per LoRA
through its weights or epochs (report.rank.tradeoff_curves), its no-LoRA reference as a cross in the curve's
colour. Up and right is better: a state below and left of its reference is worse than no LoRA on both.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from batchgen.report.files import safe_name, write_atomic
from batchgen.report.rank import tradeoff_curves


def tradeoff_plots(table: pd.DataFrame, run_dir: Path) -> list[Path]:
    """plots/tradeoff-<model>.png for each model whose LoRA jobs have clip_i and clip_t; returns the files
    written."""
    found = tradeoff_curves(table)
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, whatever the environment says
    from matplotlib import pyplot as plt

    written = []
    for model, curves in found.items():
        figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=100)
        for curve in curves:
            x, y = [p.clip_t for p in curve.points], [p.clip_i for p in curve.points]
            (line,) = axes.plot(x, y, marker="o", label=curve.label)
            for point in curve.points:
                axes.annotate(
                    point.label,
                    (point.clip_t, point.clip_i),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=line.get_color(),
                )
            if curve.reference is not None:
                axes.plot(
                    [curve.reference.clip_t],
                    [curve.reference.clip_i],
                    marker="x",
                    markersize=9,
                    linestyle="",
                    color=line.get_color(),
                    label=f"{curve.label}: reference (no LoRA)",
                )
        axes.set(xlabel="clip_t (prompt fidelity, median)", ylabel="clip_i (concept fidelity, median)", title=model)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        path = run_dir / "plots" / f"tradeoff-{safe_name(model)}.png"
        write_atomic(path, lambda handle, f=figure: f.savefig(handle, format="png", metadata={"Software": None}))
        plt.close(figure)
        written.append(path)
    return written
