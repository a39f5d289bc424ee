"""fsync through the intent log (snapfs/store/intentlog.py, Filesystem._sync_by_log): the
record format, and what a crash leaves, without the kernel. A "crash" closes the
repository without storing the dirty buffers (Repository.close commits the open catalog
transaction, as a group commit before a SIGKILL would); the next opening replays."""

from __future__ import annotations

import os

import pytest
import trio
from unithelpers import CHUNK as CS
from unithelpers import close_and_fsck, pattern, read_all, read_path, trio_test, write_file

from snapfs.crypto.aead import Aead
from snapfs.errors import IntegrityError
from snapfs.repository import Repository
from snapfs.store.intentlog import IntentLog, IntentRecord, decode, encode
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import INTENT_RECORD_MAX, Filesystem

PAGE = 4096


def record(seq: int, epoch: int = 0, **kw) -> IntentRecord:
    fields = {"vertex": 3, "ino": 7, "size": 9000, "mtime_ns": 5, "ctime_ns": 6,
              "extents": ((0, b"a" * 4096), (8192, b"tail"))}
    fields.update(kw)
    return IntentRecord(seq, epoch, **fields)


# -- the format -------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True])
def test_records_read_back_in_order_and_a_torn_tail_is_dropped(encrypted):
    aead = Aead(os.urandom(32)) if encrypted else None
    recs = [record(1), record(2, extents=()), record(3, epoch=1, size=0)]
    blob = b"".join(encode(r, aead) for r in recs)
    assert list(decode(blob, aead)) == recs
    for cut in (1, 20, len(blob) - len(encode(recs[2], aead)) + 40, len(blob) - 1):
        assert list(decode(blob[:cut], aead)) == [r for r in recs
                                                   if len(b"".join(encode(x, aead) for x in
                                                                   recs[:r.seq])) <= cut]


def test_a_damaged_record_ends_the_log_and_a_wrong_key_is_an_error():
    recs = [record(1), record(2)]
    blob = bytearray(b"".join(encode(r, None) for r in recs))
    first = len(encode(recs[0], None))
    blob[first + 40] ^= 1  # inside the second record's body: its checksum fails
    assert list(decode(bytes(blob), None)) == recs[:1]
    sealed = encode(recs[0], Aead(os.urandom(32)))
    with pytest.raises(IntegrityError):
        list(decode(sealed, Aead(os.urandom(32))))


def test_the_log_s_name_is_made_durable_when_it_is_created(tmp_path, monkeypatch):
    """fdatasync of a new file does not make its directory entry durable (POSIX): the
    first append after creating the log syncs the directory, later ones do not."""
    import snapfs.store.intentlog as intentlog_module

    synced = []
    monkeypatch.setattr(intentlog_module, "fsync_dir", synced.append)
    log = IntentLog(str(tmp_path / "intent.log"), None)
    log.append(encode(record(1), None))
    log.append(encode(record(2), None))
    assert synced == [str(tmp_path)]
    IntentLog(log.path, None).append(encode(record(3), None))  # exists: no sync
    assert synced == [str(tmp_path)]


def test_opening_a_log_with_records_reads_the_file_once_for_recovery(tmp_path, monkeypatch):
    path = str(tmp_path / "intent.log")
    log = IntentLog(path, None)
    recs = [record(1), record(2)]
    for r in recs:
        log.append(encode(r, None))
    log.close()
    reads = []
    real = IntentLog._read
    monkeypatch.setattr(IntentLog, "_read", lambda self: reads.append(1) or real(self))
    again = IntentLog(path, None)
    assert again.read() == recs and len(reads) == 1  # the opening's read serves recovery
    again.append(encode(record(3), None))
    assert again.read() == [*recs, record(3)] and len(reads) == 2  # then from the file
    again.close()


