"""The shared dispatcher against a scripted pool: requeue of a dead worker's jobs, restarts, failed rows."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from batchgen.engine_options import EngineOptions
from batchgen.executors.base import (
    RESTARTS,
    Crashed,
    ExecutorRequest,
    Gone,
    Idle,
    Message,
    Pairs,
    Row,
    WorkerSetup,
    dispatch,
)
from batchgen.executors.registry import EXECUTORS, executor_class, executor_options
from batchgen.spec import Contribution, Job, LoraState

INK = LoraState((("unet", (Contribution("ink", 1.0),)),))


def _request(count: int) -> ExecutorRequest:
    jobs = [
        Job(f"j{i}", "a", "p", "", i, 2, 7.5, 64, 64, "default", lora_state=INK if i >= count // 2 else LoraState())
        for i in range(count)
    ]
    rows = {job.job_id: {"job_id": job.job_id, "status": "pending", "worker": ""} for job in jobs}
    return ExecutorRequest(jobs, rows, {}, Path("run"))


UNITS = 4  # jobs per unit (a fixed batch size of 4): one unit per LoRA state of an 8-job request


class ScriptedPool:
    """Renders every unit it is sent at the next poll, except that slot `wid` dies on its first `deaths[wid]`
    units (after reporting `partial` of the unit's rows), or raises on them when `crash` is set."""

    def __init__(self, deaths: dict[int, int], partial: int = 0, crash: bool = False) -> None:
        self.deaths = dict(deaths)
        self.partial = partial
        self.crash = crash
        self.queue: list[Message] = []
        self.starts: list[int] = []
        self.sent: list[tuple[int, list[str]]] = []

    def start(self, wid: int) -> None:
        self.starts.append(wid)
        self.queue.append(Idle(wid))

    def send(self, wid: int, unit: Pairs) -> None:
        self.sent.append((wid, [job.job_id for job, _ in unit]))
        rows = [{**row, "status": "ok", "worker": f"w{wid}"} for _, row in unit]
        if self.deaths.get(wid, 0) > 0:
            self.deaths[wid] -= 1
            if self.crash:
                self.queue += [Crashed(wid, "it raised"), Idle(wid)]
            else:
                self.queue += [Row(wid, row) for row in rows[: self.partial]] + [Gone(wid, "exit code -9")]
        else:
            self.queue += [Row(wid, row) for row in rows] + [Idle(wid)]

    def stop(self, wid: int) -> None:
        self.queue.append(Gone(wid, "exit code 0"))

    def poll(self, timeout: float) -> list[Message]:
        messages, self.queue = self.queue, []
        return messages

    def close(self) -> list[dict]:
        return []


def test_a_dead_workers_unreported_jobs_go_back_and_its_replacement_renders_them(capsys) -> None:
    request = _request(8)
    pool = ScriptedPool({0: 1}, partial=1)
    rows: list[dict] = []
    dispatch(request, pool, ["w0", "w1"], rows.append, unit_size=UNITS)
    assert sorted(r["job_id"] for r in rows) == [job.job_id for job in request.jobs]  # each exactly once
    assert {r["status"] for r in rows} == {"ok"}
    assert pool.starts == [0, 1, 0]
    (wid, first), *later = pool.sent
    assert wid == 0 and first[1:] in [ids for _, ids in later]  # what it had not reported is sent again
    assert capsys.readouterr().err == (
        f"batchgen: worker w0 died (exit code -9); {len(first) - 1} unfinished jobs go back to the queue\n"
    )


def test_a_slot_that_dies_past_its_restarts_fails_its_jobs_and_then_what_is_left(capsys) -> None:
    request = _request(8)
    rows: list[dict] = []
    pool = ScriptedPool({0: RESTARTS + 1})
    dispatch(request, pool, ["w0"], rows.append, unit_size=UNITS)
    assert pool.starts == [0] * (RESTARTS + 1)
    held = pool.sent[0][1]
    assert [set(ids) for _, ids in pool.sent] == [set(held)] * (RESTARTS + 1)  # retried, then given up
    assert [(r["job_id"], r["status"], r["worker"], r["error"]) for r in rows] == [
        (job_id, "failed", "w0", f"worker w0 died (exit code -9) {RESTARTS + 1} times on these jobs")
        for job_id in held
    ] + [
        (job.job_id, "failed", "", "no worker left to render it (see the failed rows above)")
        for job in request.jobs
        if job.job_id not in held
    ]
    assert capsys.readouterr().err.count("batchgen: worker w0 died (exit code -9); 4 unfinished jobs") == RESTARTS + 1


def test_a_worker_that_raises_fails_what_it_held_with_its_name_and_takes_the_next_unit() -> None:
    request = _request(8)
    rows: list[dict] = []
    pool = ScriptedPool({0: 1}, crash=True)
    dispatch(request, pool, ["w0"], rows.append, unit_size=UNITS)
    crashed = pool.sent[0][1]
    assert [(r["job_id"], r["status"], r["worker"], r["error"]) for r in rows[: len(crashed)]] == [
        (job_id, "failed", "w0", "it raised") for job_id in crashed
    ]
    assert sorted(r["job_id"] for r in rows) == [job.job_id for job in request.jobs]
    assert {r["status"] for r in rows[len(crashed) :]} == {"ok"} and pool.starts == [0]


def test_every_registered_executor_declares_its_options_and_matches_its_config_file() -> None:
    import yaml

    conf = Path(__file__).resolve().parent.parent / "conf" / "executor"
    assert sorted(EXECUTORS) == sorted(p.stem for p in conf.glob("*.yaml"))
    for name in EXECUTORS:
        raw = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert executor_options(raw) == executor_class(name).options(**raw)
        assert executor_options(raw) == executor_class(name).options()  # the file spells out the defaults


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "dask"}, "executor=dask: unknown executor; use one of local, ray, slurm"),
        (
            {"name": "ray", "devices": 2},
            "executor.devices: not a setting of executor=ray; it takes name, address, actors, cpus_per_actor, "
            "shared_fs",
        ),
        ("local", "executor: 'local' is not a section; choose executor=local, executor=ray or executor=slurm"),
    ],
)
def test_executor_section_errors(raw, message: str) -> None:
    from batchgen.errors import BatchgenError

    with pytest.raises(BatchgenError) as caught:
        executor_options(raw)
    assert str(caught.value) == message


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter, where no test has imported anything yet."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_choosing_an_executor_imports_neither_ray_nor_submitit() -> None:
    code = (
        "import sys; from batchgen.executors.registry import executor_options as o; "
        "[o({'name': n}) for n in ('local', 'ray', 'slurm')]; "
        "print(sorted(m for m in ('ray', 'submitit', 'torch') if m in sys.modules))"
    )
    assert fresh_python(code) == "[]\n"


