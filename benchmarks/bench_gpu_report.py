"""The GPU bench's pure parts: the dense-peak table, the time budget, the dry run's estimate, the printed summary and
the BENCHMARKS.md section. No torch, no rendering: tests/test_bench_gpu.py checks them with fixed inputs."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Dense bf16/fp16 tensor-core peaks with fp32 accumulation (TFLOP/s, no sparsity), matched in order against
# torch.cuda.get_device_name(): (pattern, the row's label, peak). Variants before the family's catch-all.
PEAKS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100 NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.0),
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"H200", "H200 SXM", 989.0),
    (r"B200", "B200", 2250.0),
    (r"A100", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"\bL4\b", "L4", 121.0),
    (r"RTX 4090", "RTX 4090", 165.0),
)
PLAN_NAMES = ("none", "encoders", "model", "sequential")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB)\b", re.IGNORECASE)
# batchgen prints GB meaning 2**30 bytes (plan/memory.py, run.gpu_memory_gb); so does this bench, MB 2**20.
_GB_PER = {"gb": 1.0, "gib": 1.0, "mb": 2**-10, "mib": 2**-10}


def peak_for(device_name: str) -> tuple[str, float | None]:
    """(the table row's label, its dense TFLOP/s), or ("unknown GPU", None) for a name the table lacks."""
    for pattern, label, peak in PEAKS:
        if re.search(pattern, device_name):
            return label, peak
    return "unknown GPU", None


def estimated_peak_gb(dry_run_text: str, model: str) -> float | None:
    """The estimated peak the dry run prints for ``model``, in GB (2**30 bytes), or None where it prints none.

    Read leniently: the first size (GB, GiB, MB, MiB) after the word "peak" on a line that names the model, else on
    any line, so a rewording of the dry run's memory lines does not break the bench."""
    lines = [line for line in dry_run_text.splitlines() if "peak" in line.lower()]
    for line in sorted(lines, key=lambda line: model not in line):  # stable: the model's own lines first
        match = _SIZE.search(line[line.lower().index("peak") :])
        if match:
            return float(match.group(1)) * _GB_PER[match.group(2).lower()]
    return None


def chosen_plan(dry_run_text: str, model: str) -> str | None:
    """The offload plan the dry run names on its estimate's line (what run.offload=auto picked), or None."""
    lines = [line for line in dry_run_text.splitlines() if "peak" in line.lower()]
    for line in sorted(lines, key=lambda line: model not in line):
        match = re.search(rf"\bplan\s+({'|'.join(PLAN_NAMES)})\b", line)
        if match:
            return match.group(1)
    return None


@dataclass
class Budget:
    """The bench's wall-clock budget, shared out between the models. A model starts only if its reserve (build,
    dry run, one run per contestant) fits what is left of the whole budget. Its optional runs (offload plans,
    repeats) must end by its cumulative share: the models' shares are scaled to the budget in run order, so that time
    an earlier model leaves unused passes to the later ones, and a model that overran gives up its own optional
    runs before a later model gives up any."""

    seconds: float  # math.inf: no limit (--tiny)
    clock: Callable[[], float] = time.perf_counter
    started: float = field(init=False)
    ends: dict[str, float] = field(default_factory=dict)  # model -> seconds into the bench its optional runs end by

    def __post_init__(self) -> None:
        self.started = self.clock()

    def share(self, shares: Sequence[tuple[str, float]]) -> None:
        total, running = sum(share for _, share in shares), 0.0
        for key, share in shares:
            running += share
            self.ends[key] = self.seconds * running / total if total else self.seconds

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def start_reason(self, reserve: float) -> str | None:
        """None if a model needing ``reserve`` seconds fits what is left, else why it is skipped."""
        if math.isinf(self.seconds) or reserve <= self.left():
            return None
        return f"about {reserve:g} s needed, {self.left():.0f} s of the {self.seconds:g} s budget left"

    def skip_reason(self, key: str, what: str, need: float) -> str | None:
        """None if ``what`` (about ``need`` seconds) ends within model ``key``'s share, else the line the bench
        prints and records for skipping it."""
        end = self.ends.get(key, self.seconds)
        if math.isinf(self.seconds) or self.elapsed() + need <= end:
            return None
        return f"{what} (about {need:.0f} s; {max(0.0, end - self.elapsed()):.0f} s left of {key}'s share)"


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} GB"