def test_a_failed_append_leaves_no_torn_record(tmp_path, monkeypatch):
    log = IntentLog(str(tmp_path / "intent.log"), None)
    log.append(encode(record(1), None))
    size = log.end

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", no_space)
    with pytest.raises(OSError):
        log.append(encode(record(2), None))
    monkeypatch.undo()
    assert log.end == size  # the next record goes where the failed one was
    log.append(encode(record(3), None))
    assert [r.seq for r in log.read()] == [1, 3]
    assert [r.seq for r in IntentLog(log.path, None).read()] == [1, 3]


def test_the_log_grows_only_beside_the_catalogs_reserve(tmp_path):
    """Writing zeros ahead takes disk space: it is checked like a pack append, and a
    refusal leaves the log as it was (the fsync then stores, and reports ENOSPC if
    that fails too)."""
    room = [0]

    def check_space(n):
        if n > room[0]:
            raise OSError(28, "No space left on device")

    log = IntentLog(str(tmp_path / "intent.log"), None, check_space)
    with pytest.raises(OSError):
        log.append(encode(record(1), None))
    assert log.end == 0 and log.allocated == 0
    room[0] = 1 << 30
    log.append(encode(record(2), None))
    assert [r.seq for r in log.read()] == [2]


def test_an_emptied_log_keeps_its_blocks_and_old_records_end_or_are_skipped(tmp_path):
    """Records overwrite zeros written ahead (no size change to commit at each
    fdatasync); emptying moves the end back, and what follows the new records is either
    unreadable or older records (whose epoch the catalog has passed)."""
    log = IntentLog(str(tmp_path / "intent.log"), None)
    for k in range(1, 4):
        log.append(encode(record(k, epoch=0), None))
    allocated = os.path.getsize(log.path)
    assert allocated > log.end
    log.reset()
    assert log.end == 0 and os.path.getsize(log.path) == allocated
    log.append(encode(record(4, epoch=1, extents=()), None))
    reread = IntentLog(log.path, None)
    assert [(r.seq, r.epoch) for r in reread.read()][:1] == [(4, 1)]
    assert all(r.epoch == 0 for r in reread.read()[1:])
    assert reread.end >= log.end
    log.reset(keep=False)
    assert os.path.getsize(log.path) == 0


# -- fsync through the log ---------------------------------------------------------------------


async def durable_file(fs, view, name: bytes, data: bytes):
    """A file whose rows are all durable (stored and fsynced once)."""
    f = await write_file(view, name, data)
    await fs.sync(view, f)
    assert fs.fsync_counts["stored"] >= 1
    return f


def crash(fs) -> None:
    """The daemon dies: dirty buffers are lost, the catalog keeps what it committed."""
    fs.repo.close()


async def reopen(repo_path: str, **kw) -> tuple[Filesystem, int]:
    fs = Filesystem(Repository(repo_path, **kw))
    return fs, await fs.recover()


@trio_test
async def test_an_fsync_of_a_durable_file_is_logged_and_replayed_after_a_crash(
        fs, view, repo_path):
    data = bytearray(pattern(4 * CS, seed=1))
    f = await durable_file(fs, view, b"f", bytes(data))
    f.opens += 1
    await view.write(f, CS, b"x" * PAGE)  # a page of a stored chunk (sparse)
    await view.write(f, 4 * CS, b"appended")  # past the end: a new chunk
    data[CS:CS + PAGE] = b"x" * PAGE
    data += b"appended"
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 1
    assert os.path.getsize(fs.repo.paths.intent) > 0
    await view.write(f, 0, b"unsynced")  # after the fsync: may be lost
    crash(fs)

    fs2, applied = await reopen(repo_path)
    assert applied == 1
    assert await read_path(fs2.volume_view("v"), b"f") == bytes(data)
    assert fs2.intent.end == 0 and not fs2.pending_intents()  # applied, stored, retired
    assert await close_and_fsck(fs2, repo_path) == []
    fs3, applied = await reopen(repo_path)
    assert applied == 0  # never twice
    assert await read_path(fs3.volume_view("v"), b"f") == bytes(data)
    assert await close_and_fsck(fs3, repo_path) == []


