"""The filesystem of one repository without the kernel: commit, snapshots, drafts, clones,
persistence and durability ordering (snapfs/vfs/fs.py over snapfs/vfs/view.py)."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest
import trio
from unithelpers import CHUNK as CS
from unithelpers import (
    all_trees,
    assert_gone,
    close_and_fsck,
    mkfile,
    names,
    pattern,
    read_all,
    read_path,
    trio_test,
    write_file,
)

from snapfs.errors import AlreadyExists, FsError, UsageError
from snapfs.repository import Repository
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem


async def populate(view) -> dict:
    """A small tree; returns what it holds."""
    a = pattern(2 * CS + 10, seed=1)
    b = pattern(100, seed=2)
    await write_file(view, b"a", a)
    d = view.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await write_file(view, b"b", b, d.ino)
    view.symlink(ROOT_INO, b"s", b"a", 0, 0)
    view.setxattr(view.lookup(ROOT_INO, b"a").ino, b"user.k", b"v1")
    return {"a": a, "b": b}


async def reopen(fs: Filesystem) -> Filesystem:
    path = fs.repo.paths.root
    await fs.sync()
    fs.repo.close()
    return Filesystem(Repository(path))


# -- snapshots are immutable -------------------------------------------------------------------


@trio_test
async def test_snapshot_is_never_modified_by_writes_to_the_volume(fs, view):
    content = await populate(view)
    assert await fs.commit(view, "s1") == "v@s1"
    a = view.lookup(ROOT_INO, b"a")
    await view.write(a, CS - 5, b"CHANGED-ACROSS-A-BOUNDARY")
    await view.setattr(a.ino, mode=0o600)
    view.setxattr(a.ino, b"user.k", b"v2")
    view.setxattr(a.ino, b"user.new", b"x")
    view.unlink(view.lookup(ROOT_INO, b"d").ino, b"b")
    view.rmdir(ROOT_INO, b"d")
    await write_file(view, b"c", b"new file")
    view.rename(ROOT_INO, b"s", ROOT_INO, b"s2")
    await fs.flush_dirty()

    for _ in range(2):  # as cached, then after a reopen
        snap = fs.snapshot_view("v@s1")
        assert names(snap) == [b"a", b"d", b"s"]
        assert await read_path(snap, b"a") == content["a"]
        assert await read_path(snap, b"d", b"b") == content["b"]
        sa = snap.lookup(ROOT_INO, b"a")
        assert stat.S_IMODE(sa.mode) == 0o644
        assert snap.listxattr(sa.ino) == [b"user.k"] and snap.getxattr(sa.ino, b"user.k") == b"v1"
        assert snap.readlink(snap.lookup(ROOT_INO, b"s").ino) == b"a"
        assert snap.immutable  # reading created no draft
        vol = fs.volume_view("v")
        assert names(vol) == [b"a", b"c", b"s2"]
        fs = await reopen(fs)
    fs.repo.close()


@trio_test
async def test_commit_keeps_the_volume_and_its_open_files_working(fs, view):
    f = await write_file(view, b"f", pattern(3 * CS))
    first_draft = fs.graph.volume_draft("v")
    await fs.commit(view, "s1")
    s1 = fs.graph.snapshot("v@s1")
    assert s1.id == first_draft.id and (s1.delta, s1.referenced) == (3, 3)
    draft = fs.graph.volume_draft("v")
    assert draft.parent == s1.id and (draft.delta, draft.referenced) == (0, 3)
    assert await read_path(view, b"f") == pattern(3 * CS)  # the directory shows the same
    await view.write(f, CS, b"x")  # the handle opened before the commit still writes
    await fs.flush_dirty()
    assert (draft.delta, draft.referenced) == (1, 3) and len(draft.removed) == 1
    assert (s1.delta, s1.referenced) == (3, 3)  # committing a child changes no delta
    assert await read_path(fs.snapshot_view("v@s1"), b"f") == pattern(3 * CS)
    s2 = fs.graph.snapshot(await fs.commit(view, "s2"))
    assert (s2.delta, s2.referenced, s1.delta) == (1, 3, 3)
    with pytest.raises(AlreadyExists):
        await fs.commit(view, "s2")
    s3 = fs.graph.snapshot(await fs.commit(view, "s3"))  # nothing changed: delta 0
    assert (s3.delta, s3.referenced) == (0, 3)


@trio_test
async def test_writes_under_a_snapshot_go_into_its_draft_and_commit_makes_a_branch(fs, view):
    content = await populate(view)
    await fs.commit(view, "s1")
    s1 = fs.graph.snapshot("v@s1")
    before = (s1.delta, s1.referenced, set(s1.added), set(s1.removed))
    snap = fs.snapshot_view("v@s1")
    assert snap.immutable and snap.vertex_id == s1.id
    await write_file(snap, b"fix", b"hotfix")
    sa = snap.lookup(ROOT_INO, b"a")
    await snap.write(sa, 0, b"PATCHED")
    await fs.flush_dirty()
    assert not snap.immutable and s1.id in fs.graph.snapshot_drafts
    draft = fs.graph.vertices[snap.vertex_id]
    assert draft.is_draft and draft.parent == s1.id and draft.delta == 2
    assert (s1.delta, s1.referenced, set(s1.added), set(s1.removed)) == before
    assert names(view) == [b"a", b"d", b"s"]  # the volume does not see it
    assert await read_path(view, b"a") == content["a"]

    assert await fs.commit(snap, "hotfix") == "v@hotfix"
    branch = fs.graph.snapshot("v@hotfix")
    assert branch.parent == s1.id and branch.delta == 2
    assert fs.graph.snapshot_drafts == {} and snap.immutable
    assert names(snap) == [b"a", b"d", b"s"]  # .snapshots/v@s1 shows v@s1 again
    assert await read_path(snap, b"a") == content["a"]
    hot = fs.snapshot_view("v@hotfix")
    assert names(hot) == [b"a", b"d", b"fix", b"s"]
    assert await read_path(hot, b"a") == b"PATCHED" + content["a"][7:]
    assert await read_path(hot, b"fix") == b"hotfix"
    assert fs.graph.volume_head("v").id == s1.id  # the volume did not move
    assert await close_and_fsck(fs, fs.repo.paths.root) == []


@trio_test
async def test_commit_of_an_unchanged_snapshot_view(fs, view):
    await populate(view)
    await fs.commit(view, "s1")
    name = await fs.commit(fs.snapshot_view("v@s1"), "same")
    same = fs.graph.snapshot(name)
    assert same.parent == fs.graph.snapshot("v@s1").id and same.delta == 0
    assert fs.snapshot_view("v@s1").immutable


@trio_test
async def test_a_refused_commit_of_a_snapshot_view_changes_nothing(fs, view):
    await populate(view)
    await fs.commit(view, "s1")
    vertices = set(fs.graph.vertices)
    snap = fs.snapshot_view("v@s1")
    for label in ("s1", "bad/label"):  # an existing name, an invalid name
        with pytest.raises((AlreadyExists, UsageError)):
            await fs.commit(snap, label)
    assert fs.graph.snapshot_drafts == {} and snap.immutable
    assert set(fs.graph.vertices) == vertices  # no empty draft left behind
    assert fs.stats()["totals"]["drafts"] == 1  # only the volume's


@trio_test
async def test_deleting_and_recreating_inherited_names(fs, view):
    await write_file(view, b"f", b"old")
    await write_file(view, b"g", b"keep")
    await fs.commit(view, "s1")
    old_ino = view.lookup(ROOT_INO, b"f").ino
    view.unlink(ROOT_INO, b"f")  # a whiteout over the inherited entry
    assert names(view) == [b"g"]
    f = await write_file(view, b"f", b"new")
    assert f.ino != old_ino
    view.rename(ROOT_INO, b"g", ROOT_INO, b"g2")
    await fs.commit(view, "s2")
    view.unlink(ROOT_INO, b"f")
    view.inodes.clear()
    for v in (view, fs.volume_view("v")):
        assert names(v) == [b"g2"]
    s1, s2 = fs.snapshot_view("v@s1"), fs.snapshot_view("v@s2")
    assert names(s1) == [b"f", b"g"] and await read_path(s1, b"f") == b"old"
    assert names(s2) == [b"f", b"g2"] and await read_path(s2, b"f") == b"new"
    assert await read_path(s2, b"g2") == b"keep"
    assert await close_and_fsck(fs, fs.repo.paths.root) == []


@trio_test
async def test_hard_link_inherited_from_a_snapshot(fs, view):
    f = await write_file(view, b"a", b"linked")
    view.link(f.ino, ROOT_INO, b"b")
    await fs.commit(view, "s1")
    view.inodes.clear()
    view.unlink(ROOT_INO, b"a")
    b = view.lookup(ROOT_INO, b"b")
    assert b.nlink == 1 and await read_all(view, b) == b"linked"
    assert fs.snapshot_view("v@s1").lookup(ROOT_INO, b"a").nlink == 2
    assert await close_and_fsck(fs, fs.repo.paths.root) == []


# -- clones ------------------------------------------------------------------------------------


@trio_test
async def test_clone_shows_the_snapshot_and_diverges(fs, view):
    content = await populate(view)
    await fs.commit(view, "s1")
    clone = fs.graph.create_volume("w", source="v@s1")
    assert (clone.delta, clone.parent) == (0, fs.graph.snapshot("v@s1").id)
    w = fs.volume_view("w")
    assert names(w) == [b"a", b"d", b"s"] and await read_path(w, b"a") == content["a"]
    await w.write(w.lookup(ROOT_INO, b"a"), 0, b"W")
    await write_file(w, b"only-in-w", b"w")
    await fs.flush_dirty()
    assert clone.delta == 2
    assert names(view) == [b"a", b"d", b"s"] and await read_path(view, b"a") == content["a"]
    assert await read_path(fs.snapshot_view("v@s1"), b"a") == content["a"]
    await fs.commit(w, "w1")
    assert fs.graph.snapshot("w@w1").parent == fs.graph.snapshot("v@s1").id
    assert await close_and_fsck(fs, fs.repo.paths.root) == []


# -- persistence -------------------------------------------------------------------------------


@trio_test
async def test_drafts_persist_across_close_and_reopen(fs, view):
    content = await populate(view)
    await fs.commit(view, "s1")
    f = await write_file(view, b"unflushed", pattern(CS + 1, seed=9))  # only in memory
    await view.setattr(f.ino, mode=0o640)
    snap = fs.snapshot_view("v@s1")
    await write_file(snap, b"snapdraft", b"in the draft of v@s1")
    volume_draft, snap_draft = fs.graph.volume_draft("v").id, snap.vertex_id
    fs = await reopen(fs)
    try:
        assert fs.graph.volume_draft("v").id == volume_draft
        assert fs.graph.snapshot_drafts == {fs.graph.snapshot("v@s1").id: snap_draft}
        vol = fs.volume_view("v")
        assert names(vol) == [b"a", b"d", b"s", b"unflushed"]
        assert await read_path(vol, b"unflushed") == pattern(CS + 1, seed=9)
        assert stat.S_IMODE(vol.lookup(ROOT_INO, b"unflushed").mode) == 0o640
        snap = fs.snapshot_view("v@s1")
        assert not snap.immutable
        assert await read_path(snap, b"snapdraft") == b"in the draft of v@s1"
        assert await read_path(snap, b"a") == content["a"]
        draft = fs.graph.volume_draft("v")
        assert (draft.delta, draft.referenced) == (2, 6)
        await fs.commit(snap, "branch")  # the draft keeps working after the reopen
        assert fs.snapshot_view("v@s1").immutable
    finally:
        problems = await close_and_fsck(fs, fs.repo.paths.root)
    assert problems == []


@trio_test
async def test_a_change_of_times_only_is_saved_by_the_next_flush_not_at_once(fs, view):
    """The kernel sends the mtime of its cached writes before every fsync: a row per
    SETATTR was an SQLite statement each. Times alone wait in memory for the next
    flush_inodes (group commit, commit, fsync), and a snapshot and a reopen keep them."""
    f = await write_file(view, b"f", b"data")
    d = view.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    await fs.sync()
    changes = fs.cat.db.total_changes
    await view.setattr(f.ino, atime_ns=1_000_000_123, mtime_ns=2_000_000_456)
    await view.setattr(d.ino, mtime_ns=3_000_000_789, ctime_ns=4_000_000_000)
    assert fs.cat.db.total_changes == changes  # nothing written yet
    assert {f.ino, d.ino} <= view.dirty_inodes
    assert (f.atime_ns, f.mtime_ns, d.mtime_ns, d.ctime_ns) == (
        1_000_000_123, 2_000_000_456, 3_000_000_789, 4_000_000_000)
    await view.setattr(f.ino, mode=0o600)  # anything else still saves the row at once
    assert fs.cat.db.total_changes == changes + 1
    await view.setattr(d.ino, atime_ns=5_000_000_000)
    await fs.commit(view, "s1")
    snap = fs.snapshot_view("v@s1")
    assert snap.lookup(ROOT_INO, b"d").atime_ns == 5_000_000_000
    assert snap.lookup(ROOT_INO, b"f").mtime_ns == 2_000_000_456
    await view.setattr(f.ino, mtime_ns=6_000_000_000)
    fs = await reopen(fs)
    try:
        vol = fs.volume_view("v")
        g, e = vol.lookup(ROOT_INO, b"f"), vol.lookup(ROOT_INO, b"d")
        assert (g.atime_ns, g.mtime_ns, stat.S_IMODE(g.mode)) == (1_000_000_123, 6_000_000_000,
                                                                  0o600)
        assert (e.mtime_ns, e.atime_ns) == (3_000_000_789, 5_000_000_000)
    finally:
        problems = await close_and_fsck(fs, fs.repo.paths.root)
    assert problems == []


@trio_test
async def test_orphans_of_a_dead_daemon_are_released_on_open(fs, view, repo_path):
    f = await write_file(view, b"tmp", pattern(2 * CS))
    await write_file(view, b"kept", b"kept")
    f.opens += 1
    view.unlink(ROOT_INO, b"tmp")  # unlinked while open ...
    await fs.sync()
    fs.repo.close()  # ... and the daemon dies before release()
    fs2 = Filesystem(Repository(repo_path))
    draft = fs2.graph.volume_draft("v")
    assert (draft.delta, draft.referenced) == (1, 1)
    assert_gone(fs2.volume_view("v"), f.ino)
    assert fs2.cat.execute("SELECT COUNT(*) FROM inodes WHERE nlink=0 AND mode!=0 AND "
                           "vertex=?", (draft.id,)).fetchone() == (0,)
    await fs2.gc(min_dead_ratio=0.0)  # the orphan's two chunks are garbage now
    assert fs2.cat.execute("SELECT COUNT(*) FROM chunks").fetchone() == (1,)
    assert await read_path(fs2.volume_view("v"), b"kept") == b"kept"
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_commit_while_a_file_is_unlinked_but_open_seals_it_as_deleted(fs, view,
                                                                           repo_path):
    """Found by a torture run (4 writers, commit and gc meanwhile): the snapshot kept the
    open-but-unlinked file's block rows while its chunks were only pinned, so gc freed
    them and fsck reported blocks pointing at missing chunks. The file must live on
    for its holder, in memory, and be gone from the snapshot."""
    old = await write_file(view, b"old", pattern(2 * CS, seed=1))  # also in s0
    await fs.commit(view, "s0")
    new = await write_file(view, b"new", pattern(3 * CS, seed=2))  # only in the draft
    await fs.sync()
    for node, name in ((old, b"old"), (new, b"new")):
        node.opens += 1
        view.unlink(ROOT_INO, name)
    await fs.commit(view, "s1")
    assert names(fs.snapshot_view("v@s1")) == []
    await view.write(old, 10, b"after the commit")  # still a working file
    want_old = bytearray(pattern(2 * CS, seed=1))
    want_old[10:26] = b"after the commit"
    assert await read_all(view, old) == bytes(want_old)
    assert await read_all(view, new) == pattern(3 * CS, seed=2)
    await fs.commit(view, "s2")
    for node in (old, new):
        node.opens -= 1
        view.drop_buffers(node)
        view._maybe_delete(node)
    await fs.sync()
    await fs.gc(min_dead_ratio=0.0)
    assert await read_path(fs.snapshot_view("v@s0"), b"old") == pattern(2 * CS, seed=1)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_crash_after_committing_an_open_unlinked_file_leaves_nothing_behind(
        fs, view, repo_path):
    f = await write_file(view, b"tmp", pattern(2 * CS, seed=3))
    await write_file(view, b"kept", b"kept")
    await fs.sync()  # its block rows are in the draft
    f.opens += 1
    view.unlink(ROOT_INO, b"tmp")
    await fs.commit(view, "s")
    fs.repo.close()  # the daemon dies with the file still open
    fs2 = Filesystem(Repository(repo_path))
    await fs2.gc(min_dead_ratio=0.0)
    assert fs2.cat.execute("SELECT COUNT(*) FROM chunks").fetchone() == (1,)
    assert names(fs2.snapshot_view("v@s")) == [b"kept"]
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_an_open_unlinked_file_rewritten_then_a_crash_leaves_no_dangling_rows(
        fs, view, repo_path):
    """Found by SIGKILL during tools/torture: an open, unlinked file rewritten after its
    unlink unpinned its old chunks while its block rows (kept in the draft until the last
    close) still named them; gc freed them, and fsck of the crashed repository reported
    blocks pointing at missing chunks."""
    f = await write_file(view, b"tmp", pattern(3 * CS, seed=5))
    await fs.sync()  # block rows in the draft
    f.opens += 1
    view.unlink(ROOT_INO, b"tmp")
    await view.write(f, 0, pattern(CS, seed=6))  # a new chunk 0 ...
    await view.truncate(f, 2 * CS)  # ... and chunk 2 gone
    await fs.sync()
    await fs.gc(min_dead_ratio=0.0)  # frees the unpinned old chunks 0 and 2
    assert await read_all(view, f) == pattern(CS, seed=6) + pattern(3 * CS, seed=5)[CS:2 * CS]
    await fs.sync()
    fs.repo.close()  # SIGKILL: no release
    from snapfs.fsck import fsck
    assert fsck(repo_path) == []  # the repository as the crash left it
    fs2 = Filesystem(Repository(repo_path))  # the next mount releases the orphan
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_commit_of_a_snapshot_draft_with_an_open_unlinked_file(fs, view, repo_path):
    await write_file(view, b"a", b"a")
    await fs.commit(view, "s0")
    snap = fs.snapshot_view("v@s0")
    f = await write_file(snap, b"tmp", pattern(2 * CS, seed=4))
    await fs.sync()
    f.opens += 1
    snap.unlink(ROOT_INO, b"tmp")
    await fs.commit(snap, "branch")
    assert await read_all(snap, f) == pattern(2 * CS, seed=4)
    f.opens -= 1
    snap.drop_buffers(f)
    snap._maybe_delete(f)
    await fs.gc(min_dead_ratio=0.0)
    assert names(fs.snapshot_view("v@branch")) == [b"a"]
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_mixed_workload_passes_fsck(fs, view, repo_path):
    await populate(view)
    await fs.commit(view, "s1")
    for i in range(5):
        await write_file(view, f"f{i}".encode(), pattern(i * CS + 7, seed=i))
    await view.setattr(view.lookup(ROOT_INO, b"f3").ino, size=CS + 1)
    view.rename(ROOT_INO, b"f4", ROOT_INO, b"f1")
    view.link(view.lookup(ROOT_INO, b"f2").ino, ROOT_INO, b"f2-link")
    await fs.commit(view, "s2")
    snap = fs.snapshot_view("v@s1")
    await write_file(snap, b"x", pattern(CS, seed=1))  # the same chunk as a/0
    fs.graph.create_volume("w", source="v@s2")
    w = fs.volume_view("w")
    w.unlink(ROOT_INO, b"f2")
    await w.setattr(w.lookup(ROOT_INO, b"a").ino, size=0)
    assert await close_and_fsck(fs, repo_path) == []


# -- write-back --------------------------------------------------------------------------------


@trio_test
async def test_throttle_keeps_dirty_memory_under_the_limit(fs, view):
    fs.dirty_limit = 4 * CS
    f = mkfile(view, b"f")
    for i in range(20):
        await view.write(f, i * CS, pattern(CS, seed=i))
        await fs.throttle()
        assert fs.dirty_bytes() <= fs.dirty_limit + CS
    assert await read_all(view, f) == b"".join(pattern(CS, seed=i) for i in range(20))


def _pack_bytes(fs) -> int:
    d = fs.repo.paths.packs
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))


@trio_test
async def test_open_file_stays_dirty_across_group_commits_until_it_expires(fs, view):
    f = mkfile(view, b"f")
    f.opens += 1
    expected = bytearray(pattern(3 * CS, seed=1))
    await view.write(f, 0, bytes(expected))
    await fs.sync(view, f)
    before = _pack_bytes(fs)
    for i in range(15):  # rewrites of dirty chunks: nothing is stored again and again
        off = (i % 3) * CS + 7 * i
        await view.write(f, off, b"x")
        expected[off] = ord("x")
        await fs.group_commit()
    assert sorted(f.buffers) == [0, 1, 2]
    assert _pack_bytes(fs) == before
    await fs.write_back(now=time.monotonic() + fs.dirty_expire - 1)
    assert sorted(f.buffers) == [0, 1, 2]
    await fs.write_back(now=time.monotonic() + fs.dirty_expire + 1)
    assert not f.buffers and not fs._dirty
    assert _pack_bytes(fs) > before
    assert await read_all(view, f) == expected


@trio_test
async def test_group_commit_stores_the_data_of_closed_files(fs, view):
    f = mkfile(view, b"f")
    f.opens += 1
    await view.write(f, 0, pattern(CS + 5, seed=2))
    await fs.group_commit()
    assert f.buffers
    f.opens -= 1  # closed (release)
    await fs.group_commit()
    assert not f.buffers and not fs._dirty
    assert view.block(f, 0) and view.block(f, 1)
    assert await read_all(view, f) == pattern(CS + 5, seed=2)


@trio_test
async def test_dirty_data_beyond_the_limit_is_stored_coldest_first(fs, view):
    """Coldest: written the fewest times, then dirtied first. A chunk written again and
    again stays in memory, where its next small write costs nothing but a copy."""
    fs.dirty_limit = 4 * CS
    f = mkfile(view, b"f")
    f.opens += 1
    order = [3, 0, 2, 1]
    for k, idx in enumerate(order):
        await view.write(f, idx * CS, pattern(CS, seed=idx))
        f.buffers[idx].born = 1000.0 + k  # first dirtied in this order
        await fs.throttle()
    for _ in range(3):  # chunk 3, the oldest, is the hottest
        await view.write(f, 3 * CS + 10, pattern(100, seed=3)[:100])
    assert sorted(f.buffers) == [0, 1, 2, 3]  # at the limit, not beyond: nothing stored
    await view.write(f, 4 * CS, pattern(CS, seed=4))
    await fs.throttle()
    # 1 chunk over the limit plus an eighth of it: two chunks written once, the oldest
    # of those first (0, then 2), are stored; the hot chunk 3 stays dirty
    assert sorted(f.buffers) == [1, 3, 4]
    assert view.block(f, 0) and view.block(f, 2) and not view.block(f, 3)
    expected = bytearray(b"".join(pattern(CS, seed=i) for i in range(5)))
    expected[3 * CS + 10:3 * CS + 110] = pattern(100, seed=3)[:100]
    assert await read_all(view, f) == expected


def test_default_dirty_limit_follows_the_machine():
    from snapfs.vfs.fs import MAX_DEFAULT_DIRTY_LIMIT, MIN_DIRTY_LIMIT, default_dirty_limit

    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_dirty_limit() == max(MIN_DIRTY_LIMIT, min(MAX_DEFAULT_DIRTY_LIMIT,
                                                             total // 10))


@trio_test
async def test_random_writes_to_an_open_file_respect_the_memory_bound(fs, view):
    import random

    fs.dirty_limit = 8 * CS
    f = mkfile(view, b"f")
    f.opens += 1
    rng = random.Random(5)
    expected = bytearray(40 * CS)
    for _ in range(400):
        off = rng.randrange(0, 40 * CS - 100)
        piece = rng.randbytes(rng.randrange(1, 2 * CS))[: 40 * CS - off]
        await view.write(f, off, piece)
        expected[off:off + len(piece)] = piece
        await fs.throttle()
        assert fs.dirty_bytes() <= fs.dirty_limit + 2 * CS
    assert await read_all(view, f) == expected[:f.size]
    await fs.sync(view, f)
    assert not f.buffers
    assert await read_all(view, f) == expected[:f.size]


@trio_test
async def test_chunks_filled_by_a_sequential_writer_are_stored_in_the_background(fs, view):
    import trio
    import trio.testing

    from snapfs.vfs.fs import COMPLETE_BATCH

    f = mkfile(view, b"f")
    f.opens += 1
    g = mkfile(view, b"g")  # written out of order: nothing to queue
    g.opens += 1
    n = COMPLETE_BATCH + 3
    content = pattern(n * CS + 100, seed=3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs._complete_worker)
        await trio.testing.wait_all_tasks_blocked()
        assert fs._complete_worker_running
        for off in range(CS // 2, n * CS, CS):  # g: second halves first, then first halves
            await view.write(g, off, content[off:off + CS // 2])
        for off in range(0, n * CS, CS):
            await view.write(g, off, content[off:off + CS // 2])
        for off in range(0, len(content), 1000):  # f: small appends, across chunk ends
            await view.write(f, off, content[off:off + 1000])
        for _ in range(200):
            if len(f.buffers) <= n + 1 - COMPLETE_BATCH:
                break
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert len(f.buffers) <= n + 1 - COMPLETE_BATCH and n in f.buffers  # the tail stays
    assert len(g.buffers) == n
    assert await read_all(view, f) == content
    await fs.write_back()  # the rest of f's complete chunks, not g's (open, young)
    assert sorted(f.buffers) == [n] and len(g.buffers) == n


@trio_test
async def test_a_sequential_writer_faster_than_the_store_stores_its_backlog(fs, view):
    """Complete chunks are never written again: a queue of them longer than
    COMPLETE_BACKLOG is stored by the writer itself (back-pressure), however high the
    dirty limit. Here the background worker is registered but never runs (it is slow)."""
    from snapfs.vfs.fs import COMPLETE_BACKLOG

    fs.dirty_limit = 1 << 40
    fs._complete_worker_running = True  # as if the worker were busy with an earlier batch
    f = mkfile(view, b"f")
    f.opens += 1
    n = COMPLETE_BACKLOG + 5
    content = pattern(n * CS, seed=8)
    stored_by_writer = 0
    for idx in range(n):
        await view.write(f, idx * CS, content[idx * CS:(idx + 1) * CS])
        if fs.over_limit():
            await fs.throttle()
            stored_by_writer += 1
        assert len(fs._complete) <= COMPLETE_BACKLOG
    assert stored_by_writer == 1
    assert len(f.buffers) == n - (COMPLETE_BACKLOG + 1)
    assert all(view.block(f, i) for i in range(COMPLETE_BACKLOG + 1))
    assert await read_all(view, f) == content
    fs._complete_worker_running = False


@trio_test
async def test_commit_and_fsync_capture_data_kept_dirty_in_memory(fs, view):
    f = mkfile(view, b"f")
    f.opens += 1
    await view.write(f, 0, pattern(2 * CS - 10, seed=7))
    await fs.group_commit()
    assert sorted(f.buffers) == [1]  # chunk 0 was complete: stored; chunk 1 only in memory
    await fs.commit(view, "s1")
    assert not f.buffers
    assert await read_path(fs.snapshot_view("v@s1"), b"f") == pattern(2 * CS - 10, seed=7)
    await view.write(f, 3, b"after")
    await fs.group_commit()
    assert f.buffers
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 1  # durable in the intent log (test_vfs_intent.py)
    fs.repo.close()  # a crash: the dirty chunk is lost, the log replayed
    fs2 = Filesystem(Repository(fs.repo.paths.root))
    assert await fs2.recover() == 1
    want = bytearray(pattern(2 * CS - 10, seed=7))
    want[3:8] = b"after"
    assert await read_path(fs2.volume_view("v"), b"f") == want


@trio_test
async def test_flush_dirty_of_one_view_leaves_the_others(fs, view):
    fs.graph.create_volume("w")
    w = fs.volume_view("w")
    a = await write_file(view, b"a", b"aaa")
    b = await write_file(w, b"b", b"bbb")
    await fs.flush_dirty(view)
    assert not a.buffers and b.buffers
    await fs.flush_dirty()
    assert not b.buffers


# -- durability ordering -----------------------------------------------------------------------


def _record(monkeypatch, fs) -> list[str]:
    """Record pack appends, pack syncs and catalog commits (that commit something)."""
    events: list[str] = []
    packs, cat = fs.repo.packs, fs.cat

    def wrap(obj, name, label, only_if=None):
        real = getattr(obj, name)

        def wrapper(*args, **kwargs):
            if only_if is None or only_if():
                events.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)

    wrap(packs, "sync", "pack-sync")
    real_append_many = packs.append_many  # append() goes through it too

    def append_many(*args, **kwargs):
        events.append("append")
        locs = real_append_many(*args, **kwargs)
        if kwargs.get("sync"):  # its lane's pack fdatasynced before it returned
            events.append("pack-sync")
        return locs

    monkeypatch.setattr(packs, "append_many", append_many)
    wrap(cat, "commit", "catalog-commit", only_if=lambda: cat._in_tx)
    return events


def _catalog_commits_after_unsynced_appends(events: list[str]) -> int:
    bad, unsynced = 0, False
    for e in events:
        if e == "append":
            unsynced = True
        elif e == "pack-sync":
            unsynced = False
        elif e == "catalog-commit" and unsynced:
            bad += 1
    return bad


@trio_test
async def test_fsync_makes_pack_data_durable_before_the_catalog_references_it(fs, view,
                                                                               monkeypatch):
    """docs/design.md: 'Pack data is always durable before the catalog that references it,
    so after a crash no block points at a torn record.'"""
    f = await write_file(view, b"f", pattern(2 * CS))
    events = _record(monkeypatch, fs)
    await fs.sync(view, f)
    assert "append" in events
    assert _catalog_commits_after_unsynced_appends(events) == 0, events


