"""PackStore: append-only pack files of checksummed chunk records (snapfs/store/packs.py)."""

from __future__ import annotations

import errno
import os

import pytest

from snapfs.errors import IntegrityError, SnapfsError
from snapfs.store import packs as packs_mod
from snapfs.store.packs import (
    PACK_HEADER,
    RECORD_OVERHEAD,
    PackStore,
    pack_name,
)
from snapfs.types import ChunkLocation


def pack_path(store: PackStore, pack_id: int) -> str:
    return os.path.join(store.directory, pack_name(pack_id))


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x41]))


@pytest.fixture
def store(tmp_path):
    s = PackStore(str(tmp_path / "packs"), writable=True)
    yield s
    s.close()


def test_append_read_round_trip(store):
    payloads = [b"a", b"hello world" * 100, bytes(range(256)) * 16, b"\0tail\0"]
    locs = [store.append(100 + i, p, len(p), 0) for i, p in enumerate(payloads)]
    assert locs[0] == ChunkLocation(1, PACK_HEADER.size, RECORD_OVERHEAD + len(payloads[0]))
    for prev, loc in zip(locs, locs[1:], strict=False):
        assert loc.pack == 1
        assert loc.offset == prev.offset + prev.length  # records are contiguous
    for i, (p, loc) in enumerate(zip(payloads, locs, strict=True)):
        assert store.read(100 + i, loc) == (p, 0)
    assert store.pack_size(1) == locs[-1].offset + locs[-1].length


def test_flags_are_stored_and_returned(store):
    loc = store.append(5, b"sealed", 6, packs_mod.FLAG_ENCRYPTED)
    assert store.read(5, loc) == (b"sealed", packs_mod.FLAG_ENCRYPTED)


def test_append_many_round_trip_and_contiguous(store):
    items = [(i, bytes([i]) * (i * 37 + 1), i * 37 + 1, i % 2) for i in range(1, 20)]
    locs = store.append_many(items)
    assert len(locs) == len(items)
    for (cid, p, raw, flags), loc in zip(items, locs, strict=True):
        assert store.read(cid, loc) == (p, flags)
        assert store.read_record(cid, loc) == (p, raw, flags)
    for prev, loc in zip(locs, locs[1:], strict=False):
        assert loc.offset == prev.offset + prev.length
    single = store.append(99, b"after", 5, 0)
    assert single.offset == locs[-1].offset + locs[-1].length
    assert store.read(99, single) == (b"after", 0)


def test_every_flipped_byte_of_a_record_is_detected(store):
    """Any single damaged byte in a record (header, checksum or payload) -> IntegrityError
    naming the chunk and the pack; never data."""
    payload = b"payload-bytes-0123456789"
    store.append(1, b"before", 6, 0)
    loc = store.append(7, payload, len(payload), 0)
    store.append(2, b"after", 5, 0)
    store.sync()
    path = pack_path(store, loc.pack)
    for i in range(loc.length):
        flip_byte(path, loc.offset + i)
        with pytest.raises(IntegrityError) as exc:
            store.read(7, loc)
        msg = str(exc.value)
        assert "chunk 7" in msg and pack_name(loc.pack) in msg, msg
        flip_byte(path, loc.offset + i)  # flip back
        assert store.read(7, loc) == (payload, 0)


def test_damage_is_detected_by_a_fresh_reader(store, tmp_path):
    loc = store.append(3, b"x" * 1000, 1000, 0)
    store.close()
    flip_byte(pack_path(store, 1), loc.offset + RECORD_OVERHEAD + 500)
    reader = PackStore(store.directory, writable=False)
    try:
        with pytest.raises(IntegrityError, match="checksum"):
            reader.read(3, loc)
    finally:
        reader.close()


def test_truncated_record(store):
    loc = store.append(4, b"z" * 300, 300, 0)
    store.sync()
    os.truncate(pack_path(store, 1), loc.offset + loc.length - 10)
    with pytest.raises(IntegrityError, match="truncated") as exc:
        store.read(4, loc)
    assert "chunk 4" in str(exc.value) and pack_name(1) in str(exc.value)
    os.truncate(pack_path(store, 1), loc.offset + 5)  # not even a header left
    with pytest.raises(IntegrityError, match="truncated"):
        store.read(4, loc)