@trio_test
async def test_records_apply_in_order_and_a_later_store_retires_them(fs, view, repo_path):
    data = bytearray(pattern(3 * CS, seed=2))
    f = await durable_file(fs, view, b"f", bytes(data))
    f.opens += 1
    for k in range(3):
        await view.write(f, CS, bytes([65 + k]) * PAGE)
        await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 3
    data[CS:CS + PAGE] = b"C" * PAGE
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 3
    assert await read_path(fs2.volume_view("v"), b"f") == bytes(data)

    # a group commit after the write-back stored the logged pages retires the records:
    v2 = fs2.volume_view("v")
    g = v2.lookup(ROOT_INO, b"f")
    await fs2.sync(v2, g)  # rows durable again
    await v2.write(g, 0, b"D" * PAGE)
    await fs2.sync(v2, g)
    assert fs2.fsync_counts["logged"] == 1
    await fs2.write_back()  # the file is closed: its chunk is stored
    await fs2.commit_catalog(durable=False)
    assert not fs2._logged
    crash(fs2)
    fs3, applied = await reopen(repo_path)
    assert applied == 0
    data[:PAGE] = b"D" * PAGE
    assert await read_path(fs3.volume_view("v"), b"f") == bytes(data)
    assert await close_and_fsck(fs3, repo_path) == []


