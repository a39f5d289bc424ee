"""snapfs/lane.py: blocking calls in a dedicated thread, in order, uncancellable."""

from __future__ import annotations

import threading
import time

import pytest
import trio
from unithelpers import trio_test

from snapfs import lane as lane_module
from snapfs.lane import Lane


@trio_test
async def test_a_call_runs_in_the_lanes_thread_and_returns_its_value():
    lane = Lane("test lane")
    loop_thread = threading.get_ident()
    ident, name = await lane.run(lambda: (threading.get_ident(), threading.current_thread().name))
    assert ident != loop_thread
    assert name == "test lane"
    assert await lane.run(pow, 2, 10) == 1024


@trio_test
async def test_an_exception_in_the_call_is_raised_in_the_caller():
    lane = Lane("test lane")

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        await lane.run(fail)
    assert info.value.errno == 28
    assert await lane.run(len, b"after") == 5  # the lane goes on


@trio_test
async def test_calls_from_many_tasks_run_one_at_a_time_in_the_order_made():
    lane = Lane("test lane")
    order: list[int] = []
    inside = 0
    overlap = []

    def call(i: int) -> None:
        nonlocal inside
        inside += 1
        overlap.append(inside)
        time.sleep(0.002)
        order.append(i)
        inside -= 1

    async def caller(i: int) -> None:
        await lane.run(call, i)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(caller, i)
            await trio.sleep(0)  # each task makes its call before the next starts
    assert order == list(range(20))
    assert max(overlap) == 1


@trio_test
async def test_a_cancelled_caller_still_waits_for_its_call_to_finish():
    """Like to_thread.run_sync without abandon_on_cancel: a write the caller started is
    never left running behind its back (an fdatasync whose result nobody sees)."""
    lane = Lane("test lane")
    finished = []

    def slow() -> str:
        time.sleep(0.2)
        finished.append(True)
        return "done"

    with trio.move_on_after(0.01) as scope:
        result = await lane.run(slow)
    assert finished == [True]
    assert result == "done"
    assert not scope.cancelled_caught  # the cancellation could not interrupt the call


@trio_test
async def test_an_already_cancelled_caller_makes_no_call():
    lane = Lane("test lane")
    made = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await lane.run(made.append, 1)
    assert made == []
    assert scope.cancelled_caught


@trio_test
async def test_the_thread_ends_when_idle_and_starts_again(monkeypatch):
    monkeypatch.setattr(lane_module, "IDLE_EXIT", 0.05)
    lane = Lane("test lane idle")

    def lane_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "test lane idle"]

    await lane.run(threading.get_ident)
    assert len(lane_threads()) == 1
    for _ in range(100):
        if not lane_threads():
            break
        await trio.sleep(0.02)
    assert lane_threads() == []
    second = await lane.run(threading.get_ident)
    assert second != threading.get_ident()
    assert len(lane_threads()) == 1


def test_a_lane_outlives_one_trio_run():
    """A Filesystem (and its lane) is used from several trio.run calls in the tests and
    the CLI: the reply goes to the run that made the call."""
    lane = Lane("test lane")
    assert trio.run(lane.run, sum, [1, 2]) == 3
    assert trio.run(lane.run, sum, [3, 4]) == 7
