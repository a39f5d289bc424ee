"""Append-only pack files holding chunk records.

A pack file is a 16-byte header followed by records::

    magic  b"SFCK"            4 bytes
    flags  u16                bit 0: payload is encrypted (crypto envelope)
    resv   u16
    length u32                payload length in bytes
    raw    u32                plaintext length (== length when not encrypted)
    chunk  u64                chunk id the record was written for
    check  u64                xxh3_64 of the 24 header bytes before it and the payload
    payload

Records are never modified. The index (which chunk lives where) is in the catalog; the
records are self-describing so that fsck can cross-check the index against the packs.
Every read verifies the checksum: a mismatch raises IntegrityError, never returns data.

Crash safety: a record is appended with one pwrite at the end of a pack being written;
the catalog references it only after that write returned (and, for durability, after
``sync``). A record torn by a crash is therefore never referenced. Each process that
opens the store for writing starts fresh packs, so no writer ever appends after a torn
tail.

Write lanes: up to ``lanes`` packs are written at once, each by one thread at a time.
An append takes the first lane no other thread is using, so a single writer always
fills one pack (lane 0) and two concurrent batches land in two packs side by side. That
is what lets a large flush use both cores: copying a record into new page-cache memory
is most of an append's cost on a VM (about 250 us per 128 KiB here, BENCHMARKS.md
"Fresh memory"), and ext4 serialises buffered writes to one file on its inode lock.

Disk space: appends leave ``reserve`` bytes of the file system free (ENOSPC otherwise),
so that the catalog, on the same file system, can always commit. SQLite rolls a
transaction back when its commit meets a full disk, and the daemon's group transaction
holds every metadata change since the last commit: running out of space must stop the
data, never the metadata. The collector may use half the reserve (compaction frees space).

Thread safety: ``append`` takes a lane's lock, ``sync`` each lane's in turn; ``read``
uses pread and needs none.
``read_cached`` reads into the caller's buffer and never waits for the disk (RWF_NOWAIT):
it is meant for the event loop's thread, which must not block on I/O.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

import xxhash

from snapfs.errors import IntegrityError
from snapfs.types import ChunkLocation

PACK_MAGIC = b"SNAPFSPK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII")  # magic, version, pack id
RECORD_MAGIC = b"SFCK"
RECORD_HEADER = struct.Struct("<4sHHIIQ")  # magic, flags, resv, length, raw, chunk
CHECK = struct.Struct("<Q")
RECORD_OVERHEAD = RECORD_HEADER.size + CHECK.size
FLAG_ENCRYPTED = 1
DEFAULT_PACK_LIMIT = 128 * 1024 * 1024
DEFAULT_LANES = max(1, min(2, os.cpu_count() or 1))  # packs written side by side
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14+; 0: read_cached always declines
MAX_IOVECS = 1000  # per pwritev call (IOV_MAX is 1024 on Linux)
# Free space that chunk data may not take (see PackStore.reserve): 1/64 of the file
# system, at least 4 MiB and at most 512 MiB.
RESERVE_MIN = 4 << 20
RESERVE_MAX = 512 << 20


def default_reserve(directory: str) -> int:
    """The free space chunk data leaves alone: 1/64 of the file system, within
    RESERVE_MIN..RESERVE_MAX."""
    st = os.statvfs(directory)
    return max(RESERVE_MIN, min(RESERVE_MAX, st.f_blocks * st.f_frsize // 64))


def pack_name(pack_id: int) -> str:
    return f"{pack_id:08d}.pack"


class _Lane:
    """One pack being written: a thread holds lock while it appends or syncs."""

    __slots__ = ("lock", "fd", "pack", "end", "unsynced")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd = -1
        self.pack = 0
        self.end = 0
        self.unsynced = False

    def finish(self) -> None:
        """Close the pack, durable first (the caller holds lock)."""
        if self.fd >= 0:
            if self.unsynced:
                os.fdatasync(self.fd)
            os.close(self.fd)
        self.fd, self.pack, self.unsynced = -1, 0, False


class PackStore:
    """The embedded ChunkStore: pack files in one directory."""

    def __init__(self, directory: str, *, writable: bool, pack_limit: int = DEFAULT_PACK_LIMIT,
                 reserve: int | None = None, lanes: int = DEFAULT_LANES):
        self.directory = directory
        self.writable = writable
        self.pack_limit = pack_limit
        self._lanes = [_Lane() for _ in range(max(1, lanes))]
        self._next_lane = 0  # where a writer waits when every lane is busy
        self._id_lock = threading.Lock()
        # Bytes that appends under way have been granted but not written yet: two lanes
        # checking free space side by side both saw room for their batch, and the two
        # batches together took the catalog's reserve (a disk-full test, when the kernel
        # handed over 100 MiB at one fsync).
        self._space_lock = threading.Lock()
        self._granted = 0
        self._last_id = 0  # pack ids only grow in a process, removed ones are not reused
        self._read_fds: dict[int, int] = {}
        self._retired: list[int] = []
        self.nowait = RWF_NOWAIT != 0  # cleared if the kernel or file system refuses it
        os.makedirs(directory, exist_ok=True)
        self.reserve = default_reserve(directory) if reserve is None else reserve

    # -- writing -------------------------------------------------------------------
    def pack_ids(self) -> list[int]:
        ids = []
        for name in os.listdir(self.directory):
            if name.endswith(".pack") and name[:-5].isdigit():
                ids.append(int(name[:-5]))
        return sorted(ids)

    def _lane(self) -> _Lane:
        """A lane, locked: the first free one, else wait for one in turn."""
        for lane in self._lanes:
            if lane.lock.acquire(blocking=False):
                return lane
        self._next_lane = (self._next_lane + 1) % len(self._lanes)
        lane = self._lanes[self._next_lane]
        lane.lock.acquire()
        return lane

    def _open_new_pack(self, lane: _Lane) -> None:
        lane.finish()
        with self._id_lock:
            existing = self.pack_ids()
            pack_id = max(existing[-1] if existing else 0, self._last_id) + 1
            self._last_id = pack_id
            path = os.path.join(self.directory, pack_name(pack_id))
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, pack_id))
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        lane.fd, lane.pack, lane.end, lane.unsynced = fd, pack_id, PACK_HEADER.size, True

    def append(self, chunk_id: int, payload: bytes, raw_len: int, flags: int = 0) -> ChunkLocation:
        """Append one record; returns its location. The record is durable after sync()."""
        return self.append_many([(chunk_id, payload, raw_len, flags)])[0]

    def append_many(self, items: list[tuple[int, bytes, int, int]], *,
                    keep: int | None = None, sync: bool = False) -> list[ChunkLocation]:
        """Append (chunk id, payload, plaintext length, flags) records with one pwritev;
        ENOSPC if that would leave less than keep (default: the reserve) bytes free.
        With sync, the lane's pack is made durable before its lane is let go (two
        batches appended side by side sync side by side)."""
        self._check_writable()
        nbytes = sum(RECORD_OVERHEAD + len(p) for _, p, _, _ in items)
        with self._space_lock:
            self.check_space(nbytes, self.reserve if keep is None else keep)
            self._granted += nbytes
        try:
            return self._append_granted(items, sync)
        finally:
            with self._space_lock:
                self._granted -= nbytes

    def _append_granted(self, items: list[tuple[int, bytes, int, int]],
                        sync: bool) -> list[ChunkLocation]:
        """append_many once its space is granted."""
        # Each record goes out as two iovecs (header + check, then the payload itself):
        # joining them would copy every payload once more.
        records = []
        for chunk_id, payload, raw_len, flags in items:
            header = RECORD_HEADER.pack(RECORD_MAGIC, flags, 0, len(payload), raw_len, chunk_id)
            check = xxhash.xxh3_64(header)
            check.update(payload)
            records.append((header + CHECK.pack(check.intdigest()), payload))
        locs = []
        lane = self._lane()
        try:
            batch: list[bytes] = []
            start = 0
            for head, payload in records:
                size = len(head) + len(payload)
                if (lane.fd < 0 or lane.end + size > self.pack_limit
                        or len(batch) >= MAX_IOVECS):
                    self._write_batch(lane, batch, start)
                    batch = []
                    if lane.fd < 0 or lane.end + size > self.pack_limit:
                        self._open_new_pack(lane)
                if not batch:
                    start = lane.end
                locs.append(ChunkLocation(lane.pack, lane.end, size))
                batch.append(head)
                batch.append(payload)
                lane.end += size
            self._write_batch(lane, batch, start)
            if sync and lane.unsynced:
                os.fdatasync(lane.fd)
                lane.unsynced = False
        finally:
            lane.lock.release()
        return locs

    def free_bytes(self) -> int:
        """Free space where the packs are (f_bavail, as check_space counts it)."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def check_space(self, nbytes: int, keep: int) -> None:
        """ENOSPC unless nbytes can be written leaving keep bytes free (f_bavail: what
        an unprivileged writer could use, so the root reserve stays untouched too)."""
        free = self.free_bytes() - self._granted
        if free - nbytes < keep:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {free >> 20} MiB free "
                          f"where the repository is, {keep >> 20} MiB of it kept for the "
                          "catalog (delete data, then `snapfs gc`)")

    def rotate(self) -> None:
        """Finish the packs being written (synced); the next appends start new ones. Lets
        the collector compact a pack that was being written."""
        for lane in self._lanes:
            with lane.lock:
                lane.finish()

    def _check_writable(self) -> None:
        if not self.writable:
            raise IntegrityError("the chunk store is open read-only")

    @staticmethod
    def _write_batch(lane: _Lane, batch: list[bytes], offset: int) -> None:
        if not batch:
            return
        lane.unsynced = True
        total = sum(len(r) for r in batch)
        written = os.pwritev(lane.fd, batch, offset)
        if written != total:
            raise OSError(28, "short write to pack file (disk full?)")

    def sync(self) -> None:
        """Make every appended record durable (fdatasync of the packs being written)."""
        for lane in self._lanes:
            with lane.lock:
                if lane.fd >= 0 and lane.unsynced:
                    os.fdatasync(lane.fd)
                    lane.unsynced = False

    @property
    def unsynced(self) -> bool:
        """True if records were appended since the last sync."""
        return any(lane.unsynced for lane in self._lanes)

    def writing(self, pack_id: int) -> bool:
        """True if pack_id is being written (rotate() first to compact or remove it)."""
        return any(lane.pack == pack_id for lane in self._lanes if lane.fd >= 0)

    # -- reading -------------------------------------------------------------------
    def _fd(self, pack_id: int) -> int:
        fd = self._read_fds.get(pack_id)
        if fd is None:
            path = os.path.join(self.directory, pack_name(pack_id))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise IntegrityError(f"pack file {path} is missing")
            self._read_fds[pack_id] = fd
        return fd

    def read(self, chunk_id: int, loc: ChunkLocation) -> tuple[bytes, int]:
        """Read and verify one record; returns (payload, flags)."""
        data = os.pread(self._fd(loc.pack), loc.length, loc.offset)
        return verify_record(data, chunk_id, loc)

    def read_cached(self, chunk_id: int, loc: ChunkLocation,
                    buf: bytearray) -> tuple[memoryview, int] | None:
        """Read and verify one record into buf, but only if the page cache holds all of it.

        Returns (payload, flags), the payload a view into buf (valid until buf is reused),
        or None when reading would wait for the disk (EAGAIN), the read came back short
        (partly cached, or a truncated pack), or RWF_NOWAIT is not supported: the caller
        then reads with read(), in a worker thread, which also reports truncation.
        A damaged record raises IntegrityError, as read() does.
        """
        view = memoryview(buf)[:loc.length]
        if len(view) != loc.length:
            raise ValueError("buffer smaller than the record")
        if not self._read_nowait(loc, (view,)):
            return None
        return verify_record(view, chunk_id, loc)

    def _read_nowait(self, loc: ChunkLocation, buffers: tuple) -> bool:
        """preadv2(RWF_NOWAIT) of a whole record into buffers; False when that would wait
        for the disk, came back short, or RWF_NOWAIT is not supported here."""
        if not self.nowait:
            return False
        try:
            n = os.preadv(self._fd(loc.pack), buffers, loc.offset, RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            self.nowait = False
            return False
        return n == loc.length

    def read_payload_into(self, chunk_id: int, loc: ChunkLocation, out: memoryview,
                          *, nowait: bool) -> int | None:
        """Read one record with its payload scattered straight into out, which must be
        exactly the payload's length, and verify it; returns the record's flags.

        For large reads: the payload lands where the reply is assembled, with no copy in
        between. With nowait (the event loop's thread), None when reading would wait for
        the disk or came back short, as read_cached; without, a short read is a truncated
        record (IntegrityError). A damaged record raises IntegrityError; out then holds
        unverified bytes and must not be used.
        """
        if len(out) != loc.length - RECORD_OVERHEAD:
            raise ValueError("out must be exactly the payload's length")
        header = bytearray(RECORD_OVERHEAD)
        if nowait:
            if not self._read_nowait(loc, (header, out)):
                return None
        else:
            n = os.preadv(self._fd(loc.pack), (header, out), loc.offset)
            if n != loc.length:
                raise IntegrityError(f"{_where(chunk_id, loc)}: record truncated "
                                     f"({n} of {loc.length} bytes)")
        return _verify(header, out, chunk_id, loc)

    def read_record(self, chunk_id: int, loc: ChunkLocation) -> tuple[bytes, int, int]:
        """Read and verify one record; returns (payload, plaintext length, flags)."""
        data = os.pread(self._fd(loc.pack), loc.length, loc.offset)
        payload, flags = verify_record(data, chunk_id, loc)
        return payload, RECORD_HEADER.unpack_from(data)[4], flags

    def remove_pack(self, pack_id: int) -> None:
        """Delete a pack file (compaction moved everything live out of it).

        Its cached read descriptor is retired, not closed: a reader thread may still be
        in a pread on it, and a closed number could be reused for another file meanwhile.
        It is pointed at /dev/null instead (dup2), which releases the file, so its space
        is free at once (on a full disk that is the point); a read after that comes back
        short and is retried at the record's new place. Retired descriptors are closed
        at the next removal.
        """
        if self.writing(pack_id):
            raise ValueError("cannot remove a pack being written")
        for fd in self._retired:
            os.close(fd)
        self._retired = []
        fd = self._read_fds.pop(pack_id, None)
        if fd is not None:
            null = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
            self._retired.append(fd)
        os.unlink(os.path.join(self.directory, pack_name(pack_id)))
        fsync_dir(self.directory)

    def pack_size(self, pack_id: int) -> int:
        return os.stat(os.path.join(self.directory, pack_name(pack_id))).st_size

    def close(self) -> None:
        self.rotate()
        for fd in [*self._read_fds.values(), *self._retired]:
            os.close(fd)
        self._read_fds.clear()
        self._retired = []


def verify_record(data: bytes | memoryview, chunk_id: int,
                  loc: ChunkLocation) -> tuple[bytes | memoryview, int]:
    """Check one record's framing and checksum; raise IntegrityError naming it. The payload
    returned is a slice of data (a view if data is a memoryview)."""
    if len(data) != loc.length or len(data) < RECORD_OVERHEAD:
        raise IntegrityError(f"{_where(chunk_id, loc)}: record truncated "
                             f"({len(data)} of {loc.length} bytes)")
    payload = data[RECORD_OVERHEAD:]
    return payload, _verify(data, payload, chunk_id, loc)


def _verify(header: bytes | bytearray | memoryview, payload: bytes | memoryview,
            chunk_id: int, loc: ChunkLocation) -> int:
    """Check a record's header (its first RECORD_OVERHEAD bytes) and the checksum over
    header and payload, which need not be contiguous; return the record's flags."""
    magic, flags, _resv, length, _raw, stored_id = RECORD_HEADER.unpack_from(header)
    if magic != RECORD_MAGIC or length != loc.length - RECORD_OVERHEAD or stored_id != chunk_id:
        raise IntegrityError(f"{_where(chunk_id, loc)}: record header damaged")
    (stored_check,) = CHECK.unpack_from(header, RECORD_HEADER.size)
    with memoryview(header) as h:
        check = xxhash.xxh3_64(h[:RECORD_HEADER.size])
    check.update(payload)
    if check.intdigest() != stored_check:
        raise IntegrityError(f"{_where(chunk_id, loc)}: checksum mismatch")
    return flags


def _where(chunk_id: int, loc: ChunkLocation) -> str:
    return f"chunk {chunk_id} in {pack_name(loc.pack)} at offset {loc.offset}"


def fsync_dir(path: str) -> None:
    """Make the directory's entries durable: a new file's name survives a power loss only
    once its directory is synced (POSIX; ext4's journal happens to do it earlier)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
