"""The daemon's process set-up (snapfs/fuse/daemon.py), without mounting."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard}))
from snapfs.fuse.daemon import raise_fd_limit
print(raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _probe(hard: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(hard=hard)], check=True,
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_the_soft_open_file_limit_is_lifted_to_the_hard_one():
    """One read descriptor per 128 MiB pack: 1,024 would run out at about 120 GiB."""
    assert _probe(4096) == [4096, 4096, 4096]


def test_a_soft_limit_already_at_the_hard_one_is_left_alone():
    assert _probe(64) == [64, 64, 64]
