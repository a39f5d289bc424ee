"""A full disk under the repository: writes fail with ENOSPC, nothing else is lost.

The repository lives on a 64 MiB tmpfs. Chunk data may not take the last 4 MiB (the
pack store's reserve), so metadata keeps committing when data no longer fits; and when
another process takes even that space, a catalog commit that SQLite rolls back is
redone, not forgotten. Each test remounts and checks what survived; the fixture's
teardown runs fsck and fails on unexpected log lines."""

import errno
import os
import subprocess

import pytest
from conftest import _close_mount, _open_mount
from fusehelpers import assert_one_line_error, data, lazy_unmount, write_bytes

pytestmark = pytest.mark.snapfs_only

DISK = "64M"


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(disk)],
                   check=True)
    try:
        m = _open_mount(disk, None)
        m.expect_log(r"disk full|disk holding the repository is full")
        try:
            yield m
        finally:
            _close_mount(m)
    finally:
        lazy_unmount(disk)


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_until_full(path, total: int) -> None:
    """Write and fsync path; ENOSPC is expected somewhere on the way."""
    with pytest.raises(OSError) as e:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(total >> 20):
                os.write(fd, os.urandom(1 << 20))  # distinct: no deduplication
            os.fsync(fd)
        finally:
            os.close(fd)
    assert e.value.errno == errno.ENOSPC


def test_data_filling_the_disk_leaves_metadata_working_and_space_comes_back(small_disk):
    m = small_disk
    write_bytes(m.vol / "keep", data(300_000, seed="keep"))
    _fsync(m.vol / "keep")
    _write_until_full(m.vol / "big", 100 << 20)

    # the data is refused, not the metadata: it commits and is durable
    (m.vol / "dir").mkdir()
    for i in range(20):
        (m.vol / "dir" / f"empty{i}").touch()
    os.rename(m.vol / "dir" / "empty0", m.vol / "renamed")
    _fsync(m.vol / "dir")
    # the stats still open: what is stored, and how much is not
    assert m.stats()["dirty_bytes"] > 0
    assert "dirty_bytes" in m.run_cli("-C", m.vol, "stats", "--json").stdout
    # a commit has to store the dirty data first: refused in one clear line
    assert_one_line_error(m.run_cli("commit", m.vol, "--label", "full", check=False),
                          "disk", "full", "snapfs gc")

    os.unlink(m.vol / "big")
    m.run_cli("-C", m.vol, "gc")
    assert _free(m.repo) > 48 << 20, "space of the deleted file was not given back"
    after = data(5 << 20, seed="after")
    write_bytes(m.vol / "after", after)
    _fsync(m.vol / "after")
    m.commit(m.vol, "after")

    m.remount()
    assert (m.vol / "keep").read_bytes() == data(300_000, seed="keep")
    assert (m.vol / "after").read_bytes() == after
    assert sorted(os.listdir(m.vol / "dir")) == sorted(f"empty{i}" for i in range(1, 20))
    assert (m.vol / "renamed").exists() and not (m.vol / "big").exists()


def test_catalog_commit_on_a_disk_another_process_filled_is_redone(small_disk):
    """SQLite rolls back a COMMIT that meets a full disk; the daemon's memory already
    shows the changes. They must be committed once space is back, not lost."""
    m = small_disk
    write_bytes(m.vol / "keep", b"kept")
    _fsync(m.vol / "keep")
    filler = m.base / "filler"  # on the tmpfs, beside the repository, not in the mount
    with pytest.raises(OSError) as e, open(filler, "wb") as f:
        while True:
            f.write(bytes(1 << 20))
            f.flush()
    assert e.value.errno == errno.ENOSPC
    assert _free(m.repo) < 1 << 20

    (m.vol / "dir").mkdir()
    for i in range(300):
        (m.vol / "dir" / f"f{i:03d}").touch()
    os.rename(m.vol / "keep", m.vol / "dir" / "kept")
    with pytest.raises(OSError) as e:
        _fsync(m.vol / "dir")  # commits the catalog: no room for its WAL
    assert e.value.errno == errno.ENOSPC
    assert len(os.listdir(m.vol / "dir")) == 301

    filler.unlink()
    _fsync(m.vol / "dir")
    m.remount()
    names = sorted(os.listdir(m.vol / "dir"))
    assert names == sorted([f"f{i:03d}" for i in range(300)] + ["kept"])
    assert (m.vol / "dir" / "kept").read_bytes() == b"kept"


def test_mounting_on_a_full_disk_says_so_and_works_once_there_is_room(small_disk):
    """Opening the catalog creates SQLite's -wal and -shm files; on a full disk SQLite
    reports a "disk I/O error", which must not read as damage."""
    m = small_disk
    write_bytes(m.vol / "f", b"kept")
    _fsync(m.vol / "f")
    m.umount()
    filler = m.base / "filler"
    with pytest.raises(OSError), open(filler, "wb") as f:
        while True:
            f.write(bytes(1 << 20))
            f.flush()
    for args in (["mount", m.repo, m.mnt], ["fsck", m.repo]):
        r = m.run_cli(*args, check=False)
        assert_one_line_error(r, "disk holding the repository is full", "free some space")
        assert "fsck" not in r.stderr  # not sent to fsck for a full disk
    filler.unlink()
    m.mount()
    assert (m.vol / "f").read_bytes() == b"kept"
