"""Pure scheduling: work units, affinity, re-queueing, and where workers run."""

from __future__ import annotations

import pytest

from batchgen.errors import BatchgenError
from batchgen.executors.local import Slot, plan_slots
from batchgen.executors.units import UnitQueue, make_units
from batchgen.spec import Contribution, Job, LoraState

NONE = LoraState()
INK = LoraState((("unet", (Contribution("ink", 1.0),)),))
GRAIN = LoraState((("unet", (Contribution("grain", 0.5),)),))


def _jobs(model: str, state: LoraState, count: int) -> list[Job]:
    name = state.loras[0] if state.loras else "none"
    return [
        Job(f"{model}-{name}-{i}", model, "p", "", i, 2, 7.5, 64, 64, "default", lora_state=state)
        for i in range(count)
    ]


def test_one_worker_gets_one_unit_per_state_in_render_order() -> None:
    jobs = _jobs("a", NONE, 3) + _jobs("a", INK, 2) + _jobs("b", INK, 2)
    units = make_units(jobs, workers=1, batch=4)
    assert [(u.key, len(u.jobs)) for u in units] == [(("a", NONE), 3), (("a", INK), 2), (("b", INK), 2)]
    assert [j for u in units for j in u.jobs] == jobs


def test_a_big_group_is_split_into_whole_batches_for_many_workers() -> None:
    jobs = _jobs("a", INK, 40)
    units = make_units(jobs, workers=2, batch=4)
    # share = ceil(40 / (2 * 4)) = 5 -> rounded up to whole batches of 4: 8
    assert [len(u.jobs) for u in units] == [8, 8, 8, 8, 8]
    assert [j for u in units for j in u.jobs] == jobs


def test_idle_worker_gets_its_own_state_then_its_model_then_the_next() -> None:
    units = make_units(_jobs("a", NONE, 2) + _jobs("b", INK, 2) + _jobs("a", GRAIN, 2) + _jobs("b", NONE, 2), 1, 1)
    queue = UnitQueue(units)
    assert queue.next_for(("b", NONE)).key == ("b", NONE)  # same state, though it is last
    assert queue.next_for(("b", GRAIN)).key == ("b", INK)  # same model
    assert queue.next_for(None).key == ("a", NONE)  # nothing held: render order
    assert queue.next_for(("c", NONE)).key == ("a", GRAIN)  # nothing matches: render order
    assert queue.next_for(("a", NONE)) is None and len(queue) == 0


def test_put_back_jobs_come_first() -> None:
    jobs = _jobs("a", NONE, 4)
    queue = UnitQueue(make_units(jobs[:2], 1, 1))
    queue.put_back(jobs[2:])
    assert queue.next_for(None).jobs == tuple(jobs[2:])
    queue.put_back([])
    assert len(queue) == 1


@pytest.mark.parametrize(
    ("devices", "cuda", "cores", "threads", "slots"),
    [
        ("auto", 0, 2, None, [Slot("cpu0", "cpu")]),
        ("auto", 0, 2, 1, [Slot("cpu0", "cpu", 1)]),
        (2, 0, 2, None, [Slot("cpu0", "cpu", 1), Slot("cpu1", "cpu", 1)]),
        (3, 0, 16, None, [Slot("cpu0", "cpu", 5), Slot("cpu1", "cpu", 5), Slot("cpu2", "cpu", 5)]),
        (4, 0, 2, None, [Slot(f"cpu{i}", "cpu", 1) for i in range(4)]),
        ("auto", 2, 16, None, [Slot("cuda0", "cuda:0"), Slot("cuda1", "cuda:1")]),
        ([0, 2], 4, 16, None, [Slot("cuda0", "cuda:0"), Slot("cuda2", "cuda:2")]),
        (3, 2, 16, None, [Slot("cuda0-0", "cuda:0"), Slot("cuda1-1", "cuda:1"), Slot("cuda0-2", "cuda:0")]),
    ],
)
def test_plan_slots(devices, cuda: int, cores: int, threads, slots: list[Slot]) -> None:
    assert plan_slots(devices, cuda, cores, threads) == slots


@pytest.mark.parametrize(
    ("devices", "cuda", "threads", "message"),
    [
        (
            [0, 2],
            0,
            None,
            "executor.devices=[0, 2] names CUDA devices but none is visible; use executor.devices=2 for 2 CPU workers",
        ),
        ([3], 2, None, "executor.devices: CUDA device 3 does not exist (this machine has 2)"),
        ([], 2, None, "executor.devices=[]: list CUDA device numbers, such as [0,2]"),
        (0, 0, None, "executor.devices=0: need at least 1 worker"),
        ("many", 0, None, "executor.devices='many': use auto, a worker count such as 2, or a list like [0,2]"),
    ],
)
def test_plan_slots_errors(devices, cuda: int, threads, message: str) -> None:
    with pytest.raises(BatchgenError) as error:
        plan_slots(devices, cuda, 2, threads)
    assert str(error.value) == message