def test_wrong_chunk_id_or_wrong_location(store):
    a = store.append(10, b"aaaa", 4, 0)
    b = store.append(11, b"bbbb", 4, 0)
    with pytest.raises(IntegrityError) as exc:
        store.read(11, a)  # the index points chunk 11 at chunk 10's record
    assert "chunk 11" in str(exc.value)
    with pytest.raises(IntegrityError):
        store.read(10, ChunkLocation(1, a.offset, a.length + 1))  # wrong length
    with pytest.raises(IntegrityError):
        store.read(10, ChunkLocation(1, a.offset + 1, a.length))  # not a record start
    with pytest.raises(IntegrityError, match="missing"):
        store.read(10, ChunkLocation(42, a.offset, a.length))  # no such pack
    assert store.read(11, b) == (b"bbbb", 0)


def test_pack_rotation_at_pack_limit(tmp_path):
    rec = RECORD_OVERHEAD + 100
    limit = PACK_HEADER.size + 3 * rec  # exactly three records per pack
    s = PackStore(str(tmp_path / "p"), writable=True, pack_limit=limit)
    try:
        locs = [s.append(i, bytes([i]) * 100, 100, 0) for i in range(1, 8)]
        assert [loc.pack for loc in locs] == [1, 1, 1, 2, 2, 2, 3]
        assert s.writing(3) and not s.writing(2)
        assert s.pack_ids() == [1, 2, 3]
        assert s.pack_size(1) == limit and s.pack_size(2) == limit
        for i, loc in enumerate(locs, 1):
            assert s.read(i, loc) == (bytes([i]) * 100, 0)
        big = s.append(50, b"B" * (2 * limit), 2 * limit, 0)  # larger than a pack: own pack
        assert big.pack == 4 and big.offset == PACK_HEADER.size
        assert s.read(50, big)[0] == b"B" * (2 * limit)
        after = s.append(51, b"c", 1, 0)
        assert after.pack == 5
    finally:
        s.close()


def test_append_many_rotates_like_append(tmp_path):
    rec = RECORD_OVERHEAD + 100
    limit = PACK_HEADER.size + 3 * rec
    s = PackStore(str(tmp_path / "p"), writable=True, pack_limit=limit)
    try:
        s.append(1, b"\1" * 100, 100, 0)
        locs = s.append_many([(i, bytes([i]) * 100, 100, 0) for i in range(2, 9)])
        assert [loc.pack for loc in locs] == [1, 1, 2, 2, 2, 3, 3]
        for i, loc in zip(range(2, 9), locs, strict=True):
            assert s.read(i, loc) == (bytes([i]) * 100, 0)
        assert all(s.pack_size(p) <= limit for p in (1, 2, 3))
    finally:
        s.close()


def test_each_writer_starts_a_new_pack(tmp_path):
    d = str(tmp_path / "p")
    first = PackStore(d, writable=True)
    a = first.append(1, b"one", 3, 0)
    first.close()
    second = PackStore(d, writable=True)
    try:
        b = second.append(2, b"two", 3, 0)
        assert (a.pack, b.pack) == (1, 2)
        assert b.offset == PACK_HEADER.size
        assert second.read(1, a) == (b"one", 0)  # the old pack is still readable
        assert second.read(2, b) == (b"two", 0)
        # the old pack was not appended to
        assert second.pack_size(1) == a.offset + a.length
    finally:
        second.close()


def test_pack_header(store):
    store.append(1, b"x", 1, 0)
    with open(pack_path(store, 1), "rb") as f:
        magic, version, pack_id = PACK_HEADER.unpack(f.read(PACK_HEADER.size))
    assert (magic, version, pack_id) == (packs_mod.PACK_MAGIC, packs_mod.PACK_VERSION, 1)
    assert os.stat(pack_path(store, 1)).st_mode & 0o777 == 0o600


def _record_syncs(monkeypatch) -> list[str]:
    """Paths of the files fsync'ed/fdatasync'ed from now on."""
    synced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def rec(real):
        def wrapper(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)
        return wrapper

    monkeypatch.setattr(os, "fsync", rec(real_fsync))
    monkeypatch.setattr(os, "fdatasync", rec(real_fdatasync))
    return synced


