"""The snapshot graph on a real mount (issue 3): deleting snapshots anywhere, what the
figures say before and after, copies from old snapshots, and space that really goes
down on disk once the collector has run."""

import os
import shutil

import pytest
from fusehelpers import KiB

pytestmark = pytest.mark.snapfs_only

CHUNK_SIZE = "64K"
CH = 64 * KiB


def _snap(stats: dict, name: str) -> dict:
    return next(s for s in stats["snapshots"] if s["name"] == name)


def _write_random(path, nchunks: int) -> bytes:
    content = os.urandom(nchunks * CH)
    with open(path, "wb") as f:
        f.write(content)
    return content


def _pack_bytes(repo) -> int:
    packs = repo / "packs"
    return sum(os.path.getsize(packs / n) for n in os.listdir(packs))


def test_delete_then_gc_shrinks_the_packs_and_keeps_every_other_byte(fresh_mount):
    m = fresh_mount
    keep = _write_random(m.vol / "keep", 16)
    _write_random(m.vol / "big", 160)  # 10 MiB that only the first snapshot will hold
    m.commit(m.vol, "s1")
    os.unlink(m.vol / "big")
    m.commit(m.vol, "s2")
    stats = m.stats()
    assert _snap(stats, "vol@s1")["exclusive"] == 160
    reclaim = m.run_cli("-C", m.mnt, "stats", "--reclaim", "vol@s1").stdout
    assert "would free 160 chunks" in reclaim
    before = _pack_bytes(m.repo)
    os.rmdir(m.mnt / ".snapshots" / "vol@s1")  # like rmdir .zfs/snapshot/NAME
    assert not (m.mnt / ".snapshots" / "vol@s1").exists()
    m.run_cli("-C", m.mnt, "gc", "--min-dead-ratio", "0.1")
    after = _pack_bytes(m.repo)
    assert after < before - 9 * 1024 * 1024, (before, after)
    stats = m.stats()
    assert stats["totals"]["garbage_chunks"] == 0
    assert _snap(stats, "vol@s2")["parent"] is None  # the child of a deleted root is a root
    assert _snap(stats, "vol@s2")["delta"] == 16  # recomputed from its contents
    assert (m.mnt / ".snapshots" / "vol@s2" / "keep").read_bytes() == keep
    assert (m.vol / "keep").read_bytes() == keep


def test_deleting_a_middle_snapshot_reparents_and_overcounts_sum_delta(fresh_mount):
    m = fresh_mount
    _write_random(m.vol / "a", 4)
    m.commit(m.vol, "root")
    _write_random(m.vol / "b", 3)
    mid = m.commit(m.vol, "mid")
    (mid / "c").write_bytes(os.urandom(CH))  # a branch off mid
    m.commit(mid, "branch")
    _write_random(m.vol / "d", 2)
    m.commit(m.vol, "tip")
    m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@mid")
    stats = m.stats()
    tip, branch = _snap(stats, "vol@tip"), _snap(stats, "vol@branch")
    assert tip["parent"] == branch["parent"] == "vol@root"
    assert (tip["delta"], branch["delta"]) == (3 + 2, 3 + 1)  # b's chunks in both now
    totals = stats["totals"]
    assert totals["sum_delta_snapshots"] > totals["unique_chunks"]  # the known over-count
    assert totals["unique_chunks"] == 4 + 3 + 1 + 2


def test_copy_back_from_an_old_snapshot_keeps_unique_exact(fresh_mount):
    m = fresh_mount
    content = _write_random(m.vol / "f", 8)
    old = m.commit(m.vol, "old")
    os.unlink(m.vol / "f")
    m.commit(m.vol, "gone")
    shutil.copyfile(old / "f", m.vol / "f")  # the same chunks come back
    m.commit(m.vol, "back")
    stats = m.stats()
    assert _snap(stats, "vol@back")["delta"] == 8
    assert stats["totals"]["unique_chunks"] == 8  # deduplicated, counted once
    assert stats["totals"]["sum_delta_snapshots"] == 16  # re-introduction over-counts
    assert (m.vol / "f").read_bytes() == content


def test_deleting_the_head_of_a_volume_keeps_what_the_volume_shows(fresh_mount):
    m = fresh_mount
    content = _write_random(m.vol / "f", 3)
    m.commit(m.vol, "head")
    (m.vol / "new").write_bytes(b"draft change")
    m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@head")
    assert (m.vol / "f").read_bytes() == content
    assert (m.vol / "new").read_bytes() == b"draft change"
    vols = m.stats()["volumes"]["vol"]
    assert vols["head"] is None and vols["draft_delta"] == 3 + 1


def test_snapshot_delete_refuses_open_files_and_unsaved_drafts(fresh_mount):
    m = fresh_mount
    (m.vol / "f").write_bytes(b"x")
    snap = m.commit(m.vol, "s")
    with open(snap / "f", "rb"):
        r = m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@s", check=False)
        assert r.returncode != 0 and "open file" in r.stderr
    (snap / "draft-change").write_bytes(b"y")
    r = m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@s", check=False)
    assert r.returncode != 0 and "uncommitted" in r.stderr
    m.run_cli("-C", m.mnt, "snapshot", "delete", "vol@s", "--force")
    assert not snap.exists()


def test_volume_delete_and_clone(fresh_mount):
    m = fresh_mount
    (m.vol / "f").write_bytes(b"origin")
    m.commit(m.vol, "s")
    m.run_cli("-C", m.mnt, "volume", "create", "clone", "--from", "vol@s")
    assert (m.mnt / "clone" / "f").read_bytes() == b"origin"
    assert m.stats()["volumes"]["clone"]["draft_delta"] == 0  # a fresh clone adds nothing
    (m.mnt / "clone" / "g").write_bytes(b"unsaved")
    r = m.run_cli("-C", m.mnt, "volume", "delete", "clone", check=False)
    assert r.returncode != 0 and "uncommitted" in r.stderr
    m.run_cli("-C", m.mnt, "volume", "delete", "clone", "--force")
    assert not (m.mnt / "clone").exists()
    assert "clone" not in m.stats()["volumes"]
    assert (m.mnt / ".snapshots" / "vol@s" / "f").read_bytes() == b"origin"


def test_diff_lists_changes_and_chunks(fresh_mount):
    m = fresh_mount
    (m.vol / "a").write_bytes(b"a")
    (m.vol / "gone").write_bytes(b"g")
    _write_random(m.vol / "big", 4)
    m.commit(m.vol, "one")
    os.rename(m.vol / "a", m.vol / "renamed")
    os.unlink(m.vol / "gone")
    (m.vol / "new").write_bytes(b"n")
    with open(m.vol / "big", "r+b") as f:
        f.seek(CH)
        f.write(os.urandom(100))
    m.commit(m.vol, "two")
    out = m.run_cli("-C", m.mnt, "snapshot", "diff", "vol@one", "vol@two", "--chunks").stdout
    lines = set(out.splitlines())
    assert "R /renamed (from /a)" in lines
    assert "- /gone" in lines and "+ /new" in lines and "M /big" in lines
    assert "changed blocks: 1" in out
