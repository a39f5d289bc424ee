"""ChunkManager: identity, deduplication, the index, the cache and integrity
(snapfs/store/chunks.py)."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
import trio

from snapfs.errors import IntegrityError
from snapfs.store.catalog import Catalog
from snapfs.store.chunks import ChunkCache, ChunkManager
from snapfs.store.packs import RECORD_OVERHEAD, PackStore, pack_name

KEY = bytes(range(32))


class Store:
    """A catalog, a pack store and a chunk manager in one directory."""

    def __init__(self, root, key: bytes = KEY, cache_bytes: int = 1 << 20) -> None:
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.cat = Catalog(os.path.join(self.root, "meta.db"))
        self.packs = PackStore(os.path.join(self.root, "packs"), writable=True)
        self.cm = ChunkManager(self.cat, self.packs, key, cache_bytes=cache_bytes)

    def rows(self) -> int:
        return self.cat.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def records_bytes(self) -> int:
        return sum(self.packs.pack_size(p) for p in self.packs.pack_ids())

    def fresh_manager(self, cache_bytes: int = 1 << 20) -> ChunkManager:
        """Another manager over the same index and packs, with an empty cache."""
        return ChunkManager(self.cat, self.packs, KEY, cache_bytes=cache_bytes)

    def damage(self, cid: int, at: int = 0) -> None:
        pack, offset = self.cat.execute("SELECT pack, offset FROM chunks WHERE id=?",
                                        (cid,)).fetchone()
        self.packs.sync()
        with open(os.path.join(self.packs.directory, pack_name(pack)), "r+b") as f:
            f.seek(offset + RECORD_OVERHEAD + at)
            b = f.read(1)
            f.seek(offset + RECORD_OVERHEAD + at)
            f.write(bytes([b[0] ^ 1]))

    def close(self) -> None:
        self.cat.close()
        self.packs.close()


@pytest.fixture
def st(tmp_path):
    s = Store(tmp_path / "s")
    yield s
    s.close()


def test_identity_is_keyed_blake3_or_hmac_sha256_in_old_repositories(st, tmp_path):
    from blake3 import blake3

    payload = b"some chunk"
    assert st.cm.identity(payload) == blake3(payload, key=KEY).digest()
    assert st.cm.identity(payload) != blake3(payload).digest()  # keyed, not bare
    other = ChunkManager(st.cat, st.packs, b"\x01" * 32)
    assert other.identity(payload) != st.cm.identity(payload)
    assert st.cm.identity(b"a") != st.cm.identity(b"b")
    old = ChunkManager(st.cat, st.packs, KEY, id_hash="hmac-sha256")
    assert old.identity(payload) == hmac.digest(KEY, payload, "sha256")
    assert old.identity(payload) != hashlib.sha256(payload).digest()
    with pytest.raises(ValueError, match="identity hash"):
        ChunkManager(st.cat, st.packs, KEY, id_hash="md5")


def test_put_dedups_same_payload(st):
    async def main():
        a1 = await st.cm.put(b"A" * 1000)
        size = st.records_bytes()
        a2 = await st.cm.put(b"A" * 1000)
        b = await st.cm.put(b"B" * 1000)
        return a1, a2, b, size

    a1, a2, b, size_after_a = trio.run(main)
    assert a1 == a2 != b
    assert st.rows() == 2
    assert st.records_bytes() == size_after_a + RECORD_OVERHEAD + 1000  # one record for B only
    row = st.cat.execute("SELECT hash, raw_len, pack FROM chunks WHERE id=?", (a1,)).fetchone()
    assert row == (st.cm.identity(b"A" * 1000), 1000, 1)


def test_put_sync_and_put_agree(st):
    cid = st.cm.put_sync(b"sync payload")
    assert st.cm.put_sync(b"sync payload") == cid
    assert trio.run(st.cm.put, b"sync payload") == cid
    assert st.cm.get_sync(cid) == b"sync payload"
    assert st.rows() == 1


def test_different_keys_do_not_share_identities(tmp_path):
    """Two repositories with different id keys store the same content under different
    identities (nobody can tell equal chunks across repositories)."""
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b", key=b"k" * 32)
    try:
        ca = trio.run(a.cm.put, b"same")
        cb = trio.run(b.cm.put, b"same")
        ha = a.cat.execute("SELECT hash FROM chunks WHERE id=?", (ca,)).fetchone()[0]
        hb = b.cat.execute("SELECT hash FROM chunks WHERE id=?", (cb,)).fetchone()[0]
        assert ha != hb
    finally:
        a.close()
        b.close()


def test_concurrent_puts_of_the_same_new_content_share_one_record(st):
    payload = os.urandom(3000)
    ids: list[int] = []

    async def put_one():
        ids.append(await st.cm.put(payload))

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(put_one)

    trio.run(main)
    assert len(ids) == 12 and len(set(ids)) == 1
    assert st.rows() == 1
    assert st.records_bytes() == 16 + RECORD_OVERHEAD + 3000  # pack header + one record
    assert not st.cm._pending
    assert trio.run(st.fresh_manager().get, ids[0]) == payload


def test_put_many_dedups_within_and_across_batches(st):
    async def main():
        first = await st.cm.put_many([b"x" * 10, b"y" * 10, b"x" * 10, b"z" * 10])
        second = await st.cm.put_many([b"y" * 10, b"w" * 10])
        return first, second

    first, second = trio.run(main)
    assert first[0] == first[2]
    assert len({first[0], first[1], first[3]}) == 3
    assert second[0] == first[1]
    assert st.rows() == 4
    fresh = st.fresh_manager()
    for cid, p in zip(first + second, [b"x", b"y", b"x", b"z", b"y", b"w"], strict=True):
        assert fresh.get_sync(cid) == p * 10



def test_put_many_looks_up_large_batches_in_parts(st):
    """More identities than one IN (...) query takes (500), half of them known already,
    with repeats inside the batch: every id is right and nothing is stored twice."""
    old = [b"old %d" % i for i in range(700)]
    new = [b"new %d" % i for i in range(700)]

    async def main():
        known = await st.cm.put_many(old)
        batch = [p for pair in zip(old, new, strict=True) for p in pair] + new[:50]
        return known, batch, await st.cm.put_many(batch)

    known, batch, ids = trio.run(main)
    assert ids[0:1400:2] == known, "known content keeps its ids"
    assert ids[1400:] == ids[1:100:2], "a repeat in the batch gets the first one's id"
    assert len(set(ids)) == 1400 and st.rows() == 1400
    fresh = st.fresh_manager()
    assert all(fresh.get_sync(cid) == p for cid, p in zip(ids, batch, strict=True))

def test_put_many_concurrent_with_put(st):
    payloads = [bytes([i]) * 500 for i in range(1, 9)]
    results: dict[str, list[int]] = {}

    async def many(tag):
        results[tag] = await st.cm.put_many(payloads)

    async def singles():
        results["single"] = [await st.cm.put(p) for p in reversed(payloads)][::-1]

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(many, "a")
            nursery.start_soon(singles)
            nursery.start_soon(many, "b")

    trio.run(main)
    assert results["a"] == results["b"] == results["single"]
    assert st.rows() == len(payloads)
    assert st.records_bytes() == 16 + len(payloads) * (RECORD_OVERHEAD + 500)


def test_get_verifies_and_caches(st, monkeypatch):
    cid = trio.run(st.cm.put, b"cached content")
    fresh = st.fresh_manager()
    assert fresh.cache.get(cid) is None
    assert trio.run(fresh.get, cid) == b"cached content"
    assert fresh.cache.get(cid) == b"cached content"

    def no_reads(*args):
        raise AssertionError("a cached chunk must not be read from the pack")

    monkeypatch.setattr(st.packs, "read", no_reads)
    assert trio.run(fresh.get, cid) == b"cached content"


def test_damaged_record_raises_integrity_error(st):
    cid = trio.run(st.cm.put, b"important data" * 10)
    st.damage(cid, at=3)
    fresh = st.fresh_manager()
    with pytest.raises(IntegrityError) as exc:
        trio.run(fresh.get, cid)
    assert f"chunk {cid}" in str(exc.value)
    assert fresh.cache.get(cid) is None  # damaged data is never cached
    with pytest.raises(IntegrityError):
        trio.run(fresh.get, cid)  # and stays an error
    with pytest.raises(IntegrityError):
        fresh.get_sync(cid)


def test_cache_does_not_hide_damage_of_an_uncached_chunk(tmp_path):
    s = Store(tmp_path / "s", cache_bytes=1000)  # room for one 1000-byte chunk
    try:
        async def main():
            return await s.cm.put(b"a" * 1000), await s.cm.put(b"b" * 1000)

        a, b = trio.run(main)
        assert s.cm.cache.get(a) is None and s.cm.cache.get(b) == b"b" * 1000
        s.damage(a, at=999)
        with pytest.raises(IntegrityError):
            trio.run(s.cm.get, a)
        assert trio.run(s.cm.get, b) == b"b" * 1000  # the cached, verified one still reads
    finally:
        s.close()


def test_unknown_chunk_id(st):
    with pytest.raises(IntegrityError, match="not in the chunk index"):
        trio.run(st.cm.get, 12345)
    with pytest.raises(IntegrityError):
        st.cm.location(12345)


def test_failed_append_leaves_no_dangling_index_row(st, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.packs, "append", disk_full)
    monkeypatch.setattr(st.packs, "append_many", disk_full)
    with pytest.raises(OSError):
        trio.run(st.cm.put, b"never stored")
    with pytest.raises(OSError):
        trio.run(st.cm.put_many, [b"never stored either"])
    # no index row points at a record that was never written (a placeholder with pack -1
    # may stay: it is reused by the next write of the same content)
    assert st.cat.execute("SELECT COUNT(*) FROM chunks WHERE pack >= 0").fetchone() == (0,)
    assert not st.cm._pending and not st.cm.pinned
    monkeypatch.undo()
    cid = trio.run(st.cm.put, b"never stored")  # works once the disk has room again
    assert trio.run(st.fresh_manager().get, cid) == b"never stored"


def _leave_interrupted_row(st: Store, payload: bytes) -> None:
    """What a daemon killed between the index insert and the pack append leaves behind:
    put_hashed inserts the row with pack=-1 and awaits the append in a worker thread; a
    group commit running meanwhile commits the row; then the process dies."""
    st.cat.write("INSERT INTO chunks (hash, pack, offset, length, raw_len) VALUES (?,-1,0,0,?)",
                 (st.cm.identity(payload), len(payload)))
    st.cat.commit()


def test_put_after_an_interrupted_write_of_the_same_content(st):
    payload = b"content being written when the daemon was killed"
    _leave_interrupted_row(st, payload)
    cm = st.fresh_manager()  # the next daemon
    cid = trio.run(cm.put, payload)
    assert trio.run(st.fresh_manager().get, cid) == payload


def test_put_many_after_an_interrupted_write_of_the_same_content(st):
    payload = b"batch content being written when the daemon was killed"
    _leave_interrupted_row(st, payload)
    [cid] = trio.run(st.fresh_manager().put_many, [payload])
    assert trio.run(st.fresh_manager().get, cid) == payload


def test_put_sync_after_an_interrupted_write_of_the_same_content(st):
    payload = b"sync content being written when the process was killed"
    _leave_interrupted_row(st, payload)
    cid = st.fresh_manager().put_sync(payload)
    assert st.fresh_manager().get_sync(cid) == payload


def test_chunk_cache_is_a_byte_bounded_lru():
    c = ChunkCache(10)
    c.put(1, b"aaaa")
    c.put(2, b"bbbb")
    assert c.get(1) == b"aaaa"  # 1 is now the most recent
    c.put(3, b"cccc")  # evicts 2, the least recently used
    assert c.get(2) is None and c.get(1) == b"aaaa" and c.get(3) == b"cccc"
    assert c.size == 8
    c.put(3, b"cccc")  # already there: no double counting
    assert c.size == 8
    c.drop(1)
    c.drop(1)
    assert c.size == 4 and c.get(1) is None
    c.put(4, b"x" * 11)  # larger than the whole cache: not kept
    assert c.size <= 10 and c.get(4) is None


# -- the read path: inline page-cache reads, the thread fallback, the location map --------------
def _forbid_thread_reads(monkeypatch, packs: PackStore) -> None:
    def no_thread_read(*args):
        raise AssertionError("this record should have been read inline")

    monkeypatch.setattr(packs, "read", no_thread_read)


def test_record_in_the_page_cache_is_read_inline(st, monkeypatch):
    payload = os.urandom(100_000)
    cid = trio.run(st.cm.put, payload)
    fresh = st.fresh_manager()
    _forbid_thread_reads(monkeypatch, st.packs)  # just written: in the page cache
    assert trio.run(fresh.get, cid) == payload
    assert (fresh.reads_inline, fresh.reads_thread) == (1, 0)
    assert type(fresh.cache.get(cid)) is bytes  # a copy, not a view of the shared buffer
    # the shared buffer is reused: the first chunk's cached bytes do not change
    other = trio.run(st.cm.put, os.urandom(100_000))
    assert trio.run(fresh.get, other) != payload
    assert fresh.cache.get(cid) == payload


def test_eagain_falls_back_to_a_worker_thread(st, monkeypatch):
    import snapfs.store.packs as packs_mod

    payload = os.urandom(50_000)
    cid = trio.run(st.cm.put, payload)
    calls = []

    def not_cached(fd, buffers, offset, flags=0):
        calls.append(flags)
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(packs_mod.os, "preadv", not_cached)
    fresh = st.fresh_manager()
    assert trio.run(fresh.get, cid) == payload
    assert calls == [packs_mod.RWF_NOWAIT]
    assert (fresh.reads_inline, fresh.reads_thread) == (0, 1)
    assert st.packs.nowait  # EAGAIN is not a reason to stop trying


def test_short_nowait_read_falls_back_to_a_worker_thread(st, monkeypatch):
    import snapfs.store.packs as packs_mod

    payload = os.urandom(50_000)
    cid = trio.run(st.cm.put, payload)
    real = packs_mod.os.preadv

    def partly_cached(fd, buffers, offset, flags=0):
        return real(fd, [b[:4096] for b in buffers], offset, flags)

    monkeypatch.setattr(packs_mod.os, "preadv", partly_cached)
    fresh = st.fresh_manager()
    assert trio.run(fresh.get, cid) == payload
    assert (fresh.reads_inline, fresh.reads_thread) == (0, 1)


def test_nowait_unsupported_is_remembered(st, monkeypatch):
    import snapfs.store.packs as packs_mod

    cid = trio.run(st.cm.put, b"p" * 5000)
    calls = []

    def unsupported(fd, buffers, offset, flags=0):
        calls.append(flags)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(packs_mod.os, "preadv", unsupported)
    for _ in range(2):
        fresh = st.fresh_manager()
        assert trio.run(fresh.get, cid) == b"p" * 5000
        assert fresh.reads_thread == 1
    assert len(calls) == 1 and not st.packs.nowait


def test_damaged_record_read_inline_raises_integrity_error(st, monkeypatch):
    cid = trio.run(st.cm.put, b"inline damage" * 100)
    st.damage(cid, at=700)
    fresh = st.fresh_manager()
    _forbid_thread_reads(monkeypatch, st.packs)  # the inline read itself must catch it
    with pytest.raises(IntegrityError, match=f"chunk {cid} .*checksum mismatch"):
        trio.run(fresh.get, cid)
    assert fresh.cache.get(cid) is None
    assert fresh.reads_inline == 0


def test_truncated_pack_is_reported_by_the_fallback(st):
    cid = trio.run(st.cm.put, b"t" * 9000)
    st.packs.sync()
    path = os.path.join(st.packs.directory, pack_name(1))
    os.truncate(path, os.path.getsize(path) - 10)
    fresh = st.fresh_manager()
    with pytest.raises(IntegrityError, match="truncated"):
        trio.run(fresh.get, cid)
    assert fresh.reads_thread == 1  # the short inline read declined, the thread reported


def test_encrypted_record_read_inline(tmp_path, monkeypatch):
    from snapfs.crypto.aead import Aead

    s = Store(tmp_path / "e")
    try:
        s.cm.aead = Aead(bytes(range(32, 64)))
        payload = os.urandom(128 * 1024)
        cid = trio.run(s.cm.put, payload)
        fresh = s.fresh_manager()
        fresh.aead = s.cm.aead
        _forbid_thread_reads(monkeypatch, s.packs)
        assert trio.run(fresh.get, cid) == payload
        assert fresh.reads_inline == 1
        s.damage(cid, at=1000)  # in the ciphertext: the checksum catches it first
        fresh = s.fresh_manager()
        fresh.aead = s.cm.aead
        with pytest.raises(IntegrityError):
            trio.run(fresh.get, cid)
        plain = s.fresh_manager()  # no key: refuses the envelope, inline too
        cid2 = trio.run(s.cm.put, b"second")
        with pytest.raises(IntegrityError, match="encrypted but this repository has no key"):
            trio.run(plain.get, cid2)
    finally:
        s.close()


def test_location_map_avoids_the_index_and_is_bounded(st):
    ids = [st.cm.put_sync(bytes([i]) * 3000) for i in range(1, 6)]
    cm = ChunkManager(st.cat, st.packs, KEY, cache_bytes=0, locations_limit=3)
    for cid in ids:
        assert trio.run(cm.get, cid)[:1] == bytes([ids.index(cid) + 1])
    assert list(cm._where) == ids[2:]  # the oldest went first
    queries = []
    st.cat.db.set_trace_callback(queries.append)
    try:
        trio.run(cm.get, ids[-1])
    finally:
        st.cat.db.set_trace_callback(None)
    assert not [q for q in queries if "FROM chunks" in q]


def _collector(st: Store, cm: ChunkManager):
    from snapfs.store.gc import Collector

    return Collector(st.cat, st.packs, cm, rate=0)


def test_location_map_stays_exact_across_compaction(st, monkeypatch):
    from pyroaring import BitMap

    payloads = [os.urandom(20_000) for _ in range(6)]
    ids = [st.cm.put_sync(p) for p in payloads]
    cm = ChunkManager(st.cat, st.packs, KEY, cache_bytes=0)
    for cid in ids:
        trio.run(cm.get, cid)  # every location in the map
    gc = _collector(st, cm)
    keep = ids[::2]
    assert gc.free(BitMap(keep)) == 3
    assert sorted(cm._where) == keep  # freed chunks are forgotten
    assert trio.run(gc.compact, 0.0) == 1  # pack 1 moved into pack 2 and removed
    assert 1 not in st.packs.pack_ids()
    for cid in keep:
        assert cm._where[cid] == cm._lookup(cid) and cm._where[cid][0].pack == 2
    _forbid_thread_reads(monkeypatch, st.packs)
    inline = cm.reads_inline
    for cid in keep:
        assert trio.run(cm.get, cid) == payloads[ids.index(cid)]
    assert cm.reads_inline == inline + 3  # no retries, no fallbacks


def test_a_pack_with_nothing_live_is_deleted_only_after_the_catalog_is_durable(st, monkeypatch):
    """free() commits without fsync; if compaction then deleted the pack whose every chunk
    it freed, a power cut could bring back a catalog that points into it (a removal of
    files that never became durable, their data gone: test_mnt_powerloss.py)."""
    from pyroaring import BitMap

    ids = [st.cm.put_sync(os.urandom(20_000)) for _ in range(4)]
    gc = _collector(st, st.cm)
    assert gc.free(BitMap()) == 4
    st.cat.commit()  # as Filesystem._gc does: not durable
    events = []
    sync_wal, remove_pack = st.cat.sync_wal, st.packs.remove_pack
    monkeypatch.setattr(st.cat, "sync_wal", lambda: (events.append("sync_wal"), sync_wal())[1])
    monkeypatch.setattr(st.packs, "remove_pack",
                        lambda pack: (events.append(f"remove {pack}"), remove_pack(pack))[1])
    assert trio.run(gc.compact, 0.0) == 1
    assert events == ["sync_wal", "remove 1"]
    assert ids and 1 not in st.packs.pack_ids()


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("reader", ["get", "read_into"])
def test_reads_retry_when_the_record_moved_under_a_stale_location(tmp_path, monkeypatch,
                                                                   reader, encrypted):
    """What a read in a worker thread sees when the collector moves the record meanwhile:
    the old place is gone; get() and read_into() (large reads, straight into the reply)
    read the new place instead of reporting damage."""
    from pyroaring import BitMap

    from snapfs.crypto.aead import Aead

    st = Store(tmp_path / "s")
    try:
        if encrypted:
            st.cm.aead = Aead(bytes(range(32, 64)))
        payloads = [os.urandom(20_000) for _ in range(4)]
        ids = [trio.run(st.cm.put, p) for p in payloads]
        cm = ChunkManager(st.cat, st.packs, KEY, cache_bytes=0)
        cm.aead = st.cm.aead
        for cid in ids:
            trio.run(cm.get, cid)
        gc = _collector(st, cm)
        gc.free(BitMap(ids[:2]))
        monkeypatch.setattr(cm, "relocated", lambda cid, loc: None)  # the map goes stale
        trio.run(gc.compact, 0.0)
        assert cm._where[ids[0]] != cm._lookup(ids[0])
        if reader == "get":
            assert trio.run(cm.get, ids[0]) == payloads[0]
        else:
            out = bytearray(32_768)
            trio.run(cm.read_into, ids[0], memoryview(out))
            assert out == payloads[0] + bytes(32_768 - 20_000)
        assert cm._where[ids[0]] == cm._lookup(ids[0])
    finally:
        st.close()


def test_forget_all_drops_every_cached_id(st):
    cid = trio.run(st.cm.put, b"rolled back")
    trio.run(st.cm.get, cid)
    st.cm.location(cid)
    st.cm.forget_all()
    assert st.cm.cache.get(cid) is None and not st.cm._where
    assert st.cm.cache.limit == 1 << 20


def test_default_cache_size_follows_the_machine():
    from snapfs.store.chunks import default_cache_bytes

    size = default_cache_bytes()
    assert 64 << 20 <= size <= 1 << 30
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert size == max(64 << 20, min(1 << 30, total // 16))
    assert ChunkManager.__init__.__kwdefaults__["cache_bytes"] is None


def test_record_evicted_from_the_page_cache_is_read_in_a_worker_thread(st):
    """No mocks: the kernel itself answers EAGAIN for a record it would read from disk."""
    payload = os.urandom(128 * 1024)
    cid = trio.run(st.cm.put, payload)
    st.packs.sync()  # clean pages can be dropped
    probe = os.path.join(st.root, "probe")  # does this file system drop clean pages?
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, os.urandom(1 << 16), 0)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(4096)], 8192, os.RWF_NOWAIT)
            pytest.skip("this file system kept the pages (e.g. tmpfs): no EAGAIN to see")
        except BlockingIOError:
            pass
    finally:
        os.close(fd)
    # The kernel may keep a page now and then (CI saw one inline read once in many
    # runs): drop and read again a few times; a read path that never goes to a thread
    # still fails.
    for _ in range(5):
        fd = os.open(os.path.join(st.packs.directory, pack_name(1)), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        fresh = st.fresh_manager()
        assert trio.run(fresh.get, cid) == payload
        if fresh.reads_thread:
            break
    assert (fresh.reads_inline, fresh.reads_thread) == (0, 1)
    fresh.cache.drop(cid)
    assert trio.run(fresh.get, cid) == payload  # now in the page cache again
    assert (fresh.reads_inline, fresh.reads_thread) == (1, 1)


def test_read_into_places_a_chunk_in_a_larger_buffer(st):
    """read_into, used for large reads: straight from the pack (not cached), from the cache
    when the chunk is there, and a zero-stripped payload leaves the zeroed tail alone."""
    full = os.urandom(64 * 1024)
    short = os.urandom(1000)  # a chunk whose trailing zeros were stripped
    a, b = trio.run(st.cm.put, full), trio.run(st.cm.put, short)
    fresh = st.fresh_manager()
    reply = bytearray(3 * 64 * 1024)
    mv = memoryview(reply)
    trio.run(fresh.read_into, a, mv[:64 * 1024])
    trio.run(fresh.read_into, b, mv[64 * 1024:2 * 64 * 1024])
    assert reply == full + short + bytes(2 * 64 * 1024 - 1000)
    assert fresh.reads_inline + fresh.reads_thread == 2
    assert fresh.cache.get(a) is None  # a scan does not evict what random readers use
    cached = trio.run(fresh.get, a)
    before = fresh.reads_inline + fresh.reads_thread
    part = bytearray(1000)  # smaller than the payload: the first 1,000 bytes
    trio.run(fresh.read_into, a, memoryview(part))
    assert part == cached[:1000]
    assert fresh.reads_inline + fresh.reads_thread == before  # served by the cache


def test_read_into_detects_damage(st):
    cid = trio.run(st.cm.put, os.urandom(4096))
    st.damage(cid, at=100)
    fresh = st.fresh_manager()
    with pytest.raises(IntegrityError, match=f"chunk {cid}"):
        trio.run(fresh.read_into, cid, memoryview(bytearray(8192)))


def test_read_into_an_encrypted_chunk(tmp_path):
    """Encrypted records are opened (decrypted) as get() does, then copied; a manager
    without the key refuses them on this path too."""
    from snapfs.crypto.aead import Aead

    s = Store(tmp_path / "e")
    try:
        s.cm.aead = Aead(bytes(range(32, 64)))
        payload = os.urandom(10_000)
        cid = trio.run(s.cm.put, payload)
        fresh = s.fresh_manager()
        fresh.aead = s.cm.aead
        out = bytearray(16_384)
        trio.run(fresh.read_into, cid, memoryview(out))
        assert out == payload + bytes(16_384 - 10_000)
        assert fresh.cache.get(cid) is None  # decrypted in place, not through the cache
        assert fresh.reads_inline + fresh.reads_thread == 1
        s.packs.sync()  # the worker-thread path: the pack's pages are dropped first
        fd = os.open(os.path.join(s.packs.directory, pack_name(1)), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        out2 = bytearray(16_384)
        trio.run(fresh.read_into, cid, memoryview(out2))
        assert out2 == out
        plain = s.fresh_manager()
        with pytest.raises(IntegrityError, match="encrypted but this repository has no key"):
            trio.run(plain.read_into, cid, memoryview(bytearray(16_384)))
        s.damage(cid, at=5000)
        damaged = s.fresh_manager()
        damaged.aead = s.cm.aead
        with pytest.raises(IntegrityError, match=f"chunk {cid}"):
            trio.run(damaged.read_into, cid, memoryview(bytearray(16_384)))
    finally:
        s.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_read_many_into_loads_a_batch_with_one_thread_hop(tmp_path, encrypted):
    """The bases of sparse dirty chunks, loaded when a batch of them is stored: cached
    chunks are copied, the others read (and decrypted) in one worker thread; a short
    payload leaves the rest of its buffer alone; a damaged record is reported by name."""
    from snapfs.crypto.aead import Aead

    s = Store(tmp_path / "m")
    try:
        if encrypted:
            s.cm.aead = Aead(bytes(range(32, 64)))
        payloads = [os.urandom(8192), os.urandom(3000), os.urandom(8192)]
        ids = [trio.run(s.cm.put, p) for p in payloads]
        fresh = s.fresh_manager()
        fresh.aead = s.cm.aead
        trio.run(fresh.get, ids[1])  # one of them cached
        outs = [bytearray(b"\xee" * 8192) for _ in ids]
        sizes = trio.run(fresh.read_many_into, list(zip(ids, map(memoryview, outs),
                                                        strict=True)))
        assert sizes == [8192, 3000, 8192]
        assert outs[0] == payloads[0] and outs[2] == payloads[2]
        assert outs[1][:3000] == payloads[1] and outs[1][3000:] == b"\xee" * 5192
        assert fresh.reads_thread == 2 and fresh.cache.get(ids[0]) is None
        s.damage(ids[2], at=100)
        again = s.fresh_manager()
        again.aead = s.cm.aead
        with pytest.raises(IntegrityError, match=f"chunk {ids[2]}"):
            trio.run(again.read_many_into, [(i, memoryview(bytearray(8192))) for i in ids])
    finally:
        s.close()


def test_the_catalog_is_committed_only_when_every_append_is_durable(st, monkeypatch):
    """The collector committed its moves after one pack sync and an await: a store that
    appended meanwhile had its location committed before its record was durable (a
    power loss could tear a record the catalog points at). commit_catalog syncs until
    nothing is pending, then commits without an await."""

    async def main():
        await st.cm.put_many([os.urandom(5000)])  # a record appended, not synced
        real_sync = st.packs.sync
        appends_during_sync = [2]

        def sync_while_others_append():
            real_sync()
            if appends_during_sync[0]:
                appends_during_sync[0] -= 1
                st.packs.append_many([st.cm._record(0, bytes(32), os.urandom(100))])

        monkeypatch.setattr(st.packs, "sync", sync_while_others_append)
        seen = []
        await st.cm.commit_catalog(lambda: seen.append(st.packs.unsynced))
        assert seen == [False]

    trio.run(main)


def test_a_large_batch_is_appended_in_two_threads_into_two_packs(st, monkeypatch):
    """put_many of more than SPLIT_APPEND_BYTES appends two halves side by side, each in
    a pack of its own; every chunk reads back from a fresh manager."""
    import threading

    from snapfs.store import chunks as chunks_mod

    payloads = [os.urandom(64 * 1024) for _ in range(24)]  # 1.5 MiB
    assert sum(map(len, payloads)) >= chunks_mod.SPLIT_APPEND_BYTES
    both = threading.Barrier(2)
    real = st.packs.append_many

    def append_many(items, **kwargs):
        both.wait(timeout=10)  # fails unless the two halves are appended at once
        return real(items, **kwargs)

    monkeypatch.setattr(st.packs, "append_many", append_many)
    ids = trio.run(st.cm.put_many, payloads)
    packs = {row[0] for row in st.cat.execute("SELECT pack FROM chunks")}
    assert len(packs) == 2
    fresh = st.fresh_manager(cache_bytes=0)
    for cid, payload in zip(ids, payloads, strict=True):
        assert trio.run(fresh.get, cid) == payload
    st.cm.unpin(ids)  # the caller's part, once it has referenced them
    assert not st.cm.pinned and not st.cm._pending


def test_a_failed_half_fails_the_batch_with_its_own_error(st, monkeypatch):
    """One half meets a full disk: put_many raises that OSError itself (not an
    ExceptionGroup), no index row points at a record, and the next put works."""
    payloads = [os.urandom(64 * 1024) for _ in range(24)]
    real = st.packs.append_many
    calls = []

    def append_many(items, **kwargs):
        calls.append(len(items))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(items, **kwargs)

    monkeypatch.setattr(st.packs, "append_many", append_many)
    with pytest.raises(OSError) as exc:
        trio.run(st.cm.put_many, payloads)
    assert exc.value.errno == 28 and len(calls) == 2
    assert st.cat.execute("SELECT COUNT(*) FROM chunks WHERE pack >= 0").fetchone() == (0,)
    assert not st.cm._pending and not st.cm.pinned
    monkeypatch.undo()
    ids = trio.run(st.cm.put_many, payloads)
    fresh = st.fresh_manager(cache_bytes=0)
    assert [trio.run(fresh.get, cid) for cid in ids] == payloads
