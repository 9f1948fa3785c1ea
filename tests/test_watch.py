"""--watch: a long-lived worker renders each new or rewritten LoRA file with its own bytes, and the watch loop."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.confs import SMALL, write_conf


def _lora(folder: Path, source: Path, name: str, scale: float, epoch: int, mtime_ns: int | None = None) -> Path:
    """A copy of a tiny kohya LoRA with its up weights scaled (so that its images differ), saved as a trainer
    would: written beside its name, then renamed over it. Returns its path."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v * scale if k.endswith("lora_up.weight") else v for k, v in load_file(source).items()}
    path = folder / f"{name}.safetensors"
    save_file(tensors, folder / f".{name}.part", {"ss_epoch": str(epoch), "ss_steps": str(epoch * 100)})
    os.replace(folder / f".{name}.part", path)
    if mtime_ns is not None:  # a rewrite within the filesystem's timestamp resolution must still look new
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def _conf(tmp: Path, tiny_cache: Path, folder: Path, body: str = "") -> Path:
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    stacks = "  prompts: ['a castle']\n  stacks: {epochs: {'mylora*': 1.0}}\n  grid: {x: epoch, y: seed}\n"
    model = f"base: sd-1\ncheckpoint: {main}\nloras: [{folder}]\n"
    return write_conf(tmp / "conf", "w", stacks + SMALL + body, {"mine": model})


@pytest.mark.slow
def test_a_held_renderer_renders_a_rewritten_file_with_its_new_bytes(tiny_cache: Path, tmp_path: Path) -> None:
    from batchgen.config import compose_config
    from batchgen.engine import worker
    from batchgen.runner import prepare

    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    path = _lora(folder, source, "mylora", 0.5, 1)
    conf = _conf(tmp_path, tiny_cache, folder)
    composed = compose_config(["+sweep=w", f"run.out_dir={tmp_path / 'run'}"], conf)
    first = prepare(composed)
    loads = []
    real_load = worker.load_pipeline

    def counting_load(*args, **kwargs):
        loads.append(args[0].name)
        return real_load(*args, **kwargs)

    held = worker.Renderer(first.models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "load_pipeline", counting_load)
        before = {r.job_id: np.asarray(r.image) for r in held.render(first.jobs)}
        # The trainer's final save over the same name: new bytes, so new job_ids, and the held renderer must
        # neither keep the old layers nor the text encodings made with them.
        _lora(folder, source, "mylora", 1.5, 2, mtime_ns=path.stat().st_mtime_ns + 10**9)
        second = prepare(composed)
        held.update_models(second.models)
        after = {r.job_id: np.asarray(r.image) for r in held.render(second.jobs)}
    assert loads == ["mine"]  # one load for both plans
    lora_jobs = [job for job in second.jobs if job.loras]
    assert len(lora_jobs) == 1 and lora_jobs[0].job_id not in before
    reference = next(job.job_id for job in second.jobs if not job.loras)
    assert reference in before  # the no-LoRA reference kept its id: same bytes, same job
    fresh = {r.job_id: np.asarray(r.image) for r in worker.Renderer(second.models).render(second.jobs)}
    assert np.array_equal(after[lora_jobs[0].job_id], fresh[lora_jobs[0].job_id])
    old = next(job.job_id for job in first.jobs if job.loras)
    assert not np.array_equal(before[old], after[lora_jobs[0].job_id])
    # Back to the pristine weights: the reference renders as before, bit for bit.
    assert np.array_equal(after[reference], before[reference])


