"""The filesystem of one open repository: views, write-back of dirty data, durability.

Concurrency contract (see docs/design.md): everything here runs on the trio thread.
Catalog statements are short and run inline; hashing, pack I/O and fsync run in worker
threads. Code between two awaits is atomic with respect to other FUSE handlers, and every
catalog mutation happens between awaits, so the catalog is always consistent as seen by
a handler. Dirty data lives in per-inode buffers until a flush stores it as chunks: on
fsync, on commit, at unmount, and by the write-back policy below.

Write-back policy: the data of an open file stays dirty in memory, so that a chunk
written many times (random writes) is hashed and appended to a pack once, not at every
group commit. The background pass (every 2 s) stores the dirty chunks of files nobody
has open and chunks first dirtied more than dirty_expire seconds ago (like the kernel's
dirty_expire); a writer that takes the dirty total past dirty_limit stores the coldest
chunks first (the fewest writes per page held, then dirtied first). Whole-page writes into
stored chunks hold only their pages (sparse chunks, see DirtyChunk), so the limit counts
pages. A chunk that a sequential
writer filled from start to end will not be written again soon: such chunks are stored
in the background as soon as a batch of them is complete, so that a long sequential
write overlaps its hashing and pack appends with the writing and reuses pooled buffers.
fsync, commit and unmount store everything they cover. A crash loses at most what was
not fsynced or committed; the catalog never references unstored data.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

import trio

from snapfs.errors import FsError, IntegrityError, NotFound, Refused, is_disk_full
from snapfs.graph import accounting
from snapfs.graph import stats as graph_stats
from snapfs.graph.delete import Deletion, pending_purges, purge_steps
from snapfs.lane import Lane
from snapfs.ratelimit import Every
from snapfs.repository import Repository
from snapfs.store import intentlog
from snapfs.store.catalog import JOURNAL_SIZE_LIMIT
from snapfs.store.gc import Collector
from snapfs.store.intentlog import IntentLog, IntentRecord
from snapfs.vfs.buffers import PAGE, BufferPool, DirtyChunk, release_free_memory
from snapfs.vfs.view import STORE_BATCH, Inode, View, store_batches, store_buffers

log = logging.getLogger(__name__)

# The kernel's own limit for FUSE files (MAX_LFS_FILESIZE). A lower one cannot be
# enforced: with the writeback cache the kernel accepts a write up to its limit and
# reports success before the daemon sees it, so a daemon that then refused it would
# lose the data silently (a 64 TiB limit did exactly that).
MAX_FILE_SIZE = (1 << 63) - 1
# A checkpoint starts when the WAL file grows past the size it is cut back to after a
# restart (so: when its content does), and every checkpoint_every seconds. Continuous
# commits append about 100 KB each: with only a 30 s timer the WAL reached hundreds of MB.
CHECKPOINT_BYTES = JOURNAL_SIZE_LIMIT
COMPACT_QUIET = 10.0  # seconds without a request before the background pass compacts packs
COMPACT_MAX_DEFER = 600.0  # ...but it compacts at least this often, however busy the mount
BUSY_MAX_LIVE = 1 / 16  # packs this little live are compacted by a busy mount's pass too
SLICE_COMMIT = 0.1  # seconds between catalog commits during a long operation's slices
DIRTY_EXPIRE = 30.0  # seconds a chunk may stay dirty in memory (background pass)
IDLE_POOL_BYTES = 64 << 20  # free dirty buffers kept once writing has stopped...
# ...for this long: a pause between two bursts of writes (a benchmark verifying what
# it wrote) must not make the next burst fault all of its memory in again
POOL_IDLE_SECONDS = 300.0
COMPLETE_BATCH = 32  # complete chunks (4 MiB by default) that wake the background store
# Complete chunks queued beyond this make the sequential writer store them itself: they
# will not be written again, so holding more only costs memory (fresh memory is slow to
# fault in on virtual machines: 2 GiB piled up when the store fell behind a fast writer).
COMPLETE_BACKLOG = 8 * COMPLETE_BATCH


# The intent log (store/intentlog.py): an fsync whose file holds at most this much dirty
# data appends it to the log instead of storing it (a larger one is stored as before:
# the log would write as much, and the data has to be stored anyway)...
INTENT_RECORD_MAX = 256 << 10
# ...and once the log holds this much, or its oldest record is dirty_expire old, the
# background pass stores what only the log holds and empties it.
INTENT_LOG_RETIRE = 64 << 20
# A record of a file with at most this many dirty chunks looks at all of them; beyond,
# only at those written since its last record (Inode.unlogged): with 883 dirty chunks
# the look at all took 106 us of the 416 us of CPU of a 4 KiB write + fsync.
SCAN_ALL_BUFFERS = 32

MIN_DIRTY_LIMIT = 16 << 20
MAX_DEFAULT_DIRTY_LIMIT = 4 << 30


def default_dirty_limit() -> int:
    """Dirty memory allowed by default: a tenth of RAM, 16 MiB to 4 GiB (ZFS's default
    for zfs_dirty_data_max). Random writes are fast only while the pages they touch stay
    dirty: storing a chunk again loads, hashes and appends all of it. With 256 MiB (and
    before sparse chunks), random writes over a 1 GiB file ran at 0.16-0.41x the
    yardstick (BENCHMARKS.md, full-size run)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 2 << 30
    return max(MIN_DIRTY_LIMIT, min(MAX_DEFAULT_DIRTY_LIMIT, ram // 10))


class Quiet:
    """How long a mount has gone without a request. activity is a count that grows while
    requests are served; it is sampled when asked, often enough (every background pass,
    every compaction batch) for the seconds-scale decisions made with it."""

    def __init__(self, activity: Callable[[], int]) -> None:
        self.activity = activity
        self._count = activity()
        self._since = time.monotonic()

    def seconds(self) -> float:
        count, now = self.activity(), time.monotonic()
        if count != self._count:
            self._count, self._since = count, now
        return now - self._since


class Filesystem:
    def __init__(self, repo: Repository, *, dirty_limit: int | None = None,
                 dirty_expire: float = DIRTY_EXPIRE, clean_orphans: bool = True) -> None:
        if dirty_limit is None:
            dirty_limit = default_dirty_limit()
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
        self.dirty_expire = dirty_expire
        self.volume_views: dict[str, View] = {}
        self.snapshot_views: dict[int, View] = {}
        self._dirty: dict[tuple[int, int], tuple[View, Inode]] = {}
        self._sync_lock = trio.Lock()
        self._throttle_lock = trio.Lock()
        self._gc_lock = trio.Lock()
        self._delete_lock = trio.Lock()  # one deletion (in slices) at a time
        self.import_lock = trio.Lock()  # one import's rows at a time (exchange.py)
        self.importing: set[int] = set()  # vertex ids an import is writing rows under
        self._complete: list[tuple[View, Inode, int]] = []  # filled by sequential writers
        self._complete_wake = trio.Event()
        self._complete_worker_running = False  # without it (tests, CLI) nothing is queued
        # Called with a View whose content changed without the kernel's knowledge.
        self.on_view_changed: Callable[[View], None] = lambda view: None
        # Set by the daemon: brings the written pages the kernel still holds for the
        # mount here (syncfs from a worker thread, fuse/kernelcache.py), so that a commit
        # and the figures include every write(2) that returned before them.
        self.pull_kernel_pages: Callable[[], Awaitable[None]] | None = None
        # Extra sections for the stats document, e.g. the daemon's event-loop figures.
        self.extra_stats: dict[str, Callable[[], dict]] = {}
        self.collector = Collector(self.cat, repo.packs, self.chunks, commit=self._commit_now)
        # set after deletions: the next background pass collects (and finishes the purge
        # of deleted vertices' rows that a crash interrupted)
        self.gc_requested = bool(pending_purges(self.cat))
        self._pins: Counter[int] = Counter()  # snapshots an export or import reads
        self.checkpoint_bytes = CHECKPOINT_BYTES
        self._checkpoint_wanted = trio.Event()
        self.checkpoints = 0
        self._last_dirty = time.monotonic()  # when dirty data was last seen (trim_pool)
        self._compacted_at = time.monotonic()  # the last background compaction not stopped
        self._damage_reported: set[str] = set()  # write-back errors already logged
        self._disk_full_log = Every(60.0)  # the background pass's "disk full" line
        # Durability (see sync): rows written while cat.commits < durable_commits are in
        # the durable catalog. The intent log's records live while their epoch is at
        # least the catalog's intent_epoch; _logged are the files with records of the
        # current epoch, _log_top the highest epoch in the log file, _durable_epoch the
        # catalog's epoch at its last durable commit.
        self.durable_commits = 0
        packs = repo.packs
        # None only in tests that take the stored path on purpose
        self.intent: IntentLog | None = IntentLog(
            repo.paths.intent, repo.chunks.aead, lambda n: packs.check_space(n, packs.reserve))
        # the fdatasyncs of every fsync, each at half the cost of a to_thread hop: the
        # intent log's (_log_write) and the catalog's WAL (commit_catalog)
        self._log_lane = Lane("snapfs intent log")
        self._wal_lane = Lane("snapfs catalog sync")
        self._log_failure = Every(60.0)  # "the intent log could not be written"
        self._log_queue: list[_LogEntry] = []  # records made, waiting for _log_write
        self._log_writing = False
        self._intent_epoch = int(self.cat.meta_get("intent_epoch", 0))
        self._durable_epoch = -1
        self._log_top = -1
        self._log_seq = 0
        self._log_since = 0.0  # when the first record of the current epoch was appended
        self._logged: dict[tuple[int, int], tuple[View, Inode]] = {}
        self._retire_pending = False  # recovery applied records: the next commit retires them
        self.fsync_counts = Counter()  # how fsyncs were made durable: logged, stored, clean
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

    def note_complete(self, view: View, node: Inode, idx: int) -> None:
        """A sequential writer has just filled chunk idx: store it soon, in a batch."""
        if self._complete_worker_running:
            self._complete.append((view, node, idx))
            if len(self._complete) >= COMPLETE_BATCH:
                self._complete_wake.set()

    async def store_complete(self) -> None:
        items, self._complete = self._complete, []
        await self._store([(v, node, idx) for v, node, idx in items if idx in node.buffers])

    async def _complete_worker(self) -> None:
        self._complete_worker_running = True
        try:
            while True:
                await self._complete_wake.wait()
                self._complete_wake = trio.Event()
                try:
                    await self.store_complete()
                except Exception as e:
                    if not is_disk_full(e):
                        log.exception("storing complete chunks failed; the write-back will "
                                      "retry")
                    # a full disk: the chunks stay dirty, fsync reports it, write-back retries
        finally:
            self._complete_worker_running = False
            self._complete.clear()

    def dirty_bytes(self) -> int:
        """Dirty memory as the limit counts it: a chunk-sized buffer per whole dirty
        chunk, a page per page of a sparse one."""
        cs = self.chunk_size
        return sum(cs if b.pages is None else len(b.pages) * PAGE
                   for _, n in self._dirty.values() for b in n.buffers.values())

    @property
    def dirty_limit(self) -> int:
        return self._dirty_limit

    @dirty_limit.setter
    def dirty_limit(self, value: int) -> None:
        self._dirty_limit = value
        self.dirty_pages_limit = value // PAGE

    def _dirty_pages(self) -> int:
        """Cheap dirty_bytes() // PAGE: the pool counts whole buffers out and the pages
        of sparse chunks."""
        return self.pool.out * (self.chunk_size // PAGE) + self.pool.pages

    def over_limit(self) -> bool:
        """Checked after every write; the complete queue is what sequential writers
        filled."""
        return (self._dirty_pages() > self.dirty_pages_limit
                or len(self._complete) > COMPLETE_BACKLOG)

    async def throttle(self) -> None:
        """Back-pressure for writers: keep dirty memory under the limit, and the queue of
        complete chunks short (a writer faster than the store waits for it)."""
        if len(self._complete) > COMPLETE_BACKLOG:
            await self.store_complete()
        if self._dirty_pages() > self.dirty_pages_limit:
            await self.store_oldest()

    async def store_oldest(self) -> None:
        """Store the coldest dirty chunks until the dirty total is an eighth of the limit
        below it, in batches, not one chunk per write. Coldest: the fewest writes per
        page held (whole chunks count all their pages), then dirtied first. A chunk written
        often is likely to be written again, and storing it would cost a load and a store
        for its next small write; one that is hot no longer is still stored after
        dirty_expire by the background pass. Among sparse chunks of random writes (one
        write per page) the oldest go first."""
        async with self._throttle_lock:  # concurrent writers wait instead of storing twice
            dirty = self.dirty_bytes()
            excess = dirty - self.dirty_limit
            if excess <= 0:  # a buffer lost without give(): count again
                self.pool.out = sum(1 for _, n in self._dirty.values()
                                    for b in n.buffers.values() if b.pages is None)
                self.pool.pages = (dirty - self.pool.out * self.chunk_size) // PAGE
                return
            await self._store(self._coldest(excess + self.dirty_limit // 8))

    def _coldest(self, want: int) -> list[tuple[View, Inode, int]]:
        """The coldest dirty chunks that hold at least want bytes between them."""
        ppc = self.chunk_size // PAGE
        cands = [(b.gen / (ppc if b.pages is None else max(1, len(b.pages))), b.born,
                  ppc if b.pages is None else len(b.pages), v, node, idx)
                 for v, node in list(self._dirty.values()) for idx, b in node.buffers.items()]
        k = -(-want // self.chunk_size)
        while True:  # few candidates are enough unless most chunks are sparse
            picked = heapq.nsmallest(k, cands, key=lambda t: (t[0], t[1]))
            held = 0
            for n, item in enumerate(picked):
                held += item[2] * PAGE
                if held >= want:
                    return [(v, node, idx) for *_, v, node, idx in picked[:n + 1]]
            if k >= len(cands):
                return [(v, node, idx) for *_, v, node, idx in picked]
            k *= 4

    async def write_back(self, now: float | None = None) -> None:
        """Background: store closed files' data and chunks dirty for longer than
        dirty_expire; an open file's recent chunks stay in memory."""
        old = (time.monotonic() if now is None else now) - self.dirty_expire
        cs = self.chunk_size
        self._complete.clear()  # stored here
        items = [(v, node, idx) for v, node in list(self._dirty.values())
                 for idx, buf in sorted(node.buffers.items())
                 if not node.opens or buf.born <= old or (buf.seq and buf.length == cs)]
        await self._store(items)

    async def _store(self, items: list, batch: int = 64) -> None:
        """Store for the write-back policy: a chunk that cannot be merged with its damaged
        stored base stays dirty and is reported once in the log (and by EIO to fsync of
        its file), instead of stopping the write-back of everything else."""
        for i in range(0, len(items), batch):
            try:
                await store_buffers(self.chunks, items[i:i + batch])
            except IntegrityError as e:
                if str(e) not in self._damage_reported:
                    self._damage_reported.add(str(e))
                    log.error("write-back: %s; the pages written over it stay in memory "
                              "and fsync of that file reports EIO", e)
        for key, (_view, node) in list(self._dirty.items()):
            if not node.buffers:
                del self._dirty[key]

    async def flush_dirty(self, view: View | None = None, batch: int = STORE_BATCH) -> None:
        """Store every dirty buffer (of one view, or all) as chunks, many to a batch,
        two batches at once (store_batches)."""
        for _ in range(8):
            items = [(v, node, idx) for v, node in list(self._dirty.values())
                     if view is None or v is view for idx in sorted(node.buffers)]
            if not items:
                break
            await store_batches(self.chunks,
                                [items[i:i + batch] for i in range(0, len(items), batch)])
            for key, (_view, node) in list(self._dirty.items()):
                if not node.buffers:
                    del self._dirty[key]

    async def flush_for_figures(self) -> None:
        """Before stats or a diff: store the dirty data, so that the figures count every
        write made before. On a full disk they cover what is stored (dirty_bytes says
        how much is not): refusing them then would hide where the space went."""
        if self.pull_kernel_pages is not None:
            await self.pull_kernel_pages()
        await _disk_full_of(self.flush_dirty())
        self.flush_inodes()  # rows a diff reads: times of directories and written files

    def flush_inodes(self, view: View | None = None) -> None:
        views = [view] if view else [*self.volume_views.values(), *self.snapshot_views.values()]
        for v in views:
            v.flush_inodes()

    async def sync(self, view: View | None = None, node: Inode | None = None) -> None:
        """Durability point: dirty data, then inode attributes, then fsync packs and WAL.
        On a full disk the metadata is still made durable, then the error is raised: what
        could not be stored stays dirty (and reads as before).

        The fsync of one file whose rows are all durable already, and whose only changes
        since are data (at most INTENT_RECORD_MAX), size and times, appends them to the
        intent log instead (one small fdatasync where the store and the catalog commit
        cost two journal commits): _sync_by_log."""
        if node is not None and view is not None:
            if node.orphan or node.rowless:
                # unlinked (or gone with its snapshot directory's draft) and still open:
                # no name can reach it again, and after a crash the next mount releases
                # it, so its data can never be read back and is not stored (stress-ng
                # unlinks its files as soon as it opens them, then fsyncs them: 16,412
                # stores). What is made durable is the unlink, as ext4 would.
                self.fsync_counts["unlinked"] += 1
                if node.rowless or node.dirty or node.row_txn >= self.durable_commits:
                    await self.sync_metadata()
                return
            if self.intent is not None and await self._sync_by_log(view, node):
                return
            self.fsync_counts["stored"] += 1
        full = await _disk_full_of(view.flush_data(node, sync=True)
                                   if node is not None and view is not None
                                   else self.flush_dirty(view))
        await self.sync_metadata()
        if full is not None:
            raise full

    async def sync_metadata(self) -> None:
        """fsync of a directory: every name, attribute and link durable, but no file
        data (that is each file's own fsync; flushing all of it here made a directory
        fsync wait for every dirty file, and fail when one of them could not be stored)."""
        async with self._sync_lock:
            await self.commit_catalog(durable=True)  # writes the inode rows first
            await self._reset_log_if_retired()

    # -- the intent log ------------------------------------------------------------------------
    def _loggable(self, view: View, node: Inode) -> bool:
        """Whether an fsync of node may go through the intent log: a regular file in a
        live tree whose rows (inode, blocks, xattrs) are all in the durable catalog, whose
        attributes other than size and times are as its row has them, and which no
        truncate is changing (a record's size is applied exactly: see retire_log)."""
        return (not view.dropped and stat.S_ISREG(node.mode) and not node.rowless
                and not node.orphan and not node.truncating
                and node.row_txn < self.durable_commits
                and node.meta_row() == node.saved_meta)

    async def _sync_by_log(self, view: View, node: Inode) -> bool:
        """fsync through the intent log; False when it cannot (then it is stored).

        A record holds the file's data written since its last record, its size and
        times: with the rows durable, the catalog plus the live records in order give
        the file as it was at this fsync. Records are made under the sync lock, in seq
        order, and written in that order by _log_write. Nothing to append (no data, and
        size and times durable or in a live record already): nothing to do."""
        if not self._loggable(view, node):
            return False
        async with self._sync_lock:
            if not self._loggable(view, node):
                return False
            if not node.buffers and not node.dirty and node.attrs_txn < self.durable_commits:
                self.fsync_counts["clean"] += 1  # everything is durable already
                return True
            built = self._intent_record(view, node)
            if built is None:
                return False
            rec, taken = built
            if not rec.extents and node.logged_attrs == (rec.size, rec.mtime_ns, rec.ctime_ns):
                self.fsync_counts["clean"] += 1  # a live record says all of it already
                return True
            if not self._logged:
                self._log_since = time.monotonic()
            self._logged[(rec.vertex, node.ino)] = (view, node)
            node.log_last = rec.seq
            self._log_top = max(self._log_top, rec.epoch)
            entry = _LogEntry(intentlog.encode(rec, self.intent.aead), node)
            self._log_queue.append(entry)
        await self._log_write(entry)
        if entry.error is not None:
            # a full disk is the store's to report (ENOSPC, if the data cannot be stored
            # either); anything else once a minute
            if not is_disk_full(entry.error) and self._log_failure():
                log.warning("the intent log could not be written (%s); fsync stores "
                            "instead", entry.error)
            return False
        for buf, gen, fresh in taken:
            buf.logged_gen = gen
            if fresh and buf.pages is not None:
                if buf.logged_pages is None:
                    buf.logged_pages = {}
                buf.logged_pages.update(fresh)
        node.logged_attrs = (rec.size, rec.mtime_ns, rec.ctime_ns)
        self.fsync_counts["logged"] += 1
        return True

    async def _log_write(self, entry: _LogEntry) -> None:
        """Group commit: the first fsync to arrive writes every queued record with one
        fdatasync (in a worker thread); those arriving meanwhile wait and go in the next
        batch together. With four fio jobs fsyncing their own files, one record per
        fdatasync gave 1,275-1,324 IOPS against the yardstick's 1,997-2,473."""
        if self._log_writing:
            await entry.done.wait()
            return
        self._log_writing = True
        batch: list[_LogEntry] = []
        try:
            while self._log_queue:
                batch, self._log_queue = self._log_queue, []
                try:
                    await self._log_lane.run(self.intent.append,
                                             b"".join(e.blob for e in batch))
                except OSError as e:
                    # the records made meanwhile may leave out chunks that only the
                    # failed ones held (Inode.unlogged was cleared for them): they fail
                    # too, and every file's unlogged chunks are known again at once
                    batch += self._log_queue
                    self._log_queue = []
                    _fail(batch, e)
                for waiter in batch:
                    waiter.done.set()
                batch = []
        finally:
            self._log_writing = False
            # only if this task was cancelled: whatever it did not finish stores instead
            _fail([w for w in batch + self._log_queue if not w.done.is_set()],
                  OSError(errno.EIO, "the intent log writer was cancelled"))
            self._log_queue.clear()

    def _intent_record(self, view: View, node: Inode) -> tuple[
            IntentRecord, list[tuple[DirtyChunk, int, list[tuple[int, bytes]]]]] | None:
        """The record of node's dirty data not in a live record yet (a buffer written
        since its last record: DirtyChunk.logged_gen), size and times, with the buffers
        it takes and their gens; None when that is more than INTENT_RECORD_MAX. Its
        buffers are marked with its seq at once: a store that freezes them from now on
        covers it (DirtyChunk.log_seq)."""
        cs, size = self.chunk_size, node.size
        extents: list[tuple[int, bytes]] = []
        total = 0
        taken: list[tuple[DirtyChunk, int, list[tuple[int, bytes]]]] = []
        # the chunks written since the last record (a small file: all its chunks,
        # whatever the set says); any order: extents never overlap
        if len(node.buffers) <= SCAN_ALL_BUFFERS:
            idxs: Iterable[int] = list(node.buffers)
        else:
            idxs = [i for i in node.unlogged if i in node.buffers]
        for idx in idxs:
            buf = node.buffers[idx]
            if buf.logged_gen == buf.gen:
                continue
            base = idx * cs
            fresh: list[tuple[int, bytes]] = []
            if buf.data is None:  # sparse: its pages not in a record yet
                logged = buf.logged_pages or {}
                for p, page in sorted((buf.pages or {}).items()):
                    off = base + p * PAGE
                    if off < size and logged.get(p) is not page:
                        extents.append((off, bytes(page[:size - off])))
                        fresh.append((p, page))
                        total += PAGE
            elif base < size:
                n = min(buf.length, size - base)
                extents.append((base, bytes(memoryview(buf.data)[:n])))
                total += n
            taken.append((buf, buf.gen, fresh))
            if total > INTENT_RECORD_MAX:
                return None
        node.unlogged.clear()  # what is written from now on goes in the next record
        self._log_seq += 1
        for buf, _, _ in taken:
            buf.log_seq = self._log_seq
        rec = IntentRecord(self._log_seq, self._intent_epoch, view.draft_id(), node.ino,
                           size, node.mtime_ns, node.ctime_ns, tuple(extents))
        return rec, taken

    def is_logged(self, view: View, node: Inode) -> bool:
        """Whether a live intent record holds this file of view's draft."""
        if not self._logged:
            return False
        entry = self._logged.get((view.draft_id(), node.ino))
        return entry is not None and entry[1] is node

    def _retire_covered(self) -> None:
        """In the transaction about to commit: the files whose every logged page is in
        a stored chunk whose block row it holds (a store that froze the buffer after the
        record: DirtyChunk.stored_log) get their last seq in intent_files, and their
        records never apply again. A file's records must stop applying as soon as its
        rows hold them: a later fsync that stores (not logs) makes newer data durable,
        which a replay of the old record would overwrite. Files deleted, or whose tree
        went, need no row: their records find nothing to apply to."""
        for key, (view, node) in list(self._logged.items()):
            if view.dropped or node.rowless:
                del self._logged[key]
            elif all(b.log_seq <= b.stored_log for b in node.buffers.values()):
                self.cat.write("INSERT OR REPLACE INTO intent_files VALUES (?,?,?)",
                               (key[0], key[1], node.log_last))
                del self._logged[key]

    def _retired_seqs(self) -> dict[tuple[int, int], int]:
        return {(v, ino): seq for v, ino, seq in
                self.cat.execute("SELECT vertex, ino, seq FROM intent_files")}

    def _uncovered(self) -> list[tuple[View, Inode, int]]:
        return [(v, n, idx) for v, n in self._logged.values() if not v.dropped and not n.rowless
                for idx, buf in sorted(n.buffers.items()) if buf.log_seq > buf.stored_log]

    async def retire_log(self) -> None:
        """Store what only the intent log holds and commit with a new epoch (durably),
        so that no record applies any more; then empty the log. Before a truncate that
        shrinks a logged file (replaying its older record would bring the old size
        back over the committed cut), at the log's size or age limit, and at unmount.

        The bulk is stored while fsyncs go on; under the sync lock (no new record) only
        what they logged meanwhile."""
        for _ in range(2):  # the second pass takes what was logged during the first
            if not await self._store_uncovered():
                break
        async with self._sync_lock:
            for _ in range(4):
                if not await self._store_uncovered():
                    break
            await self.commit_catalog(durable=True)
            await self._reset_log_if_retired()

    async def _store_uncovered(self) -> bool:
        """Store the logged chunks no store covers yet; False if there were none, or the
        disk is full (they stay in the log, which still holds them)."""
        items = self._uncovered()
        return bool(items) and await _disk_full_of(self._store(items)) is None

    async def _reset_log_if_retired(self) -> None:
        """Empty the log file once every record in it has an epoch below the durable
        catalog's (the caller holds the sync lock: no append meanwhile)."""
        if (self.intent is not None and self.intent.end and self._log_top < self._durable_epoch
                and not self._log_queue and not self._log_writing):
            await trio.to_thread.run_sync(self.intent.reset)
            self._log_top = -1

    def pending_intents(self) -> list[IntentRecord]:
        """The log's records that the catalog does not hold yet (they apply at recover)."""
        if self.intent is None:
            return []
        done = self._retired_seqs()
        return [r for r in self.intent.read() if r.epoch >= self._intent_epoch
                and r.seq > done.get((r.vertex, r.ino), 0)]

    async def recover(self) -> int:
        """Apply the intent log after the last writer died: the records whose epoch is
        at least the catalog's, in order (fsynced writes the catalog does not hold), as
        writes through the views, then store them, commit with a new epoch and empty the
        log. Called once, before anything else uses the repository (mount, commands).
        Returns how many records applied."""
        if self.intent is None:
            return 0
        records = await trio.to_thread.run_sync(self.intent.read)
        self._log_top = max((r.epoch for r in records), default=-1)
        done = self._retired_seqs()
        # seqs go on from the highest seen: intent_files compares them
        self._log_seq = max([self._log_seq, *(r.seq for r in records), *done.values()])
        applied = 0
        for rec in records:
            if (rec.epoch >= self._intent_epoch and rec.seq > done.get((rec.vertex, rec.ino), 0)
                    and await self._apply(rec)):
                applied += 1
        await self.flush_dirty()
        # retire them even if none applied (their files were deleted or sealed since):
        # otherwise every opening would read them again
        self._retire_pending = any(r.epoch >= self._intent_epoch for r in records)
        async with self._sync_lock:
            await self.commit_catalog(durable=True)
            await self._reset_log_if_retired()
        if applied:
            log.info("applied %d intent-log record(s): fsynced writes of the last run that "
                     "were not yet in the catalog", applied)
        return applied

    async def _apply(self, rec: IntentRecord) -> bool:
        view = self._view_of_draft(rec.vertex)
        if view is None:
            return False  # its draft was sealed or deleted later: nothing to apply to
        try:
            node = view.get(rec.ino)
        except FsError:
            return False  # deleted later
        if not stat.S_ISREG(node.mode) or node.nlink == 0:
            return False
        for off, data in rec.extents:
            await view.write(node, off, data)
        if node.size != rec.size:
            await view.truncate(node, rec.size)
        node.mtime_ns, node.ctime_ns = rec.mtime_ns, rec.ctime_ns  # as at that fsync
        view._mark_dirty(node)
        return True

    async def shutdown(self) -> None:
        """The unmount's last sync. Dirty data may now use three quarters of the pack
        store's reserve (what is not stored here is lost; the catalog needs little more
        than this one commit). If the disk is full even so, the metadata is committed and
        the loss is logged in one line."""
        packs = self.repo.packs
        packs.reserve //= 4
        full = await _disk_full_of(self.sync())
        if full is not None:
            log.error("unmounted with %.1f MiB of unsynced data in %d file(s) that could not "
                      "be stored: %s", self.dirty_bytes() / (1 << 20), len(self._dirty), full)
        if self.intent is not None:
            if not self.intent.end:  # every record retired: give the file's blocks back
                await trio.to_thread.run_sync(self.intent.reset, False)
            self.intent.close()

    async def commit_catalog(self, durable: bool) -> None:
        """End the open catalog transaction, never before the pack data it references
        (ChunkManager.commit_catalog); with durable=True the WAL is fsynced too. The
        inode rows kept in memory are written right before the commit, with no await
        between: a store meanwhile raised what their sizes may say (View.row_size)."""
        await self.chunks.commit_catalog(self._commit_now)
        if self.cat.wal_bytes() > self.checkpoint_bytes:
            self._checkpoint_wanted.set()
        if durable:
            done, epoch = self.cat.commits, self._intent_epoch
            await self._wal_lane.run(self.cat.sync_wal)
            self.durable_commits = max(self.durable_commits, done)
            self._durable_epoch = max(self._durable_epoch, epoch)

    def _commit_now(self) -> None:
        """Write the inode rows and commit, retiring the intent-log records its rows hold
        (_retire_covered). When no file has a live record left, the epoch is raised in
        the same transaction (and intent_files emptied): from then on the catalog holds
        all that the log does, and once that commit is durable the log is emptied. Both
        count as done at once: a commit that SQLite refuses is redone with the next one."""
        self.flush_inodes()
        if self._logged or self._retire_pending:
            self._retire_covered()
            if not self._logged:
                self._intent_epoch += 1
                self.cat.meta_set("intent_epoch", self._intent_epoch)
                self.cat.write("DELETE FROM intent_files")
                self._retire_pending = False
        self.cat.commit()

    async def group_commit(self) -> None:
        """Periodic: write back (see the policy above) and end the open catalog
        transaction (no fsync). On a full disk the data stays dirty, but the metadata is
        committed all the same (the catalog has the pack store's reserve to grow into)."""
        full = await _disk_full_of(self.write_back())
        await self.commit_catalog(durable=False)  # writes the inode rows first
        if full is not None:
            raise full

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
                         gc_every: float = 60.0, activity: Callable[[], int] | None = None
                         ) -> None:
        """The mount's background work. activity: a count that grows while requests are
        served (the FUSE adapter's); without it the mount counts as always quiet."""
        quiet = Quiet(activity or (lambda: 0))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.checkpointer, checkpoint_every)
            nursery.start_soon(self._complete_worker)
            await self._background(interval, gc_every, quiet)

    async def _background(self, interval: float, gc_every: float, quiet: Quiet) -> None:
        last_gc = time.monotonic()
        while True:
            await trio.sleep(interval)
            quiet.seconds()  # sampled every pass, so that it knows within `interval`
            try:
                await self.group_commit()
                now = time.monotonic()
                if self._logged and (self.intent.end > INTENT_LOG_RETIRE
                                     or now - self._log_since > self.dirty_expire):
                    await self.retire_log()
                await self.trim_pool(now)
                if self.gc_requested or now - last_gc > gc_every:
                    last_gc = now
                    self.gc_requested = False
                    await self.background_gc(quiet)
            except Exception as e:
                if is_disk_full(e):
                    self._warn_disk_full(e)
                else:
                    log.exception("background write-back failed; will retry")

    def _warn_disk_full(self, e: BaseException) -> None:
        """Once a minute at most while the disk stays full."""
        if self._disk_full_log():
            log.warning("the disk holding the repository is full; changes stay in memory "
                        "until space is freed (delete files, then `snapfs gc`): %s", e)

    async def trim_pool(self, now: float) -> None:
        """Once nothing has been dirty for POOL_IDLE_SECONDS, keep IDLE_POOL_BYTES of free
        buffers and give the rest of the memory back: a burst of random writes takes up
        to dirty_limit (a tenth of RAM), which an idle daemon should not hold."""
        if self.pool.out or self.pool.pages:
            self._last_dirty = now
        elif (now - self._last_dirty >= POOL_IDLE_SECONDS
              and self.pool.trim(IDLE_POOL_BYTES // self.chunk_size)):
            await trio.to_thread.run_sync(release_free_memory)

    def held_chunks(self):
        return accounting.shared_chunks(self.graph.vertices.values())[0]

    async def background_gc(self, quiet: Quiet) -> None:
        """The periodic collection. Unheld chunks are freed every time (index rows only).
        Packs with much live data are compacted (their live records copied, up to 64
        MiB/s) only once the mount has had no request for COMPACT_QUIET seconds, and the
        pass stops as soon as one comes in: the copying competed with the I/O that users
        wait for (fio's randrw on an encrypted repository ran at 0.47x the yardstick
        while 23 packs were being compacted, BENCHMARKS.md). Packs that are (nearly)
        all garbage go at once, busy or not: removing them copies next to nothing, and
        the page cache they free is what the next pack appends reuse, where new memory
        costs a fault per page on a virtual machine (deferring them too took randwrite
        from 10,174 to 8,925 IOPS). A mount that is never quiet compacts everything
        COMPACT_MAX_DEFER seconds after the last pass that ran to the end, and so does
        one whose disk is short of space."""
        overdue = (time.monotonic() - self._compacted_at >= COMPACT_MAX_DEFER
                   or self.repo.packs.free_bytes() < 4 * self.repo.packs.reserve)
        if not overdue and quiet.seconds() < COMPACT_QUIET:
            await self.gc(flush=False, max_live_ratio=BUSY_MAX_LIVE)
            return

        def busy() -> bool:
            return quiet.seconds() < COMPACT_QUIET

        await self.gc(pause=None if overdue else busy, flush=False)
        if overdue or not busy():
            self._compacted_at = time.monotonic()

    async def gc(self, compact: bool = True, min_dead_ratio: float = 0.25, *,
                 pause: Callable[[], bool] | None = None, max_live_ratio: float = 1.0,
                 flush: bool = True) -> dict:
        """Free unheld chunks, then compact packs (throttled; pause, max_live_ratio: see
        Collector.compact). Safe while mounted. Collections run one at a time: the
        background pass and `snapfs gc` would otherwise both compact (and remove) the
        same packs.

        flush: store every dirty buffer first, so that `snapfs gc` frees what the writes
        made before it replaced. The background pass does not: it would store, every
        minute, the chunks that the write-back keeps in memory on purpose (a random
        writer's working set: about a GiB of stores in the middle of a 15 s fio job).
        Dirty data needs no flush to be safe from the collector: a dirty chunk's base is
        still in its block, and a chunk being stored is pinned until its block points
        to it."""
        async with self._gc_lock:
            return await self._gc(compact, min_dead_ratio, flush, pause=pause,
                                  max_live_ratio=max_live_ratio)

    async def _gc(self, compact: bool, min_dead_ratio: float, flush: bool,
                  **compact_kw) -> dict:
        if flush:
            await self.flush_dirty()
        await self.purge()
        freed = self.collector.free(self.held_chunks())
        await self.commit_catalog(durable=False)
        removed = (await self.collector.compact(min_dead_ratio, **compact_kw)
                   if compact else 0)
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
        if self.pull_kernel_pages is not None:
            await self.pull_kernel_pages()
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
        view.seal_orphans(draft.id)
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

    def pin(self, vertex: int) -> None:
        """Keep a snapshot from being deleted while a long operation (an export served
        in slices between FUSE requests) reads it."""
        self.graph.check_not_deleting(vertex)
        self._pins[vertex] += 1

    def unpin(self, vertex: int) -> None:
        self._pins[vertex] -= 1
        if self._pins[vertex] <= 0:
            del self._pins[vertex]

    async def delete_snapshot(self, name: str, *, force: bool = False) -> None:
        """Delete a snapshot (re-parenting its children) and collect what it freed."""
        async with self._delete_lock:
            snap = self.graph.snapshot(name)
            if self._pins.get(snap.id):
                raise Refused(f"snapshot {name} is being exported, or imported onto: delete "
                              "it when that is done", errno=16)
            self._check_snapshot_unused(snap.id, name, force)
            deletion = Deletion(self.graph, snap.id)
            try:
                await self._run_steps(deletion.steps())
                # from here to the commit, no await: the snapshot goes in one step
                self._check_snapshot_unused(snap.id, name, force)
            except BaseException:
                deletion.abort()
                raise
            view = self.snapshot_views.pop(snap.id, None)
            if view is not None:
                self._discard(view)
            draft = self.graph.drop_snapshot_draft(snap.id)
            if draft is not None:
                Deletion(self.graph, draft).finish()
            deletion.finish()
            await self.commit_catalog(durable=True)
            if view is not None:
                self.on_view_changed(view)
            log.info("deleted snapshot %s", name)
            await self._purge_after_delete()
        self.want_gc()

    def _check_snapshot_unused(self, vid: int, name: str, force: bool) -> None:
        view = self.snapshot_views.get(vid)
        self._check_unused(view, f"snapshot {name} (under .snapshots/{name})")
        draft = self.graph.snapshot_drafts.get(vid)
        if draft is not None and not force and (
                self.graph.draft_has_changes(draft) or (view and self._view_dirty(view))):
            raise Refused(f"snapshot {name} has uncommitted changes under .snapshots/{name}: "
                          f"commit them (snapfs commit .snapshots/{name}) or delete with --force")

    async def delete_volume(self, name: str, *, force: bool = False) -> None:
        async with self._delete_lock:
            draft = self.graph.volume_draft(name)
            view = self.volume_views.get(name)
            self._check_unused(view, f"volume {name}")
            if not force and (self.graph.draft_has_changes(draft.id)
                              or (view and self._view_dirty(view))):
                raise Refused(f"volume {name} has uncommitted changes: commit them "
                              f"(snapfs commit {name}) or delete with --force")
            if view is not None:
                self._discard(view)
            Deletion(self.graph, self.graph.drop_volume(name)).finish()  # a leaf: O(1)
            await self.commit_catalog(durable=True)
            if view is not None:
                del self.volume_views[name]
                self.on_view_changed(view)
            log.info("deleted volume %s", name)
            await self._purge_after_delete()
        self.want_gc()

    async def _purge_after_delete(self) -> None:
        """The deletion is done and durable: a purge that fails now (a full disk at one
        of its commits) is not its failure; the next collection retries it."""
        try:
            await self.purge()
        except Exception as e:
            log.warning("deleting the rows of deleted vertices failed (%s); the next "
                        "collection tries again", e)

    async def purge(self) -> None:
        """Delete the rows of deleted vertices and of abandoned imports, in slices
        (graph/delete.py); not those of an import still running."""
        for vid in pending_purges(self.cat):
            if vid not in self.importing:
                await self._run_steps(purge_steps(self.cat, vid))

    async def _run_steps(self, steps: Iterable[None]) -> None:
        """Run a generator of synchronous slices, letting other requests in between."""
        slices, done = iter(steps), object()
        while True:
            start = time.monotonic()
            if next(slices, done) is done:
                return
            await self.between_slices(time.monotonic() - start)

    async def between_slices(self, took: float) -> None:
        """Between two slices of a long operation (a deletion, a purge, an import's rows).

        Other requests get the loop for as long as the slice took: a FUSE request takes a
        few scheduler rounds, and with a bare checkpoint every one of them waited for a
        slice (a probe's open+read waited 50-75 ms under 6-9 ms slices). And the catalog
        is committed every SLICE_COMMIT seconds, so that the operation's own last commit
        stays small: SQLite writes a transaction's pages on the loop's thread, and the
        commit after a 50,000-file deletion held it for 115 ms."""
        if time.monotonic() - self.cat.last_commit >= SLICE_COMMIT:
            await self.commit_catalog(durable=False)
        await trio.sleep(took)

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
        result["dirty_limit"] = self.dirty_limit
        result["fsync"] = {"logged": self.fsync_counts["logged"],
                           "stored": self.fsync_counts["stored"],
                           "clean": self.fsync_counts["clean"],
                           "unlinked": self.fsync_counts["unlinked"],
                           "intent_log_bytes": self.intent.end if self.intent else 0}
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


def _fail(entries: list[_LogEntry], error: OSError) -> None:
    """These records were not written: their fsyncs store instead, and their files'
    chunks that no written record holds are unlogged again."""
    for entry in entries:
        entry.error = error
        entry.node.unlogged.update(
            i for i, b in entry.node.buffers.items() if b.logged_gen != b.gen)
        entry.done.set()


class _LogEntry:
    """A record waiting to be written to the intent log, and how that went."""

    __slots__ = ("blob", "node", "done", "error")

    def __init__(self, blob: bytes, node: Inode) -> None:
        self.blob = blob
        self.node = node
        self.done = trio.Event()
        self.error: OSError | None = None


async def _disk_full_of(work: Awaitable[None]) -> BaseException | None:
    """Await work; a full disk is returned, not raised, for callers that commit the
    metadata before they report it (data may wait in memory, names and links may not)."""
    try:
        await work
    except Exception as e:
        if not is_disk_full(e):
            raise
        return e
    return None
