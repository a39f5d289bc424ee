"""Crash consistency: SIGKILL the daemon in the middle of a workload, clear the dead mount,
mount again. Everything acknowledged by fsync and every committed snapshot must be
intact, and (snapfs) fsck must pass (checked by the fixture's teardown)."""

import contextlib
import errno
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from fusehelpers import data, read_bytes, snapfs_bin, tree_contents, wait_pid_gone, write_bytes


@contextlib.contextmanager
def open_through_crash(path, flags: int, mode: int = 0o644):
    """A descriptor for a body that ends by killing the daemon: closed afterwards whatever
    happened (once the mount is gone, the close fails, and that is expected)."""
    fd = os.open(path, flags, mode)
    try:
        yield fd
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone

WORKER = r"""
import os, random, sys
d = sys.argv[1]
journal = os.open(os.path.join(d, "journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
jlen = 0
i = 0
while True:
    name = f"f{i:05d}"
    payload = random.Random(name).randbytes(random.Random(i).randrange(1, 300_000))
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    if i % 2 == 0:
        os.fsync(fd)
        os.close(fd)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        rec = random.Random(-i).randbytes(4096)
        os.write(journal, rec)
        os.fdatasync(journal)
        jlen += len(rec)
        print("ack", name, jlen, flush=True)
    else:
        os.close(fd)
    i += 1
"""


def _content(name: str) -> bytes:
    import random

    i = int(name[1:])
    return random.Random(name).randbytes(random.Random(i).randrange(1, 300_000))


