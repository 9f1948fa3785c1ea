"""One latest-row rule: a job that went ok -> failed or failed -> ok shows the same state in the run's own
index.html, after `batchgen report`, in `batchgen diff`, and to resume and --retry-failed."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pandas as pd

from batchgen.config import compose_config
from batchgen.manifest import completed_jobs, failed_jobs, read_manifest
from batchgen.report.grids import build_grids
from batchgen.report.index import build_index
from batchgen.runner import merged_table, prepare

ARGS = ("+sweep=styles", "sweep.seeds=[1]", "sweep.models=[tiny_sd1]", "sweep.prompts=[a castle at night]")  # 6 jobs
_ROW = re.compile(r'<tr[^>]* title="([0-9a-f]{16})"[^>]* data-status="([a-z]+)"')


def index_states(run: Path) -> dict[str, str]:
    """job_id -> the status index.html shows for it."""
    states = dict(_ROW.findall((run / "index.html").read_text(encoding="utf-8")))
    assert states, "no job rows in index.html"
    return states


def recorded(row: pd.Series, status: str, error: str) -> pd.Series:
    """`row` as a render that did not produce an image records it."""
    changed = row.copy()
    for column, value in {"status": status, "error": error, "image": "", "image_sha256": "", "timings": ""}.items():
        changed[column] = value
    return changed


def diff_jobs(path: Path) -> dict[str, set[str]]:
    """kind -> job ids (A's for only_a, B's otherwise) in a diff.csv."""
    kinds: dict[str, set[str]] = {}
    for row in csv.DictReader(path.open(encoding="utf-8")):
        kinds.setdefault(row["kind"], set()).add(row["job_id_a"] if row["kind"] == "only_a" else row["job_id_b"])
    return kinds


def test_ok_then_failed_and_failed_then_ok_read_alike_everywhere(run_cli) -> None:
    code, _, err = run_cli(*ARGS)
    assert code == 0, err
    run = Path("runs/styles")
    shutil.copytree(run, "runs/reference")  # every job ok: what diff compares against
    rows = read_manifest(run)
    assert len(rows) == 6 and set(rows["status"]) == {"ok"}
    kept, back, lost, changed, later = (rows.iloc[i] for i in range(5))
    # As appended by earlier invocations: `back` failed in the first render and rendered ok on a retry; `kept`,
    # `lost` and `changed` rendered ok and failed later (only `kept` still has its image as recorded).
    first = [recorded(row, "failed", "RuntimeError: first try") if i == 1 else row for i, row in rows.iterrows()]
    history = pd.DataFrame(
        [
            recorded(later, "skipped", "LoRA 'ink' has no file"),  # skipped up front once, rendered since
            *first,
            back,
            recorded(kept, "failed", "RuntimeError: after its image landed"),
            recorded(lost, "failed", "RuntimeError: image deleted"),
            recorded(changed, "failed", "RuntimeError: image replaced"),
        ]
    )
    history.to_csv(run / "manifest.csv", index=False)
    (run / lost["image"]).unlink()
    shutil.copyfile(run / kept["image"], run / changed["image"])  # a readable PNG without the recorded hash
    broken = {lost["job_id"], changed["job_id"]}
    expected = {job_id: "failed" if job_id in broken else "ok" for job_id in rows["job_id"]}

    # The run's own grids and index.html, from the table the runner builds after rendering.
    plan = prepare(compose_config(list(ARGS)))
    table = merged_table(plan.table, run)
    (grid,) = build_grids(table, run, "stack", "prompt", plan.slots)
    build_index(table, run, [grid])
    assert index_states(run) == expected
    runner_grid = grid.read_bytes()
    assert runner_grid != (Path("runs/reference/grids") / grid.name).read_bytes()  # two cells say why they failed

    code, out, _ = run_cli("report", "runs/styles")
    assert code == 0 and out == "1 grids, 1 strength plots, runs/styles/index.html\n"
    assert index_states(run) == expected
    assert grid.read_bytes() == runner_grid

    code, out, _ = run_cli("diff", "runs/reference", "runs/styles")
    assert code == 0 and "matched by job_id: 4\n" in out and "only in A: 2\n" in out
    ok = {job_id for job_id, state in expected.items() if state == "ok"}
    assert diff_jobs(run / "diff" / "diff.csv") == {"only_a": broken, "identical": ok}

    assert completed_jobs(run) == ok and failed_jobs(run) == broken
    code, out, err = run_cli(*ARGS, "--retry-failed")
    assert code == 0, err
    assert "rendered 2, failed 0, skipped 0, already done 4" in out
    assert index_states(run) == dict.fromkeys(rows["job_id"], "ok")
