"""The intent log: fsynced writes made durable with one small append (REPO/intent.log).

An fsync of a file whose catalog rows are already durable need not store its dirty
chunks and commit the catalog (two journal commits of ext4 here: the pack append, then
the WAL). It appends one record with the file's dirty pages, size and times to this log
and fdatasyncs it, as ZFS's ZIL and btrfs's log tree do. The chunk store and the catalog
catch up later (vfs/fs.py decides when, and replays the log when the repository opens).

Format: records one after another, each

    "SFIL" | u32 body length | u64 seq | u64 epoch | u64 xxh3_64(the 24 bytes before it
    + body) | body

and the body (sealed with the data key, aad = "intent" + seq + epoch, in an encrypted
repository)

    u64 vertex | u64 ino | u64 size | i64 mtime_ns | i64 ctime_ns | u32 extents
    | extents x (u64 offset, u32 length) | the extents' bytes, in that order

A record applies while its epoch is at least the catalog's `intent_epoch` (meta table);
the catalog raises that epoch in the same transaction that makes every logged write part
of its own rows, so a replay never repeats a record the catalog already holds. Reading
stops at the first record that is torn or fails its checksum: an append is acknowledged
only after its fdatasync, so anything after a bad record was never acknowledged either.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from snapfs.crypto.aead import Aead
from snapfs.errors import IntegrityError
from snapfs.store.packs import fsync_dir

MAGIC = b"SFIL"
HEADER = struct.Struct("<4sIQQ")  # magic, body length, seq, epoch
CHECK = struct.Struct("<Q")
BODY = struct.Struct("<QQQqqI")  # vertex, ino, size, mtime_ns, ctime_ns, extents
EXTENT = struct.Struct("<QI")
MAX_BODY = 64 << 20  # anything longer is damage, not a record
PREALLOC = 4 << 20  # zeros written ahead of the records at a time
KEEP = 16 << 20  # emptied, the log keeps this much of its file written


@dataclass(frozen=True, slots=True)
class IntentRecord:
    seq: int
    epoch: int
    vertex: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    extents: tuple[tuple[int, bytes], ...]  # (file offset, bytes)


def encode(rec: IntentRecord, aead: Aead | None) -> bytes:
    """One record as appended (checksummed, and sealed when aead is given)."""
    parts = [BODY.pack(rec.vertex, rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns,
                       len(rec.extents))]
    parts += [EXTENT.pack(off, len(data)) for off, data in rec.extents]
    parts += [bytes(data) for _, data in rec.extents]
    body = b"".join(parts)
    if aead is not None:
        body = aead.seal(body, _aad(rec.seq, rec.epoch))
    header = HEADER.pack(MAGIC, len(body), rec.seq, rec.epoch)
    return header + CHECK.pack(xxhash.xxh3_64_intdigest(header + body)) + body


def _aad(seq: int, epoch: int) -> bytes:
    return b"intent" + struct.pack("<QQ", seq, epoch)


def _frames(buf: bytes | memoryview) -> Iterator[tuple[int, int, bytes, int]]:
    """(seq, epoch, body, end) of each intact record, up to the first torn or damaged one
    (or the zeros written ahead of the records)."""
    pos, n = 0, len(buf)
    head = HEADER.size + CHECK.size
    while pos + head <= n:
        magic, length, seq, epoch = HEADER.unpack_from(buf, pos)
        if magic != MAGIC or length > MAX_BODY or pos + head + length > n:
            return
        (check,) = CHECK.unpack_from(buf, pos + HEADER.size)
        body = bytes(buf[pos + head:pos + head + length])
        if xxhash.xxh3_64_intdigest(bytes(buf[pos:pos + HEADER.size]) + body) != check:
            return
        pos += head + length
        yield seq, epoch, body, pos


def decode(buf: bytes | memoryview, aead: Aead | None) -> Iterator[IntentRecord]:
    """The records of a log's bytes, up to the first torn or damaged one. A record that
    passes its checksum but not its authentication (encrypted) is damage: IntegrityError."""
    for seq, epoch, body, _ in _frames(buf):
        if aead is not None:
            body = aead.open(body, _aad(seq, epoch), f"intent-log record {seq}")
        yield _parse(body, seq, epoch)


def _parse(body: bytes, seq: int, epoch: int) -> IntentRecord:
    try:
        vertex, ino, size, mtime, ctime, count = BODY.unpack_from(body, 0)
        at = BODY.size
        spans = [EXTENT.unpack_from(body, at + i * EXTENT.size) for i in range(count)]
        at += count * EXTENT.size
        extents = []
        for off, length in spans:
            extents.append((off, body[at:at + length]))
            at += length
        if at != len(body):
            raise struct.error("extents do not add up to the body")
    except struct.error as e:
        raise IntegrityError(f"intent-log record {seq} is malformed: {e}") from None
    return IntentRecord(seq, epoch, vertex, ino, size, mtime, ctime, tuple(extents))


class IntentLog:
    """The log file of one repository, owned by the single writer (the repository lock).

    Records go one after another from the file's start; end is where the next one goes.
    The file is written with zeros ahead of them (PREALLOC at a time), so that an
    append overwrites allocated blocks and its fdatasync commits no size change: 117-148
    us per 4 KiB record here against 238-240 us appending. Emptying the log only moves
    end back to 0: what lies beyond the new records (older ones, zeros) ends the log
    when read (a torn or zero header), or is older records whose epoch is below the
    catalog's, which never apply.

    append() and reset() block on the disk: callers run them in a worker thread, one at
    a time (the filesystem's sync lock), so records land in seq order.
    """

    def __init__(self, path: str, aead: Aead | None,
                 check_space: Callable[[int], None] | None = None) -> None:
        self.path = path
        self.aead = aead
        # raises ENOSPC unless that many bytes fit beside the catalog's reserve
        # (PackStore.check_space): the log must not take the room metadata needs
        self.check_space = check_space
        self._fd: int | None = None
        data = self._read()
        self.end = max((end for *_, end in _frames(data)), default=0)
        self.allocated = len(data)
        # A log with records is read once more right away, by recovery (read()): keep
        # what was read for it instead of reading up to the whole file again.
        self._unread: bytes | None = data if self.end else None

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def read(self) -> list[IntentRecord]:
        """Every intact record, in the order appended."""
        data, self._unread = self._unread, None
        return list(decode(self._read() if data is None else data, self.aead))

    def _open(self) -> int:
        if self._fd is None:
            created = not os.path.exists(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if created:  # an fdatasync of the file alone would not keep its name
                fsync_dir(os.path.dirname(self.path) or ".")
        return self._fd

    def append(self, blob: bytes) -> None:
        """Write one encoded record at end and make it durable (fdatasync). On failure
        end stays: the next record overwrites what was torn."""
        self._unread = None
        fd = self._open()
        at = self.end
        if at + len(blob) > self.allocated:
            grow = max(PREALLOC, at + len(blob) - self.allocated)
            if self.check_space is not None:
                self.check_space(grow)
            _write_all(fd, bytes(grow), self.allocated)
            self.allocated += grow
        _write_all(fd, blob, at)
        os.fdatasync(fd)
        self.end = at + len(blob)

    def reset(self, keep: bool = True) -> None:
        """Empty the log: every record in it is in the durable catalog. Not synced: a
        record that comes back after a power loss has an epoch below the catalog's.
        keep=False (unmount) also gives the file's blocks back."""
        self._unread = None
        if not keep or self.allocated > KEEP:
            if self._fd is not None or os.path.exists(self.path):
                os.ftruncate(self._open(), 0)
            self.allocated = 0
        self.end = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, at)
        view, at = view[done:], at + done
