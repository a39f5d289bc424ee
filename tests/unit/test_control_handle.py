"""Repository operations shared by the CLI and the daemon (snapfs/control.py handle())."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from unithelpers import CHUNK as CS
from unithelpers import pattern, read_path, trio_test, write_file

from snapfs import control
from snapfs.errors import AlreadyExists, NotFound, UsageError
from snapfs.types import ROOT_INO

A, B, C = pattern(CS, seed=1), pattern(CS, seed=2), pattern(CS, seed=3)


async def call(fs, **req):
    result = await control.handle(fs, req)
    json.dumps(result)  # every answer goes over the socket as JSON
    return result


@trio_test
async def test_volume_create_and_list(fs):
    assert (await call(fs, op="volume-list")) == {"volumes": []}
    res = await call(fs, op="volume-create", name="home")
    assert res["volume"] == "home" and res["draft"] == fs.graph.volumes["home"]
    await call(fs, op="volume-create", name="alpha")
    vols = (await call(fs, op="volume-list"))["volumes"]
    assert [v["name"] for v in vols] == ["alpha", "home"]
    assert vols[1] == {"name": "home", "head": None, "draft_delta": 0}
    with pytest.raises(AlreadyExists):
        await call(fs, op="volume-create", name="home")
    with pytest.raises(UsageError):
        await call(fs, op="volume-create", name="a@b")
    with pytest.raises(NotFound):
        await call(fs, op="volume-create", name="c", **{"from": "home@nothing"})
    # volume-create commits the catalog: visible to another connection at once
    import sqlite3

    con = sqlite3.connect(fs.repo.paths.db)
    try:
        assert {r[0] for r in con.execute("SELECT name FROM volumes")} == {"alpha", "home"}
    finally:
        con.close()


async def history(fs):
    """v: s1 = file f [A, B]; s2 = f [A, C]; a clone w of s1; the draft of v writes [A, C, B]."""
    await call(fs, op="volume-create", name="v")
    view = fs.volume_view("v")
    f = await write_file(view, b"f", A + B)
    await call(fs, op="commit", where="v", label="s1")
    await view.write(f, CS, C)
    await call(fs, op="commit", where="v/", label="s2")
    await call(fs, op="volume-create", name="w", **{"from": "v@s1"})
    await view.write(f, 2 * CS, B)
    return view


@trio_test
async def test_commit_where_and_snapshot_list(fs):
    await history(fs)
    snaps = (await call(fs, op="snapshot-list"))["snapshots"]
    assert [(s["name"], s["parent"], s["delta"], s["referenced"]) for s in snaps] == [
        ("v@s1", None, 2, 2), ("v@s2", "v@s1", 1, 2)]
    assert all(isinstance(s["created"], float) and s["id"] > 0 for s in snaps)
    res = await call(fs, op="commit", where="./v/sub/dir", label="s3")
    assert res == {"snapshot": "v@s3"}
    res = await call(fs, op="commit", where=".snapshots/v@s1", label="b1")
    assert res == {"snapshot": "v@b1"}
    assert fs.graph.snapshot("v@b1").parent == fs.graph.snapshot("v@s1").id
    vols = {v["name"]: v for v in (await call(fs, op="volume-list"))["volumes"]}
    assert vols["v"]["head"] == "v@s3" and vols["w"]["head"] == "v@s1"


@pytest.mark.parametrize("where", ["", ".", "/", ".snapshots", ".snapfs", ".snapfs/stats"])
@trio_test
async def test_commit_where_errors(fs, where):
    await call(fs, op="volume-create", name="v")
    with pytest.raises(UsageError):
        await call(fs, op="commit", where=where, label="x")


@trio_test
async def test_commit_of_unknown_things(fs):
    with pytest.raises(NotFound):
        await call(fs, op="commit", where="nothing", label="x")
    with pytest.raises(NotFound):
        await call(fs, op="commit", where=".snapshots/v@nothing", label="x")


@trio_test
async def test_stats_figures(fs):
    await history(fs)
    stats = await call(fs, op="stats")  # flushes the draft's dirty data first
    t = stats["totals"]
    # chunks: A, B, C. s1 holds {A, B}; s2 {A, C}; draft of v {A, B, C}; w (a clone of s1)
    assert stats["chunk_size"] == CS
    assert (t["snapshots"], t["drafts"], t["volumes"]) == (2, 2, 2)
    assert t["unique_chunks"] == 3 and t["unique_bytes"] == 3 * CS
    assert t["sum_delta"] == 2 + 1 + 1 + 0  # B counted twice: s1 and the draft of v
    assert t["sum_delta_snapshots"] == 3
    assert t["stored_chunks"] == 3 and t["garbage_chunks"] == 0
    assert t["stored_bytes"] > 3 * CS  # pack headers and record overheads
    per = {s["name"]: s for s in stats["snapshots"]}
    assert (per["v@s1"]["delta"], per["v@s1"]["referenced"], per["v@s1"]["exclusive"]) == (
        2, 2, 0)  # A and B live on elsewhere
    assert (per["v@s2"]["delta"], per["v@s2"]["exclusive"], per["v@s2"]["parent"]) == (
        1, 0, "v@s1")
    assert stats["volumes"]["v"]["head"] == "v@s2"
    assert stats["volumes"]["v"]["draft_delta"] == 1
    assert stats["volumes"]["w"]["draft_delta"] == 0
    assert stats["volumes"]["v"]["unique_chunks"] == 3


@trio_test
async def test_stats_reclaim(fs):
    view = await history(fs)
    view.unlink(ROOT_INO, b"f")  # now only the snapshots and w hold anything
    res = await call(fs, op="stats", reclaim="v@s2")
    assert res["reclaim"] == {"snapshots": ["v@s2"], "chunks": 1, "bytes": CS}  # C
    res = await call(fs, op="stats", reclaim="v@s1..v@s2")
    assert res["reclaim"]["chunks"] == 1  # w (a clone of s1) still holds A and B
    res = await call(fs, op="stats", reclaim="v@s1, v@s2")
    assert res["reclaim"]["chunks"] == 1
    with pytest.raises(UsageError, match="ancestor"):
        await call(fs, op="stats", reclaim="v@s2..v@s1")
    with pytest.raises(NotFound):
        await call(fs, op="stats", reclaim="v@nothing")


@trio_test
async def test_diff(fs):
    await call(fs, op="volume-create", name="v")
    view = fs.volume_view("v")
    await write_file(view, b"gone", b"1")
    await write_file(view, b"changed", b"2")
    await write_file(view, b"same", b"3")
    await call(fs, op="commit", where="v", label="a")
    view.unlink(ROOT_INO, b"gone")
    await view.write(view.lookup(ROOT_INO, b"changed"), 0, b"X")
    await write_file(view, b"new", b"4")
    await call(fs, op="commit", where="v", label="b")
    res = await call(fs, op="diff", a="v@a", b="v@b")
    assert res["a"] == "v@a" and res["b"] == "v@b"
    assert res["changes"] == [{"change": "modified", "path": "/changed"},
                              {"change": "removed", "path": "/gone"},
                              {"change": "added", "path": "/new"}]
    assert (await call(fs, op="diff", a="v@b", b="v@b"))["changes"] == []
    with pytest.raises(NotFound):
        await call(fs, op="diff", a="v@a", b="v@zzz")


@trio_test
async def test_unknown_operation(fs):
    with pytest.raises(UsageError, match="unknown operation"):
        await call(fs, op="explode")


@trio_test
async def test_an_export_runs_in_slices_and_pins_its_snapshot(fs, tmp_path, monkeypatch):
    """A long export gives other tasks (FUSE requests, control requests) turns between
    its slices, sends its progress lines to the callback, and keeps its snapshot from
    being deleted until it ends."""
    import trio

    from snapfs.errors import Refused

    monkeypatch.setattr(control, "SLICE_SECONDS", 0.0)  # a turn after every step
    await call(fs, op="volume-create", name="v")
    view = fs.volume_view("v")
    await write_file(view, b"f", b"".join(pattern(CS, seed=i) for i in range(1100)))
    await call(fs, op="commit", where="v", label="s")
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    lines: list[str] = []
    turns = {"while exporting": 0}
    refusals: list[str] = []
    exporting = True

    async def other_requests() -> None:
        while exporting:
            turns["while exporting"] += 1
            if lines and not refusals:  # half-way through: try to delete the snapshot
                with pytest.raises(Refused, match="being exported") as refused:
                    await call(fs, op="snapshot-delete", name="v@s")
                refusals.append(str(refused.value))
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_requests)
        res = await control.handle(fs, {"op": "export", "snapshot": "v@s", "since": None,
                                        "site": "far", "path": str(tmp_path / "b")},
                                   lines.append)
        exporting = False
    assert res["chunks"] == 1100
    assert lines == ["exported 512/1100 chunks" + lines[0].split("chunks", 1)[1],
                     "exported 1024/1100 chunks" + lines[1].split("chunks", 1)[1]]
    assert turns["while exporting"] > 1100 and refusals
    await call(fs, op="snapshot-delete", name="v@s")  # unpinned once it ended


@trio_test
async def test_an_export_walks_the_tree_between_other_requests(fs, tmp_path, monkeypatch):
    """Gathering the rows of a full or incremental bundle yields too, not only sending its
    chunks: walking a 50,000-file snapshot in one step held the mount for 1.3 s. The
    bundles still carry every row (imported at another site, the trees are equal)."""
    import trio

    from snapfs import exchange

    monkeypatch.setattr(control, "SLICE_SECONDS", 0.0)  # a turn after every step
    monkeypatch.setattr(exchange, "ROW_STEP", 8)
    await call(fs, op="volume-create", name="v")
    view = fs.volume_view("v")
    for i in range(300):
        await write_file(view, b"f%d" % i, b"%d" % i)
    await call(fs, op="commit", where="v", label="s1")
    for i in range(0, 300, 2):
        await view.write(view.lookup(ROOT_INO, b"f%d" % i), 0, b"changed %d" % i)
    await call(fs, op="commit", where="v", label="s2")
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    turns = 0
    before_chunks: list[int] = []
    real_get = fs.chunks.get_sync

    def get_sync(chunk):
        before_chunks.append(turns)
        return real_get(chunk)

    async def other_requests(done: trio.Event) -> None:
        nonlocal turns
        while not done.is_set():
            turns += 1
            await trio.sleep(0)

    monkeypatch.setattr(fs.chunks, "get_sync", get_sync)
    for name, since in (("s1", None), ("s2", "v@s1")):
        turns, done = 0, trio.Event()
        before_chunks.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_requests, done)
            res = await control.handle(fs, {"op": "export", "snapshot": f"v@{name}",
                                            "since": since, "site": "far",
                                            "path": str(tmp_path / name)})
            done.set()
        assert res["inodes"] >= 150 and before_chunks[0] >= 150 // 8, (name, before_chunks[:1])
    async with _site(tmp_path) as ofs:
        for name in ("s1", "s2"):
            await call(ofs, op="import", path=str(tmp_path / name))
        for name in ("s1", "s2"):
            here, there = fs.snapshot_view(f"v@{name}"), ofs.snapshot_view(f"v@{name}")
            for i in range(300):
                want = await read_path(here, b"f%d" % i)
                assert await read_path(there, b"f%d" % i) == want


@trio_test
async def test_a_failed_export_leaves_the_bundle_that_was_there(fs, tmp_path):
    """The bundle is written beside its path and renamed over it only when complete: a
    wrong site name (found after the output is opened) must not truncate a good bundle."""
    await call(fs, op="volume-create", name="v")
    await write_file(fs.volume_view("v"), b"f", A)
    await call(fs, op="commit", where="v", label="s")
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    out = tmp_path / "out.bundle"
    out.write_bytes(b"an earlier, good bundle")
    with pytest.raises(NotFound):
        await call(fs, op="export", snapshot="v@s", site="nowhere", path=str(out))
    assert out.read_bytes() == b"an earlier, good bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.key", "out.bundle", "repo"]
    res = await call(fs, op="export", snapshot="v@s", site="far", path=str(out))
    assert out.stat().st_size == res["bundle_bytes"]
    assert out.stat().st_mode & 0o777 == 0o644 & ~_umask()
    null = await call(fs, op="export", snapshot="v@s", site="far", path="/dev/null")
    assert null["bundle_bytes"] == res["bundle_bytes"]
    link = tmp_path / "link.bundle"
    link.symlink_to(out)
    out.write_bytes(b"")
    await call(fs, op="export", snapshot="v@s", site="far", path=str(link))
    assert link.is_symlink() and out.stat().st_size == res["bundle_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "far.key", "link.bundle", "out.bundle", "repo"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@trio_test
async def test_an_import_stores_chunks_between_other_requests_and_adds_the_snapshot_at_once(
        fs, tmp_path, monkeypatch):
    """Import: the chunks go in batches through put_many (other tasks run between them),
    the snapshot appears only with all its rows, and a failure after the chunks were
    stored (here: the name taken meanwhile) leaves no trace but unreferenced chunks,
    none of them still pinned; the same bundle imports once the name is free again."""
    import trio

    from snapfs import exchange
    from snapfs.errors import AlreadyExists
    data, bundle = await _exported(fs, tmp_path, 300)
    async with _site(tmp_path) as ofs:
        monkeypatch.setattr(exchange, "IMPORT_BATCH", 16)
        real_put_many = ofs.chunks.put_many
        batches = []

        async def put_many(payloads, sync=False):
            if len(payloads) > 1:  # the import's batches, not the commit below
                batches.append(len(payloads))
            if len(batches) == 3 and "v" not in ofs.graph.volumes:
                # meanwhile, a snapshot of the same name appears
                await call(ofs, op="volume-create", name="v")
                await write_file(ofs.volume_view("v"), b"x", b"other")
                await call(ofs, op="commit", where="v", label="s")
            return await real_put_many(payloads, sync=sync)

        monkeypatch.setattr(ofs.chunks, "put_many", put_many)
        with pytest.raises(AlreadyExists, match="v@s"):
            await call(ofs, op="import", path=str(bundle))
        assert batches[:3] == [16, 16, 16] and sum(batches) == 300
        assert not ofs.chunks.pinned
        assert [v.name for v in ofs.graph.snapshots()] == ["v@s"]
        assert not ofs.cat.execute("SELECT 1 FROM imports").fetchone()

        await call(ofs, op="snapshot-delete", name="v@s")
        batches.clear()
        turns = 0
        importing = True

        async def other_requests() -> None:
            nonlocal turns
            while importing:
                turns += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_requests)
            res = await call(ofs, op="import", path=str(bundle))
            importing = False
        assert res["snapshot"] == "v@s" and res["chunks_received"] == 300
        assert turns >= len(batches) == 19 and not ofs.chunks.pinned
        snap = ofs.snapshot_view("v@s")
        node = snap.lookup(ROOT_INO, b"f")
        assert await snap.read(node, 0, len(data) + 1) == data
        again = await call(ofs, op="import", path=str(bundle))
        assert again == {"snapshot": "v@s", "already_imported": True}
        await call(ofs, op="snapshot-delete", name="v@s")  # deleted since: imports again
        again = await call(ofs, op="import", path=str(bundle))
        assert again["snapshot"] == "v@s" and "already_imported" not in again
        snap = ofs.snapshot_view("v@s")
        assert await snap.read(snap.lookup(ROOT_INO, b"f"), 0, len(data) + 1) == data


@contextlib.asynccontextmanager
async def _site(tmp_path):
    """A second repository (tmp_path/other) holding the key of site far (_exported)."""
    from snapfs.repository import Repository
    from snapfs.store.repo import init_repository
    from snapfs.vfs.fs import Filesystem

    init_repository(str(tmp_path / "other"), CS)
    other = Repository(str(tmp_path / "other"), holder="unit test")
    try:
        ofs = Filesystem(other)
        await call(ofs, op="site-key-import", site="far", path=str(tmp_path / "far.key"))
        yield ofs
    finally:
        other.close()


async def _exported(fs, tmp_path, chunks: int) -> tuple[bytes, object]:
    """Volume v with one file of `chunks` chunks, committed as v@s and exported for site
    far (key in tmp_path/far.key): the file's data and the bundle's path."""
    await call(fs, op="volume-create", name="v")
    data = b"".join(pattern(CS, seed=i) for i in range(chunks))
    await write_file(fs.volume_view("v"), b"f", data)
    await call(fs, op="commit", where="v", label="s")
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    bundle = tmp_path / "b.bundle"
    await call(fs, op="export", snapshot="v@s", site="far", path=str(bundle))
    return data, bundle


@trio_test
async def test_two_imports_of_one_bundle_at_once_add_it_once(fs, tmp_path):
    """Both requests verify and store chunks concurrently; the second to reach the
    atomic step finds the bundle imported and says so, as a repeated import does."""
    import trio

    _data, bundle = await _exported(fs, tmp_path, 100)
    async with _site(tmp_path) as ofs:
        results = []

        async def one() -> None:
            results.append(await call(ofs, op="import", path=str(bundle)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
        assert sorted(r.get("already_imported", False) for r in results) == [False, True]
        assert [v.name for v in ofs.graph.snapshots()] == ["v@s"]
        assert not ofs.chunks.pinned


def _committed_rows(fs, vid: int) -> int:
    """Rows of vertex vid that a crash now would leave: what another connection sees."""
    import sqlite3

    con = sqlite3.connect(fs.repo.paths.db)
    try:
        return sum(con.execute(f"SELECT count(*) FROM {t} WHERE vertex=?", (vid,)).fetchone()[0]
                   for t in ("inodes", "dirents", "blocks", "xattrs", "vertex_chunks"))
    finally:
        con.close()


def _committed_purge_list(fs) -> list[int]:
    import sqlite3

    con = sqlite3.connect(fs.repo.paths.db)
    try:
        row = con.execute("SELECT value FROM meta WHERE key='purge'").fetchone()
        return [int(p) for p in str(row[0]).split(",") if p] if row else []
    finally:
        con.close()


@trio_test
async def test_an_import_writes_its_rows_between_other_requests_and_holds_up_no_commit(
        fs, tmp_path, monkeypatch):
    """The rows of an imported snapshot go in slices, with other requests served in
    between (a large import held the mount for seconds when they went in one piece); a
    commit asked for meanwhile (an fsync, the group commit) goes through at once. What it
    makes durable of the import's rows is listed for purging: a crash at that moment
    leaves a repository that fsck passes, without the snapshot, and whose next mount
    deletes those rows."""
    import shutil

    import trio

    from snapfs import exchange
    from snapfs.fsck import fsck
    from snapfs.repository import Repository
    from snapfs.vfs.fs import Filesystem

    data, bundle = await _exported(fs, tmp_path, 100)
    crashed = str(tmp_path / "crashed")
    async with _site(tmp_path) as ofs:
        monkeypatch.setattr(exchange, "IMPORT_SLICE", 10)
        await call(ofs, op="volume-create", name="w")
        real_write_rows, real_count_trees = exchange._write_rows, exchange._count_trees
        seen: dict[str, object] = {}
        turns = 0

        async def write_rows(fs_, vid, parent, rows, ids):
            seen["vid"], before = vid, turns
            await real_write_rows(fs_, vid, parent, rows, ids)
            seen["turns"] = turns - before

        async def count_trees(fs_, vid, parent):
            await trio.sleep(0.3)  # long enough for the commit below to happen
            seen["committed"] = _committed_rows(ofs, vid)
            seen["listed"] = _committed_purge_list(ofs)
            shutil.copytree(ofs.repo.paths.root, crashed)  # what a crash now leaves
            return await real_count_trees(fs_, vid, parent)

        async def other_requests() -> None:
            nonlocal turns
            while "done" not in seen:
                turns += 1
                await trio.sleep(0)

        async def commit_meanwhile() -> None:
            while "turns" not in seen:
                await trio.sleep(0)
            await write_file(ofs.volume_view("w"), b"g", b"written during the import")
            await ofs.flush_dirty()
            await ofs.commit_catalog(durable=True)
            seen["commit saw"] = [v.name for v in ofs.graph.snapshots()]

        monkeypatch.setattr(exchange, "_write_rows", write_rows)
        monkeypatch.setattr(exchange, "_count_trees", count_trees)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_requests)
            nursery.start_soon(commit_meanwhile)
            res = await call(ofs, op="import", path=str(bundle))
            seen["done"] = True
        assert res["snapshot"] == "v@s"
        assert seen["turns"] >= 10  # 100 block rows, 10 a slice
        assert seen["commit saw"] == []  # it did not wait for the import
        assert seen["committed"] > 100 and seen["vid"] in seen["listed"]
        vid = ofs.graph.by_name["v@s"]
        assert vid == seen["vid"] and _committed_rows(ofs, vid) > 100
        assert vid not in ofs.cat.meta_get("purge", "").split(",")
        snap = ofs.snapshot_view("v@s")
        assert await snap.read(snap.lookup(ROOT_INO, b"f"), 0, len(data) + 1) == data
        w = ofs.volume_view("w")
        assert await w.read(w.lookup(ROOT_INO, b"g"), 0, 100) == b"written during the import"

    assert fsck(crashed) == []
    after = Filesystem(Repository(crashed, holder="unit test"))
    try:
        assert not after.graph.snapshots() and after.gc_requested
        await after.gc()  # the first background pass
        assert _committed_rows(after, seen["vid"]) == 0 and not after.cat.meta_get("purge")
        w = after.volume_view("w")
        assert await w.read(w.lookup(ROOT_INO, b"g"), 0, 100) == b"written during the import"
        await after.sync()
    finally:
        after.repo.close()
    assert fsck(crashed) == []


@trio_test
async def test_an_import_that_fails_half_way_keeps_what_others_wrote_meanwhile(
        fs, tmp_path, monkeypatch):
    """A failure after some of the snapshot's rows were written leaves them to the purge,
    which takes them out, but not the writes other requests made between the slices
    (they share the open transaction: a rollback would have lost them)."""
    from snapfs import exchange
    from snapfs.fsck import fsck

    _data, bundle = await _exported(fs, tmp_path, 50)
    async with _site(tmp_path) as ofs:
        monkeypatch.setattr(exchange, "IMPORT_SLICE", 10)
        await call(ofs, op="volume-create", name="w")
        vids = []

        async def count_trees(fs_, vid, parent):
            vids.append(vid)
            await write_file(ofs.volume_view("w"), b"g", b"kept")  # another request
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(exchange, "_count_trees", count_trees)
        with pytest.raises(OSError, match="No space"):
            await call(ofs, op="import", path=str(bundle))
        assert not ofs.graph.snapshots() and not ofs.chunks.pinned
        assert ofs.gc_requested  # the next background pass deletes the rows
        await ofs.purge()
        assert not ofs.cat.meta_get("purge")
        for table in ("inodes", "dirents", "blocks", "xattrs", "vertex_chunks"):
            assert not ofs.cat.execute(f"SELECT 1 FROM {table} WHERE vertex=?",
                                       (vids[0],)).fetchone()
        w = ofs.volume_view("w")
        assert await w.read(w.lookup(ROOT_INO, b"g"), 0, 100) == b"kept"
        await ofs.sync()
    assert fsck(str(tmp_path / "other")) == []


@trio_test
async def test_the_base_of_an_incremental_import_cannot_be_deleted_during_it(
        fs, tmp_path, monkeypatch):
    """Between the slices the import reads its base (blocks it already has): deleting
    the base is refused until the import is done, then allowed."""
    from snapfs import exchange
    from snapfs.errors import Refused

    await history(fs)  # v@s2 changes one chunk of v@s1
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    full, inc = tmp_path / "full.bundle", tmp_path / "inc.bundle"
    await call(fs, op="export", snapshot="v@s1", site="far", path=str(full))
    await call(fs, op="export", snapshot="v@s2", since="v@s1", site="far", path=str(inc))
    async with _site(tmp_path) as ofs:
        await call(ofs, op="import", path=str(full))
        real_count_trees = exchange._count_trees
        refused = []

        async def count_trees(fs_, vid, parent):
            with pytest.raises(Refused, match="imported onto") as e:
                await call(ofs, op="snapshot-delete", name="v@s1")
            refused.append(e.value)
            return await real_count_trees(fs_, vid, parent)

        monkeypatch.setattr(exchange, "_count_trees", count_trees)
        res = await call(ofs, op="import", path=str(inc))
        assert res["snapshot"] == "v@s2" and res["parent"] == "v@s1" and refused
        await call(ofs, op="snapshot-delete", name="v@s1")
        assert [v.name for v in ofs.graph.snapshots()] == ["v@s2"]


@trio_test
async def test_the_daemon_keeps_a_waiting_client_alive_during_a_long_request(
        fs, tmp_path, monkeypatch):
    """A request that takes longer than the client's timeout per line (600 s in the CLI;
    a gc of a big repository) is answered, because the daemon sends keep-alive lines
    meanwhile; they are not shown as progress. A client that stops waiting costs the
    daemon nothing."""
    import trio

    async def slow_handle(fs_, req, progress=None):
        await trio.sleep(0.6)
        return {"slept": req["op"]}

    monkeypatch.setattr(control, "KEEPALIVE_SECONDS", 0.05)
    monkeypatch.setattr(control, "handle", slow_handle)
    sock = str(tmp_path / "s.sock")
    shown: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve, fs, sock)
        while not os.path.exists(sock):
            await trio.sleep(0.01)
        res = await trio.to_thread.run_sync(
            lambda: control.call(sock, {"op": "long"}, timeout=0.3, progress=shown.append))
        assert res == {"slept": "long"} and shown == []
        monkeypatch.setattr(control, "KEEPALIVE_SECONDS", 10.0)
        with pytest.raises(TimeoutError):
            await trio.to_thread.run_sync(
                lambda: control.call(sock, {"op": "long"}, timeout=0.3))
        await trio.sleep(0.5)  # the daemon answers into the closed socket: no harm
        res = await trio.to_thread.run_sync(
            lambda: control.call(sock, {"op": "again"}, timeout=5))
        assert res == {"slept": "again"}
        nursery.cancel_scope.cancel()


@trio_test
async def test_an_incremental_export_pins_its_base_too(fs, tmp_path):
    """Between the slices of an incremental export its base is read too (where a block
    it already has lies there): deleting either snapshot is refused until the export
    ends, even when it ends early (the generator closed)."""
    import io

    from snapfs import exchange
    from snapfs.errors import Refused

    await history(fs)  # v@s2 changes one chunk of v@s1
    await call(fs, op="site-key-create", site="far", path=str(tmp_path / "far.key"))
    steps = exchange.export_steps(fs, "v@s2", "v@s1", "far", io.BytesIO())
    next(steps)
    for name in ("v@s1", "v@s2"):
        with pytest.raises(Refused, match="being exported"):
            await call(fs, op="snapshot-delete", name=name)
    steps.close()
    await call(fs, op="snapshot-delete", name="v@s1")
    await call(fs, op="snapshot-delete", name="v@s2")
