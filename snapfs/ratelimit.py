"""Log lines that a failing loop would repeat (a full disk fails every write until space
is freed): say it once per period, not once per attempt."""

from __future__ import annotations

import time


class Every:
    """Calling it answers True at most once per `seconds` (the first call: True)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -seconds

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.seconds:
            return False
        self._last = now
        return True