@trio_test
async def test_what_cannot_go_through_the_log_is_stored(fs, view, repo_path):
    f = await write_file(view, b"new", b"never stored")
    await fs.sync(view, f)  # a new file: its rows are not durable yet
    assert fs.fsync_counts == {"stored": 1}
    await view.setattr(f.ino, mode=0o600)
    await view.write(f, 0, b"N")
    await fs.sync(view, f)  # a mode change is not in a record
    assert fs.fsync_counts["stored"] == 2
    await fs.sync(view, f)  # nothing changed since
    assert fs.fsync_counts["clean"] == 1
    await view.write(f, 0, pattern(INTENT_RECORD_MAX + CS, seed=3))
    await fs.sync(view, f)  # too much for a record
    assert fs.fsync_counts["stored"] == 3 and not fs.fsync_counts["logged"]
    f.opens += 1
    await view.write(f, 0, b"M")
    await fs.group_commit()  # saves its new size and times only: not a reason to store
    await view.write(f, 1, b"N")
    await fs.sync(view, f)
    assert fs.fsync_counts["stored"] == 3 and fs.fsync_counts["logged"] == 1
    f.opens -= 1
    await view.write(f, 0, b"O")
    await fs.group_commit()  # stores the closed file's chunk: a block row not durable yet
    await view.write(f, 1, b"P")
    await fs.sync(view, f)
    assert fs.fsync_counts["stored"] == 4 and fs.fsync_counts["logged"] == 1
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_cut_after_a_logged_fsync_is_not_undone_by_the_replay(fs, view, repo_path):
    """A record's size is applied exactly: a truncate that shrinks a logged file retires
    the log first, or the replay would bring the old size back over the committed cut."""
    data = pattern(4 * CS, seed=4)
    f = await durable_file(fs, view, b"f", data)
    f.opens += 1
    await view.write(f, 0, b"y" * PAGE)  # below the cut: its dirty chunk stays
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 1
    await view.truncate(f, CS + 10)  # not synced
    fs.flush_inodes()
    await fs.commit_catalog(durable=False)  # a group commit
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 0
    assert await read_path(fs2.volume_view("v"), b"f") == b"y" * PAGE + data[PAGE:CS + 10]
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_a_group_commit_before_the_logged_pages_are_stored_keeps_the_records(
        fs, view, repo_path):
    """The epoch is raised only by a commit whose rows hold every page a live record
    holds: the file is open, so the write-back keeps its chunk dirty, and the group
    commit must leave the record live."""
    data = bytearray(pattern(3 * CS, seed=9))
    f = await durable_file(fs, view, b"f", bytes(data))
    f.opens += 1
    await view.write(f, 2 * CS + 100, b"w" * 100)  # inside a chunk: not a complete one
    await fs.sync(view, f)
    data[2 * CS + 100:2 * CS + 200] = b"w" * 100
    await fs.write_back()  # f is open and its chunk is young: not stored
    await fs.group_commit()
    assert f.buffers and fs._logged
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 1
    assert await read_path(fs2.volume_view("v"), b"f") == bytes(data)
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_records_of_a_deleted_file_or_a_sealed_draft_do_not_apply(fs, view, repo_path):
    a = await durable_file(fs, view, b"a", pattern(2 * CS, seed=5))
    b = await durable_file(fs, view, b"b", pattern(2 * CS, seed=6))
    for node in (a, b):
        node.opens += 1
        await view.write(node, 0, b"z" * PAGE)
        await fs.sync(view, node)
    assert fs.fsync_counts["logged"] == 2
    a.opens -= 1
    view.unlink(ROOT_INO, b"a")
    await fs.commit(view, "s")  # stores b, seals the draft
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 0
    v2 = fs2.volume_view("v")
    assert await read_path(v2, b"b") == b"z" * PAGE + pattern(2 * CS, seed=6)[PAGE:]
    assert await read_path(fs2.snapshot_view("v@s"), b"b") == await read_path(v2, b"b")
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_the_log_is_emptied_when_its_records_are_retired(fs, view, repo_path):
    f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=7))
    f.opens += 1
    await view.write(f, 0, b"q" * PAGE)
    await fs.sync(view, f)
    assert fs.intent.end > 0
    await fs.retire_log()
    assert fs.intent.end == 0 and not fs.pending_intents()
    assert not f.buffers
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 0
    assert (await read_path(fs2.volume_view("v"), b"f"))[:PAGE] == b"q" * PAGE
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_unmount_leaves_an_empty_log(fs, view, repo_path):
    f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=8))
    await view.write(f, CS, b"r" * 100)
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 1
    await fs.shutdown()
    assert os.path.getsize(fs.repo.paths.intent) == 0
    assert await read_all(view, f) == pattern(2 * CS, seed=8)[:CS] + b"r" * 100 + \
        pattern(2 * CS, seed=8)[CS + 100:]
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_records_hold_only_what_changed_since_the_last_one(fs, view, repo_path):
    """Each fsync logs the chunks written since the file's last record: a database that
    fsyncs after every write of a few bytes keeps going through the log long after its
    dirty data outgrew one record."""
    n = 2 * INTENT_RECORD_MAX // CS
    data = bytearray(pattern(n * CS, seed=10))
    f = await durable_file(fs, view, b"db", bytes(data))
    f.opens += 1
    for k in range(n):
        at = k * CS + (k * 37) % (CS - 8)
        await view.write(f, at, b"%08d" % k)
        data[at:at + 8] = b"%08d" % k
        await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == n and fs.fsync_counts["stored"] == 1
    assert sum(len(b.data or b"") for b in f.buffers.values()) > INTENT_RECORD_MAX
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == n
    assert await read_path(fs2.volume_view("v"), b"db") == bytes(data)
    assert await close_and_fsck(fs2, repo_path) == []


def test_an_encrypted_repository_seals_its_records_and_replays_them(tmp_path):
    from snapfs.crypto import keys
    from snapfs.fsck import fsck
    from snapfs.store.repo import init_repository

    key_file = os.urandom(32)
    wrapped = keys.wrap_with_key_file(keys.new_master(), key_file)
    path = str(tmp_path / "repo")
    init_repository(path, CS, {"scheme": "aes-256-gcm", "wrapped": wrapped})
    secret = b"written in the intent log"

    async def before_crash():
        fs = Filesystem(Repository(path, secret=key_file))
        await fs.recover()
        fs.graph.create_volume("v")
        view = fs.volume_view("v")
        f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=11))
        f.opens += 1
        await view.write(f, CS, secret)
        await fs.sync(view, f)
        assert fs.fsync_counts["logged"] == 1
        crash(fs)

    async def after_crash():
        with open(os.path.join(path, "intent.log"), "rb") as log:
            assert secret not in log.read()
        with pytest.raises(IntegrityError):
            IntentLog(os.path.join(path, "intent.log"), Aead(os.urandom(32))).read()
        fs, applied = await reopen(path, secret=key_file)
        assert applied == 1
        got = await read_path(fs.volume_view("v"), b"f")
        assert got[CS:CS + len(secret)] == secret
        await fs.sync()
        fs.repo.close()
        assert fsck(path, secret=key_file) == []

    trio.run(before_crash)
    trio.run(after_crash)


