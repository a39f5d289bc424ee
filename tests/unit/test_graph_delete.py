"""Deleting a snapshot in steps (snapfs/graph/delete.py through vfs/fs.py): the mount keeps
serving between the slices, nothing changes for anyone until the last step, and a crash
after any step leaves a catalog that fsck passes and the next mount finishes."""

from __future__ import annotations

import errno

import pytest
import trio
from unithelpers import (
    CHUNK,
    all_trees,
    assert_stats_match_oracle,
    close_and_fsck,
    pattern,
    trio_test,
    write_file,
)

from snapfs.errors import Refused
from snapfs.fsck import fsck
from snapfs.graph import delete
from snapfs.graph.delete import Deletion, pending_purges
from snapfs.repository import Repository
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem

ROW_TABLES = (*delete.ROW_TABLES, "vertex_chunks")


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    monkeypatch.setattr(delete, "SLICE", 3)


async def history(fs, view) -> None:
    """v@s1 <- v@s2 <- (v's draft, and a clone w): s2 is a middle snapshot with two
    children, one of them a draft that is written to."""
    for i in range(12):
        await write_file(view, b"f%d" % i, pattern(CHUNK + i, seed=i))
    view.setxattr(view.lookup(ROOT_INO, b"f0").ino, b"user.k", b"v")
    await fs.commit(view, "s1")
    for i in range(0, 12, 3):
        await view.write(view.lookup(ROOT_INO, b"f%d" % i), 5, b"s2")
    view.unlink(ROOT_INO, b"f1")
    await write_file(view, b"new", pattern(3 * CHUNK, seed=40))
    await fs.commit(view, "s2")
    fs.graph.create_volume("w", source="v@s2")
    await fs.flush_dirty()


def rows_of(fs, vid: int) -> int:
    return sum(fs.cat.execute(f"SELECT count(*) FROM {t} WHERE vertex=?", (vid,)).fetchone()[0]
               for t in ROW_TABLES)


@trio_test
async def test_other_requests_run_between_the_slices_of_a_deletion(fs, view, repo_path):
    await history(fs, view)
    expected = await all_trees(fs)
    del expected["v@s2"]
    s2 = fs.graph.snapshot("v@s2").id
    done = False
    written_meanwhile = 0

    async def delete_s2() -> None:
        nonlocal done
        await fs.delete_snapshot("v@s2")
        done = True

    async def write_meanwhile() -> None:
        nonlocal written_meanwhile
        i = 0
        while not done:
            # the draft is a child of the snapshot being deleted: its counts change
            data = pattern(CHUNK, seed=100 + i)
            await write_file(view, b"during%d" % i, data)
            await view.write(view.lookup(ROOT_INO, b"f3"), CHUNK - 2, b"%d" % i)
            await fs.flush_dirty()
            expected["volume v"][b"/during%d" % i] = data
            i += 1
            written_meanwhile += s2 in fs.graph.deleting  # between two slices
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete_s2)
        nursery.start_soon(write_meanwhile)
    assert written_meanwhile >= 1, "the deletion ran without letting other requests in"
    f3 = await all_trees(fs)
    expected["volume v"][b"/f3"] = f3["volume v"][b"/f3"]  # its last overwrite
    assert f3 == expected
    assert s2 not in fs.graph.vertices and rows_of(fs, s2) == 0
    assert pending_purges(fs.cat) == []
    assert_stats_match_oracle(fs)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_crash_during_the_slices_leaves_the_snapshot_whole(fs, view, repo_path):
    await history(fs, view)
    expected = await all_trees(fs)
    s2 = fs.graph.snapshot("v@s2").id
    deletion = Deletion(fs.graph, s2)
    steps = deletion.steps()
    for _ in range(6):  # some rows merged into both children, counts half read
        next(steps)
        assert await all_trees(fs) == expected
    await fs.commit_catalog(durable=True)
    fs.repo.close()  # the daemon dies here
    fs = Filesystem(Repository(repo_path))
    assert await all_trees(fs) == expected
    assert_stats_match_oracle(fs)
    await fs.delete_snapshot("v@s2")  # and it can be deleted after all
    del expected["v@s2"]
    assert await all_trees(fs) == expected
    assert_stats_match_oracle(fs)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_crash_before_the_purge_is_finished_by_the_next_mount(fs, view, repo_path):
    await history(fs, view)
    await fs.delete_snapshot("v@s1")  # s2 becomes the root: it holds every chunk now
    s2 = fs.graph.snapshot("v@s2").id
    await fs.delete_volume("w")  # the clone of s2: it would hold the chunks
    await view.truncate(view.lookup(ROOT_INO, b"new"), 0)  # only s2 has its chunks
    await fs.flush_dirty()
    expected = await all_trees(fs)
    del expected["v@s2"]
    deletion = Deletion(fs.graph, s2)
    for _ in deletion.steps():
        pass
    deletion.finish()
    await fs.commit_catalog(durable=True)
    assert pending_purges(fs.cat) == [s2] and rows_of(fs, s2) > 0
    # the collector frees s2's chunks before the purge (it would, racing it)
    assert fs.collector.free(fs.held_chunks()) > 0
    await fs.commit_catalog(durable=True)
    fs.repo.close()  # the daemon dies before purging
    # the rows left name freed chunks: nobody reads them, and fsck knows it
    assert fsck(repo_path) == []
    fs = Filesystem(Repository(repo_path))
    assert fs.gc_requested  # the first background pass finishes the purge
    await fs.gc()
    assert pending_purges(fs.cat) == [] and rows_of(fs, s2) == 0
    assert await all_trees(fs) == expected
    assert_stats_match_oracle(fs)
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_snapshot_being_deleted_gets_no_new_child(fs, view):
    await history(fs, view)
    s2 = fs.graph.snapshot("v@s2")
    deletion = Deletion(fs.graph, s2.id)
    snapshot_view = fs.snapshot_view("v@s2")
    for attempt in (
            lambda: fs.graph.create_volume("clone", source="v@s2"),
            lambda: fs.graph.snapshot_draft(s2.id, create=True),  # a write under .snapshots
            lambda: fs.pin(s2.id)):  # an export of it, or an import onto it
        with pytest.raises(Refused) as refused:
            attempt()
        assert refused.value.errno == errno.EBUSY
        assert "being deleted" in str(refused.value)
    with pytest.raises(Refused):
        await write_file(snapshot_view, b"x", b"data")
    deletion.abort()
    fs.graph.create_volume("clone", source="v@s2")
    await write_file(snapshot_view, b"x", b"data")
    assert_stats_match_oracle(fs)


@trio_test
async def test_a_purge_that_fails_after_a_deletion_is_left_to_the_collector(
        fs, view, repo_path, monkeypatch, caplog):
    """The deletion is durable before its rows are purged: a purge that meets a full disk
    does not make the deletion fail; the next collection purges."""
    import logging

    from snapfs.vfs import fs as fs_module

    await history(fs, view)
    s1 = fs.graph.snapshot("v@s1").id
    real_purge_steps = fs_module.purge_steps

    def full_disk(cat, vid):
        yield
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs_module, "purge_steps", full_disk)
    with caplog.at_level(logging.WARNING):
        await fs.delete_snapshot("v@s1")
    assert "v@s1" not in fs.graph.by_name and pending_purges(fs.cat) == [s1]
    assert any("No space left" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(fs_module, "purge_steps", real_purge_steps)
    await fs.gc()
    assert pending_purges(fs.cat) == [] and rows_of(fs, s1) == 0
    assert_stats_match_oracle(fs)
    assert await close_and_fsck(fs, repo_path) == []
