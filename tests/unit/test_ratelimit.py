"""snapfs/ratelimit.py: a line a failing loop repeats is logged once per period."""

from __future__ import annotations

import time

from snapfs.ratelimit import Every


def test_every_answers_true_once_per_period():
    every = Every(0.2)
    assert every() is True
    assert [every() for _ in range(100)] == [False] * 100
    time.sleep(0.25)
    assert every() is True and every() is False