@trio_test
async def test_a_size_saved_by_a_group_commit_is_still_made_durable_by_fsync(
        fs, view, repo_path):
    """A row save that changes only size and times keeps the file loggable, but its
    commit is not durable: an fsync after it must still log the size (a power loss
    would take the group commit), not call the file clean."""
    f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=12))
    f.opens += 1
    await view.truncate(f, 5 * CS)  # extended: no dirty data, a new size
    await fs.group_commit()  # saves the size, not durably
    assert not f.buffers and not f.dirty
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] == 1 and not fs.fsync_counts["clean"]
    (rec,) = fs.pending_intents()
    assert rec.size == 5 * CS and rec.extents == ()
    await fs.sync(view, f)  # now nothing is new
    assert fs.fsync_counts["clean"] == 1
    assert await close_and_fsck(fs, repo_path) == []


@trio_test
async def test_a_file_stored_since_its_record_is_not_overwritten_by_the_replay(
        fs, view, repo_path):
    """x's record says A; then x is written with B, stored and fsynced the stored way,
    while another file's record keeps the log live. Replaying x's old record would put
    A back over B, which fsync acknowledged: x's records stop applying in the commit
    whose rows hold them (intent_files)."""
    x = await durable_file(fs, view, b"x", pattern(2 * CS, seed=13))
    g = await durable_file(fs, view, b"g", pattern(2 * CS, seed=14))
    x.opens += 1
    g.opens += 1
    await view.write(x, 100, b"A" * 100)  # inside a chunk: it stays dirty while open
    await fs.sync(view, x)
    await view.write(g, 100, b"G" * 100)
    await fs.sync(view, g)
    assert fs.fsync_counts["logged"] == 2
    await view.write(x, 100, b"B" * 100)
    x.opens -= 1  # closed: the write-back stores it
    await fs.group_commit()
    assert not x.buffers and g.buffers
    x.opens += 1
    await view.write(x, 300, b"C" * 10)
    await fs.sync(view, x)  # its block row is not durable: stored, not logged
    assert fs.fsync_counts["logged"] == 2
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 1  # g's record only
    got = await read_path(fs2.volume_view("v"), b"x")
    assert got[100:200] == b"B" * 100 and got[300:310] == b"C" * 10
    assert (await read_path(fs2.volume_view("v"), b"g"))[100:200] == b"G" * 100
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_concurrent_fsyncs_share_one_fdatasync(fs, view, repo_path, monkeypatch):
    """Group commit: fsyncs that arrive while a record is being written go together in
    the next write, and each returns only once its own record is durable."""
    files = [await durable_file(fs, view, b"f%d" % k, pattern(2 * CS, seed=20 + k))
             for k in range(6)]
    writes: list[int] = []
    real_append = fs.intent.append

    def slow_append(blob):
        writes.append(blob.count(b"SFIL"))
        import time

        time.sleep(0.02)
        real_append(blob)

    monkeypatch.setattr(fs.intent, "append", slow_append)
    for k, f in enumerate(files):
        f.opens += 1
        await view.write(f, 100, b"%d" % k * 50)
    async with trio.open_nursery() as nursery:
        for f in files:
            nursery.start_soon(fs.sync, view, f)
    assert fs.fsync_counts["logged"] == 6
    assert sum(writes) == 6 and len(writes) < 6, writes
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 6
    for k in range(6):
        got = await read_path(fs2.volume_view("v"), b"f%d" % k)
        assert got[100:150] == b"%d" % k * 50
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_fsck_reports_pending_records_and_leaves_them(fs, view, repo_path):
    from snapfs.fsck import fsck

    f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=30))
    f.opens += 1
    await view.write(f, 10, b"pending")
    await fs.sync(view, f)
    crash(fs)
    said: list[str] = []
    assert fsck(repo_path, out=said.append) == []
    assert any("intent log: 1 fsynced write(s) not yet in the catalog" in s for s in said), said
    fs2, applied = await reopen(repo_path)  # fsck applied nothing
    assert applied == 1
    assert (await read_path(fs2.volume_view("v"), b"f"))[10:17] == b"pending"
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_a_file_under_a_snapshot_directory_is_replayed_into_its_draft(
        fs, view, repo_path):
    """Writes under .snapshots/S go to a draft over S (never to S): its records name
    that draft, and the replay writes there."""
    await durable_file(fs, view, b"f", pattern(2 * CS, seed=31))
    await fs.commit(view, "s")
    snap = fs.snapshot_view("v@s")
    f = snap.lookup(ROOT_INO, b"f")
    await snap.write(f, 0, b"first")
    await fs.sync(snap, f)  # its rows in the new draft are not durable yet: stored
    f.opens += 1
    await snap.write(f, 5, b"second")
    await fs.sync(snap, f)
    assert fs.fsync_counts["logged"] == 1
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 1
    s2 = fs2.snapshot_view("v@s")
    assert not s2.immutable  # the draft over the snapshot
    assert (await read_path(s2, b"f"))[:11] == b"firstsecond"
    assert (await read_path(fs2.volume_view("v"), b"f")) == pattern(2 * CS, seed=31)
    assert await close_and_fsck(fs2, repo_path) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_gives_the_file_as_at_its_last_fsync(tmp_path, seed):
    """Random page writes (sparse chunks: 16 KiB chunks here, four pages each) and
    partial writes over more chunks than a record scans whole (so the record takes the
    chunks written since the last one: Inode.unlogged), fsyncs between, then a crash:
    the replay must give exactly the content at the last fsync."""
    import random

    from snapfs.store.repo import init_repository

    cs = 4 * PAGE
    path = str(tmp_path / "repo")
    init_repository(path, cs)
    rng = random.Random(seed)
    nchunks = 3 * 32
    data = bytearray(pattern(nchunks * cs, seed=40 + seed))

    async def before_crash():
        fs = Filesystem(Repository(path))
        await fs.recover()
        fs.graph.create_volume("v")
        view = fs.volume_view("v")
        f = await durable_file(fs, view, b"f", bytes(data))
        f.opens += 1
        for _ in range(600):
            op = rng.random()
            if op < 0.5:  # a whole page
                at = rng.randrange(nchunks * 4) * PAGE
                piece = rng.randbytes(PAGE)
            elif op < 0.8:  # a few bytes anywhere
                at = rng.randrange(len(data) - 64)
                piece = rng.randbytes(rng.randrange(1, 64))
            else:
                await fs.sync(view, f)
                continue
            await view.write(f, at, piece)
            data[at:at + len(piece)] = piece
        await fs.sync(view, f)
        # (a long run of writes between two fsyncs can outgrow a record: then it stores)
        assert fs.fsync_counts["logged"] > 10 * fs.fsync_counts["stored"]
        assert any(b.data is None for b in f.buffers.values())  # sparse chunks were made
        crash(fs)

    async def after_crash():
        fs2, _ = await reopen(path)
        assert await read_path(fs2.volume_view("v"), b"f") == bytes(data)
        assert await close_and_fsck(fs2, path) == []

    trio.run(before_crash)
    trio.run(after_crash)


