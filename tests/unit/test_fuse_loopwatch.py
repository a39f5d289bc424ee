"""The event-loop stall measurement: a blocking call is measured and named, short steps
are not counted."""

from __future__ import annotations

import logging
import time

import trio

from snapfs.fuse.loopwatch import LoopWatch


def _blocks_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a blocking SQLite call or a hash on the loop thread does


async def _run_with_watch(watch: LoopWatch, body) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        await trio.sleep(0.05)  # a few heartbeats first
        await body()
        await trio.sleep(0.05)  # the late heartbeat is recorded after the hold
        nursery.cancel_scope.cancel()


def _one_hold(caplog, seconds: float, log_after: float) -> tuple[dict, list[str]]:
    """The watch's report and its log lines after the loop is held once for seconds."""
    watch = LoopWatch(period=0.005, idle_period=0.005, log_after=log_after)

    async def body():
        _blocks_the_loop(seconds)

    with caplog.at_level(logging.INFO, logger="snapfs.daemon"):
        trio.run(_run_with_watch, watch, body)
    return watch.report(), [r.getMessage() for r in caplog.records
                            if "event loop held" in r.getMessage()]


def test_a_long_hold_is_measured_logged_and_named(caplog):
    report, held = _one_hold(caplog, 0.25, log_after=0.1)
    # at least: on a loaded machine the scheduler can make another beat late too
    assert report["held_over_100ms"] >= 1 and report["held_over_10ms"] >= 1, report
    assert 200 <= report["max_held_ms"] < 1000
    assert "_blocks_the_loop" in report["max_held_in"], report
    assert report["heartbeats"] >= 10
    assert held and "_blocks_the_loop" in held[0], held


def test_short_steps_are_not_counted_as_holds():
    watch = LoopWatch(period=0.005, idle_period=0.005, log_after=0.1)

    async def body():
        for _ in range(20):  # 2 ms holds: many steps, none long
            _blocks_the_loop(0.002)
            await trio.sleep(0)

    trio.run(_run_with_watch, watch, body)
    report = watch.report()
    # not held_over_10ms == 0: on a loaded machine the scheduler alone delays a beat that much
    assert report["held_over_100ms"] == 0 and report["max_held_ms"] < 100, report
    assert report["max_held_in"] == ""


def test_a_medium_hold_is_counted_without_a_log_line(caplog):
    report, held = _one_hold(caplog, 0.05, log_after=0.5)
    assert report["held_over_10ms"] >= 1 and report["held_over_100ms"] == 0, report
    assert report["max_held_ms"] >= 40
    assert not held


def _beats(watch: LoopWatch, requests: list[int], phases: list[tuple[float, int]]
           ) -> list[int]:
    """Heartbeats in each phase of (seconds, requests a second)."""

    async def main():
        counts = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            for seconds, rate in phases:
                before = watch.beats
                for _ in range(int(seconds * 100)):
                    requests[0] += rate // 100
                    await trio.sleep(0.01)
                counts.append(watch.beats - before)
            nursery.cancel_scope.cancel()
        return counts

    return trio.run(main)


def test_an_idle_daemon_wakes_rarely_and_a_busy_one_often():
    """Many requests switch the short period on; without them the idle period stays
    (timer wakeups cost CPU). busy_cpu=1: only the requests count here, not a CPU spike
    of the test process."""
    requests = [0]
    watch = LoopWatch(lambda: requests[0], period=0.005, idle_period=0.1, window=0.2,
                      busy_cpu=1.0)
    idle, busy = _beats(watch, requests, [(0.6, 0), (0.8, 500)])
    assert idle <= 8, idle  # 0.6 s at 0.1 s
    assert busy >= 40, busy  # about 0.6 s at 5 ms once a window saw the load


def test_a_few_requests_a_second_keep_the_idle_period():
    """A shell or an editor sends a few requests a second: not worth 100 wakeups."""
    requests = [0]
    watch = LoopWatch(lambda: requests[0], period=0.005, idle_period=0.1, window=0.2,
                      busy_cpu=1.0)

    async def trickle():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            for _ in range(20):  # 20 requests a second for 1 s
                requests[0] += 1
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(trickle)
    assert watch.beats <= 14, watch.beats  # 1 s at 0.1 s, not at 5 ms
