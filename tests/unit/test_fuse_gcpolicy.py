"""The garbage-collection policy of the daemon (snapfs/fuse/gcpolicy.py): a busy daemon's
collections skip what already lived through a second, and cyclic garbage is still freed
once the daemon is idle."""

from __future__ import annotations

import gc

import trio
import trio.testing

from snapfs.fuse import gcpolicy


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_busy_freezes_and_idle_sweeps_cyclic_garbage():
    requests = [0]
    seen: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: gcpolicy.run(lambda: requests[0], every=1, idle=10))
            await trio.sleep(0.5)
            cache = [object() for _ in range(1000)]  # what the caches hold
            for _ in range(3):  # busy for three seconds
                requests[0] += 100
                await trio.sleep(1)
            seen["frozen while busy"] = gc.get_freeze_count()
            garbage = _Node()
            marker = id(garbage)
            del garbage
            requests[0] += 1  # frozen with the rest: no collection can free it now
            await trio.sleep(1)
            gc.collect()
            await trio.sleep(5)  # quiet, but not for long enough
            seen["swept early"] = _count_of(marker)
            await trio.sleep(10)  # idle: the sweep
            seen["after sweep"] = _count_of(marker)
            seen["frozen after sweep"] = gc.get_freeze_count()
            seen["cache"] = len(cache)
            nursery.cancel_scope.cancel()

    _run_on_a_mock_clock(main)
    assert seen["frozen while busy"] > 1000
    assert seen["swept early"] == 1, "the garbage was freed before the daemon was idle"
    assert seen["after sweep"] == 0, "idle, and the cyclic garbage is still there"
    assert seen["frozen after sweep"] > 1000 and seen["cache"] == 1000
    assert gc.get_freeze_count() == 0  # the task unfroze everything when it ended


def test_a_daemon_never_idle_still_gets_a_full_collection_now_and_then():
    requests = [0]
    seen: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: gcpolicy.run(lambda: requests[0], every=1, idle=10,
                                                    max_unswept=20))
            garbage = _Node()
            marker = id(garbage)
            del garbage
            for second in range(30):  # a request every second: never idle
                requests[0] += 1
                await trio.sleep(1)
                if second == 15:
                    seen["at 15 s"] = _count_of(marker)
            seen["at 30 s"] = _count_of(marker)
            nursery.cancel_scope.cancel()

    _run_on_a_mock_clock(main)
    assert seen == {"at 15 s": 1, "at 30 s": 0}


def _run_on_a_mock_clock(main) -> None:
    """trio.run(main) on a clock that jumps over sleeps; the heap unfrozen afterwards."""
    gc.collect()
    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        gc.unfreeze()


def _count_of(marker: int) -> int:
    """1 if the _Node whose id is marker still exists (frozen or not), else 0."""
    gc.unfreeze()  # get_objects does not list frozen objects
    try:
        return sum(1 for o in gc.get_objects() if type(o) is _Node and id(o) == marker)
    finally:
        gc.freeze()