class FakeMachine:
    """/proc/stat, /proc/self/stat and a clock that move only when the test runs time forward: `cpus` CPUs, of which
    other processes keep `others` busy and this process `own`, counted in the kernel's 100 ticks a second."""

    def __init__(self, cpus: int, others: float, own: float) -> None:
        self.cpus, self.others, self.own = cpus, others, own
        self.now = 1000.0
        self.user = self.system = self.idle = self.iowait = self.guest = self.own_ticks = 0
        self.slept: list[float] = []
        self.readable = True

    def run(self, seconds: float) -> None:
        ticks = round(seconds * 100)
        busy, own = round(ticks * (self.others + self.own)), round(ticks * self.own)
        self.user, self.system = self.user + busy - busy // 4, self.system + busy // 4
        self.idle, self.iowait = self.idle + ticks * self.cpus - busy - 3, self.iowait + 3  # iowait is idle
        self.guest += busy  # already inside user: must not count twice
        self.own_ticks += own
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.run(seconds)

    def proc_stat(self) -> str:
        if not self.readable:
            raise OSError("no /proc")
        head = f"cpu  {self.user} 0 {self.system} {self.idle} {self.iowait} 0 0 0 {self.guest} 0"
        return head + "\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n"

    def own_stat(self) -> str:
        utime, stime = self.own_ticks - self.own_ticks // 3, self.own_ticks // 3
        return f"4242 (py) thon) R 1 4242 4242 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 3 0 55 1 2"

    def probe(self):
        from batchgen.cpuload import Probe

        return Probe(lambda: self.now, self.sleep, self.proc_stat, self.own_stat, lambda: self.cpus)