def test_sync_fdatasyncs_only_when_needed(store, monkeypatch):
    store.append(1, b"x", 1, 0)
    synced = _record_syncs(monkeypatch)
    store.sync()
    assert synced == [pack_path(store, 1)]
    store.sync()  # nothing new: no second fdatasync
    assert synced == [pack_path(store, 1)]
    store.append(2, b"y", 1, 0)
    store.sync()
    assert synced == [pack_path(store, 1)] * 2


def test_rotation_by_append_syncs_the_old_pack(tmp_path, monkeypatch):
    rec = RECORD_OVERHEAD + 100
    s = PackStore(str(tmp_path / "p"), writable=True, pack_limit=PACK_HEADER.size + 2 * rec)
    try:
        s.append(1, b"a" * 100, 100, 0)
        s.sync()
        synced = _record_syncs(monkeypatch)
        s.append(2, b"b" * 100, 100, 0)  # fills pack 1
        s.append(3, b"c" * 100, 100, 0)  # rotates to pack 2
        s.sync()
        assert pack_path(s, 1) in synced, "record 2 in pack 1 was never made durable"
    finally:
        s.close()


def test_rotation_inside_append_many_syncs_the_old_pack(tmp_path, monkeypatch):
    """Records written to a pack before append_many rotates away from it must be
    fdatasync'ed before sync() returns: sync() only syncs the current pack."""
    rec = RECORD_OVERHEAD + 100
    s = PackStore(str(tmp_path / "p"), writable=True, pack_limit=PACK_HEADER.size + 2 * rec)
    try:
        s.append(1, b"a" * 100, 100, 0)
        s.sync()  # pack 1 is clean
        synced = _record_syncs(monkeypatch)
        # record 2 still fits in pack 1, record 3 goes to pack 2
        locs = s.append_many([(2, b"b" * 100, 100, 0), (3, b"c" * 100, 100, 0)])
        assert [loc.pack for loc in locs] == [1, 2]
        s.sync()
        assert pack_path(s, 1) in synced, (
            "record 2 went into pack 1 and pack 1 was closed without fsync: "
            f"synced only {synced}")
    finally:
        s.close()


def test_read_only_store_refuses_append(tmp_path):
    d = str(tmp_path / "p")
    w = PackStore(d, writable=True)
    loc = w.append(1, b"data", 4, 0)
    w.close()
    r = PackStore(d, writable=False)
    try:
        with pytest.raises(SnapfsError):
            r.append(2, b"more", 4, 0)
        with pytest.raises(SnapfsError):
            r.append_many([(2, b"more", 4, 0)])
        assert r.pack_ids() == [1]  # no pack was created
        assert r.read(1, loc) == (b"data", 0)
    finally:
        r.close()


def test_records_survive_reopening(tmp_path):
    d = str(tmp_path / "p")
    s = PackStore(d, writable=True, pack_limit=PACK_HEADER.size + 2 * (RECORD_OVERHEAD + 50))
    locs = {i: s.append(i, bytes([i]) * 50, 50, 0) for i in range(1, 6)}
    s.close()
    s2 = PackStore(d, writable=False)
    try:
        assert s2.pack_ids() == [1, 2, 3]
        for i, loc in locs.items():
            assert s2.read(i, loc) == (bytes([i]) * 50, 0)
    finally:
        s2.close()


def test_reads_work_after_close(store):
    loc = store.append(1, b"abc", 3, 0)
    store.read(1, loc)
    store.close()
    assert store.read(1, loc) == (b"abc", 0)  # read fds are reopened on demand


