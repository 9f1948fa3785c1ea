"""`batchgen [OPTIONS] [HYDRA_OVERRIDES]...`, plus the `report`, `diff`, `check` and `rank` subcommands.

Any first word other than a subcommand belongs to the render command, so `batchgen +sweep=styles` needs no verb.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from typer.core import TyperGroup

from batchgen.errors import BatchgenError, Stopped
from batchgen.library_log import VERBOSE_ENV, routed

if TYPE_CHECKING:  # the modules behind these types import hydra and pandas: start-up pays them only when needed
    from batchgen.config import Composed
    from batchgen.executors.base import Executor, PlanningDevice
    from batchgen.plan import Plan

RENDER = "render"
SUBCOMMANDS = ("report", "diff", "check", "rank")


class DefaultGroup(TyperGroup):
    """Routes any argument list that does not start with a subcommand word to `render`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in (*SUBCOMMANDS, RENDER, "--help", "-h"):
            args = [RENDER, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultGroup,
    add_completion=False,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Render Stable Diffusion TI/LoRA sweeps from Hydra configs: batchgen +sweep=NAME [key=value ...]",
)


@app.command(
    RENDER,
    context_settings={"allow_extra_args": False, "ignore_unknown_options": True},
    help="Render a sweep (the default command): batchgen +sweep=styles sweep.stacks.ink.ink=0.4,0.8",
)
def render_command(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Hydra overrides, e.g. +sweep=styles sweep.seeds=1,2,3")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and count jobs; load no weights.")] = False,
    cfg: Annotated[bool, typer.Option("--cfg", help="Print the composed config and exit.")] = False,
    config_dir: Annotated[
        Path | None, typer.Option("--config-dir", help="Your config folder, searched ahead of conf/.")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the embeddings and LoRAs found per model.")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Render only the jobs whose last row is failed.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Render a sweep larger than run.max_jobs.")] = False,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="After rendering, render each new LoRA/TI file the models' folders get, until Ctrl-C."
        ),
    ] = False,
    settle: Annotated[
        float,
        typer.Option("--settle", help="With --watch: seconds a new file must keep its size before it is read."),
    ] = 2.0,
    # Read by main() from the raw arguments: the libraries' quiet settings must be in place before click parses.
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show diffusers', transformers' and torch's own notices and bars.")
    ] = False,
) -> None:
    from batchgen.cpuload import choose_wait_policy, start_sample

    renders = not (dry_run or cfg or list_)
    if watch and not renders:
        used = next(name for name, on in (("--cfg", cfg), ("--list", list_), ("--dry-run", dry_run)) if on)
        raise BatchgenError(f"--watch renders and {used} renders nothing; drop one of them")
    if settle < 0:
        raise BatchgenError(f"--settle {settle:g}: give the seconds a new file must keep its size, such as 2")
    load_sample = start_sample() if renders else None  # composing the config fills the sample's wait
    from omegaconf import OmegaConf

    from batchgen.config import compose_config
    from batchgen.executors.registry import executor_options, make_executor
    from batchgen.plan.values import engine_options
    from batchgen.runner import prepare

    composed = compose_config(list(overrides or []), config_dir)
    # Planning checks these again (Plan.engine); the executor's workers need them before planning starts.
    engine = engine_options(composed.config.sweep, composed.config.run)
    if cfg:
        # The config layer cannot type the executor section (it must not import executors); check it here so
        # --cfg refuses what a render would refuse.
        executor_options(composed.config.executor)
        sys.stdout.write(OmegaConf.to_yaml(composed.container))
        return
    executor = None
    device = None
    if renders:
        # Before torch loads (composing imports none): libgomp reads the policy once, when it starts, and
        # spawned workers inherit it.
        choose_wait_policy(since=load_sample)
        executor = make_executor(composed.config.executor, engine)
        executor.start_early()  # workers import their libraries while this process plans
        device = executor.planning_device()
    elif dry_run:
        # What a render would refuse (executor.devices naming a missing GPU, say), the dry run refuses too; it
        # starts nothing, and plans memory for the same devices.
        device = make_executor(composed.config.executor, engine).planning_device()
    try:
        with routed(None):  # a model built here (the tiny ones) has no run directory to log into yet
            plan = prepare(composed, all_assets=list_, device=device)
        if watch:
            _watch_plan(composed, plan, executor, device, yes, retry_failed, settle)
        _render_plan(composed, plan, executor, list_, dry_run, yes, retry_failed)
    finally:
        if executor is not None:
            executor.discard()


