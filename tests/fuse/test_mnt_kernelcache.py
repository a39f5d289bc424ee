"""Written pages the kernel holds for the mount (snapfs/fuse/kernelcache.py).

The daemon gives the mount's backing device the same dirty budget as its own, so the
kernel may keep much of what a program writes (not fsynced, file still open) in its page
cache for up to 30 s. Everything that must see those writes asks the kernel for them
first: a commit, the figures, and an unmount by signal."""

import os
import random
import re
import signal

import pytest
from fusehelpers import Mount, is_mounted, lazy_unmount, read_bytes, wait_pid_gone

pytestmark = pytest.mark.snapfs_only

PAGE = 4096


def _max_bytes(mnt) -> int | None:
    st = os.stat(mnt)
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/max_bytes"
    try:
        with open(path) as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def _scatter(fd: int, size: int, n: int, seed: int, base: bytes = b"") -> bytes:
    """n random pages written at random page offsets of a size-byte file holding base
    (no fsync): what the file must hold afterwards."""
    rng = random.Random(seed)
    content = bytearray(base or bytes(size))
    os.ftruncate(fd, size)
    for _ in range(n):
        off = rng.randrange(size // PAGE) * PAGE
        page = rng.randbytes(PAGE)
        assert os.pwrite(fd, page, off) == PAGE
        content[off:off + PAGE] = page
    return bytes(content)


def test_the_mount_may_hold_as_much_written_data_as_the_daemon(tmp_path):
    m = Mount(tmp_path, env={"SNAPFS_DIRTY_LIMIT": "300M"})
    m.require_snapfs("the dirty limit")
    m.setup()
    try:
        limit = _max_bytes(m.mnt)
        if limit is None:
            pytest.skip("the kernel has no max_bytes for a backing device (Linux < 6.2)")
        # the kernel's default for a FUSE mount is 1 % of its dirty threshold; it keeps a
        # ratio of that threshold, so the figure moves a little with free memory
        assert abs(limit - (300 << 20)) < (300 << 20) // 100, limit
        with open(m.log_path) as f:
            logged = re.search(r"the kernel may hold (\d+) MiB", f.read())
        assert logged and abs(int(logged.group(1)) - 300) <= 3, logged
    finally:
        m.close()


def test_a_commit_holds_the_pages_the_kernel_kept(mount, vd):
    """Written, not fsynced, still open: `snapfs commit` and mkdir in .snapshots must
    capture every page (the daemon pulls them in before it seals the draft)."""
    fd = os.open(vd / "held", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        first = _scatter(fd, 8 << 20, 300, seed=1)
        snap = mount.commit(mount.vol, "held") / vd.name
        assert read_bytes(snap / "held") == first
        second = _scatter(fd, 8 << 20, 300, seed=2, base=first)
        os.mkdir(mount.mnt / ".snapshots" / "vol@held-mkdir")
        snap2 = mount.mnt / ".snapshots" / "vol@held-mkdir" / vd.name
        assert read_bytes(snap2 / "held") == second
    finally:
        os.close(fd)


def test_the_figures_count_the_pages_the_kernel_kept(mount, vd):
    before = mount.stats()["totals"]["unique_chunks"]
    chunk = 128 * 1024
    fd = os.open(vd / "counted", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, os.urandom(3 * chunk), 0)  # three new chunks, in the kernel
        assert mount.stats()["totals"]["unique_chunks"] == before + 3
    finally:
        os.close(fd)


def test_an_unmount_by_signal_keeps_the_pages_the_kernel_kept(fresh_mount):
    """SIGTERM stops the daemon's loop; pages still in the kernel could not reach it
    after that: the daemon takes them in first, and stores them at shutdown."""
    m = fresh_mount
    fd = os.open(m.vol / "late", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        want = _scatter(fd, 8 << 20, 300, seed=3)
        pid = m.daemon_pid()
        os.kill(pid, signal.SIGTERM)
        assert wait_pid_gone(pid, 120), "the daemon did not exit after SIGTERM"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    if is_mounted(m.mnt):
        lazy_unmount(m.mnt)
    m.mount()
    assert read_bytes(m.vol / "late") == want


def test_a_commit_on_a_busy_mount_finishes_and_holds_the_pages(mount, vd):
    """Another process keeps the daemon busy with requests (getxattr always reaches it)
    while a commit pulls the kernel's pages in: the device is never idle, and the
    commit must neither wait for that nor miss a page."""
    import subprocess
    import sys
    import time

    (vd / "busy").write_bytes(b"x")
    hammer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "while True:\n"
        "    try: os.getxattr(sys.argv[1], 'user.none')\n"
        "    except OSError: pass\n"), str(vd / "busy")])
    try:
        fd = os.open(vd / "held-busy", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            want = _scatter(fd, 8 << 20, 300, seed=4)
            t0 = time.monotonic()
            snap = mount.commit(mount.vol, "busy") / vd.name
            took = time.monotonic() - t0
            assert read_bytes(snap / "held-busy") == want
        finally:
            os.close(fd)
    finally:
        hammer.kill()
        hammer.wait()
    assert took < 60, f"the commit took {took:.1f} s on a busy mount"
