"""The filesystem of one open repository: views, write-back of dirty data, durability.

Concurrency contract (see docs/design.md): everything here runs on the trio thread.
Catalog statements are short and run inline; hashing, pack I/O and fsync run in worker
threads. Code between two awaits is atomic with respect to other FUSE handlers, and every
catalog mutation happens between awaits, so the catalog is always consistent as seen by
a handler. Dirty data lives in per-inode buffers until a flush stores it as chunks: on
fsync, on commit, when the dirty total passes a limit, and every few seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from snapfs.errors import FsError, NotFound, Refused
from snapfs.graph import accounting
from snapfs.graph import stats as graph_stats
from snapfs.repository import Repository
from snapfs.store.catalog import JOURNAL_SIZE_LIMIT
from snapfs.store.gc import Collector
from snapfs.vfs.view import BufferPool, Inode, View, store_buffers

log = logging.getLogger(__name__)

MAX_FILE_SIZE = 1 << 46  # 64 TiB
# A checkpoint starts when the WAL file grows past the size it is cut back to after a
# restart (so: when its content does), and every checkpoint_every seconds. Continuous
# commits append about 100 KB each: with only a 30 s timer the WAL reached hundreds of MB.
CHECKPOINT_BYTES = JOURNAL_SIZE_LIMIT


class Filesystem:
    def __init__(self, repo: Repository, *, dirty_limit: int = 64 * 1024 * 1024,
                 clean_orphans: bool = True) -> None:
        self.repo = repo
        self.cat = repo.cat
        self.graph = repo.graph
        self.chunks = repo.chunks
        self.chunk_size = repo.chunk_size
        self.meta = repo.meta
        # enough pooled buffers for the dirty limit plus the batch being stored
        self.pool = BufferPool(self.chunk_size, max(64, (dirty_limit + (16 << 20))
                                                    // self.chunk_size))
        self.max_file_size = MAX_FILE_SIZE
        self.dirty_limit = dirty_limit
        self.volume_views: dict[str, View] = {}
        self.snapshot_views: dict[int, View] = {}
        self._dirty: dict[tuple[int, int], tuple[View, Inode]] = {}
        self._written_since_check = 0
        self._sync_lock = trio.Lock()
        # Called with a View whose content changed without the kernel's knowledge.
        self.on_view_changed: Callable[[View], None] = lambda view: None
        # Extra sections for the stats document, e.g. the daemon's event-loop figures.
        self.extra_stats: dict[str, Callable[[], dict]] = {}
        self.collector = Collector(self.cat, repo.packs, self.chunks)
        self.gc_requested = False  # set after deletions: the next background pass collects
        self.checkpoint_bytes = CHECKPOINT_BYTES
        self._checkpoint_wanted = trio.Event()
        self.checkpoints = 0
        if clean_orphans:
            self._clean_orphans()

    # -- views -------------------------------------------------------------------------------
    def volume_view(self, name: str) -> View:
        view = self.volume_views.get(name)
        if view is None:
            self.graph.volume_draft(name)
            view = self.volume_views[name] = View(self, "volume", name)
        return view

    def snapshot_view(self, name: str) -> View:
        snap = self.graph.snapshot(name)
        view = self.snapshot_views.get(snap.id)
        if view is None:
            view = self.snapshot_views[snap.id] = View(self, "snapshot", snap.id)
        return view

    def _clean_orphans(self) -> None:
        """Files unlinked while open when the last daemon died: release them now.

        The orphan's row may be in the draft or, if a commit sealed it, in an ancestor.
        """
        orphans = self.cat.execute(
            "SELECT ino, vertex FROM inodes WHERE nlink=0 AND mode!=0").fetchall()
        if not orphans:
            return
        for draft in [v.id for v in self.graph.vertices.values() if v.is_draft]:
            chain = self.graph.chain(draft)
            inos = sorted({ino for ino, vertex in orphans if vertex in chain})
            view = self._view_of_draft(draft) if inos else None
            for ino in inos if view is not None else ():
                try:
                    node = view.get(ino)
                except FsError:
                    continue  # already released in this draft
                if node.nlink == 0 and not node.opens:
                    view._maybe_delete(node)
        self.repo.sync()

    def _view_of_draft(self, draft: int) -> View | None:
        for name, vid in self.graph.volumes.items():
            if vid == draft:
                return self.volume_view(name)
        for snap, vid in self.graph.snapshot_drafts.items():
            if vid == draft:
                return self.snapshot_view(self.graph.vertices[snap].name)
        return None

    # -- dirty data ----------------------------------------------------------------------------
    def note_dirty(self, view: View, node: Inode, idx: int) -> None:
        self._dirty[(id(view), node.ino)] = (view, node)

    def note_written(self, nbytes: int) -> None:
        self._written_since_check += nbytes

    def dirty_bytes(self) -> int:
        return sum(len(n.buffers) for _, n in self._dirty.values()) * self.chunk_size

    async def throttle(self) -> None:
        """Back-pressure for writers: keep dirty memory under the limit."""
        if self._written_since_check < self.chunk_size:
            return
        self._written_since_check = 0
        if self.dirty_bytes() > self.dirty_limit:
            await self.flush_dirty()

    async def flush_dirty(self, view: View | None = None, batch: int = 64) -> None:
        """Store every dirty buffer (of one view, or all) as chunks, many to a batch."""
        for _ in range(8):
            items = [(v, node, idx) for v, node in list(self._dirty.values())
                     if view is None or v is view for idx in sorted(node.buffers)]
            if not items:
                break
            for i in range(0, len(items), batch):
                await store_buffers(self.chunks, items[i:i + batch])
            for key, (_view, node) in list(self._dirty.items()):
                if not node.buffers:
                    del self._dirty[key]

    def flush_inodes(self, view: View | None = None) -> None:
        views = [view] if view else [*self.volume_views.values(), *self.snapshot_views.values()]
        for v in views:
            v.flush_inodes()

    async def sync(self, view: View | None = None, node: Inode | None = None) -> None:
        """Durability point: dirty data, then inode attributes, then fsync packs and WAL."""
        if node is not None and view is not None:
            await view.flush_data(node)
        else:
            await self.flush_dirty(view)
        async with self._sync_lock:
            self.flush_inodes()
            await self.commit_catalog(durable=True)

    async def commit_catalog(self, durable: bool) -> None:
        """End the open catalog transaction, never before the pack data it references.

        Pack records are made durable first (worker thread); if another request appended
        records meanwhile, sync again (the last try inline, which is rare and short), so
        that the catalog committed never points at a record a power loss could tear.
        With durable=True the WAL is fsynced too.
        """
        packs = self.repo.packs
        for _ in range(3):
            await trio.to_thread.run_sync(packs.sync)
            if not packs.unsynced:
                break
        else:
            packs.sync()
        self.cat.commit()  # no await between the check above and this commit
        if self.cat.wal_bytes() > self.checkpoint_bytes:
            self._checkpoint_wanted.set()
        if durable:
            await trio.to_thread.run_sync(self.cat.sync_wal)

    async def group_commit(self) -> None:
        """Periodic: store dirty data and end the open catalog transaction (no fsync)."""
        await self.flush_dirty()
        self.flush_inodes()
        await self.commit_catalog(durable=False)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database and let SQLite reuse it from its start.

        The bulk is copied by a worker thread on a second connection while requests go
        on; a second pass copies what was committed during the first; the last few
        frames are copied on the trio thread right after the next commit
        (Catalog.finish_checkpoint), so that the write transaction after it restarts the
        WAL. Without that last step the WAL never shrank under continuous commits.
        """
        for _ in range(2):
            await trio.to_thread.run_sync(self.cat.checkpoint)
        self.cat.request_restart()
        self.checkpoints += 1

    async def checkpointer(self, every: float = 30.0) -> None:
        """Checkpoint when the WAL passes checkpoint_bytes (signalled by commits), or on a
        timer so that an idle repository's WAL is copied back too."""
        while True:
            with trio.move_on_after(every):
                await self._checkpoint_wanted.wait()
            self._checkpoint_wanted = trio.Event()
            try:
                await self.checkpoint()
            except Exception:
                log.exception("WAL checkpoint failed; will retry")
            await trio.sleep(min(0.05, every))  # the restart happens at the next commit

    async def background(self, interval: float = 2.0, checkpoint_every: float = 30.0,
                         gc_every: float = 60.0) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.checkpointer, checkpoint_every)
            await self._background(interval, gc_every)

    async def _background(self, interval: float, gc_every: float) -> None:
        last_gc = time.monotonic()
        while True:
            await trio.sleep(interval)
            try:
                await self.group_commit()
                now = time.monotonic()
                if self.gc_requested or now - last_gc > gc_every:
                    last_gc = now
                    self.gc_requested = False
                    await self.gc()
            except Exception:
                log.exception("background write-back failed; will retry")

    def held_chunks(self):
        return accounting.shared_chunks(self.graph.vertices.values())[0]

    async def gc(self, compact: bool = True, min_dead_ratio: float = 0.25) -> dict:
        """Free unheld chunks, then compact packs (throttled). Safe while mounted."""
        await self.flush_dirty()
        freed = self.collector.free(self.held_chunks())
        await self.commit_catalog(durable=False)
        removed = await self.collector.compact(min_dead_ratio) if compact else 0
        if freed or removed:
            log.info("gc: freed %d chunks, removed %d packs", freed, removed)
        return {"freed_chunks": freed, "removed_packs": removed}

    def want_gc(self) -> None:
        self.gc_requested = True

    # -- graph operations that touch views ------------------------------------------------------
    async def commit(self, view: View, label: str | None) -> str:
        """Seal the draft under view into a snapshot; returns the snapshot's name."""
        if label is not None:
            self.graph.check_label(view.name().split("@")[0] if view.kind == "snapshot"
                                   else view.name(), label)
        if view.kind == "snapshot" and view.immutable:
            draft = self.graph.snapshot_draft(view.key, create=True)
        else:
            draft = self.graph.vertices[view.draft_id()]
        await self.flush_dirty(view)
        # No await from here to the end of graph.commit: the seal is atomic.
        for _, node in [item for item in self._dirty.values() if item[0] is view]:
            if node.buffers:  # written during the flush: store it too (rare)
                await view.flush_data(node)
        view.flush_inodes()
        if view.kind == "snapshot":
            view.prepare_reset()
        snap = self.graph.commit(draft.id, label)
        await self.commit_catalog(durable=True)
        if view.kind == "snapshot":
            view.reset()
            self.on_view_changed(view)
        log.info("committed %s (delta %d chunks)", snap.name, snap.delta)
        return snap.name

    # -- deleting ----------------------------------------------------------------------------
    def _check_unused(self, view: View | None, what: str) -> None:
        if view is None:
            return
        busy = [n for n in view.inodes.values() if n.opens]
        if busy:
            raise Refused(f"{what} has {len(busy)} open file(s): close them first", errno=16)

    async def delete_snapshot(self, name: str, *, force: bool = False) -> None:
        """Delete a snapshot (re-parenting its children) and collect what it freed."""
        snap = self.graph.snapshot(name)
        view = self.snapshot_views.get(snap.id)
        self._check_unused(view, f"snapshot {name} (under .snapshots/{name})")
        draft = self.graph.snapshot_drafts.get(snap.id)
        if draft is not None and not force and (
                self.graph.draft_has_changes(draft) or (view and self._view_dirty(view))):
            raise Refused(f"snapshot {name} has uncommitted changes under .snapshots/{name}: "
                          f"commit them (snapfs commit .snapshots/{name}) or delete with --force")
        if view is not None:
            self._discard(view)
        self.graph.delete_snapshot(name)
        await self.commit_catalog(durable=True)
        if view is not None:
            del self.snapshot_views[snap.id]
            self.on_view_changed(view)
        log.info("deleted snapshot %s", name)
        self.want_gc()

    async def delete_volume(self, name: str, *, force: bool = False) -> None:
        draft = self.graph.volume_draft(name)
        view = self.volume_views.get(name)
        self._check_unused(view, f"volume {name}")
        if not force and (self.graph.draft_has_changes(draft.id)
                          or (view and self._view_dirty(view))):
            raise Refused(f"volume {name} has uncommitted changes: commit them "
                          f"(snapfs commit {name}) or delete with --force")
        if view is not None:
            self._discard(view)
        self.graph.delete_volume(name)
        await self.commit_catalog(durable=True)
        if view is not None:
            del self.volume_views[name]
            self.on_view_changed(view)
        log.info("deleted volume %s", name)
        self.want_gc()

    def _view_dirty(self, view: View) -> bool:
        """Changes still only in memory: unstored data or unsaved attributes."""
        return bool(view.dirty_inodes) or any(v is view and n.buffers
                                               for v, n in self._dirty.values())

    def _discard(self, view: View) -> None:
        """Drop a view's unsaved state (its vertex is about to be deleted)."""
        for key, (v, node) in list(self._dirty.items()):
            if v is view:
                v.drop_buffers(node)
                del self._dirty[key]
        view.dirty_inodes.clear()
        view.dropped = True

    def stats(self) -> dict:
        result = graph_stats.compute(self.graph, self.chunk_size, self.repo.paths.packs)
        result["dirty_bytes"] = self.dirty_bytes()
        for key, fn in self.extra_stats.items():
            result[key] = fn()
        return result

    def stats_json(self) -> str:
        """The text of .snapfs/stats (graph/stats.py dumps: one line per vertex)."""
        return graph_stats.dumps(self.stats())

    def find_view(self, kind: str, name: str) -> View:
        if kind == "volume":
            return self.volume_view(name)
        if kind == "snapshot":
            return self.snapshot_view(name)
        raise NotFound(f"unknown view kind {kind}")
