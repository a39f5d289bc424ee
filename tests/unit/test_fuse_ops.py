"""The FUSE adapter without the kernel: its inode bookkeeping (tests/fuse covers the rest
through real mounts)."""

from __future__ import annotations

import errno
import os
from types import SimpleNamespace

import pyfuse3
import pytest
from unithelpers import mkfile, read_path, trio_test

import snapfs.fuse.ops as ops_module
from snapfs.fuse.ops import MNT_ROOT, SnapfsOperations
from snapfs.repository import Repository
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem


@pytest.fixture
def ops(fs, view):
    return SnapfsOperations(fs)


async def _lookup_file(ops: SnapfsOperations, name: bytes) -> int:
    vol = await ops.lookup(MNT_ROOT, b"v")
    return (await ops.lookup(vol.st_ino, name)).st_ino


@trio_test
async def test_forgotten_inodes_stay_in_memory_until_the_bound(ops, view, monkeypatch):
    """After the kernel forgets an inode (drop_caches), looking it up again must not go to
    the catalog: the daemon keeps the last RETAIN_FORGOTTEN forgotten inodes."""
    monkeypatch.setattr(ops_module, "RETAIN_FORGOTTEN", 3)
    for i in range(5):
        mkfile(view, b"f%d" % i)
    view.flush_inodes()
    finos = [await _lookup_file(ops, b"f%d" % i) for i in range(5)]
    await ops.forget([(fino, 1) for fino in finos])
    kept = [fino for fino in finos if fino & ops_module.INO_MASK in view.inodes]
    assert kept == finos[2:], "the three most recently forgotten inodes stay"
    # looked up again: no longer forgotten, so later forgets do not evict it
    assert await _lookup_file(ops, b"f2") == finos[2]
    more = [mkfile(view, b"g%d" % i) for i in range(3)]
    view.flush_inodes()
    gfinos = [await _lookup_file(ops, b"g%d" % i) for i in range(3)]
    await ops.forget([(fino, 1) for fino in gfinos])
    assert finos[2] & ops_module.INO_MASK in view.inodes, "in use again: kept"
    assert all(n.ino in view.inodes for n in more)


@trio_test
async def test_deleted_and_dirty_inodes_are_not_lost_by_forget(ops, view):
    node = mkfile(view, b"gone")
    view.flush_inodes()
    fino = await _lookup_file(ops, b"gone")
    view.unlink(ROOT_INO, b"gone")
    await ops.forget([(fino, 1)])
    assert node.ino not in view.inodes, "a deleted inode is freed at once"
    dirty = mkfile(view, b"dirty")
    dirty.dirty = True
    dfino = await _lookup_file(ops, b"dirty")
    ops_module.RETAIN_FORGOTTEN, saved = 0, ops_module.RETAIN_FORGOTTEN
    try:
        await ops.forget([(dfino, 1)])
    finally:
        ops_module.RETAIN_FORGOTTEN = saved
    assert view.inodes[dirty.ino] is dirty, "unsaved state is never dropped"


@trio_test
async def test_requests_that_reach_a_file_just_deleted(ops, fs, view):
    """The kernel resolved the name, another process unlinked the file, then the request
    arrived for the inode the kernel still holds (tools/torture). OPEN is refused with
    ENOENT, as if the unlink came first; a truncating SETATTR succeeds in memory and
    touches nothing stored (it used to fail with EIO: negative reference count)."""
    f = mkfile(view, b"f")
    await view.write(f, 0, b"x" * 10_000)
    await fs.commit(view, "s0")
    fino = await _lookup_file(ops, b"f")
    view.unlink(ROOT_INO, b"f")
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.open(fino, os.O_RDWR | os.O_TRUNC, None)
    assert e.value.errno == errno.ENOENT
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 100
    fields = SimpleNamespace(update_mode=False, update_uid=False, update_gid=False,
                             update_size=True, update_atime=False, update_mtime=False)
    assert (await ops.setattr(fino, attr, fields, None, None)).st_size == 100
    assert fs.cat.execute("SELECT mode FROM inodes WHERE ino=? AND vertex=?",
                          (f.ino, view.draft_id())).fetchone() == (0,)


@trio_test
async def test_a_rename_over_a_file_stores_the_renamed_files_data_first(ops, fs, view,
                                                                        repo_path):
    """Found with a crash probe (2026-11-27): a file written, closed and renamed over an
    existing one, no fsync; a catalog commit came before the write-back stored its data
    (renames go on while a group commit stores), then SIGKILL: the name showed an
    empty file. Like ext4's auto_da_alloc, a rename over an existing name stores the
    renamed file's data first, so a crash leaves the old content or the new."""
    old = mkfile(view, b"config")
    await view.write(old, 0, b"old settings\n")
    await fs.sync()
    new = mkfile(view, b"config.tmp")
    await view.write(new, 0, b"new settings\n" * 1000)  # dirty in memory, closed
    vol = (await ops.lookup(MNT_ROOT, b"v")).st_ino
    await ops.rename(vol, b"config.tmp", vol, b"config", 0, None)
    fs.flush_inodes()  # a commit that no write-back preceded
    await fs.commit_catalog(durable=False)
    fs.repo.close()  # SIGKILL
    fs2 = Filesystem(Repository(repo_path))
    assert await read_path(fs2.volume_view("v"), b"config") == b"new settings\n" * 1000
    fs2.repo.close()