def _render_plan(
    composed: Composed,
    plan: Plan,
    executor: Executor | None,
    list_: bool,
    dry_run: bool,
    yes: bool,
    retry_failed: bool,
) -> None:
    from batchgen.runner import dry_run as print_dry_run
    from batchgen.runner import list_assets, render

    for warning in plan.warnings:
        sys.stderr.write(f"batchgen: warning: {warning}\n")
    if list_:
        list_assets(plan, sys.stdout)
        return
    if dry_run:
        print_dry_run(composed, plan, sys.stdout)
        return
    _check_size(composed, plan, yes)
    outcome = render(composed, plan, retry_failed=retry_failed, executor=executor)
    raise typer.Exit(outcome.exit_code)


def _check_size(composed: Composed, plan: Plan, yes: bool) -> None:
    limit = composed.config.run.max_jobs
    if len(plan.jobs) > limit and not yes:
        raise BatchgenError(
            f"the sweep has {len(plan.jobs)} jobs to render, more than run.max_jobs={limit}; pass --yes to render "
            "them all, or raise run.max_jobs"
        )


def _watch_plan(
    composed: Composed,
    plan: Plan,
    executor: Executor,
    device: PlanningDevice | None,
    yes: bool,
    retry_failed: bool,
    settle: float,
) -> None:
    """Render, then watch the models' folders until a signal (`Stopped`: exit 130 or 143)."""
    from batchgen.watch import WatchOptions, watch_run

    for warning in plan.warnings:
        sys.stderr.write(f"batchgen: warning: {warning}\n")
    _check_size(composed, plan, yes)
    watch_run(composed, plan, executor, device, sys.stdout, sys.stderr, retry_failed, WatchOptions(settle_s=settle))


@app.command("report", help="Rebuild grids and index.html of RUN_DIR from its manifest, without rendering.")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory holding manifest.csv")],
    x: Annotated[str | None, typer.Option(help="Grid x axis (default: the run's sweep.grid.x)")] = None,
    y: Annotated[str | None, typer.Option(help="Grid y axis (default: the run's sweep.grid.y)")] = None,
    z: Annotated[str | None, typer.Option(help="Grid z axis, sub-grids side by side; 'none' for none")] = None,
    max_megapixels: Annotated[
        float | None, typer.Option("--max-megapixels", help="Split larger grids into pages")
    ] = None,
    from_pngs: Annotated[
        bool, typer.Option("--from-pngs", help="Rebuild a missing manifest.csv from the PNGs' batchgen metadata")
    ] = False,
    clip: Annotated[
        str | None, typer.Option("--clip", help="A CLIPModel folder: fill empty clip_t/clip_i (as sweep.metrics.clip)")
    ] = None,
    dino: Annotated[
        str | None, typer.Option("--dino", help="A DINO/DINOv2 folder: fill empty dino_i (as sweep.metrics.dino)")
    ] = None,
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", help="NAME=FOLDER: a LoRA's or TI's training images (as sweep.metrics.concepts)"),
    ] = None,
) -> None:
    from batchgen.manifest import MANIFEST
    from batchgen.report.rebuild import ReportRequest, rebuild_report
    from batchgen.runlock import RunLock

    concepts = {}
    for pair in concept or []:
        name, _, folder = pair.partition("=")
        if not name.strip() or not folder.strip():
            raise BatchgenError(f"--concept {pair}: give NAME=FOLDER, e.g. --concept ink=/data/ink_train")
        concepts[name.strip()] = folder.strip()
    request = ReportRequest(run_dir, x, y, z, max_megapixels, from_pngs, RunLock, clip, dino, concepts, _metrics_root)
    result = rebuild_report(request)
    if result.recovered is not None:
        for path, why in result.recovered.ignored:
            sys.stderr.write(f"batchgen: ignored {path}: {why}\n")
        sys.stderr.write(f"rebuilt {run_dir / MANIFEST}: {len(result.recovered.rows)} jobs from their PNGs\n")
    if result.measured:
        sys.stderr.write(f"measured {result.measured} images (effect, ssim, degenerate) into the manifest\n")
    if result.semantic:
        sys.stderr.write(f"measured {result.semantic} images (clip_t, clip_i, dino_i) into the manifest\n")
    plots = f", {len(result.plots)} strength plots" if result.plots else ""
    plots += f", {len(result.tradeoffs)} tradeoff plots" if result.tradeoffs else ""
    sys.stdout.write(f"{len(result.grids)} grids{plots}, {result.index}\n")


def _metrics_root(name: str) -> Path:
    """A recorded sweep.metrics.builtin's folder (only tiny_metrics exists), built on first use."""
    from batchgen.tiny import ensure_tiny_metrics

    return ensure_tiny_metrics()