@trio_test
async def test_fsync_of_a_small_write_syncs_the_pack_once_then_commits_then_syncs_the_wal(
        fs, view, monkeypatch):
    """The fsync path of a database-like writer (4 KiB into a stored chunk): one append
    with its fdatasync (same worker call), the catalog commit, the WAL fsync; no
    second pack sync, and the WAL alone is fsynced (SQLite syncs the database file at
    its checkpoints). That is the path of an fsync the intent log cannot take (here:
    the log is off; test_vfs_intent.py has the other)."""
    fs.intent = None
    f = await write_file(view, b"f", pattern(4 * CS))
    await fs.sync(view, f)
    await view.write(f, CS + 4096, b"x" * 4096)
    events = _record(monkeypatch, fs)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(
        f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    real_sync_wal = fs.cat.sync_wal

    def sync_wal():
        events.append("wal-sync")
        real_sync_wal()

    monkeypatch.setattr(fs.cat, "sync_wal", sync_wal)
    await fs.sync(view, f)
    assert events == ["append", "pack-sync", "catalog-commit", "wal-sync"], events
    assert [os.path.basename(p) for p in synced] == ["meta.db-wal"]
    assert await read_all(view, f) == (pattern(4 * CS)[:CS + 4096] + b"x" * 4096
                                       + pattern(4 * CS)[CS + 8192:])


@trio_test
async def test_commit_makes_pack_data_durable_before_the_catalog_references_it(fs, view,
                                                                                monkeypatch):
    await write_file(view, b"f", pattern(2 * CS))
    events = _record(monkeypatch, fs)
    await fs.commit(view, "s1")
    assert "append" in events
    assert _catalog_commits_after_unsynced_appends(events) == 0, events


@trio_test
async def test_group_commit_makes_pack_data_durable_before_the_catalog_references_it(
        fs, view, monkeypatch):
    await write_file(view, b"f", pattern(2 * CS))
    events = _record(monkeypatch, fs)
    await fs.group_commit()
    assert "append" in events
    assert _catalog_commits_after_unsynced_appends(events) == 0, events


# -- deleting snapshots and volumes ---------------------------------------------------------


@trio_test
async def test_deleting_snapshots_keeps_every_other_tree_and_the_accounting(fs, view, repo_path):
    from unithelpers import assert_stats_match_oracle

    from snapfs.errors import NotFound, Refused

    await populate(view)
    await fs.commit(view, "s1")
    await view.write(view.lookup(ROOT_INO, b"a"), CS + 3, b"s2 change")
    view.unlink(view.lookup(ROOT_INO, b"d").ino, b"b")
    await write_file(view, b"c", pattern(CS, seed=7))
    await fs.commit(view, "s2")
    await view.write(view.lookup(ROOT_INO, b"c"), 0, b"s3")
    await fs.commit(view, "s3")
    branch = fs.snapshot_view("v@s2")
    await write_file(branch, b"br", pattern(CS, seed=1))  # the same chunk as a/0
    await fs.commit(branch, "br")
    await write_file(view, b"uncommitted", b"draft data")
    fs.graph.create_volume("w", source="v@s2")
    await write_file(fs.volume_view("w"), b"w-only", pattern(CS, seed=8))
    await fs.flush_dirty()
    expected = await all_trees(fs)
    assert_stats_match_oracle(fs)

    for name in ("v@s2", "v@s1", "v@br"):  # a middle vertex, then a root, then a leaf
        await fs.delete_snapshot(name)
        del expected[name]
        assert await all_trees(fs) == expected, name
        assert_stats_match_oracle(fs)
        with pytest.raises(NotFound):
            fs.graph.snapshot(name)
    # s3 and w (a clone of s2) were re-parented onto s1, then became roots
    assert fs.graph.snapshot("v@s3").parent is None
    assert fs.graph.volume_draft("w").parent is None

    # a snapshot whose directory holds uncommitted changes is kept unless forced
    s3 = fs.snapshot_view("v@s3")
    await write_file(s3, b"pending", b"x")
    with pytest.raises(Refused):
        await fs.delete_snapshot("v@s3")
    assert "v@s3" in fs.graph.by_name
    f = s3.lookup(ROOT_INO, b"pending")
    f.opens += 1
    with pytest.raises(Refused):  # an open file in it
        await fs.delete_snapshot("v@s3", force=True)
    f.opens -= 1
    await fs.delete_snapshot("v@s3", force=True)
    del expected["v@s3"]
    assert await all_trees(fs) == expected
    assert_stats_match_oracle(fs)

    fs = await reopen(fs)
    assert await all_trees(fs) == expected
    assert_stats_match_oracle(fs)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_deleting_a_volume(fs, view, repo_path):
    from unithelpers import assert_stats_match_oracle

    from snapfs.errors import Refused

    await populate(view)
    await fs.commit(view, "s1")
    await write_file(view, b"unsaved", b"x")
    with pytest.raises(Refused):
        await fs.delete_volume("v")
    await fs.delete_volume("v", force=True)
    assert "v" not in fs.graph.volumes
    assert [s.name for s in fs.graph.snapshots()] == ["v@s1"]  # its snapshots stay
    assert await read_path(fs.snapshot_view("v@s1"), b"a") == pattern(2 * CS + 10, seed=1)
    assert_stats_match_oracle(fs)
    fs.graph.create_volume("v", source="v@s1")  # the name can be used again
    assert names(fs.volume_view("v")) == [b"a", b"d", b"s"]
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_an_open_file_the_snapshot_lacks_survives_the_commit_of_its_directory(
        fs, view, repo_path):
    """Committing .snapshots/S makes the directory show S again. A file created and still
    open there is in no tree any more: it stays readable and writable (its chunks survive a
    collection) until closed, and it changes nothing under .snapshots/S."""
    await populate(view)
    await fs.commit(view, "s1")
    snap = fs.snapshot_view("v@s1")
    new = await write_file(snap, b"new", pattern(2 * CS, seed=4))
    new.opens += 1
    await fs.commit(snap, "b1")
    assert names(snap) == [b"a", b"d", b"s"] and snap.immutable  # S again
    assert await read_path(fs.snapshot_view("v@b1"), b"new") == pattern(2 * CS, seed=4)
    await fs.gc(min_dead_ratio=0.0)
    for cid in list(fs.chunks.cache._items):
        fs.chunks.cache.drop(cid)
    assert await read_all(snap, new) == pattern(2 * CS, seed=4)
    await snap.write(new, 2 * CS, b"more")
    await fs.flush_dirty()
    assert await read_all(snap, new) == pattern(2 * CS, seed=4) + b"more"
    assert names(snap) == [b"a", b"d", b"s"]
    new.opens -= 1  # release()
    await snap.flush_data(new)
    snap._maybe_delete(new)
    assert not fs.chunks.pinned
    await fs.sync()
    # nothing was changed under .snapshots/v@s1: deleting it needs no --force
    await fs.delete_snapshot("v@s1")
    assert await read_path(fs.snapshot_view("v@b1"), b"new") == pattern(2 * CS, seed=4)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_an_open_file_the_snapshot_has_shows_it_again_after_the_commit(
        fs, view, repo_path):
    """...and a file S has shows S's version and takes further writes into a new draft."""
    from snapfs.vfs.view import PinnedView as _Pinned

    content = await populate(view)
    await fs.commit(view, "s1")
    snap = fs.snapshot_view("v@s1")
    a = snap.lookup(ROOT_INO, b"a")
    a.opens += 1
    await snap.write(a, 0, b"PATCH")
    await fs.commit(snap, "b1")
    assert await read_all(snap, a) == content["a"]
    await snap.write(a, 0, b"AGAIN")
    await fs.flush_dirty()
    assert not snap.immutable
    assert await read_path(snap, b"a") == b"AGAIN" + content["a"][5:]
    assert await read_path(fs.snapshot_view("v@b1"), b"a") == b"PATCH" + content["a"][5:]
    assert await read_path(_Pinned(fs, fs.graph.snapshot("v@s1").id), b"a") == content["a"]
    a.opens -= 1
    await snap.flush_data(a)
    snap._maybe_delete(a)
    assert not fs.chunks.pinned
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_fsck_is_clean_after_deleting_the_snapshot_that_held_a_deleted_file(
        fs, view, repo_path):
    """s1 has file f; s2 deleted it; deleting s1 and collecting frees f's chunks. Nothing
    that is still live may point at them (fsck: 'points at missing chunk')."""
    await write_file(view, b"f", pattern(2 * CS, seed=11))
    await write_file(view, b"g", b"stays")
    await fs.commit(view, "s1")
    view.unlink(ROOT_INO, b"f")
    await fs.commit(view, "s2")
    await fs.delete_snapshot("v@s1")
    res = await fs.gc(min_dead_ratio=0.0)
    assert res["freed_chunks"] == 2
    assert names(fs.snapshot_view("v@s2")) == [b"g"]
    assert await close_and_fsck(fs, repo_path) == []


async def _garbage_in_a_pack(fs, view, dead: int, live: int, seed: int) -> None:
    """Files f (dead chunks) and g (live chunks, pattern seed + 1) in one pack; f is
    deleted with the only snapshot that held it, so the pack is mostly garbage."""
    await write_file(view, b"f", pattern(dead * CS, seed=seed))
    await write_file(view, b"g", pattern(live * CS, seed=seed + 1))
    await fs.commit(view, "s1")
    view.unlink(ROOT_INO, b"f")
    await fs.commit(view, "s2")
    await fs.delete_snapshot("v@s1")


@trio_test
async def test_compaction_also_moves_chunks_recorded_in_the_pack_meanwhile(fs, view,
                                                                            repo_path,
                                                                            caplog):
    """A store whose append reached the pack before its rotation records the location
    after compaction's first query (seen with tools/torture: "pack N still has live
    chunks after compaction; kept"). Compaction moves those in a second round and removes
    the pack, with no warning."""
    await _garbage_in_a_pack(fs, view, 4, 2, seed=21)
    g = view.lookup(ROOT_INO, b"g")
    late = view.block(g, 1)
    pack = fs.cat.execute("SELECT pack FROM chunks WHERE id=?", (late,)).fetchone()[0]
    real_move = fs.collector._move
    hidden: list = []

    async def move(batch):  # the first query did not see `late` yet
        if not hidden:
            hidden.append(True)
            batch = [(cid, loc) for cid, loc in batch if cid != late]
        await real_move(batch)

    fs.collector._move = move
    await fs.gc(min_dead_ratio=0.0)
    assert fs.cat.execute("SELECT COUNT(*) FROM chunks WHERE pack=?", (pack,)).fetchone() == (0,)
    assert "still has live chunks" not in caplog.text
    assert await read_all(view, g) == pattern(2 * CS, seed=22)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_two_collections_at_once_run_one_after_the_other(fs, view, repo_path):
    """The background pass collects after a deletion while `snapfs gc` asks for it too:
    both computed the same packs to compact, and the second failed removing a pack the
    first had removed (FileNotFoundError in the daemon's log, seen in CI)."""
    import trio

    await _garbage_in_a_pack(fs, view, 8, 3, seed=12)
    results = []

    async def collect():
        results.append(await fs.gc(min_dead_ratio=0.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        nursery.start_soon(collect)
    assert sorted(r["freed_chunks"] for r in results) == [0, 8]
    assert sum(r["removed_packs"] for r in results) >= 1
    assert await read_all(fs.snapshot_view("v@s2"), fs.snapshot_view("v@s2").lookup(
        ROOT_INO, b"g")) == pattern(3 * CS, seed=13)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_write_during_a_store_thaws_the_buffer_and_the_chunk_stays_exact(fs, view,
                                                                                repo_path):
    from snapfs.vfs.view import store_buffers

    f = mkfile(view, b"f")
    f.opens += 1
    original = pattern(CS, seed=1)
    await view.write(f, 0, original)
    frozen_data = f.buffers[0].data
    real = fs.chunks.put_many

    async def racing(payloads, sync=False):  # a write arrives while the store reads the buffer
        assert f.buffers[0].frozen == 1
        await view.write(f, 10, b"RACE")
        await view.write(f, CS - 2, b"ZZ")
        return await real(payloads, sync=sync)

    fs.chunks.put_many = racing
    await store_buffers(fs.chunks, [(view, f, 0)])
    fs.chunks.put_many = real
    chunk = view.block(f, 0)
    assert chunk and fs.chunks.get_sync(chunk) == original  # what was hashed was appended
    digest = fs.cat.execute("SELECT hash FROM chunks WHERE id=?", (chunk,)).fetchone()[0]
    assert digest == fs.chunks.identity(original)
    assert frozen_data == original and f.buffers[0].data is not frozen_data
    assert f.buffers[0].frozen == 0
    want = original[:10] + b"RACE" + original[14:CS - 2] + b"ZZ"
    assert await read_all(view, f) == want
    await fs.sync(view, f)
    assert not f.buffers and await read_all(view, f) == want
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_buffer_dropped_during_its_store_is_not_reused_meanwhile(fs, view):
    from snapfs.vfs.view import store_buffers

    f = mkfile(view, b"f")
    f.opens += 1
    await view.write(f, 0, pattern(CS, seed=2))
    data = f.buffers[0].data
    real = fs.chunks.put_many

    async def racing(payloads, sync=False):
        await view.truncate(f, 0)  # drops the buffer while the store reads it
        assert all(d is not data for d in fs.pool._free)
        g = mkfile(view, b"g")
        await view.write(g, 0, pattern(CS, seed=3))  # takes a pooled buffer: not that one
        return await real(payloads, sync=sync)

    fs.chunks.put_many = racing
    await store_buffers(fs.chunks, [(view, f, 0)])
    fs.chunks.put_many = real
    assert data == pattern(CS, seed=2) and not f.buffers and f.size == 0


@trio_test
async def test_an_idle_pool_gives_its_memory_back(fs, view, monkeypatch):
    """After a burst of writes the pool holds a buffer for every chunk that was dirty at
    once; once nothing has been dirty for POOL_IDLE_SECONDS it keeps IDLE_POOL_BYTES."""
    from snapfs.vfs import fs as fsmod

    monkeypatch.setattr(fsmod, "IDLE_POOL_BYTES", 2 * CS)
    f = mkfile(view, b"f")
    f.opens += 1
    await view.write(f, 0, pattern(10 * CS, seed=9))
    t0 = time.monotonic()
    await fs.trim_pool(t0)  # dirty: nothing to trim
    await fs.sync(view, f)
    assert fs.pool.out == 0 and len(fs.pool._free) >= 10
    await fs.trim_pool(t0 + fsmod.POOL_IDLE_SECONDS - 1)  # not idle for long enough
    assert len(fs.pool._free) >= 10
    await fs.trim_pool(t0 + fsmod.POOL_IDLE_SECONDS + 1)
    assert len(fs.pool._free) == 2
    await view.write(f, 0, b"again")  # the pool still serves writers
    assert await view.read(f, 0, 5) == b"again"


@trio_test
async def test_a_truncate_that_reaches_a_file_just_deleted_changes_nothing_stored(
        fs, view, repo_path):
    """Found by tools/torture ("negative reference count", EIO): truncate(path) resolves
    the path, another process unlinks the file (closed: it is deleted at once), then the
    kernel's SETATTR arrives for the inode it still holds. The deleted node had forgotten
    its blocks, so the truncate loaded them again from the snapshot's rows and took away
    references the deletion had already taken. Nor may attribute changes write the inode
    row back over its tombstone."""
    f = await write_file(view, b"f", pattern(3 * CS, seed=7))
    await write_file(view, b"kept", b"kept")
    await fs.commit(view, "s0")  # the blocks' rows are in the snapshot
    node = view.get(f.ino)  # what the kernel still holds
    view.unlink(ROOT_INO, b"f")
    await view.setattr(node.ino, size=CS + 10, mode=0o600)  # no AssertionError
    await view.setattr(node.ino, size=0)
    await fs.sync()
    row = fs.cat.execute("SELECT mode FROM inodes WHERE ino=? AND vertex=?",
                         (node.ino, view.draft_id())).fetchone()
    assert row == (0,)  # still a tombstone
    await fs.commit(view, "s1")
    assert names(fs.snapshot_view("v@s1")) == [b"kept"]
    assert await read_path(fs.snapshot_view("v@s0"), b"f") == pattern(3 * CS, seed=7)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_an_open_that_reaches_a_file_just_deleted_is_refused(fs, view):
    """The same race for open(2): the inode was deleted between the kernel's lookup and
    its OPEN. Opened, it would take writes that are never stored (and O_TRUNC would
    truncate it as above); the open is answered as if the unlink came first."""
    f = await write_file(view, b"f", b"data")
    await fs.commit(view, "s0")
    node = view.get(f.ino)
    view.unlink(ROOT_INO, b"f")
    with pytest.raises(FsError) as e:
        await view.open_file(node.ino)
    assert e.value.errno == errno.ENOENT
    assert node.opens == 0


@trio_test
async def test_a_commit_never_sees_half_a_truncate(fs, view, repo_path, monkeypatch):
    """A truncate that loads its partial last chunk from the disk (a worker thread: an
    await) used to drop the blocks past the new size first: a commit meanwhile sealed
    the file with its old size and zeros where those blocks were, a state the file
    never had. The snapshot must show it before or after the truncate."""
    data = pattern(4 * CS, seed=9)
    f = await write_file(view, b"f", data)
    await fs.sync()  # stored: the truncate must load chunk 1
    real = fs.chunks.read_into

    async def slow_read_into(cid, out):
        await trio.sleep(0.05)  # as a read that waits for the disk
        return await real(cid, out)

    monkeypatch.setattr(fs.chunks, "read_into", slow_read_into)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(view.truncate, f, CS + 100)
        await trio.sleep(0.01)  # the truncate is loading chunk 1
        await fs.commit(view, "mid")
    assert await read_path(fs.snapshot_view("v@mid"), b"f") in (data, data[:CS + 100])
    assert await read_all(view, f) == data[:CS + 100]
    await fs.commit(view, "after")
    assert await read_path(fs.snapshot_view("v@after"), b"f") == data[:CS + 100]
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_committed_size_never_claims_data_that_is_only_in_memory(fs, view,
                                                                          repo_path):
    """Found by hand (2026-11-27): a log file kept open was appended to, the kernel wrote
    its pages back, nothing fsynced it. A group commit saved its size while its last
    chunks were still dirty in memory; after SIGKILL the file had that size and was
    zeros from end to end. The row now ends where the stored data ends; a crash loses
    the unsynced tail, never turns it into zeros."""
    data = pattern(3 * CS + 500, seed=11)
    f = await write_file(view, b"log", data)
    f.opens += 1  # open: the write-back policy keeps its recent chunks in memory
    await view.flush_blocks(f, [0, 1])  # the first two are stored, 2 and 3 are not
    fs.flush_inodes()  # as a group commit does
    await fs.commit_catalog(durable=False)
    row = fs.cat.execute("SELECT size FROM inodes WHERE ino=? AND vertex=?",
                         (f.ino, view.draft_id())).fetchone()
    assert row == (2 * CS,)
    assert f.size == len(data) and await read_all(view, f) == data  # memory: all of it
    await view.flush_blocks(f, [2])  # one more stored: the next commit says more
    await fs.commit_catalog(durable=False)
    fs.repo.close()  # SIGKILL: chunk 3 was never stored
    fs2 = Filesystem(Repository(repo_path))
    assert await read_path(fs2.volume_view("v"), b"log") == data[:3 * CS]
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_compaction_commits_its_moves_only_when_every_append_is_durable(
        fs, view, repo_path, monkeypatch):
    """The collector synced the packs once, then committed after an await: a store that
    appended during that sync had its location committed before its record was
    durable. Every catalog commit now sees no pending append."""
    await _garbage_in_a_pack(fs, view, 4, 2, seed=31)
    packs = fs.repo.packs
    real_sync = packs.sync
    late = [1]

    def sync_while_a_store_appends():
        real_sync()
        if late[0]:  # another request's store lands during the sync's worker thread
            late[0] -= 1
            packs.append_many([fs.chunks._record(0, bytes(32), pattern(100, seed=32))])

    real_commit = fs.cat.commit
    pending_at_commit = []

    def commit():
        pending_at_commit.append(packs.unsynced)
        real_commit()

    monkeypatch.setattr(packs, "sync", sync_while_a_store_appends)
    monkeypatch.setattr(fs.cat, "commit", commit)
    res = await fs.gc(min_dead_ratio=0.0)
    assert res["removed_packs"] >= 1 and late == [0]
    assert pending_at_commit and not any(pending_at_commit)
    monkeypatch.undo()
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_crash_after_an_unsynced_truncate_never_brings_old_bytes_back(
        fs, view, repo_path):
    """Found by hand (2026-11-27): a file cut from 10,000 bytes to 100 while open (its cut
    last chunk stayed dirty in memory), a group commit, SIGKILL. The committed row said
    100 bytes over the old chunk, and a truncate up after the remount brought 9,900 old
    bytes back where zeros belong. The cut chunk is now stored by the truncate itself."""
    data = pattern(3 * CS + 1000, seed=13)
    f = await write_file(view, b"f", data)
    await fs.sync()
    f.opens += 1
    await view.truncate(f, CS + 100)
    fs.flush_inodes()  # a group commit
    await fs.commit_catalog(durable=False)
    fs.repo.close()  # SIGKILL with the file open
    fs2 = Filesystem(Repository(repo_path))
    v2 = fs2.volume_view("v")
    g = v2.lookup(ROOT_INO, b"f")
    size = g.size
    assert size in (CS + 100, len(data))  # the unsynced truncate made it, or not at all
    await v2.truncate(g, len(data))
    want = data if size == len(data) else data[:CS + 100] + bytes(len(data) - CS - 100)
    assert await read_all(v2, g) == want
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_a_store_that_ends_past_a_truncate_made_meanwhile_is_not_recorded(
        fs, view, repo_path, monkeypatch):
    """A store of the last chunk in flight while a truncate cuts it: recording the stored
    (uncut) chunk would put old bytes past the end into the block's row."""
    data = pattern(2 * CS, seed=14)
    f = await write_file(view, b"f", data)  # dirty, never stored
    real = fs.chunks.put_many

    async def slow_put_many(payloads, sync=False):
        await trio.sleep(0.05)
        return await real(payloads, sync=sync)

    monkeypatch.setattr(fs.chunks, "put_many", slow_put_many)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.write_back)  # one pass: the file is closed
        await trio.sleep(0.01)  # the store of both chunks is under way
        await view.truncate(f, CS + 10)
    monkeypatch.undo()
    fs.flush_inodes()  # a group commit, before the cut chunk is stored again
    await fs.commit_catalog(durable=False)
    (reach,) = fs.cat.execute(
        "SELECT c.raw_len FROM blocks b JOIN chunks c ON c.id = b.chunk "
        "WHERE b.ino=? AND b.idx=1", (f.ino,)).fetchone() or (0,)
    assert reach <= 10  # nothing of the old chunk 1 past the new end in the catalog
    await view.truncate(f, 2 * CS)
    assert await read_all(view, f) == data[:CS + 10] + bytes(CS - 10)
    assert await close_and_fsck(fs, repo_path) == []


class _Clock:
    """time.monotonic for fs.py, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pack_of(fs, view, name: bytes, idx: int = 0) -> int:
    cid = view.block(view.lookup(ROOT_INO, name), idx)
    return fs.cat.execute("SELECT pack FROM chunks WHERE id=?", (cid,)).fetchone()[0]


@trio_test
async def test_background_collection_compacts_only_when_the_mount_is_quiet(
        fs, view, repo_path, monkeypatch):
    """Chunks are freed on every pass and packs with next to nothing live removed; the
    others are compacted only after COMPACT_QUIET seconds without a request, and a
    request stops the compaction between two batches (consistent, finished by a later
    pass); a mount busy for COMPACT_MAX_DEFER compacts anyway."""
    import snapfs.vfs.fs as fsmod

    clock = _Clock()
    monkeypatch.setattr(fsmod.time, "monotonic", clock)
    requests = [0]
    quiet = fsmod.Quiet(lambda: requests[0])
    fs._compacted_at = clock.now
    await _garbage_in_a_pack(fs, view, 8, 3, seed=31)
    pack = _pack_of(fs, view, b"g")
    fs.repo.packs.rotate()
    await write_file(view, b"h", pattern(4 * CS, seed=33))
    await fs.flush_dirty()
    empty = _pack_of(fs, view, b"h")
    view.unlink(ROOT_INO, b"h")  # its pack: all garbage

    clock.now += 5  # a request 5 s ago: busy
    requests[0] += 1
    quiet.seconds()
    freed = fs.collector.freed_chunks
    await fs.background_gc(quiet)
    assert fs.collector.freed_chunks == freed + 8 + 4  # freed at once...
    assert empty != pack and empty not in fs.repo.packs.pack_ids()  # nothing to copy: gone
    assert pack in fs.repo.packs.pack_ids()  # ...but 3 of 11 chunks live: not compacted

    fs.collector.batch_bytes = CS  # one record a batch: a request can come in between
    real_move = fs.collector._move

    async def move_then_request(batch):
        await real_move(batch)
        requests[0] += 1

    fs.collector._move = move_then_request
    clock.now += fsmod.COMPACT_QUIET
    await fs.background_gc(quiet)
    assert pack in fs.repo.packs.pack_ids()  # stopped after the first batch
    left = fs.cat.execute("SELECT COUNT(*) FROM chunks WHERE pack=?", (pack,)).fetchone()[0]
    assert left == 2
    g = view.lookup(ROOT_INO, b"g")
    assert await read_all(view, g) == pattern(3 * CS, seed=32)

    clock.now += fsmod.COMPACT_MAX_DEFER  # busy all along, but overdue: compacts anyway
    await fs.background_gc(quiet)
    assert pack not in fs.repo.packs.pack_ids()
    assert fs._compacted_at == clock.now
    assert await read_all(view, g) == pattern(3 * CS, seed=32)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_background_collection_leaves_dirty_data_in_memory(fs, view, repo_path):
    """The write-back keeps an open file's dirty chunks in memory so that a chunk written
    many times is stored once; the background collection used to store them all every
    minute. `snapfs gc` still does, to free what they replaced."""
    import snapfs.vfs.fs as fsmod

    f = mkfile(view, b"f")
    f.opens += 1
    await view.write(f, 0, pattern(2 * CS, seed=41))
    await fs.background_gc(fsmod.Quiet(lambda: 0))
    assert len(f.buffers) == 2
    await fs.gc()
    assert not f.buffers
    assert await read_all(view, f) == pattern(2 * CS, seed=41)
    f.opens -= 1
    assert await close_and_fsck(fs, repo_path) == []
