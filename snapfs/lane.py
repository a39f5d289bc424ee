"""A worker thread of its own for one stream of short blocking calls from trio tasks.

``trio.to_thread.run_sync`` hands each call to a cached thread through a fresh cancel
scope, a thread-cache job and a lock released per call; on the 2-vCPU VMs we run on, one
hop cost 165-250 us of wall time and 170-215 us of CPU for a call that does nothing
(BENCHMARKS.md, "The fsync path: a thread of its own"). The fdatasync of the intent log makes
one such hop per fsync of a database-like writer, where the whole fsync costs about a
millisecond. A Lane keeps one thread waiting on a queue: a call is one queue put, one
wake-up of that thread and one ``run_sync_soon`` back, about half the cost.

Calls run one at a time, in the order made; a call cannot be cancelled once made (as
``to_thread.run_sync`` without ``abandon_on_cancel``): the caller waits for its outcome.
The thread ends after IDLE_EXIT seconds without work and starts again at the next call,
so an idle or forgotten Lane holds no thread. Like any thread, it does not survive a
fork: the daemon forks before it opens the repository (fuse/daemon.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

IDLE_EXIT = 30.0  # seconds without a call before the thread ends


class Lane:
    """Run blocking calls in one dedicated thread, in order (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], trio.lowlevel.Task,
                                             trio.lowlevel.TrioToken]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the thread's start and end against a new call
        self._running = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the lane's thread; its result, or its exception raised here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._calls.put((lambda: fn(*args), task, token))
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name=self.name, daemon=True).start()
        # reschedule() with the call's outcome: its value returned, its exception raised
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _serve(self) -> None:
        while True:
            try:
                call, task, token = self._calls.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():
                        self._running = False
                        return
                continue
            result = outcome.capture(call)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the caller's trio.run is gone: no one to tell
                pass