def test_store_recovers_after_a_failed_pack_creation(tmp_path, monkeypatch):
    """A transient ENOSPC while creating the next pack must not break the store for good
    (and it must never leave the store using a file descriptor it already closed)."""
    rec = RECORD_OVERHEAD + 10
    s = PackStore(str(tmp_path / "p"), writable=True, pack_limit=PACK_HEADER.size + rec)
    try:
        first = s.append(1, b"0123456789", 10, 0)  # pack 1 is now full
        real_open = os.open

        def no_space(path, flags, *args, **kwargs):
            if str(path).endswith(".pack") and flags & os.O_CREAT:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_space)
        with pytest.raises(OSError):
            s.append(2, b"abcdefghij", 10, 0)
        monkeypatch.setattr(os, "open", real_open)
        loc = s.append(3, b"ABCDEFGHIJ", 10, 0)  # space is back
        s.sync()
        assert s.read(3, loc) == (b"ABCDEFGHIJ", 0)
        assert s.read(1, first) == (b"0123456789", 0)
    finally:
        monkeypatch.undo()
        try:
            s.close()
        except OSError:
            pass


def test_append_many_splits_long_batches_into_several_pwritev(store, monkeypatch):
    monkeypatch.setattr(packs_mod, "MAX_IOVECS", 6)  # three records per pwritev
    calls = []
    real = os.pwritev

    def counting(fd, bufs, offset):
        calls.append(len(bufs))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", counting)
    payloads = [bytes([i]) * (100 + i) for i in range(8)]
    locs = store.append_many([(i + 1, p, len(p), 0) for i, p in enumerate(payloads)])
    assert calls == [6, 6, 4]
    for i, (p, loc) in enumerate(zip(payloads, locs, strict=True)):
        assert store.read(i + 1, loc) == (p, 0)
    assert [b.offset for b in locs[1:]] == [a.offset + a.length for a in locs[:-1]]


@pytest.mark.parametrize("nowait", [True, False])
def test_read_payload_into_scatters_the_payload_and_checks_every_byte(store, nowait):
    """The payload lands in the caller's buffer (a view of a larger one, as a read reply
    is assembled); any damaged byte of the record is an IntegrityError, as in read()."""
    payload = os.urandom(5000)
    store.append(1, b"before", 6, 0)
    loc = store.append(7, payload, len(payload), packs_mod.FLAG_ENCRYPTED)
    store.sync()
    reply = bytearray(b"#" * (len(payload) + 20))
    out = memoryview(reply)[10:10 + len(payload)]
    assert store.read_payload_into(7, loc, out, nowait=nowait) == packs_mod.FLAG_ENCRYPTED
    assert reply == b"#" * 10 + payload + b"#" * 10
    with pytest.raises(ValueError):
        store.read_payload_into(7, loc, out[1:], nowait=nowait)
    path = pack_path(store, loc.pack)
    for i in [0, 5, RECORD_OVERHEAD - 1, RECORD_OVERHEAD, loc.length - 1]:
        flip_byte(path, loc.offset + i)
        with pytest.raises(IntegrityError, match="chunk 7"):
            store.read_payload_into(7, loc, out, nowait=nowait)
        flip_byte(path, loc.offset + i)
    with pytest.raises(IntegrityError, match="chunk 8"):
        store.read_payload_into(8, loc, out, nowait=nowait)  # another chunk's record


def test_read_payload_into_a_truncated_record(store):
    loc = store.append(4, b"z" * 300, 300, 0)
    store.sync()
    os.truncate(pack_path(store, 1), loc.offset + loc.length - 10)
    out = memoryview(bytearray(300))
    assert store.read_payload_into(4, loc, out, nowait=True) is None  # short: the caller retries
    with pytest.raises(IntegrityError, match="truncated"):
        store.read_payload_into(4, loc, out, nowait=False)


def test_appends_leave_the_reserve_free(tmp_path):
    """Chunk data may not take the last `reserve` bytes of the file system (the catalog
    must always be able to commit); the collector passes a smaller keep."""
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    s = PackStore(str(tmp_path / "p"), writable=True, reserve=free + (1 << 30))
    try:
        with pytest.raises(OSError) as e:
            s.append(1, b"x" * 100, 100)
        assert e.value.errno == errno.ENOSPC and "kept for the catalog" in str(e.value)
        with pytest.raises(OSError):
            s.append_many([(2, b"y" * 100, 100, 0)])
        loc = s.append_many([(3, b"z" * 100, 100, 0)], keep=0)[0]
        assert s.read(3, loc)[0] == b"z" * 100
    finally:
        s.close()