def test_threads_wait_passively_only_when_other_processes_keep_the_cpus_busy(monkeypatch) -> None:
    from batchgen import cpuload

    env: dict[str, str] = {}
    monkeypatch.setattr(cpuload, "busy_cpus", lambda since=None: 0.1)
    assert cpuload.choose_wait_policy(env) is None and env == {}
    monkeypatch.setattr(cpuload, "busy_cpus", lambda since=None: 1.0)
    assert cpuload.choose_wait_policy(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert cpuload.choose_wait_policy(mine) is None and mine == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice


def test_a_load_sample_counts_other_processes_busy_cpus_and_not_this_ones() -> None:
    from batchgen import cpuload

    # Another process's busy loop reads as one busy CPU of two; this process's own half CPU does not count.
    loop = FakeMachine(cpus=2, others=1.0, own=0.5)
    assert cpuload.busy_cpus(0.5, probe=loop.probe()) == 1.0
    assert loop.slept == [0.5]
    quiet = FakeMachine(cpus=2, others=0.0, own=1.5)
    assert cpuload.busy_cpus(0.5, probe=quiet.probe()) == 0.0
    assert cpuload.busy_cpus(0.3, probe=FakeMachine(cpus=8, others=3.0, own=2.0).probe()) == 3.0
    unreadable = FakeMachine(cpus=2, others=1.0, own=0.0)
    unreadable.readable = False
    assert cpuload.start_sample(unreadable.probe()) is None
    assert cpuload.busy_cpus(0.1, probe=unreadable.probe()) is None
    assert cpuload.busy_cpus(0.0, probe=FakeMachine(cpus=2, others=1.0, own=0.0).probe()) is None  # no tick passed


def test_a_load_sample_started_earlier_waits_only_for_what_is_left() -> None:
    from batchgen import cpuload

    machine = FakeMachine(cpus=2, others=1.0, own=0.0)
    probe = machine.probe()
    sample = cpuload.start_sample(probe)
    assert sample is not None and sample.began == 1000.0
    machine.run(0.15)  # planning outlasts the sample
    assert cpuload.busy_cpus(0.1, since=sample, probe=probe) == 1.0
    assert machine.slept == [0.0]
    fresh = cpuload.start_sample(probe)
    machine.run(0.02)
    assert cpuload.busy_cpus(0.1, since=fresh, probe=probe) == 1.0
    assert machine.slept[1] == pytest.approx(0.08)  # the sample had only just begun


def test_the_machines_probe_reads_this_machines_counters() -> None:
    from batchgen import cpuload

    sample = cpuload.start_sample()
    assert sample is not None and sample.cpu[0] >= sample.cpu[1] >= 0 and sample.own >= 0
    assert cpuload.MACHINE.proc_stat().startswith("cpu ")


def test_the_render_command_chooses_the_wait_policy_after_composing_and_before_torch_loads() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import batchgen.cpuload as c\n"
        "def chosen(environ=None, since=None):\n"
        "    print('torch' in sys.modules, 'hydra' in sys.modules, since is not None)\n"
        "    raise SystemExit(0)\n"
        "c.choose_wait_policy = chosen\n"
        "from batchgen.cli import main\n"
        "main(['+sweep=styles'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False True True\n"


@pytest.mark.slow
def test_workers_started_before_planning_are_stopped_when_the_run_is_refused(run_cli) -> None:
    import multiprocessing

    # Two local workers start importing while the parent plans; an error after planning must not leave them behind.
    code, _, err = run_cli("+sweep=styles", "executor.devices=2", "run.max_jobs=3")
    assert code == 2 and err.startswith("batchgen: error: the sweep has 72 jobs to render"), err
    assert multiprocessing.active_children() == []


def test_an_early_pool_binds_the_request_and_hands_its_spares_to_the_workers(monkeypatch) -> None:
    from batchgen.executors import local

    spawned: list[int] = []

    class FakeProcess:
        def __init__(self, wid: int) -> None:
            self.wid, self.alive = wid, True

        def is_alive(self) -> bool:
            return self.alive

        def terminate(self) -> None:
            self.alive = False

        def join(self, timeout: float) -> None:
            pass

    class FakeQueue(list):
        def put(self, item) -> None:
            self.append(item)

    def spawn(self, wid: int):
        spawned.append(wid)
        return FakeProcess(wid), FakeQueue()

    monkeypatch.setattr(local.ProcessPool, "_spawn", spawn)
    slots = [local.Slot("cpu0", "cpu", 1), local.Slot("cpu1", "cpu", 1)]
    engine = EngineOptions(dtype="fp32", batch_size=2)
    pool = local.ProcessPool(slots, engine)
    pool.start_spares()
    spares = {wid: process for wid, (process, _) in pool.spares.items()}
    pool.bind(ExecutorRequest([], {}, {}, Path("run")))
    spares[1].alive = False  # died while importing: replaced
    pool.start(0)
    pool.start(1)
    assert spawned == [0, 1, 1]
    assert pool.processes[0] is spares[0] and pool.processes[1] is not spares[1]
    assert list(pool.inboxes[0]) == list(pool.inboxes[1]) == [WorkerSetup({}, engine, Path("run"))]
    assert pool.spares == {}


class FakeProcess:
    alive = True
    exitcode = 0

    def is_alive(self) -> bool:
        return self.alive


class FakeOutbox:
    """A worker queue whose messages arrive on time (`get` returns them) or late (only a drain finds them)."""

    def __init__(self, items: list, late: bool = False) -> None:
        self.items, self.late = items, late

    def get(self, timeout: float):
        if self.late or not self.items:
            raise queue.Empty
        return self.items.pop(0)

    def get_nowait(self):
        if not self.items:
            raise queue.Empty
        return self.items.pop(0)


def test_a_worker_that_says_done_is_gone_at_once_and_not_reported_again_when_it_exits() -> None:
    from batchgen.executors import local

    pool = local.ProcessPool([local.Slot("cpu0", "cpu", 1), local.Slot("cpu1", "cpu", 1)], EngineOptions())
    first, second = FakeProcess(), FakeProcess()
    pool.processes, pool.inboxes = {0: first, 1: second}, {0: object(), 1: object()}
    pool.outbox = FakeOutbox([("row", 0, {"job_id": "j0"}), ("done", 0)])
    assert pool.poll(0) == [Row(0, {"job_id": "j0"})]
    assert pool.poll(0) == [Gone(0, "finished")]
    assert list(pool.processes) == list(pool.inboxes) == [1]
    first.alive = False  # its teardown ends later: no second Gone for slot 0
    assert pool.poll(0) == []
    second.alive, second.exitcode = False, -9
    assert pool.poll(0) == [Gone(1, "exit code -9")]


def test_a_done_found_while_draining_a_dead_worker_is_taken_and_its_own_exit_not_reported_twice() -> None:
    from batchgen.executors import local

    pool = local.ProcessPool([local.Slot("cpu0", "cpu", 1), local.Slot("cpu1", "cpu", 1)], EngineOptions())
    first, second = FakeProcess(), FakeProcess()
    first.alive, first.exitcode, second.alive = False, -9, False
    pool.processes, pool.inboxes = {0: first, 1: second}, {0: object(), 1: object()}
    # Slot 0 was killed; slot 1 said done and exited before the parent read its last messages.
    pool.outbox = FakeOutbox([("row", 1, {"job_id": "j1"}), ("done", 1)], late=True)
    assert pool.poll(0) == [Row(1, {"job_id": "j1"}), Gone(1, "finished"), Gone(0, "exit code -9")]
    assert pool.processes == pool.inboxes == {}


CPU_WHEEL_VERSION = (
    "from typing import Optional\n__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n"
)


@pytest.mark.parametrize(
    ("text", "gpu"),
    [
        (CPU_WHEEL_VERSION, False),
        (CPU_WHEEL_VERSION.replace("cuda: Optional[str] = None", "cuda: Optional[str] = '12.8'"), True),
        (CPU_WHEEL_VERSION.replace("hip: Optional[str] = None", "hip = '6.4.1'"), True),
        (CPU_WHEEL_VERSION.replace("hip: Optional[str] = None\n", ""), True),  # unknown layout: ask torch
        ("cuda = (", True),
        (None, True),  # no version.py at all
    ],
)
def test_a_cpu_wheel_is_told_from_its_version_file(tmp_path: Path, text: str | None, gpu: bool) -> None:
    from batchgen.executors.local import torch_has_gpu_build

    version = tmp_path / "version.py"
    if text is not None:
        version.write_text(text)
    assert torch_has_gpu_build(version) is gpu


def test_choosing_cpu_workers_does_not_import_torch_in_the_parent() -> None:
    # The installed wheel is the CPU one (see the Makefile): the workers are spawned before any torch import here.
    code = (
        "import sys\n"
        "from batchgen.executors.local import LocalExecutor, LocalOptions\n"
        "from batchgen.engine_options import EngineOptions\n"
        "print([s.name for s in LocalExecutor(LocalOptions(devices=2), EngineOptions(threads=1)).slots], "
        "'torch' in sys.modules)\n"
    )
    assert fresh_python(code) == "['cpu0', 'cpu1'] False\n"
