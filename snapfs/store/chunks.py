"""Chunks by identity: deduplication, the chunk index, a read cache and integrity checks.

A chunk's identity is a keyed hash of its plaintext under a per-repository random key
(BLAKE3 in keyed mode; HMAC-SHA256 in repositories of format 1), so equal plaintexts
deduplicate but nobody without the key learns which chunks are equal (the key is wrapped
in an encrypted repository). The index row (chunks table) maps the
identity to a chunk id and the record's place in a pack file.

Hashing and pack writes run in worker threads (blake3, hashlib and os.pwrite release the GIL);
the index is touched only from the calling (trio) thread, between awaits, so each put is
atomic with respect to other handlers. Two concurrent puts of the same new content share
one record: the second waits for the first.

Reading a chunk that is not in the cache costs, in this order of preference:

* the location, from an in-memory map (``_where``) filled from the index on first use and
  kept exact by the only code that moves or deletes records of live chunks, the collector
  (``relocated``, ``forget``). Chunk ids are never reused (AUTOINCREMENT), and the index
  row of a chunk that can be read never changes otherwise. The map is bounded (FIFO).
* the record, read on the event loop's thread with RWF_NOWAIT into a reused buffer and
  verified there (xxh3 and, if encrypted, AES-GCM: 10-20 us for 128 KiB), when the page
  cache holds it; a trio thread hop costs more than that (BENCHMARKS.md). Only when the
  kernel would have to wait for the disk (EAGAIN, or a short read) does the read go to a
  worker thread, so a cold disk never stalls the other requests.

Large reads use ``read_into``: the payload is scattered straight into the reply buffer.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TypeVar

import trio
from blake3 import blake3

from snapfs.crypto.aead import OVERHEAD as AEAD_OVERHEAD
from snapfs.crypto.aead import Aead
from snapfs.errors import IntegrityError
from snapfs.store.catalog import Catalog
from snapfs.store.packs import FLAG_ENCRYPTED, RECORD_OVERHEAD, PackStore, pack_name
from snapfs.types import ChunkLocation

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
LOCATIONS_LIMIT = 1 << 18  # 262,144 locations (32 GiB of 128 KiB chunks), about 60 MiB
INLINE_HASH_BYTES = 256 * 1024  # BLAKE3 of this much on the trio thread: ~40 us, < one hop
SPLIT_APPEND_BYTES = 1 * MiB  # a batch this large is appended in two threads, two packs


def default_cache_bytes() -> int:
    """The plaintext chunk cache by default: 1/16 of the machine's memory, at least 64 MiB
    and at most 1 GiB."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 0
    return max(64 * MiB, min(1024 * MiB, total // 16))


class ChunkCache:
    """A byte-bounded LRU of plaintext chunks (hot reads never touch the pack files)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def get(self, cid: int) -> bytes | None:
        data = self._items.get(cid)
        if data is not None:
            self._items.move_to_end(cid)
        return data

    def put(self, cid: int, data: bytes) -> None:
        if cid in self._items:
            return
        self._items[cid] = data
        self.size += len(data)
        while self.size > self.limit and self._items:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)

    def drop(self, cid: int) -> None:
        data = self._items.pop(cid, None)
        if data is not None:
            self.size -= len(data)


class ChunkManager:
    def __init__(self, catalog: Catalog, packs: PackStore, id_key: bytes, *,
                 cache_bytes: int | None = None, aead: Aead | None = None,
                 locations_limit: int = LOCATIONS_LIMIT, id_hash: str = "blake3") -> None:
        self.cat = catalog
        self.packs = packs
        self.id_key = id_key
        if id_hash not in ("blake3", "hmac-sha256"):
            raise ValueError(f"unknown chunk identity hash {id_hash!r}")
        self.id_hash = id_hash
        self.aead = aead  # encrypted repository: every record is an AES-GCM envelope
        self.cache = ChunkCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
        self._where: dict[int, tuple[ChunkLocation, bytes]] = {}  # see the module docstring
        self.locations_limit = max(1, locations_limit)
        self._buf = bytearray()  # the event loop thread's record buffer (read_cached)
        self.reads_inline = 0  # records read on the event loop's thread (page cache hits)
        self.reads_thread = 0  # records read in a worker thread (would have waited)
        self._pending: dict[bytes, trio.Event] = {}
        self.pinned: Counter[int] = Counter()

    def identity(self, payload: bytes) -> bytes:
        """The chunk identity: 32 bytes, keyed (any thread; the GIL is released)."""
        if self.id_hash == "blake3":
            return blake3(payload, key=self.id_key).digest()
        return hmac.digest(self.id_key, payload, "sha256")

    # -- writing ---------------------------------------------------------------------------
    async def put(self, payload: bytes) -> int:
        """Store payload (non-empty, trailing zeros already stripped); return its chunk id."""
        digest = await trio.to_thread.run_sync(self.identity, payload)
        return await self.put_hashed(digest, payload)

    async def put_hashed(self, digest: bytes, payload: bytes) -> int:
        while True:
            row = self.cat.execute("SELECT id, pack FROM chunks WHERE hash=?", (digest,)).fetchone()
            if row is not None and row[1] >= 0:
                return row[0]
            pending = self._pending.get(digest)
            if pending is None:
                break
            await pending.wait()
        event = self._pending[digest] = trio.Event()
        try:
            # a placeholder left by an interrupted write of the same content is reused
            cid = row[0] if row is not None else self._placeholder(digest, len(payload))
            try:
                loc = await trio.to_thread.run_sync(self._append_one, cid, digest, payload)
            except BaseException:
                self.cat.write("DELETE FROM chunks WHERE id=? AND pack<0", (cid,))
                raise
            self._located(cid, loc, payload)
            return cid
        finally:
            del self._pending[digest]
            event.set()

    def _record(self, cid: int, digest: bytes, payload: bytes) -> tuple[int, bytes, int, int]:
        """The pack record for a payload: sealed under the data key when encrypted, bound
        to the chunk's identity so that records cannot be swapped."""
        if self.aead is None:
            return cid, payload, len(payload), 0
        return cid, self.aead.seal(payload, b"chunk" + digest), len(payload), FLAG_ENCRYPTED

    def _append(self, items: list[tuple[int, bytes, bytes]],
                sync: bool = False) -> list[ChunkLocation]:
        """Worker thread: seal (if encrypted) and append a batch with one write; with
        sync, fdatasync the pack too (an fsync saves a thread hop, ~100 us here)."""
        return self.packs.append_many([self._record(cid, d, p) for cid, d, p in items],
                                      sync=sync)

    async def _append_batch(self, items: list[tuple[int, bytes, bytes]],
                            sync: bool) -> list[ChunkLocation]:
        """Append a batch from worker threads: a large one in two halves side by side,
        each into a pack of its own (PackStore's write lanes), sealing and copying on
        both cores. A flush of 1 GiB of dirty chunks took 4.1 s in one thread, nearly
        all of it the copy into new page-cache memory (BENCHMARKS.md)."""
        if len(items) < 2 or sum(len(p) for _, _, p in items) < SPLIT_APPEND_BYTES:
            return await trio.to_thread.run_sync(self._append, items, sync)
        half = len(items) // 2
        first, second = await in_threads(self._append, [(items[:half], sync),
                                                        (items[half:], sync)])
        return first + second

    def _append_one(self, cid: int, digest: bytes, payload: bytes) -> ChunkLocation:
        return self._append([(cid, digest, payload)])[0]

    def _placeholder(self, digest: bytes, raw_len: int) -> int:
        """An index row for a record being written (pack -1 until it is)."""
        return self.cat.write(
            "INSERT INTO chunks (hash, pack, offset, length, raw_len) VALUES (?,-1,0,0,?)",
            (digest, raw_len)).lastrowid

    def _located(self, cid: int, loc: ChunkLocation, payload: bytes) -> None:
        self._located_many([(cid, loc, payload)])

    def _located_many(self, placed: list[tuple[int, ChunkLocation, bytes]]) -> None:
        """Record where appended records are (one executemany for a batch)."""
        self.cat.writemany("UPDATE chunks SET pack=?, offset=?, length=? WHERE id=?",
                           [(loc.pack, loc.offset, loc.length, cid) for cid, loc, _ in placed])
        for cid, _, payload in placed:
            if type(payload) is bytes:  # not a view of a write buffer (store_buffers)
                self.cache.put(cid, payload)

    def _rows_by_hash(self, digests: list[bytes]) -> dict[bytes, tuple[int, int]]:
        """The index rows (id, pack) of many identities: a few queries for a batch, not
        one per chunk (a sequential writer stores 8,192 chunks per GiB)."""
        found: dict[bytes, tuple[int, int]] = {}
        unique = list(dict.fromkeys(digests))
        for i in range(0, len(unique), 500):
            part = unique[i:i + 500]
            marks = ",".join("?" * len(part))
            for digest, cid, pack in self.cat.execute(
                    f"SELECT hash, id, pack FROM chunks WHERE hash IN ({marks})", part):
                found[digest] = (cid, pack)
        return found

    def _identities(self, payloads: list[bytes]) -> list[bytes]:
        return [self.identity(p) for p in payloads]

    async def identities(self, payloads: list[bytes]) -> list[bytes]:
        """Hash a batch in worker threads: one hop per half, both cores busy. Up to
        INLINE_HASH_BYTES of BLAKE3 (about 20 us per 128 KiB here) is hashed right here:
        a thread hop costs more (about 100 us of latency), and an fsync of a small
        write waits for it."""
        if self.id_hash == "blake3" and sum(map(len, payloads)) <= INLINE_HASH_BYTES:
            return self._identities(payloads)
        if len(payloads) < 4:
            return await trio.to_thread.run_sync(self._identities, payloads)
        half = len(payloads) // 2
        first, second = await in_threads(self._identities, [(payloads[:half],),
                                                            (payloads[half:],)])
        return first + second

    async def commit_catalog(self, commit: Callable[[], None] | None = None) -> None:
        """End the catalog's open transaction (commit, by default Catalog.commit), never
        before the pack records it references are durable.

        A location is recorded only after its append returned, having set the pack's
        unsynced flag: with the flag clear, every record the catalog points at is durable.
        Another request may append while the sync runs in a worker thread, so the flag is
        checked again (the last sync inline, which is rare and short), and commit is
        called with no await after the last check. The collector committed its moves
        after one sync and an await: a store in between had its location committed
        before its record was durable.
        """
        for _ in range(3):
            if not self.packs.unsynced:
                break
            await trio.to_thread.run_sync(self.packs.sync)
        else:
            if self.packs.unsynced:
                self.packs.sync()
        (commit or self.cat.commit)()

    async def put_many(self, payloads: list[bytes], sync: bool = False) -> list[int]:
        """Store a batch of payloads; one thread hop for hashing (none for a small
        batch), one for the pack write, which with sync also makes the pack durable."""
        digests = await self.identities(payloads)
        ids: list[int | None] = [None] * len(payloads)
        new: list[tuple[int, int, bytes, bytes]] = []  # (position, chunk id, digest, payload)
        waits: list[int] = []
        rows = self._rows_by_hash(digests)
        for i, digest in enumerate(digests):
            row = rows.get(digest)
            if row is not None and row[1] >= 0:
                ids[i] = row[0]
                self.pinned[row[0]] += 1
            elif digest in self._pending:
                waits.append(i)
            else:
                cid = row[0] if row is not None else self._placeholder(digest, len(payloads[i]))
                self._pending[digest] = trio.Event()
                self.pinned[cid] += 1
                new.append((i, cid, digest, payloads[i]))
        try:
            if new:
                locs = await self._append_batch([(cid, d, p) for _, cid, d, p in new], sync)
                self._located_many([(cid, loc, payload) for (_, cid, _, payload), loc
                                    in zip(new, locs, strict=True)])
                for i, cid, _digest, _payload in new:
                    ids[i] = cid
        except BaseException:
            for i, cid, _digest, _payload in new:
                if ids[i] is None:
                    self.cat.write("DELETE FROM chunks WHERE id=? AND pack<0", (cid,))
            self.unpin([cid for cid in ids if cid is not None] + [n[1] for n in new
                                                                   if ids[n[0]] is None])
            raise
        finally:
            for _, _, digest, _ in new:
                self._pending.pop(digest).set()
        try:
            for i in waits:
                ids[i] = cid = await self.put_hashed(digests[i], payloads[i])
                self.pinned[cid] += 1
        except BaseException:
            self.unpin([cid for cid in ids if cid is not None])
            raise
        return ids  # type: ignore[return-value]

    def pin(self, ids: list[int]) -> None:
        """Keep chunks from the collector until the caller has referenced them."""
        for cid in ids:
            self.pinned[cid] += 1

    def unpin(self, ids: list[int]) -> None:
        for cid in ids:
            self.pinned[cid] -= 1
            if self.pinned[cid] <= 0:
                del self.pinned[cid]

    def put_sync(self, payload: bytes) -> int:
        """put() for single-threaded callers without trio (tests, import, CLI)."""
        digest = self.identity(payload)
        row = self.cat.execute("SELECT id, pack FROM chunks WHERE hash=?", (digest,)).fetchone()
        if row is not None and row[1] >= 0:
            return row[0]
        cid = row[0] if row is not None else self._placeholder(digest, len(payload))
        try:
            loc = self._append_one(cid, digest, payload)
        except BaseException:
            self.cat.write("DELETE FROM chunks WHERE id=? AND pack<0", (cid,))
            raise
        self._located(cid, loc, payload)
        return cid

    # -- reading -----------------------------------------------------------------------------
    def location(self, cid: int) -> tuple[ChunkLocation, bytes]:
        """Where chunk cid is stored, and its identity (the envelope's associated data)."""
        where = self._where.get(cid)
        if where is None:
            where = self._lookup(cid)
            self._remember(cid, where)
        return where

    def knows_location(self, cid: int) -> bool:
        return cid in self._where

    def locate_many(self, cids: list[int]) -> None:
        """Put the locations of many chunks in the map with a few queries: a sequential
        reader otherwise looked each one up alone, a query per 128 KiB read (11-17 % of
        the daemon's busy samples in a cold sequential read). Chunks the index lacks are
        left out: location() reports them when they are read."""
        todo = [cid for cid in dict.fromkeys(cids) if cid and cid not in self._where]
        for i in range(0, len(todo), 500):
            part = todo[i:i + 500]
            marks = ",".join("?" * len(part))
            for cid, pack, offset, length, digest in self.cat.execute(
                    "SELECT id, pack, offset, length, hash FROM chunks "
                    f"WHERE id IN ({marks})", part):
                if pack >= 0:
                    self._remember(cid, (ChunkLocation(pack, offset, length), digest))

    def _remember(self, cid: int, where: tuple[ChunkLocation, bytes]) -> None:
        if len(self._where) >= self.locations_limit:
            del self._where[next(iter(self._where))]  # the oldest entry
        self._where[cid] = where

    def _lookup(self, cid: int) -> tuple[ChunkLocation, bytes]:
        """The location from the index itself (never from the map)."""
        row = self.cat.execute("SELECT pack, offset, length, hash FROM chunks WHERE id=?",
                               (cid,)).fetchone()
        if row is None or row[0] < 0:
            raise IntegrityError(f"chunk {cid} is referenced but not in the chunk index")
        return ChunkLocation(*row[:3]), row[3]

    def relocated(self, cid: int, loc: ChunkLocation) -> None:
        """The collector moved chunk cid's record to loc (and updated the index row)."""
        where = self._where.get(cid)
        if where is not None:
            self._where[cid] = (loc, where[1])

    def forget(self, cid: int) -> None:
        """Chunk cid's index row was deleted: drop it from the cache and the location map."""
        self.cache.drop(cid)
        self._where.pop(cid, None)

    def forget_all(self) -> None:
        """The catalog was rolled back: index rows (and chunk ids, which a rollback can hand
        out again) may have vanished, so nothing cached by id can be trusted."""
        self.cache = ChunkCache(self.cache.limit)
        self._where.clear()

    def read_stats(self) -> dict:
        return {"inline": self.reads_inline, "thread": self.reads_thread,
                "cache_bytes": self.cache.size, "cache_limit": self.cache.limit,
                "locations": len(self._where)}

    def _open(self, cid: int, where: tuple[ChunkLocation, bytes], payload, flags: int) -> bytes:
        """The plaintext of a verified record's payload (bytes or a view)."""
        loc, digest = where
        if flags & FLAG_ENCRYPTED:
            if self.aead is None:
                raise IntegrityError(f"chunk {cid} is encrypted but this repository has no key")
            return self.aead.open(payload, b"chunk" + digest,
                                  f"chunk {cid} in {pack_name(loc.pack)} at offset {loc.offset}")
        if self.aead is not None:
            raise IntegrityError(f"chunk {cid} is stored unencrypted in an encrypted repository")
        return payload if type(payload) is bytes else bytes(payload)

    def _read_verified(self, cid: int, where: tuple[ChunkLocation, bytes]) -> bytes:
        """Read, verify (and decrypt) a record; any thread, may wait for the disk."""
        payload, flags = self.packs.read(cid, where[0])
        return self._open(cid, where, payload, flags)

    def _read_cached(self, cid: int, where: tuple[ChunkLocation, bytes]) -> bytes | None:
        """_read_verified on the event loop's thread, only from the page cache (None when
        the record is not all there). Uses the one shared buffer: no await in here."""
        got = self.packs.read_cached(cid, where[0], self._grow_buf(where[0].length))
        if got is None:
            return None
        return self._open(cid, where, got[0], got[1])

    async def get(self, cid: int) -> bytes:
        data = self.cache.get(cid)
        if data is not None:
            return data
        data = await self._read_located(cid, lambda where: self._read_cached(cid, where),
                                        lambda where: self._read_verified(cid, where))
        self.cache.put(cid, data)
        return data

    async def _read_located(self, cid: int, inline: Callable, in_thread: Callable):
        """inline(where) on the event loop's thread, or, when it returns None (the record
        is not all in the page cache), in_thread(where) in a worker thread. A record the
        collector moved meanwhile fails its checks at the old place: it is read again at
        the new one; any other IntegrityError is damage."""
        where = self.location(cid)
        while True:
            try:
                result = inline(where)
                if result is None:
                    self.reads_thread += 1
                    return await trio.to_thread.run_sync(in_thread, where)
                self.reads_inline += 1
                return result
            except IntegrityError:
                self._where.pop(cid, None)
                if self.location(cid) == where:
                    raise
                where = self.location(cid)

    async def read_into(self, cid: int, out: memoryview) -> int:
        """Copy chunk cid's plaintext from its start into out; returns how many bytes were
        placed: a payload shorter than out (trailing zeros are not stored) leaves the rest
        of out alone, so a reader zeroes it first.

        For large reads, which would otherwise copy each chunk three times (page cache to
        the record buffer, to a bytes object, into the joined reply), and for loading a
        chunk into a write buffer: a record that out holds whole is read (and decrypted)
        straight into it. It is not cached: a scan larger than the cache would only evict
        what random readers use, and a chunk loaded for writing is about to change.
        """
        data = self.cache.get(cid)
        if data is None:
            where = self.location(cid)
            length = where[0].length - RECORD_OVERHEAD
            if self.aead is None and length <= len(out):
                await self._read_payload_into(cid, where, out[:length])
                return length
            if self.aead is not None and length - AEAD_OVERHEAD <= len(out):
                await self._open_into(cid, out[:length - AEAD_OVERHEAD])
                return length - AEAD_OVERHEAD
            data = await self.get(cid)
        n = min(len(data), len(out))
        with memoryview(data) as mv:
            out[:n] = mv[:n]
        return n

    async def read_many_into(self, items: list[tuple[int, memoryview]]) -> list[int]:
        """read_into for a batch, with one worker-thread hop for all records not cached.

        For merging sparse dirty chunks with their stored bases when a batch of them is
        stored: loading each inline would hold the event loop for the whole batch, and a
        hop per chunk costs more than the read. A record that fails its checks in the
        thread is read again alone by read_into, which follows a move by the collector
        or reports the damage.
        """
        sizes = [0] * len(items)
        todo = []
        for i, (cid, out) in enumerate(items):
            data = self.cache.get(cid)
            if data is not None:
                n = min(len(data), len(out))
                with memoryview(data) as mv:
                    out[:n] = mv[:n]
                sizes[i] = n
            else:
                todo.append((i, cid, self.location(cid), out))
        if len(todo) == 1:  # one record: inline when it is in the page cache, no hop
            sizes[todo[0][0]] = await self.read_into(todo[0][1], todo[0][3])
        elif todo:
            self.reads_thread += len(todo)
            failed = await trio.to_thread.run_sync(self._read_many_sync, todo, sizes)
            for i in failed:
                sizes[i] = await self.read_into(*items[i])
        return sizes

    def _read_many_sync(self, todo: list, sizes: list[int]) -> list[int]:
        """Worker thread: each record straight into its buffer; returns the failures."""
        failed = []
        for i, cid, where, out in todo:
            length = where[0].length - RECORD_OVERHEAD
            try:
                if self.aead is None and length <= len(out):
                    flags = self.packs.read_payload_into(cid, where[0], out[:length],
                                                         nowait=False)
                    if flags & FLAG_ENCRYPTED:
                        raise IntegrityError("encrypted record")
                    sizes[i] = length
                elif self.aead is not None and length - AEAD_OVERHEAD <= len(out):
                    payload, flags = self.packs.read(cid, where[0])
                    self._open_payload_into(cid, where, payload, flags,
                                            out[:length - AEAD_OVERHEAD])
                    sizes[i] = length - AEAD_OVERHEAD
                else:
                    failed.append(i)
            except (IntegrityError, OSError):
                failed.append(i)
        return failed

    async def _read_payload_into(self, cid: int, where: tuple[ChunkLocation, bytes],
                                 out: memoryview) -> None:
        flags = await self._read_located(
            cid, lambda w: self.packs.read_payload_into(cid, w[0], out, nowait=True),
            lambda w: self.packs.read_payload_into(cid, w[0], out, nowait=False))
        if flags & FLAG_ENCRYPTED:
            raise IntegrityError(f"chunk {cid} in {pack_name(where[0].pack)} is encrypted "
                                 "but this repository has no key")

    async def _open_into(self, cid: int, out: memoryview) -> None:
        """An encrypted record, decrypted straight into out: read and verified as get()
        reads (inline from the page cache, else in a worker thread, which decrypts too)."""

        def inline(where: tuple[ChunkLocation, bytes]) -> bool | None:
            got = self.packs.read_cached(cid, where[0], self._grow_buf(where[0].length))
            if got is None:
                return None
            self._open_payload_into(cid, where, got[0], got[1], out)
            return True

        def in_thread(where: tuple[ChunkLocation, bytes]) -> None:
            payload, flags = self.packs.read(cid, where[0])
            self._open_payload_into(cid, where, payload, flags, out)

        await self._read_located(cid, inline, in_thread)

    def _open_payload_into(self, cid: int, where: tuple[ChunkLocation, bytes], payload,
                           flags: int, out: memoryview) -> None:
        loc, digest = where
        if not flags & FLAG_ENCRYPTED:
            raise IntegrityError(f"chunk {cid} is stored unencrypted in an encrypted repository")
        self.aead.open_into(payload, b"chunk" + digest, f"chunk {cid} in {pack_name(loc.pack)} "
                            f"at offset {loc.offset}", out)

    def _grow_buf(self, length: int) -> bytearray:
        """The event loop thread's record buffer, at least length bytes."""
        if len(self._buf) < length:
            self._buf = bytearray(max(length, 128 * 1024 + RECORD_OVERHEAD + 64))
        return self._buf

    def get_sync(self, cid: int) -> bytes:
        """get() for callers without trio, in any one thread (never the shared buffer)."""
        data = self.cache.get(cid)
        if data is None:
            data = self._read_verified(cid, self._lookup(cid))
        return data

    async def sync(self) -> None:
        await trio.to_thread.run_sync(self.packs.sync)


async def in_threads(fn: Callable[..., T], calls: list[tuple]) -> list[T]:
    """fn(*args) for each args of calls, each in a worker thread, all at once; their
    results in order. Every call runs to its end (a worker thread cannot be stopped);
    then the first exception is raised as itself, not in an ExceptionGroup, so that
    callers see the OSError (ENOSPC) or IntegrityError they handle."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    async def run(i: int, args: tuple) -> None:
        try:
            results[i] = await trio.to_thread.run_sync(fn, *args)
        except BaseException as e:  # noqa: BLE001 - raised below, after the others end
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for i, args in enumerate(calls):
            nursery.start_soon(run, i, args)
    if errors:
        raise errors[0]
    return results
