"""How long the event loop thread is held: measured by a heartbeat, not a per-step hook.

Every FUSE request waits while any one task step holds the trio thread, so the daemon
reports how long the loop was held (`.snapfs/stats`, "event_loop") and logs holds over
100 ms with the place in the code that held it.

Why a heartbeat and not a `trio.abc.Instrument`: an instrument's `before_task_step` and
`after_task_step` run in Python on every task step, and a 4 KiB read is about one step.
Measured on this machine (fio randread, libaio, iodepth 16, 2026-11-27): 42.4 us of
daemon CPU per request with the instrument against 37.7 without, the yardstick 31.0.
The heartbeat costs one timer wakeup per period instead. A wakeup of an idle process
costs about 300 us of CPU on this VM (3 % of a core at 100 a second), so the period is
PERIOD only while the daemon is busy (over the last WINDOW: at least BUSY_REQUESTS
requests a second, or more than BUSY_CPU of a core) and IDLE_PERIOD otherwise: an idle or
lightly used mount wakes 4 times a second, and a hold that starts then is still seen if
it overlaps a wakeup.

How it works: a trio task sleeps PERIOD at a time and measures how late it wakes; the
lateness is how long other steps kept the loop from it (the wait a new request sees).
A watchdog thread looks at the heartbeat twice per LOG_AFTER; once it is overdue, the
thread records where the loop thread is (`sys._current_frames`), so the log names the
function that held the loop, not only how long. The thread only reads: it never touches
trio or the filesystem.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

import trio

log = logging.getLogger("snapfs.daemon")

PERIOD = 0.01  # seconds between heartbeats while the daemon is busy
IDLE_PERIOD = 0.25  # and while it is idle
WINDOW = 1.0  # seconds over which busy or idle is judged
BUSY_REQUESTS = 100  # busy: at least this many requests a second over the window,
BUSY_CPU = 0.1  # or more than this share of a core
LOG_AFTER = 0.1  # holds longer than this are logged with where they happened


class LoopWatch:
    """Heartbeat-based stall measurement for one trio event loop (see the module doc)."""

    def __init__(self, activity: Callable[[], int] = lambda: 0, *, period: float = PERIOD,
                 idle_period: float = IDLE_PERIOD, log_after: float = LOG_AFTER,
                 window: float = WINDOW, busy_cpu: float = BUSY_CPU) -> None:
        self.activity = activity  # a count that grows while requests are being served
        self.window = window
        self.busy_cpu = busy_cpu
        self.period = period
        self.idle_period = idle_period
        self._period = idle_period  # the current one: a new mount is idle
        self.log_after = log_after
        self.beats = 0
        self.max_ms = 0.0
        self.max_where = ""
        self.over_10ms = 0
        self.over_100ms = 0
        self._beat = time.perf_counter()  # when the heartbeat last went to sleep
        self._where: str | None = None  # set by the watchdog while a beat is overdue
        self._loop_thread = 0

    async def run(self) -> None:
        """The heartbeat task: run it in the daemon's nursery until the mount ends."""
        self._loop_thread = threading.get_ident()
        stop = threading.Event()
        watchdog = threading.Thread(target=self._watchdog, args=(stop,),
                                    name="snapfs-loopwatch", daemon=True)
        watchdog.start()
        opened = time.perf_counter(), time.process_time(), self.activity()  # the window
        try:
            while True:
                self._where = None
                self._beat = start = time.perf_counter()
                await trio.sleep(self._period)
                now = time.perf_counter()
                self._record(now - start - self._period)
                if now - opened[0] >= self.window:
                    closed = now, time.process_time(), self.activity()
                    self._period = self.period if self._busy(opened, closed) else \
                        self.idle_period
                    opened = closed
        finally:
            stop.set()
            watchdog.join()

    def _busy(self, opened: tuple[float, float, int], closed: tuple[float, float, int]) -> bool:
        """Whether the window between two (wall clock, CPU clock, requests) readings was
        busy enough for the short period."""
        span = closed[0] - opened[0]
        return (closed[2] - opened[2] >= BUSY_REQUESTS * span
                or closed[1] - opened[1] > self.busy_cpu * span)

    def _record(self, late: float) -> None:
        ms = late * 1000
        self.beats += 1
        if ms <= 10:
            return
        self.over_10ms += 1
        self.over_100ms += ms > 100
        where = self._where or ""
        if ms > self.log_after * 1000:
            log.info("event loop held for %.0f ms%s", ms, f" in {where}" if where else "")
        if ms > self.max_ms:
            self.max_ms, self.max_where = ms, where

    def _watchdog(self, stop: threading.Event) -> None:
        """Thread: note where the loop thread is while the heartbeat is overdue."""
        while not stop.wait(max(self.log_after / 2, self._period)):  # idle: rarely
            if self._where is None and \
                    time.perf_counter() - self._beat > self._period + self.log_after / 2:
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    self._where = describe(frame)

    def report(self) -> dict:
        return {"heartbeats": self.beats, "max_held_ms": round(self.max_ms, 1),
                "max_held_in": self.max_where, "held_over_10ms": self.over_10ms,
                "held_over_100ms": self.over_100ms}


def describe(frame) -> str:
    """The innermost snapfs frames of a stack, innermost first (where time is spent)."""
    stack = traceback.extract_stack(frame)
    ours = [f for f in reversed(stack) if "/snapfs/" in f.filename.replace("\\", "/")]
    picked = ours[:3] or list(reversed(stack))[:1]
    return " < ".join(f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
                      for f in picked)