@trio_test
async def test_a_failed_log_write_fails_the_records_made_meanwhile_too(
        fs, view, repo_path, monkeypatch):
    """A record made while an earlier one was being written leaves out the chunks that
    the earlier one held. When that write fails, both fsyncs store instead (and what a
    later record takes is complete again)."""
    nchunks = 2 * 32
    data = bytearray(pattern(nchunks * CS, seed=50))
    f = await durable_file(fs, view, b"f", bytes(data))
    f.opens += 1
    real_append = fs.intent.append
    calls = []

    def failing_append(blob):
        calls.append(len(blob))
        import time

        time.sleep(0.05)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_append(blob)

    monkeypatch.setattr(fs.intent, "append", failing_append)
    for k in range(40):  # more dirty chunks than a record scans whole
        await view.write(f, k * CS + 7, b"a%02d" % k)
        data[k * CS + 7:k * CS + 10] = b"a%02d" % k

    async def second():
        await trio.sleep(0.01)  # while the first record is being written
        await view.write(f, 50 * CS + 7, b"bbb")
        data[50 * CS + 7:50 * CS + 10] = b"bbb"
        await fs.sync(view, f)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.sync, view, f)
        nursery.start_soon(second)
    assert fs.fsync_counts["stored"] == 3 and not fs.fsync_counts["logged"]
    await view.write(f, 60 * CS + 7, b"ccc")
    data[60 * CS + 7:60 * CS + 10] = b"ccc"
    await fs.sync(view, f)  # rows not durable yet after the stored ones? then stored
    await view.write(f, 61 * CS + 7, b"ddd")
    data[61 * CS + 7:61 * CS + 10] = b"ddd"
    await fs.sync(view, f)
    assert fs.fsync_counts["logged"] >= 1
    crash(fs)
    fs2, _ = await reopen(repo_path)
    assert await read_path(fs2.volume_view("v"), b"f") == bytes(data)
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_an_fsync_waiting_behind_a_cancelled_log_writer_does_not_hang(
        fs, view, repo_path, monkeypatch):
    f = await durable_file(fs, view, b"f", pattern(2 * CS, seed=60))
    f.opens += 1
    real_append = fs.intent.append

    def slow_append(blob):
        import time

        time.sleep(0.05)
        real_append(blob)

    monkeypatch.setattr(fs.intent, "append", slow_append)
    await view.write(f, 10, b"first")
    scope = trio.CancelScope()

    async def first():
        with scope:
            await fs.sync(view, f)

    async def second():
        await view.write(f, CS + 10, b"second")
        with trio.fail_after(10):
            await fs.sync(view, f)  # queued behind the first write: must return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.sleep(0.01)
        nursery.start_soon(second)
        await trio.sleep(0.01)
        scope.cancel()
    crash(fs)
    fs2, _ = await reopen(repo_path)
    got = await read_path(fs2.volume_view("v"), b"f")
    assert got[CS + 10:CS + 16] == b"second"  # the second fsync returned: durable
    assert await close_and_fsck(fs2, repo_path) == []


@trio_test
async def test_fsync_of_an_unlinked_open_file_makes_only_the_unlink_durable(
        fs, view, repo_path):
    """No name reaches its data again, and the next mount after a crash releases it:
    only the unlink is made durable, once."""
    f = await write_file(view, b"tmp", pattern(3 * CS, seed=70))
    f.opens += 1
    view.unlink(ROOT_INO, b"tmp")
    await view.write(f, 0, b"more")
    commits = fs.cat.commits
    await fs.sync(view, f)
    assert fs.fsync_counts == {"unlinked": 1}
    assert f.buffers  # nothing was stored for it
    assert fs.cat.commits > commits and fs.durable_commits == fs.cat.commits  # the unlink
    await fs.sync(view, f)
    assert fs.cat.commits == fs.durable_commits  # durable already: nothing to do
    assert await read_all(view, f) == b"more" + pattern(3 * CS, seed=70)[4:]
    crash(fs)
    fs2, applied = await reopen(repo_path)
    assert applied == 0
    assert b"tmp" not in fs2.volume_view("v").entries(fs2.volume_view("v").get(ROOT_INO))
    assert await close_and_fsck(fs2, repo_path) == []