def _request(plan, run_dir: Path, done: set[str] = frozenset()):
    from batchgen.executors.base import ExecutorRequest

    rows = {r["job_id"]: r for r in plan.table.to_dict("records")}
    return ExecutorRequest([j for j in plan.jobs if j.job_id not in done], rows, plan.models, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_held_local_workers_keep_their_processes_and_models_between_runs(
    tiny_cache: Path, tmp_path: Path, devices: int
) -> None:
    from batchgen.cells import parse_timings
    from batchgen.config import compose_config
    from batchgen.executors.registry import make_executor
    from batchgen.runner import prepare

    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    _lora(folder, source, "mylora-000001", 0.5, 1)
    conf = _conf(tmp_path, tiny_cache, folder, "  batch_size: 1\n")
    overrides = ["+sweep=w", "sweep.seeds=[1,2]", f"run.out_dir={tmp_path / 'run'}", f"executor.devices={devices}"]
    composed = compose_config(overrides, conf)
    executor = make_executor(composed.config.executor, prepare(composed).engine)
    executor.hold()
    runs: list[list[dict]] = []
    processes, held = [], []
    try:
        executor.start_early()
        for epoch in (1, 2):
            if epoch == 2:
                _lora(folder, source, "mylora-000002", 1.5, 2)
            plan = prepare(composed)
            rows: list[dict] = []
            done = {row["job_id"] for run in runs for row in run}
            executor.run(_request(plan, tmp_path / "run", done), rows.append)
            runs.append(rows)
            if devices == 2:
                held = [process for process, _ in executor._early.spares.values()]
                processes.append({process.pid for process in held})
    finally:
        executor.discard()
    assert [len(rows) for rows in runs] == [4, 2]  # two seeds of the reference and epoch 1, then of epoch 2
    assert all(row["status"] == "ok" for rows in runs for row in rows)
    loads = [sum("load" in parse_timings(row["timings"]) for row in rows) for rows in runs]
    assert 1 <= loads[0] <= devices and loads[1] == 0  # a worker loads the model in the first run only
    if devices == 2:
        assert processes[0] == processes[1] and len(processes[0]) == 2  # the same two worker processes
        assert not any(process.is_alive() for process in held)  # discard() ended them


def _start_watch(tmp: Path, conf: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`batchgen +sweep=w --watch` in its own process group; returns it, its stderr log and the run folder."""
    log = tmp / "watch.err"
    command = [sys.executable, "-m", "batchgen.cli", "--config-dir", str(conf), "+sweep=w", "--watch", "--settle=0.5"]
    with log.open("wb") as err, (tmp / "watch.out").open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp, stdout=out, stderr=err, start_new_session=True, env=os.environ.copy()
        )
    return process, log, tmp / "runs" / "w"


def _until(process: subprocess.Popen, log: Path, ready, what: str, timeout: float = 240) -> None:
    """Poll until `ready()`; the run must still be up. The timeout only stops a hung test, nothing is timed."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the watch ended ({process.returncode}) before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


def _manifest(run: Path) -> pd.DataFrame:
    path = run / "manifest.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["job_id", "status", "loras", "image", "image_sha256"])
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_watch_renders_each_new_epoch_file_once_settled_and_stops_on_sigint(tiny_cache: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    source = next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors"))
    _lora(folder, source, "mylora-000001", 0.5, 1)
    process, log, run = _start_watch(tmp_path, _conf(tmp_path, tiny_cache, folder))
    try:
        _until(process, log, lambda: b"watching " in log.read_bytes(), "first render")
        first = _manifest(run)
        assert list(first["loras"]) == ["", "mylora-000001:1"]  # the no-LoRA reference, then the epoch

        # A trainer saves the next epoch (written elsewhere, renamed in): only its job renders.
        _lora(folder, source, "mylora-000002", 1.0, 2)
        _until(process, log, lambda: len(_manifest(run)) == 3, "the new epoch's row")
        second = _manifest(run)
        assert list(second["loras"][:2]) == list(first["loras"]) and second["loras"][2] == "mylora-000002:1"
        assert list(second["job_id"][:2]) == list(first["job_id"])

        # The same name written again with other bytes: a new job, rendered from the new bytes.
        path = folder / "mylora-000002.safetensors"
        _lora(folder, source, "mylora-000002", 1.5, 2, mtime_ns=path.stat().st_mtime_ns + 10**9)
        _until(process, log, lambda: len(_manifest(run)) == 4, "the rewritten file's row")
        third = _manifest(run)
        assert third["loras"][3] == "mylora-000002:1" and third["job_id"][3] != third["job_id"][2]
        assert third["image_sha256"][3] != third["image_sha256"][2]

        # Garbage under a name the glob matches: one line, and the next epoch still renders.
        (folder / "mylora-000003.safetensors").write_bytes(b"\x00" * 64)
        _until(process, log, lambda: b"mylora-000003" in log.read_bytes(), "the refusal")
        _lora(folder, source, "mylora-000004", 2.0, 4)
        _until(process, log, lambda: len(_manifest(run)) == 5, "the epoch after the refused file")
        assert _manifest(run)["loras"][4] == "mylora-000004:1"
        refusals = [line for line in log.read_text().splitlines() if "mylora-000003" in line]
        assert len(refusals) == 1 and refusals[0].startswith("batchgen: watch: refused "), refusals
        assert refusals[0].endswith("; watching goes on")
        # Each render ends with its summary line once its report is written: then the watch is idle.
        _until(process, log, lambda: (tmp_path / "watch.out").read_text().count("w: rendered 1,") == 3, "idle")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 130, log.read_text()
    assert "batchgen: watch: stopped by SIGINT" in log.read_text()
    rows = _manifest(run)
    assert len(rows) == 5 and set(rows["status"]) == {"ok"} and rows["job_id"].is_unique
    for row in rows.itertuples():
        assert hashlib.sha256((run / row.image).read_bytes()).hexdigest() == row.image_sha256
    assert not list(run.glob("**/.*.tmp")), "a temp file was left behind"
    assert 'id="progress"' not in (run / "index.html").read_text()  # the page says the run is not rendering


def test_settler_hands_out_a_file_once_its_size_and_mtime_held_for_the_interval() -> None:
    from batchgen.watch import Settler

    now = [0.0]
    states: dict[Path, tuple[int, int] | None] = {}
    settler = Settler(2.0, clock=lambda: now[0], stat=lambda path: states.get(path))
    growing, done, gone = Path("/l/growing.safetensors"), Path("/l/done.safetensors"), Path("/l/gone.safetensors")
    states.update({growing: (10, 1), done: (50, 1), gone: (5, 1)})
    settler.changed([growing, done, gone])
    assert settler.ready() == []  # the first look, at 0 s
    now[0] = 1.0
    states[growing] = (20, 2)  # still being written
    del states[gone]
    assert settler.ready() == [] and settler.pending == {growing, done}
    now[0] = 2.0
    assert settler.ready() == [done]  # unchanged for 2 s
    now[0] = 2.5
    states[growing] = (30, 3)
    assert settler.ready() == []
    now[0] = 4.4
    assert settler.ready() == []  # unchanged since 2.5 s
    now[0] = 4.5
    assert settler.ready() == [growing] and settler.pending == frozenset()
    states[done] = (60, 5)  # written again under its name: waits again from its next look
    settler.changed([done])
    now[0] = 5.0
    assert settler.ready() == []
    now[0] = 7.0
    assert settler.ready() == [done] and settler.pending == frozenset()


def test_a_signal_reaches_the_watch_loop_through_the_file_watcher(tmp_path: Path) -> None:
    from batchgen.errors import Stopped
    from batchgen.runner import stop_signals
    from batchgen.watch import FolderEvents

    events = FolderEvents([tmp_path])
    try:
        paths: set[Path] = set()
        deadline = time.monotonic() + 30
        while tmp_path / "a.safetensors" not in paths and time.monotonic() < deadline:
            (tmp_path / "a.safetensors").write_bytes(b"x")  # again until the watcher, starting in its thread, sees it
            paths |= events.take(0.5)
        assert tmp_path / "a.safetensors" in paths
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(Stopped) as stopped, stop_signals():
            while True:
                events.take(0.2)
        assert stopped.value.exit_code == 143
    finally:
        events.close()


def test_the_live_page_is_written_at_the_first_row_then_at_most_every_interval() -> None:
    from batchgen.report.live import LivePage

    now = [0.0]
    writes: list[float] = []
    page = LivePage(lambda: writes.append(now[0]), interval=3.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.9, 3.0, 3.5, 6.0, 20.0):
        now[0] = t
        page.landed()
    assert writes == [0.0, 3.0, 6.0, 20.0] and page.writes == 4

    def slow() -> None:  # a page that takes 2 s to build: the next one waits 5 times that
        writes.append(now[0])
        now[0] += 2.0

    writes.clear()
    page = LivePage(slow, interval=3.0, clock=lambda: now[0])
    now[0] = 0.0
    page.landed()
    now[0] = 9.9
    page.landed()
    now[0] = 10.0
    page.landed()
    assert writes == [0.0, 10.0]


@pytest.mark.slow
def test_index_html_is_rewritten_while_rows_land_and_final_at_the_end(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from batchgen.config import compose_config
    from batchgen.executors.registry import make_executor
    from batchgen.report import index
    from batchgen.runner import prepare, render_locked

    folder = tmp_path / "loras"
    folder.mkdir()
    _lora(folder, next(tiny_cache.glob("*/tiny_sd1/lora/ink.safetensors")), "mylora-000001", 0.5, 1)
    conf = _conf(tmp_path, tiny_cache, folder, "  batch_size: 1\n")
    composed = compose_config(["+sweep=w", "sweep.seeds=[1,2]", f"run.out_dir={tmp_path / 'run'}"], conf)
    plan = prepare(composed)
    pages: list[tuple[int, bool]] = []
    real = index.write_live_index

    def spy(table, run_dir, *args, **kwargs):
        path = real(table, run_dir, *args, **kwargs)
        pages.append((int((table["status"] == "ok").sum()), 'id="progress"' in path.read_text()))
        return path

    monkeypatch.setattr(index, "write_live_index", spy)
    executor = make_executor(composed.config.executor, plan.engine)
    # 10 s pass with each row recorded, none while a page is written: every row rewrites the page.
    clock = lambda: 10.0 * len(_manifest(tmp_path / "run"))  # noqa: E731
    render_locked(composed, plan, executor, io.StringIO(), io.StringIO(), live_clock=clock)
    assert pages == [(1, True), (2, True), (3, True), (4, True)]  # the page as each of the 4 rows landed
    assert 'id="progress"' not in (tmp_path / "run" / "index.html").read_text()  # the report's page, final


def test_watch_with_a_command_that_renders_nothing_is_refused(cli) -> None:
    code, _, err = cli("+sweep=styles", "--watch", "--dry-run")
    assert code == 2
    assert err == "batchgen: error: --watch renders and --dry-run renders nothing; drop one of them\n"


def test_watch_of_models_without_folders_is_refused_before_rendering(
    run_cli, tmp_path: Path, tiny_cache: Path
) -> None:
    main = next(tiny_cache.glob("*/tiny_sd1/main/tiny_sd1"))
    body = "  prompts: ['a castle']\n  stacks: {none: {}}\n" + SMALL
    conf = write_conf(tmp_path / "conf", "bare", body, {"bare": f"base: sd-1\ncheckpoint: {main}\n"})
    code, _, err = run_cli("--config-dir", str(conf), "+sweep=bare", "--watch")
    assert code == 2
    assert (
        err
        == "batchgen: error: --watch: models.bare names no LoRA or embedding folder to watch; give loras: [FOLDER]\n"
    )
    assert not (tmp_path / "runs" / "bare").exists()