@app.command("diff", help="Compare two runs job by job; exit 1 when an image differs by more than --tolerance.")
def diff_command(
    run_a: Annotated[Path, typer.Argument(help="The reference run directory")],
    run_b: Annotated[Path, typer.Argument(help="The run to check against it")],
    tolerance: Annotated[
        int, typer.Option(help="Largest per-channel pixel difference (0-255) that still counts as equal")
    ] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the diff grid and diff.csv (default RUN_B/diff)")
    ] = None,
    by: Annotated[
        str, typer.Option(help="job_id, or settings: match by model, prompt, LoRA names+weights, seed, ...")
    ] = "job_id",
) -> None:
    from batchgen.report.diff import compare_runs, format_report, write_outputs

    result = compare_runs(run_a, run_b, tolerance=tolerance, by=by)
    written = write_outputs(result, out if out is not None else run_b / "diff")
    sys.stdout.write(format_report(result, written))
    raise typer.Exit(result.exit_code)


@app.command("check", help="Assert on a finished run for CI; exit 1 listing the jobs that fail an assertion.")
def check_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory holding manifest.csv")],
    min_effect: Annotated[
        float | None,
        typer.Option(
            "--min-effect",
            help="Every LoRA job whose weights are all >= 0.5 differs from its reference by at least this "
            "(mean |pixel difference|, 0-255)",
        ),
    ] = None,
    no_degenerate: Annotated[
        bool, typer.Option("--no-degenerate", help="No image is flat, mostly clipped or non-finite")
    ] = False,
    max_failed: Annotated[int | None, typer.Option("--max-failed", help="At most this many failed jobs")] = None,
    min_clip_t: Annotated[
        float | None,
        typer.Option("--min-clip-t", help="Every job with a clip_t (prompt fidelity, 0-100) reaches at least this"),
    ] = None,
    min_clip_i: Annotated[
        float | None,
        typer.Option("--min-clip-i", help="Every job with a clip_i (CLIP, like its concepts' images) reaches this"),
    ] = None,
    min_dino_i: Annotated[
        float | None,
        typer.Option("--min-dino-i", help="Every job with a dino_i (DINO, like its concepts' images) reaches this"),
    ] = None,
) -> None:
    from batchgen.report.check import CheckRequest, check_run

    request = CheckRequest(run_dir, min_effect, no_degenerate, max_failed, min_clip_t, min_clip_i, min_dino_i)
    result = check_run(request)
    for line in result.problems:
        sys.stdout.write(f"{line}\n")
    sys.stdout.write(f"{result.summary}\n")
    raise typer.Exit(result.exit_code)


@app.command("rank", help="Rank each LoRA's (or TI's) weights, epochs and block presets by clip_i, dino_i, clip_t.")
def rank_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory whose manifest has sweep.metrics' columns")],
    csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout, one line per state, for machines")] = False,
) -> None:
    from batchgen.report.rank import rank_run, to_csv, to_text

    groups = rank_run(run_dir)
    sys.stdout.write(to_csv(groups) if csv else to_text(groups, run_dir))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors with exit code 2 instead of tracebacks."""
    # Models, tokenizers and configs come from local folders only; this also stops libraries phoning home.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in args or os.environ.get(VERBOSE_ENV) == "1"
    previous = os.environ.get(VERBOSE_ENV)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # spawned workers and Ray actors inherit it: library_log leaves them loud
    else:
        quiet_third_party()
    try:
        return _main(args, verbose)
    finally:
        if previous is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = previous


def _main(args: list[str], verbose: bool) -> int:
    try:
        with warnings.catch_warnings():
            if not verbose:
                # diffusers' and transformers' deprecation notices are about their API, not the user's sweep
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            # Outside standalone mode click returns the code of a typer.Exit instead of raising it.
            code = app(args=args, prog_name="batchgen", standalone_mode=False)
    except BatchgenError as e:
        sys.stderr.write(f"batchgen: error: {e}\n")
        return e.exit_code
    except Stopped as e:  # the runner already said what was kept
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except typer.TyperException as e:  # typer 0.2x carries its own copy of click: its usage errors are not click's
        show = getattr(e, "show", None)
        if show is None:
            raise
        show()
        return 2
    except click.exceptions.Abort:
        sys.stderr.write("batchgen: interrupted\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write("batchgen: interrupted\n")
        return 130
    except Exception as e:  # a bug, not bad input: one line for the user, the traceback kept for the report
        report = _save_traceback()
        text = " ".join(str(e).split())[:200]
        name = type(e).__name__
        sys.stderr.write(f"batchgen: internal error: {name}: {text} (traceback in {report}; please report it)\n")
        return 1
    return code if isinstance(code, int) else 0


def quiet_third_party() -> None:
    """Libraries' progress bars ("Writing model shards") stay off the console, which shows batchgen's lines only;
    set before the libraries are imported, and only where the user has not set it. Their warnings and notices go
    to the run's log (batchgen.library_log)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _save_traceback() -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="batchgen-crash-", suffix=".txt", delete=False) as f:
        traceback.print_exc(file=f)
        return f.name


if __name__ == "__main__":
    sys.exit(main())
