"""Dirty file data in memory: chunk buffers, their pool, and making sparse ones whole.

A file's written data waits in a DirtyChunk per chunk until the view stores it
(view.store_buffers). The buffers come from a BufferPool, because on this kind of virtual
machine fresh memory costs a page fault per 4 KiB on first touch. A DirtyChunk is either
whole (data) or sparse (only the pages written over a stored chunk); materialize makes
sparse ones whole in a batch, reading their bases in a worker thread.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapfs.errors import IntegrityError

if TYPE_CHECKING:
    from snapfs.vfs.fs import Filesystem

PAGE = 4096  # the unit of a sparse dirty chunk: the kernel's page


@dataclass(slots=True)
class DirtyChunk:
    """A chunk being written in memory; gen changes on every write into it.

    data is a chunk-sized buffer from the pool; only data[:length] is meaningful and
    what lies beyond length reads as zeros (pooled buffers hold stale bytes there).

    A sparse dirty chunk (data None, length -1) holds only the whole pages written into
    a stored chunk, base: its content is base's overlaid with pages. Random 4 KiB writes
    into a large file then cost 4 KiB of memory each, not a 128 KiB load into a 128 KiB
    buffer, so many more of them stay in memory under the dirty limit; base is read and
    merged once, when the chunk is stored (materialize). Any other use of the buffer
    (an unaligned write, truncate) materializes it first.
    """

    data: bytearray | None
    length: int = 0
    gen: int = 0
    born: float = 0.0  # time.monotonic() when it became dirty: write-back stores oldest first
    seq: bool = False  # written from empty by appends only, so far: a sequential writer's
    frozen: int = 0  # stores reading data right now: a write must thaw (copy) it first
    base: int = 0  # sparse: the stored chunk under the pages
    pages: dict[int, bytes] | None = None  # sparse: page index -> PAGE bytes
    # The intent log (vfs/fs.py): the last record that holds this chunk's pages, and the
    # last of them that a recorded store covered. log_seq > stored_log: only the log
    # holds that fsynced content, so the log must not be retired yet.
    log_seq: int = 0
    stored_log: int = 0
    logged_gen: int = -1  # gen when a record last took it: unchanged since, not logged again
    # sparse: the page objects a record took (pages are replaced, never changed, so a
    # page that is still the same object need not be logged again)
    logged_pages: dict[int, bytes] | None = None


SMALL_BUFFER = 32 * 1024  # a new chunk's first write ending here or before gets a small buffer


class BufferPool:
    """Chunk-sized bytearrays for dirty buffers, reused instead of allocated.

    Fresh memory costs a page fault per 4 KiB on first touch, which on this kind of
    virtual machine made allocating a 128 KiB buffer cost 100-900 us (more than hashing
    it). Reusing buffers keeps their pages mapped.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self.out = 0  # buffers taken and not given back: the dirty chunks, counted cheaply
        self.pages = 0  # pages held by sparse dirty chunks (not from the pool)
        self._free: list[bytearray] = []

    def take(self) -> bytearray:
        self.out += 1
        return self._free.pop() if self._free else bytearray(self.size)

    def take_small(self, need: int) -> bytearray:
        """A buffer for a new chunk whose first write ends at need (at most SMALL_BUFFER):
        a small file's data costs 4 KiB pages, not a whole chunk. It is counted like a
        chunk, and replaced by a chunk-sized buffer (fresh) when a write goes beyond it."""
        self.out += 1
        return bytearray(-(-need // 4096) * 4096)

    def fresh(self) -> bytearray:
        """A buffer for thawing a frozen chunk or growing a small one (not counted: the
        chunk was counted)."""
        return self._free.pop() if self._free else bytearray(self.size)

    def give(self, buf: DirtyChunk | None) -> None:
        """A dirty chunk is gone (stored or dropped); its buffer is reused unless a store
        is still reading it."""
        if buf is None:
            return
        if buf.pages is not None:
            self.pages -= len(buf.pages)
            buf.pages = None  # dropped: a materialize under way leaves it alone
        else:
            self.untake(None if buf.frozen else buf.data)

    def untake(self, data: bytearray | None) -> None:
        """Give back a buffer from take() (None: one that cannot be reused yet)."""
        self.out -= 1
        if data is not None and len(self._free) < self.keep and len(data) == self.size:
            self._free.append(data)

    def trim(self, keep: int) -> int:
        """Let go of all but keep free buffers (the oldest go); returns how many went."""
        extra = len(self._free) - keep
        if extra <= 0:
            return 0
        del self._free[:extra]
        return extra


def release_free_memory() -> None:
    """Hand the allocator's free memory back to the kernel (glibc's malloc_trim); any
    thread (the GIL is released during the call). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def padded(piece: bytes | bytearray, n: int) -> bytes | bytearray:
    """piece, with zeros up to n bytes: what lies beyond a dirty buffer's length or a
    stored (zero-stripped) payload reads as zeros."""
    return piece if len(piece) >= n else piece + bytes(n - len(piece))


def payload_len(data: bytearray, n: int) -> int:
    """The length of data[:n] without its trailing zeros, without copying the chunk:
    whole zero pages at the end are skipped, then the last page is stripped."""
    if not n or data[n - 1]:
        return n
    while n >= 4096 and data.count(0, n - 4096, n) == 4096:
        n -= 4096
    start = max(0, n - 4096)
    with memoryview(data) as mv:
        return start + len(bytes(mv[start:n]).rstrip(b"\0"))


async def materialize(fs: Filesystem, bufs: list[DirtyChunk]) -> IntegrityError | None:
    """Make sparse dirty chunks whole: each base is loaded into a pool buffer (one
    worker-thread hop for the batch; a chunk whose pages would cover it is already whole,
    see _write_pages), zeros fill what the base does not, and the pages (also those
    written meanwhile) go over it.
    A buffer made whole or dropped meanwhile is left alone. A base that fails its checks
    (damage) leaves its buffer sparse, and the first such error is returned for the
    caller to report: the other buffers of the batch are not held back by it."""
    todo = list({id(b): b for b in bufs if b.data is None and b.pages is not None}.values())
    if not todo:
        return None
    pool, cs = fs.pool, fs.chunk_size
    contents = [pool.take() for _ in todo]
    try:
        sizes, error = await _load_bases(
            fs, [(i, buf.base, content) for i, (buf, content) in
                 enumerate(zip(todo, contents, strict=True))])
    except BaseException:
        for content in contents:
            pool.untake(content)
        raise
    for i, (buf, content) in enumerate(zip(todo, contents, strict=True)):
        pages = buf.pages
        if pages is None or buf.data is not None or i not in sizes:
            pool.untake(content)
            continue
        n = sizes[i]
        with memoryview(content) as mv:
            mv[n:] = bytes(cs - n)
            for p, page in pages.items():
                mv[p * PAGE:(p + 1) * PAGE] = page
        pool.pages -= len(pages)
        buf.data, buf.pages, buf.base = content, None, 0
        buf.length = max(n, (max(pages) + 1) * PAGE if pages else 0)
    return error


async def _load_bases(fs: Filesystem, items: list[tuple[int, int, bytearray]]
                      ) -> tuple[dict[int, int], IntegrityError | None]:
    """Load (key, chunk, into) items: {key: payload length}, and the first damage met
    (its item is left out); on damage the batch is read again one by one."""
    reads = [(chunk, memoryview(into)) for _, chunk, into in items]
    try:
        sizes = await fs.chunks.read_many_into(reads)
        return {key: n for (key, _, _), n in zip(items, sizes, strict=True)}, None
    except IntegrityError:
        pass
    result: dict[int, int] = {}
    error = None
    for (key, _, _), read in zip(items, reads, strict=True):
        try:
            result[key] = (await fs.chunks.read_many_into([read]))[0]
        except IntegrityError as e:
            error = error or e
    return result, error