def _share(figures: dict) -> str:
    share = figures["share_of_peak"]
    return "peak unknown" if share is None else f"{100 * share:.1f}% of peak"


def plan_label(plan: str, entry: dict) -> str:
    """`encoders`, or for run.offload=auto planned for a card, `auto for 24 GB: encoders` (what it took)."""
    if "@" not in plan:
        return plan
    return f"auto for {plan.partition('@')[2]} GB: {entry['chosen'] or 'n/a'}"


def _pixels(r: dict) -> str:
    if r["pixel_check_passed"] is None:
        return f"pixels vs strong: max {r['pixel_max_diff']}/255 (not checked: {r['pixel_note']})"
    verdict = "ok" if r["pixel_check_passed"] else f"FAILED (> {r['pixel_tolerance']}/255)"
    return f"pixels vs strong: max {r['pixel_max_diff']}/255 {verdict}"


def _plan_line(plan: str, p: dict) -> str:
    vs_none = "" if plan == "none" else f", pixels vs none max {p['pixel_max_diff_vs_none']}/255"
    return (
        f"  plan {plan_label(plan, p):<10} {p['img_per_s']:8.3f} img/s ({p['img_per_s_end_to_end']:.3f} end to "
        f"end), peak memory {_gb(p['peak_gb'])}, estimated {_gb(p['estimated_peak_gb'])}{vs_none}"
    )


def summary_lines(results: dict) -> list[str]:
    peak = results["peak_tflops"]
    lines = [
        f"device: {results['device']}; peak used: {results['peak_source']}"
        + (f" ({peak:g} TFLOP/s dense bf16/fp16)" if peak else "")
        + (f"; {results['device_memory_gb']:.1f} GB" if results.get("device_memory_gb") else "")
    ]
    for key, r in results["models"].items():
        lines += model_lines(key, r)
    lines += [f"{key}: skipped: {reason}" for key, reason in results["skipped"].items()]
    return lines


def model_lines(key: str, r: dict) -> list[str]:
    """One model's figures as printed (also as soon as it is measured, so that a killed bench leaves them)."""
    lines = [
        f"{key}: {r['label']}, {r['images']} images ({r['states']} LoRA states x {r['images_per_state']}), "
        f"{r['size']}x{r['size']}, {r['steps']} steps; {r['flops']['per_image'] / 1e9:.4g} GFLOP per image"
    ]
    for name in ("bare", "strong", "batchgen"):
        c = r[name]
        lines.append(
            f"  {name:<9} {c['img_per_s']:8.3f} img/s ({c['img_per_s_end_to_end']:.3f} end to end), "
            f"{c['achieved_tflops']:.1f} TFLOP/s, {_share(c)}, peak memory {_gb(c['peak_gb'])}"
        )
    lines.append(
        f"  batchgen / bare {r['batchgen_vs_bare']:.3f} ({r['batchgen_vs_bare_end_to_end']:.3f} end to end), "
        f"batchgen / strong {r['batchgen_vs_strong']:.3f} ({r['batchgen_vs_strong_end_to_end']:.3f}); " + _pixels(r)
    )
    lines += [_plan_line(plan, p) for plan, p in r["plans"].items()]
    return lines + [f"  skipped: {reason}" for reason in r["skipped_runs"]]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _contestant_row(key: str, r: dict, name: str) -> str:
    c = r[name]
    share = f"{100 * c['share_of_peak']:.1f}%" if c["share_of_peak"] is not None else "unknown"
    ratio = f"{r[f'batchgen_vs_{name}']:.3f}" if name != "batchgen" else ""
    speed = [f"{c['img_per_s']:.3f}", f"{c['img_per_s_end_to_end']:.3f}"]
    return _row(
        [key, r["precision"], name, *speed, _number(c["peak_gb"]), f"{c['achieved_tflops']:.1f}", share, ratio]
    )