def _journal(length: int) -> bytes:
    import random

    return b"".join(random.Random(-i).randbytes(4096) for i in range(0, 2 * (length // 4096), 2))


def _reader(stream, q):
    for line in stream:
        q.put(line.split())
    q.put(None)


def test_sigkill_during_workload_loses_nothing_acknowledged(fresh_mount, tmp_path):
    m = fresh_mount
    # the daemon may warn about the unclean shutdown and its recovery on the next mount
    m.expect_log(r" WARNING ")

    base = m.vol / "base"
    base.mkdir()
    for k in range(20):
        write_bytes(base / f"b{k}", data(k * 5000 + 1, seed=f"b{k}"))
    os.symlink("b1", base / "link")
    expected_base = tree_contents(base)
    if m.is_snapfs:
        m.commit(m.vol, "before")

    work = m.vol / "work"
    work.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    worker = subprocess.Popen([sys.executable, str(script), str(work)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(worker.stdout, q), daemon=True).start()
    acked: list[str] = []
    journal_len = 0
    at_commit: list[str] = []

    def wait_acks(n):
        nonlocal journal_len
        deadline = time.monotonic() + 120
        while len(acked) < n:
            item = q.get(timeout=max(0.1, deadline - time.monotonic()))
            assert item is not None, f"worker died after {len(acked)} acks"
            acked.append(item[1])
            journal_len = int(item[2])

    try:
        wait_acks(20)
        if m.is_snapfs:
            at_commit = list(acked)
            m.commit(m.vol, "during")
        wait_acks(len(acked) + 30)
        m.kill_daemon()
    finally:
        worker.kill()
        worker.wait(timeout=60)
    while (item := q.get(timeout=30)) is not None:  # acks printed before the kill
        acked.append(item[1])
        journal_len = int(item[2])

    m.mount()
    for name in acked:
        got = read_bytes(work / name)
        assert got == _content(name), f"fsynced file {name} lost or damaged ({len(got)} bytes)"
    j = read_bytes(work / "journal")
    assert len(j) >= journal_len, f"journal: {len(j)} bytes, {journal_len} were fsynced"
    assert j[:journal_len] == _journal(journal_len)
    assert tree_contents(base) == expected_base

    if m.is_snapfs:
        snaps = m.mnt / ".snapshots"
        assert tree_contents(snaps / "vol@before" / "base") == expected_base
        assert not os.path.exists(snaps / "vol@before" / "work" / at_commit[0])
        for name in at_commit:
            assert read_bytes(snaps / "vol@during" / "work" / name) == _content(name), name
        assert tree_contents(snaps / "vol@during" / "base") == expected_base
        # the repository keeps working: a new commit after recovery
        write_bytes(m.vol / "after-crash", b"alive")
        snap = m.commit(m.vol, "after")
        assert (snap / "after-crash").read_bytes() == b"alive"


DB_WORKER = r"""
import os, random, sys
path, pages = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
rng = random.Random(7)
version = 0
while True:
    page = rng.randrange(pages)
    version += 1
    os.pwrite(fd, b"%08d:%08d|" % (page, version) * 227 + bytes(4096 - 18 * 227), page * 4096)
    os.fsync(fd)
    print("ack", page, version, flush=True)
"""


def test_sigkill_keeps_every_fsynced_page_of_a_database(fresh_mount, tmp_path):
    """A database's pattern: a page written into an existing file, then fsync, again and
    again. snapfs makes those fsyncs durable through its intent log (docs/design.md);
    after SIGKILL and a mount, every page holds the version last acknowledged, or one
    written after it (acknowledged only in the output that the kill cut off)."""
    m = fresh_mount
    m.expect_log(r" WARNING ")
    pages = 2048  # 8 MiB: 64 chunks of 128 KiB
    path = m.vol / "db"
    write_bytes(path, bytes(pages * 4096))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # stored: from now on the file's rows are durable
    os.close(fd)
    script = tmp_path / "db_worker.py"
    script.write_text(DB_WORKER)
    worker = subprocess.Popen([sys.executable, str(script), str(path), str(pages)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(worker.stdout, q), daemon=True).start()
    acked: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while len(acked) < 300 and time.monotonic() < deadline:
            item = q.get(timeout=30)
            assert item is not None, "the worker died"
            acked[int(item[1])] = int(item[2])
        if m.is_snapfs:
            stats = json.loads((m.mnt / ".snapfs" / "stats").read_text())
            assert stats["fsync"]["logged"] >= 300, stats["fsync"]
        m.kill_daemon()
    finally:
        worker.kill()
        worker.wait(timeout=60)
    while (item := q.get(timeout=30)) is not None:
        acked[int(item[1])] = int(item[2])
    m.mount()
    got = read_bytes(path)
    assert len(got) == pages * 4096
    for page, version in acked.items():
        piece = got[page * 4096:page * 4096 + 18]
        assert piece[:9] == b"%08d:" % page, (page, piece)
        assert int(piece[9:17]) >= version, f"page {page}: {piece!r}, fsynced version {version}"


def test_mount_after_kill_with_no_workload(fresh_mount):
    m = fresh_mount
    m.expect_log(r" WARNING ")
    write_bytes(m.vol / "f", b"synced")
    fd = os.open(m.vol / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    m.kill_daemon()
    m.mount()
    assert (m.vol / "f").read_bytes() == b"synced"
    m.remount()  # and a clean cycle afterwards
    assert (m.vol / "f").read_bytes() == b"synced"


def test_mount_over_the_dead_mount_of_a_killed_daemon(fresh_mount):
    """After a crash the dead mount is still in the mount table; `snapfs mount` at the same
    place detaches it, says so, and mounts. A mount whose daemon runs is still refused."""
    m = fresh_mount
    m.require_snapfs("snapfs mount")
    m.expect_log(r" WARNING ")
    write_bytes(m.vol / "f", b"synced")
    fd = os.open(m.vol / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    live = m.run_cli("mount", m.repo, m.mnt, check=False)
    assert live.returncode != 0 and "already a mount point" in live.stderr, live.stderr
    pid = m.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_pid_gone(pid, 30)
    with pytest.raises(OSError) as dead:
        os.statvfs(m.mnt)
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    r = m.run_cli("mount", m.repo, m.mnt, check=False)
    assert r.returncode == 0, r.stderr
    assert f"detached the dead mount at {m.mnt}" in r.stderr
    assert (m.vol / "f").read_bytes() == b"synced"
    with open("/proc/self/mountinfo") as f:
        mounts_here = [line for line in f if line.split()[4] == str(m.mnt)]
    assert len(mounts_here) == 1, mounts_here  # the dead one is gone, not stacked under


@pytest.mark.slow
def test_crash_loop_keeps_every_acknowledged_write(fresh_mount, tmp_path):
    """Six crashes in a row at random moments (while files are written and fsynced, while
    snapshots are committed and the collector runs): after each, fsck passes on the
    unmounted repository, and every write acknowledged in any earlier round is intact."""
    import random

    m = fresh_mount
    m.expect_log(r" WARNING ")
    rng = random.Random(int(os.environ.get("SNAPFS_CRASH_SEED", "20261126")))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    acked: dict[str, list[str]] = {}  # round directory -> acknowledged files
    snapshots: dict[str, dict] = {}  # label -> tree of the round directory it froze
    for rnd in range(6):
        work = m.vol / f"r{rnd}"
        work.mkdir()
        worker = subprocess.Popen([sys.executable, str(script), str(work)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(worker.stdout, q), daemon=True).start()
        names = acked[work.name] = []
        side = None
        try:
            while len(names) < rng.randrange(5, 40):
                try:
                    item = q.get(timeout=120)
                except queue.Empty:
                    pytest.fail(f"round {rnd}: no fsync acknowledged for 120 s\n"
                                + m.dump_stacks(), pytrace=False)
                assert item is not None, f"round {rnd}: worker died after {len(names)} acks"
                names.append(item[1])
            if m.is_snapfs and rnd > 0:
                # freeze the previous round (complete and synced), then crash while
                # another commit or the collector may still be running
                label = f"round{rnd - 1}"
                m.commit(m.vol, label)
                snapshots[label] = {f"r{rnd - 1}": tree_contents(m.vol / f"r{rnd - 1}")}
                extra = ["commit", str(m.vol), "--label", f"racing{rnd}"] if rnd % 2 else ["gc"]
                side = subprocess.Popen([snapfs_bin(), "-C", str(m.mnt), *extra],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=m.environ())
                time.sleep(rng.random() * 0.2)
            m.kill_daemon()
        finally:
            worker.kill()
            worker.wait(timeout=60)
            if side is not None:
                side.wait(timeout=60)
        while (item := q.get(timeout=30)) is not None:
            names.append(item[1])
        if m.is_snapfs:
            m.fsck()  # the repository as the crash left it
        m.mount()
        for directory, files in acked.items():
            for name in files:
                got = read_bytes(m.vol / directory / name)
                assert got == _content(name), f"round {rnd}: {directory}/{name} lost or damaged"
        for label, trees in snapshots.items():
            for directory, tree in trees.items():
                snap = m.mnt / ".snapshots" / f"vol@{label}" / directory
                assert tree_contents(snap) == tree, f"round {rnd}: snapshot {label} changed"


def test_open_file_kept_dirty_in_memory_is_committed_fsynced_and_crash_safe(fresh_mount):
    """snapfs keeps an open file's dirty chunks in memory across group commits (write-back
    policy): commit and fsync must still capture them, and a SIGKILL may lose only what
    was written after the last fsync, chunk by chunk old or new, never garbage."""
    import random

    m = fresh_mount
    m.expect_log(r" WARNING ")
    cs = 128 * 1024
    size = 16 * cs
    content = bytearray(data(size, seed="dirty"))
    rng = random.Random(1)
    path = m.vol / "open.dat"
    with open_through_crash(path, os.O_RDWR | os.O_CREAT) as fd:
        os.pwrite(fd, content, 0)
        os.fsync(fd)

        def scribble(n):
            for _ in range(n):
                off = rng.randrange(0, size - 4096) & ~4095
                piece = rng.randbytes(4096)
                assert os.pwrite(fd, piece, off) == 4096
                content[off:off + 4096] = piece

        scribble(200)
        time.sleep(2.5)  # at least one background group commit passes with the file open
        if m.is_snapfs:
            snap = m.commit(m.vol, "open")
            assert read_bytes(snap / "open.dat") == content
        scribble(200)
        os.fsync(fd)
        synced = bytes(content)
        scribble(50)  # never fsynced
        time.sleep(2.5)
        m.kill_daemon()
    m.mount()
    got = read_bytes(path)
    assert len(got) == size
    for i in range(0, size, 4096):  # every block is the fsynced one or a later write
        assert got[i:i + 4096] in (synced[i:i + 4096], content[i:i + 4096]), f"block at {i}"
    if m.is_snapfs:
        assert read_bytes(m.mnt / ".snapshots" / "vol@open" / "open.dat") != b""


def test_directory_times_are_durable_after_a_directory_fsync_commit_and_unmount(fresh_mount):
    """A directory's new times after a create, a rename or an unlink stay in memory until
    the next catalog commit (snapfs: View._save_changed): an fsync of the directory, a
    snapshot commit and an unmount must each still carry them."""
    m = fresh_mount
    m.expect_log(r" WARNING ")
    d, e = m.vol / "d", m.vol / "e"
    d.mkdir()
    e.mkdir()
    old = 10**18

    def change(tag: str) -> dict[str, tuple[int, int, int]]:
        os.mkdir(d / f"s{tag}")  # link counts change: saved at once
        os.rename(d / f"s{tag}", e / f"s{tag}")
        for p in (d, e):
            os.utime(p, ns=(old, old))  # saved at once too: what follows must show
        write_bytes(d / f"f{tag}", b"x")  # times only, from here on
        os.rename(d / f"f{tag}", e / f"f{tag}")
        write_bytes(e / f"g{tag}", b"y")
        os.unlink(e / f"g{tag}")
        return times()

    def times(base=m.vol) -> dict[str, tuple[int, int, int]]:
        return {n: (st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)
                for n in ("d", "e") for st in [os.stat(base / n)]}

    want = change("1")
    assert all(t[0] != old for t in want.values())
    if m.is_snapfs:
        snap = m.commit(m.vol, "times")
        assert times(snap) == want
    want = change("2")
    for p in (d, e):
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
    m.kill_daemon()
    m.mount()
    assert times() == want, "after a directory fsync and a crash"
    want = change("3")
    m.remount()
    assert times() == want, "after an unmount"


def test_a_crash_leaves_an_unsynced_log_a_prefix_never_zeros(fresh_mount):
    """Found by hand (2026-11-27): a log file kept open and appended to, its pages written
    back by the kernel, never fsynced. A group commit saved its size while its chunks
    were only in memory; after SIGKILL the file had that size and was all zeros. What a
    crash leaves of an unsynced append must be a prefix of what was written."""
    m = fresh_mount
    m.expect_log(r" WARNING ")
    path = m.vol / "app.log"
    written = bytearray()
    with open_through_crash(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) as fd:
        deadline = time.monotonic() + 3.5  # more than one group commit (2 s)
        n = 0
        while time.monotonic() < deadline:
            line = b"%07d the quick brown fox jumps over the lazy dog\n" % n * 200
            assert os.write(fd, line) == len(line)
            written += line
            n += 1
            # the kernel writes the pages back now, as its flusher would later
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            time.sleep(0.02)
        m.kill_daemon()
    m.mount()
    got = read_bytes(path)
    assert written.startswith(got), f"{len(got)} bytes, {got.count(0)} of them zeros"


def test_a_crash_after_an_unsynced_truncate_never_brings_old_bytes_back(fresh_mount):
    """Found by hand (2026-11-27): a file cut from 10,000 bytes to 100 through an open
    descriptor, group commits, SIGKILL. After the remount the file had 100 bytes, and a
    truncate up brought back 9,900 of the old ones where zeros belong."""
    m = fresh_mount
    m.expect_log(r" WARNING ")
    path = m.vol / "f"
    old = data(10_000, seed="cut")
    write_bytes(path, old)
    with open_through_crash(path, os.O_RDWR) as fd:
        os.fsync(fd)
        os.ftruncate(fd, 100)
        time.sleep(3.5)  # group commits (every 2 s) pass with the file open
        m.kill_daemon()
    m.mount()
    size = os.path.getsize(path)
    assert size in (100, 10_000)  # the unsynced truncate made it, or not at all
    os.truncate(path, 10_000)
    got = read_bytes(path)
    want = old if size == 10_000 else old[:100] + bytes(9_900)
    assert got == want, f"size {size} after the crash, {sum(map(bool, got[100:]))} old bytes"


@pytest.mark.slow
def test_sigkill_during_snapshot_deletions_leaves_each_whole_or_gone(fresh_mount):
    """A deletion runs in slices, then one step, then a purge of rows (graph/delete.py):
    killed at any moment, the snapshot is there whole or gone, every other tree is
    unchanged, fsck passes, and the next mount finishes what was left."""
    m = fresh_mount
    m.require_snapfs("snapshot deletion")
    m.expect_log(r" WARNING ")
    for d in range(5):
        (m.vol / f"d{d}").mkdir()
        for i in range(400):
            write_bytes(m.vol / f"d{d}" / f"f{i}", data(200 + i, seed=d * 1000 + i))
    snaps = {}
    for rnd, delay in enumerate((0.05, 0.15, 0.22, 0.3, 0.6)):
        write_bytes(m.vol / f"d{rnd}" / "f0", data(300, seed=-rnd))  # each its own delta
        label = f"r{rnd}"
        snaps[label] = tree_contents(m.commit(m.vol, label))
        victim = min(snaps)
        volume = tree_contents(m.vol)
        proc = subprocess.Popen([snapfs_bin(), "-C", m.mnt, "snapshot", "delete",
                                 f"vol@{victim}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=m.environ())
        time.sleep(delay)
        m.kill_daemon()
        proc.wait(timeout=60)
        m.fsck()
        m.mount()
        listed = set(os.listdir(m.mnt / ".snapshots"))
        if f"vol@{victim}" not in listed:
            del snaps[victim]
        assert listed == {f"vol@{s}" for s in snaps}, (delay, listed)
        for s, tree in snaps.items():
            assert tree_contents(m.mnt / ".snapshots" / f"vol@{s}") == tree, (delay, s)
        assert tree_contents(m.vol) == volume, delay
    m.run_cli("-C", m.mnt, "gc")  # (the first background pass would do the same)
    m.umount()
    m.fsck()
    with sqlite3.connect(m.repo / "meta.db") as db:  # the purges were all finished
        assert db.execute("SELECT value FROM meta WHERE key='purge'").fetchone() is None
    m.mount()
