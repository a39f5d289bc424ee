"""The garbage collector: frees unheld chunks and compacts pack files in the background.

Two steps:

* free(held): every indexed chunk that no vertex holds (it is in no added set) and that
  no in-flight write has pinned loses its index row, at once and in one transaction. Its
  record becomes dead bytes in its pack.
* compact(): a pack whose dead bytes pass a ratio has its live records copied to the
  packs being written (verified on the way, so damage is never copied silently), the index is
  repointed, the copies and the catalog are made durable, and only then is the old pack
  deleted. A crash at any point leaves either the old pack referenced, or the copies
  referenced and the old pack as an unindexed file that the next pass removes. A pack
  with nothing live is deleted only once the catalog that freed its last chunk is
  durable, for the same reason.

Copying is throttled (bytes per second) and done in batches: pack reads and writes run
in worker threads, the index updates on the trio thread between awaits, so foreground
requests are never held for more than one batch's index update.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import trio
from pyroaring import BitMap

from snapfs.store.catalog import Catalog
from snapfs.store.chunks import ChunkManager
from snapfs.store.packs import PACK_HEADER, PackStore
from snapfs.types import ChunkLocation

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, cat: Catalog, packs: PackStore, chunks: ChunkManager, *,
                 rate: float = 64 * 1024 * 1024, batch_bytes: int = 4 * 1024 * 1024,
                 commit: Callable[[], None] | None = None) -> None:
        """commit: how the catalog's open transaction is committed (the daemon's also
        writes the inode rows kept in memory first); Catalog.commit by default."""
        self.cat = cat
        self.commit = commit or cat.commit
        self.packs = packs
        self.chunks = chunks
        self.rate = rate
        self.batch_bytes = batch_bytes
        self.freed_chunks = 0
        self.moved_bytes = 0
        self.removed_packs = 0

    def garbage(self, held: BitMap) -> BitMap:
        indexed = BitMap(cid for (cid,) in self.cat.execute("SELECT id FROM chunks WHERE pack>=0"))
        return indexed - held - BitMap(self.chunks.pinned)

    def free(self, held: BitMap) -> int:
        """Drop the index rows of every unheld, unpinned chunk; returns how many."""
        dead = self.garbage(held)
        ids = list(dead)
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            self.cat.write(f"DELETE FROM chunks WHERE id IN ({','.join('?' * len(part))})", part)
        for cid in ids:
            self.chunks.forget(cid)
        self.freed_chunks += len(ids)
        return len(ids)

    def pack_usage(self) -> dict[int, tuple[int, int]]:
        """pack id -> (file size, live record bytes)."""
        live = dict(self.cat.execute(
            "SELECT pack, SUM(length) FROM chunks WHERE pack>=0 GROUP BY pack").fetchall())
        usage = {}
        for pack in self.packs.pack_ids():
            try:
                size = self.packs.pack_size(pack)
            except FileNotFoundError:
                continue
            usage[pack] = (size, live.get(pack, 0))
        return usage

    def candidates(self, min_dead_ratio: float, max_live_ratio: float = 1.0) -> list[int]:
        """Packs to compact, those with nothing live first (removing them needs no free
        space, which matters on a full disk), then the most dead bytes first; only those
        whose live share is at most max_live_ratio (the cheap ones: the copying is what
        costs)."""
        out = []
        for pack, (size, live) in self.pack_usage().items():
            dead = size - PACK_HEADER.size - live
            if live > max_live_ratio * size:
                continue
            if dead > 0 and (live == 0 or dead / max(size, 1) >= min_dead_ratio):
                out.append((live > 0, -dead, pack))
        return [pack for _, _, pack in sorted(out)]

    async def compact(self, min_dead_ratio: float = 0.25, *,
                      pause: Callable[[], bool] | None = None,
                      max_live_ratio: float = 1.0) -> int:
        """Compact every pack past the ratio (and no more live than max_live_ratio);
        returns the number of packs removed.

        pause: asked before each pack and each batch; once it says True the pass stops
        there (the daemon's background pass gives way to requests that come in). A pack
        left half moved is consistent: each chunk's row names one valid copy, and the
        next pass moves the rest and removes the pack."""
        removed = 0
        for pack in self.candidates(min_dead_ratio, max_live_ratio):
            if pause and pause():
                break
            if not await self._compact_pack(pack, pause):
                break
            removed += 1
        return removed

    async def _compact_pack(self, pack: int, pause: Callable[[], bool] | None = None) -> bool:
        """Move pack's live records and remove it; False if pause stopped it first."""
        if self.packs.writing(pack):  # stop writing into it first
            await trio.to_thread.run_sync(self.packs.rotate)
        moved = 0
        for rounds in range(4):
            # A store whose append reached this pack before the rotation records the
            # location only when its worker thread returns, which may be after the
            # first query: the next round moves what such stores added.
            rows = self.cat.execute("SELECT id, offset, length FROM chunks WHERE pack=? "
                                    "ORDER BY offset", (pack,)).fetchall()
            if not rows:
                break
            if rounds == 3:
                log.warning("pack %d still has live chunks after compaction; kept", pack)
                return True
            if not await self._move_rows(pack, rows, pause):
                return False
            moved += len(rows)
        if not moved:
            # Nothing live to move, but the commit that freed the pack's last chunk may
            # not be durable yet: if a power cut took it, the catalog would come back
            # pointing into the deleted pack (files whose removal never became durable,
            # unreadable). tests/fuse/test_mnt_powerloss.py.
            await self._make_durable()
        await trio.to_thread.run_sync(self.packs.remove_pack, pack)
        self.removed_packs += 1
        log.info("compacted pack %d (%d live chunks moved)", pack, moved)
        return True

    async def _move_rows(self, pack: int, rows: list[tuple[int, int, int]],
                         pause: Callable[[], bool] | None = None) -> bool:
        """Move rows in batches; False if pause stopped it before the last."""
        batch: list[tuple[int, ChunkLocation]] = []
        size = 0
        for cid, offset, length in rows:
            batch.append((cid, ChunkLocation(pack, offset, length)))
            size += length
            if size >= self.batch_bytes:
                await self._move(batch)
                batch, size = [], 0
                if pause and pause():
                    return False
        if batch:
            await self._move(batch)
        await self._make_durable()  # then the old pack may go
        return True

    async def _make_durable(self) -> None:
        """Commit, with the packs synced first and the WAL fsynced after: what the
        catalog says now survives a power loss."""
        await self.chunks.commit_catalog(self.commit)
        await trio.to_thread.run_sync(self.cat.sync_wal)

    async def _move(self, batch: list[tuple[int, ChunkLocation]]) -> None:
        started = time.monotonic()

        def read_all():
            return [(cid, *self.packs.read_record(cid, loc)) for cid, loc in batch]

        records = await trio.to_thread.run_sync(read_all)
        # compaction frees space: it may use half the reserve that new data may not
        locs = await trio.to_thread.run_sync(functools.partial(
            self.packs.append_many, [(cid, payload, raw, flags)
                                     for cid, payload, raw, flags in records],
            keep=self.packs.reserve // 2))
        moved = 0
        for (cid, old), new in zip(batch, locs, strict=True):
            cur = self.cat.execute("SELECT pack, offset FROM chunks WHERE id=?", (cid,)).fetchone()
            if cur is None or (cur[0], cur[1]) != (old.pack, old.offset):
                continue  # freed meanwhile: the copy is dead bytes in the new pack
            self.cat.write("UPDATE chunks SET pack=?, offset=?, length=? WHERE id=?",
                           (new.pack, new.offset, new.length, cid))
            self.chunks.relocated(cid, new)  # keep the reader's location map exact
            moved += new.length
        self.moved_bytes += moved
        # throttle: keep to self.rate bytes per second of copying
        budget = moved / self.rate if self.rate else 0
        spent = time.monotonic() - started
        if budget > spent:
            await trio.sleep(budget - spent)

    def report(self) -> dict:
        usage = self.pack_usage()
        stored = sum(s for s, _ in usage.values())
        live = sum(lv for _, lv in usage.values())
        return {"packs": len(usage), "pack_bytes": stored, "live_record_bytes": live,
                "dead_bytes": stored - live - PACK_HEADER.size * len(usage),
                "freed_chunks": self.freed_chunks, "moved_bytes": self.moved_bytes,
                "removed_packs": self.removed_packs}