def test_the_default_reserve_is_a_64th_within_bounds(tmp_path):
    st = os.statvfs(tmp_path)
    expected = min(packs_mod.RESERVE_MAX, max(packs_mod.RESERVE_MIN,
                                              st.f_blocks * st.f_frsize // 64))
    assert packs_mod.default_reserve(str(tmp_path)) == expected
    s = PackStore(str(tmp_path / "p"), writable=True)
    try:
        assert s.reserve == expected
    finally:
        s.close()


def test_removing_a_pack_releases_its_file_at_once(store):
    loc = store.append(1, b"a" * 1000, 1000)
    store.rotate()
    store.append(2, b"b" * 1000, 1000)
    assert store.read(1, loc)[0] == b"a" * 1000  # caches a read descriptor
    fd = store._read_fds[loc.pack]
    store.remove_pack(loc.pack)
    # the descriptor stays open (a reader thread may be using it) but no longer holds
    # the deleted file, whose space is free now
    assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
    assert os.pread(fd, 10, 0) == b""


def test_concurrent_appends_go_to_packs_of_their_own(tmp_path, monkeypatch):
    """Two threads appending at once write two packs side by side (write lanes); a
    single writer keeps filling one pack; sync() makes both durable."""
    import threading

    s = PackStore(str(tmp_path / "p"), writable=True, lanes=2)
    try:
        first = s.append(1, b"a" * 100, 100, 0)
        inside = threading.Barrier(2)
        real = os.pwritev

        def pwritev(fd, bufs, offset, *flags):
            inside.wait(timeout=10)  # both threads are in a write at the same time
            return real(fd, bufs, offset, *flags)

        monkeypatch.setattr(os, "pwritev", pwritev)
        locs: dict[int, list] = {}

        def worker(i: int) -> None:
            locs[i] = s.append_many([(10 + i, bytes([i]) * 500, 500, 0)])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        monkeypatch.setattr(os, "pwritev", real)
        assert sorted(loc.pack for ls in locs.values() for loc in ls) == [1, 2]
        assert s.writing(1) and s.writing(2)
        for i, (loc,) in locs.items():
            assert s.read(10 + i, loc) == (bytes([i]) * 500, 0)
        synced = _record_syncs(monkeypatch)
        s.sync()
        assert sorted(synced) == [pack_path(s, 1), pack_path(s, 2)]
        assert not s.unsynced
        again = s.append(3, b"c", 1, 0)  # alone again: the first lane's pack
        assert again.pack == first.pack
        s.rotate()
        assert not s.writing(1) and not s.writing(2)
        assert s.append(4, b"d", 1, 0).pack == 3
    finally:
        s.close()


def test_append_many_with_sync_makes_its_pack_durable(store, monkeypatch):
    synced = _record_syncs(monkeypatch)
    loc = store.append_many([(1, b"x" * 10, 10, 0)], sync=True)[0]
    assert [p for p in synced if p.endswith(".pack")] == [pack_path(store, loc.pack)]
    assert not store.unsynced


def test_pack_ids_are_not_reused_after_a_removal(store):
    store.append(1, b"a", 1, 0)
    store.rotate()
    store.remove_pack(1)
    assert store.append(2, b"b", 1, 0).pack == 2  # not 1 again: a stale location stays wrong


def test_space_granted_to_an_append_under_way_counts_as_used(store, monkeypatch):
    """Two lanes append side by side: each must see the room the other was granted, or
    both pass the check and together eat the catalog's reserve (a disk-full test saw
    SQLite refuse a directory fsync after a 100 MiB burst)."""
    free = 70 << 20
    monkeypatch.setattr(store, "free_bytes", lambda: free)
    store.reserve = 40 << 20
    payload = b"x" * (20 << 20)
    store.check_space(len(payload), store.reserve)  # alone, it fits
    seen = []
    real = store._append_granted

    def while_writing(items, sync):  # the second lane checks while the first writes
        with pytest.raises(OSError) as e:
            store.append_many([(2, payload, len(payload), 0)])
        seen.append(e.value.errno)
        return real(items, sync)

    monkeypatch.setattr(store, "_append_granted", while_writing)
    store.append_many([(1, payload, len(payload), 0)])
    assert seen == [errno.ENOSPC]
    assert store._granted == 0, "the grant ends with its write"
