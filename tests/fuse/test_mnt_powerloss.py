"""Power loss, simulated: the repository on tools/lazyfs.py, which keeps every write it
gets in memory until that file is fsynced, and on a "power cut" lets only some of those
pages reach the disk (each file's: all, none, or a random half). A SIGKILL of the daemon
alone (test_mnt_crash.py) loses nothing the kernel had, so only this shows that snapfs's
fsync, commit and ordering of syncs hold: what was fsynced survives, and the repository
is consistent whatever part of the rest reached the disk.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from fusehelpers import ENCRYPT, ROOT, Mount, data, is_mounted, read_bytes
from test_mnt_crash import DB_WORKER, _reader

sys.path.insert(0, str(ROOT / "tools"))
from lazyfs import LazyDisk  # noqa: E402

# the database worker of test_mnt_crash.py, numbering its versions from argv[3] on, so
# that a later round's writes carry higher numbers
WORKER = DB_WORKER.replace("version = 0", "version = int(sys.argv[3])")

# Each test picks its repository's encryption itself (the database test runs on both),
# so the suite's encrypted pass (SNAPFS_TEST_ENCRYPT=1) would only repeat them.
pytestmark = [pytest.mark.snapfs_only,
              pytest.mark.skipif(ENCRYPT, reason="runs plain and encrypted by itself")]


@pytest.fixture
def powered(request, tmp_path):
    """(mount, disk): a snapfs repository on a LazyDisk, mounted with volume 'vol';
    encrypted when the test parametrizes it with True."""
    encrypt = getattr(request, "param", False)
    disk = LazyDisk(tmp_path / "disk", tmp_path / "lazy", tmp_path / "lazyfs.pid")
    disk.start()
    env = {"SNAPFS_PASSPHRASE": "power cut", "SNAPFS_SCRYPT_N": "4096"} if encrypt else None
    m = Mount(tmp_path / "m", encrypt=encrypt, env=env)
    m.repo = disk.mnt / "repo"
    try:
        m.setup()
        yield m, disk
    finally:
        with contextlib.suppress(BaseException):
            m.close()  # unmount, fsck, the log check (pytest.fail is a BaseException)
        disk.cut_power(signal.SIGTERM)
        assert not is_mounted(m.mnt) and not is_mounted(disk.mnt)


@pytest.mark.parametrize("powered", [False, True], indirect=True, ids=["plain", "encrypted"])
def test_power_cut_keeps_what_was_fsynced_and_the_repository_consistent(powered, tmp_path):
    """Three power cuts during a database's pattern (a page written, then fsync, in a
    stored file: the intent log), beside files written without fsync and a new file that
    was fsynced (the stored path: its name and data). After each cut: fsck is clean, every
    page holds its last fsynced version or a later one, the fsynced new file is whole,
    and a file written without fsync is missing, empty or whole: never a reference to
    pack data that did not reach the disk, never a size its data did not reach."""
    m, disk = powered
    m.expect_log(r" WARNING ")  # the mount after a crash reports what it replayed
    pages = 512
    db = m.vol / "db"
    db.write_bytes(bytes(pages * 4096))
    fd = os.open(db, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    script = tmp_path / "db_worker.py"
    script.write_text(WORKER)
    assert WORKER != DB_WORKER
    acked: dict[int, int] = {}
    kept: dict[str, bytes] = {}
    for round_, sig in enumerate((signal.SIGUSR1, signal.SIGUSR1, signal.SIGKILL)):
        worker = subprocess.Popen([sys.executable, str(script), str(db), str(pages),
                                   str(round_ * 1_000_000)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        q: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(worker.stdout, q), daemon=True).start()
        try:
            new = f"new{round_}"
            payload = data(300_000 + round_, new)
            with open(m.vol / new, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            kept[new] = payload
            for i in range(20):  # never fsynced: written back by the daemon, or lost
                (m.vol / f"loose{round_}-{i}").write_bytes(data(50_000, f"{round_}/{i}"))
            deadline = time.monotonic() + 120
            count = 0
            while count < 150 and time.monotonic() < deadline:
                item = q.get(timeout=30)
                assert item is not None, "the database worker died"
                acked[int(item[1])] = max(acked.get(int(item[1]), 0), int(item[2]))
                count += 1
            time.sleep(2.5)  # a group commit of the loose files happens meanwhile
            m.kill_daemon()
        finally:
            worker.kill()
            worker.wait(timeout=60)
        while (item := q.get(timeout=30)) is not None:
            acked[int(item[1])] = max(acked.get(int(item[1]), 0), int(item[2]))
        disk.power_cycle(sig)
        m.fsck()
        m.mount()
        got = read_bytes(db)
        assert len(got) == pages * 4096
        for page, version in acked.items():
            piece = got[page * 4096:page * 4096 + 18]
            assert piece[:9] == b"%08d:" % page, (round_, page, piece)
            assert int(piece[9:17]) >= version, f"page {page}: {piece!r}, fsynced {version}"
        for name, payload in kept.items():
            assert (m.vol / name).read_bytes() == payload, name
        for path in m.vol.glob("loose*"):
            r, i = path.name[5:].split("-")
            assert path.read_bytes() in (b"", data(50_000, f"{r}/{i}")), path.name


def test_power_cut_after_gc_keeps_files_whose_deletion_was_not_durable(powered):
    """Files made durable, then removed (not durable), then `snapfs gc`: it frees their
    chunks and deletes the pack that held only them. A power cut in which nothing unsynced
    reaches the disk brings the files back, since their removal never was durable; so the
    collector must not delete a pack before the catalog that stopped referencing it is
    durable, or those files come back unreadable."""
    m, disk = powered
    m.expect_log(r" WARNING ")
    files = {f"f{i}": data(200_000, f"gc/{i}") for i in range(10)}
    for name, payload in files.items():
        with open(m.vol / name, "wb") as f:
            f.write(payload)
            os.fsync(f.fileno())
    for name in files:
        os.unlink(m.vol / name)
    r = m.run_cli("-C", m.repo, "gc", "--json")
    assert '"removed_packs": 0' not in r.stdout, r.stdout  # the case under test happened
    m.kill_daemon()
    disk.power_cycle(signal.SIGKILL)
    m.fsck()
    m.mount()
    for name in sorted(p.name for p in m.vol.iterdir()):
        assert (m.vol / name).read_bytes() == files[name], name


def test_graph_operations_are_durable_when_they_return(powered):
    """commit, volume create (a clone), snapshot delete and a write into a snapshot
    directory committed from there: each survives a power cut right after it returned, in
    which nothing unsynced reaches the disk. Unsynced writes made meanwhile may be lost."""
    m, disk = powered
    m.expect_log(r" WARNING ")

    def cut():
        m.kill_daemon()
        disk.power_cycle(signal.SIGKILL)
        m.fsck()
        m.mount()

    (m.vol / "a").write_bytes(data(300_000, "a"))  # not fsynced: the commit stores it
    snap = m.commit(m.vol, "s1")
    (m.vol / "later").write_bytes(b"not fsynced")
    cut()
    assert (snap / "a").read_bytes() == data(300_000, "a")
    assert (m.vol / "a").read_bytes() == data(300_000, "a")
    m.run_cli("-C", m.mnt, "volume", "create", "clone", "--from", "vol@s1")
    (m.mnt / "clone" / "b").write_bytes(data(70_000, "b"))
    snap2 = m.commit(m.mnt / "clone", "c1")
    cut()
    assert (m.mnt / "clone" / "a").read_bytes() == data(300_000, "a")
    assert (snap2 / "b").read_bytes() == data(70_000, "b")
    (snap / "c").write_bytes(b"written into the snapshot directory")
    snap3 = m.commit(snap, "s2")
    m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@s1")
    cut()
    assert not snap.exists()
    assert (snap3 / "c").read_bytes() == b"written into the snapshot directory"
    assert (snap3 / "a").read_bytes() == data(300_000, "a")
    m.run_cli("-C", m.mnt, "gc")
    cut()
    for path in (m.vol / "a", snap3 / "a", m.mnt / "clone" / "a", snap2 / "b"):
        path.read_bytes()  # every chunk still there after the collection