def _plan_row(key: str, r: dict, plan: str) -> str:
    p = r["plans"][plan]
    speed = [f"{p['img_per_s']:.3f}", f"{p['img_per_s_end_to_end']:.3f}"]
    memory = [_number(p["peak_gb"]), _number(p["reserved_gb"]), _number(p["estimated_peak_gb"])]
    vs_none = "" if plan == "none" else f"max {p['pixel_max_diff_vs_none']}/255"
    return _row([key, r["precision"], plan_label(plan, p), *speed, *memory, vs_none])


CONTESTANT_HEAD = ["model", "precision", "contestant", "img/s", "img/s end to end", "peak GB", "TFLOP/s",
                   "share of peak", "batchgen / it"]  # fmt: skip
PLAN_HEAD = ["model", "precision", "plan", "img/s", "img/s end to end", "measured peak GB", "reserved GB",
             "estimated peak GB", "pixels vs none"]  # fmt: skip


def markdown_section(results: dict) -> str:
    """One dated section: the command, the GPU's name, then a table per figure kind. Every figure in it was
    produced by that command on that GPU."""
    peak = results["peak_tflops"]
    device = results["device"]
    table = [_row(CONTESTANT_HEAD), "|" + "---|" * len(CONTESTANT_HEAD)]
    plans = [_row(PLAN_HEAD), "|" + "---|" * len(PLAN_HEAD)]
    for key, r in results["models"].items():
        table += [_contestant_row(key, r, name) for name in ("bare", "strong", "batchgen")]
        plans += [_plan_row(key, r, plan) for plan in r["plans"]]
    workloads = "; ".join(
        f"{key} {r['label']} {r['size']}x{r['size']}, {r['steps']} steps, {r['states']} LoRA states x "
        f"{r['images_per_state']} images"
        for key, r in results["models"].items()
    )
    section = [
        f"\n## GPU {results['date']}: `{results['command']}` on {device}\n",
        f"`{results['command']}` (raw figures in `runs/bench/gpu.json`) on {device}"
        + (f" ({results['device_memory_gb']:.1f} GB)" if results.get("device_memory_gb") else "")
        + f", torch {results['torch']}, bench wall {results['bench_seconds']:.0f} s of a {results['budget_s']:g} s "
        f"budget. Full-size architectures from batchgen's shipped configs with random weights (nothing downloaded): "
        f"{workloads or 'none ran'}; 4 rank-16 LoRAs (kohya for SD, diffusers/PEFT for FLUX.1). *bare*: diffusers "
        "without LoRA; *strong*: diffusers with each LoRA loaded once as an adapter and `set_adapters` per state "
        "(fp8: `transformer.enable_layerwise_casting(float8_e4m3fn, bf16)` after the adapters, before the move to "
        "the GPU); both a state's images per call; *batchgen*: `run.offload=none` (fp8: `run.weights=fp8`). "
        "Interleaved A B C [plans] C B A, medians; a run the budget could not fit is skipped and said below. "
        "img/s over each run less its model load (end to end: with it). GB: 2^30 bytes, as batchgen's dry run and "
        "`run.gpu_memory_gb` count them; peak: `torch.cuda.max_memory_allocated` over the run, load included. "
        "Share of peak: counted denoiser + VAE-decode FLOPs x img/s over "
        + (f"{results['peak_source']} {peak:g} TFLOP/s dense bf16/fp16." if peak else "an unknown GPU's peak."),
        "",
        *table,
        "",
        f"Offload plans, batchgen alone (`run.offload=...`; *auto for N GB*: `run.offload=auto run.gpu_memory_gb=N`"
        f" and the plan it took), on {device}: the measured peak (allocated, and reserved by torch's allocator) "
        "beside the dry run's estimate (`--dry-run` with the same settings; n/a where it prints none); pixels "
        "against the same precision's `run.offload=none` render.",
        "",
        *plans,
        "",
    ]
    for key, r in results["models"].items():
        section.append(f"- {key}: {_pixels(r)}" + "".join(f"; skipped {reason}" for reason in r["skipped_runs"]))
    section += [f"- {key}: skipped: {reason}" for key, reason in results["skipped"].items()]
    return "\n".join(section) + "\n"
