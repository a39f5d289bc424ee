"""POSIX semantics of one directory tree (one vertex), testable without the kernel.

A View shows one vertex: a volume shows its draft (whose parent is the volume's head),
.snapshots/S shows S, or S's draft once something was written there. Every item (inode,
directory entry, block, xattr) is a row tagged with the vertex that wrote it; the version
a view sees is the row of its nearest ancestor-or-self (largest depth in the chain).
Writes always go to the draft, so a committed snapshot is never modified.

Inodes a view has touched stay in memory (self.inodes) with their directory listings,
resolved block maps and dirty data buffers; changes of times alone (a write's mtime, a
directory's times after a create, unlink or rename, a SETATTR of times) are written by
flush_inodes(), which the filesystem calls before every group commit, commit or fsync;
other attribute changes are saved at once (_save_changed).

Errors are FsError(errno) with the errno a local filesystem gives.
"""

from __future__ import annotations

import errno
import logging
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from snapfs.errors import FsError, IntegrityError, is_disk_full
from snapfs.vfs import acl
from snapfs.vfs.buffers import (
    PAGE,
    SMALL_BUFFER,
    DirtyChunk,
    materialize,
    padded,
    payload_len,
)

if TYPE_CHECKING:
    from snapfs.vfs.fs import Filesystem

log = logging.getLogger(__name__)

# Timestamps come from the coarse clock (the kernel's tick), as a local filesystem's do.
# With the writeback cache the kernel stamps mtime itself from that clock on write; a
# finer mtime from us differs from it and costs a SETATTR per written file.
# Python's time module does not name it: on Linux it is clock id 5.
_COARSE = getattr(time, "CLOCK_REALTIME_COARSE",
                  5 if sys.platform.startswith("linux") else time.CLOCK_REALTIME)


def now_ns() -> int:
    return time.clock_gettime_ns(_COARSE)

NAME_MAX = 255
# Timestamps are stored as signed 64-bit nanoseconds (years 1677 to 2262). Like ext4
# with its own range, a time outside is clamped, not refused (`touch -d 3000-01-01`
# works; stat then shows 2262-04-11). Unclamped, the catalog refused the row and the
# inode in memory kept a time no later save could store.
TIME_NS_MIN = -(1 << 63)
TIME_NS_MAX = (1 << 63) - 1


def _clamp_time(ns: int) -> int:
    return min(TIME_NS_MAX, max(TIME_NS_MIN, ns))

WINDOW = 1024  # blocks resolved per catalog query
STORE_BATCH = 128  # dirty chunks of one file stored by one put_many (16 MiB of 128 KiB)
STORE_WIDTH = 2  # such batches stored at once (store_batches)
LOCATE_AHEAD = 256  # chunk locations looked up at once by a scan (32 MiB of 128 KiB chunks)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass(slots=True, eq=False)
class Inode:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    target: bytes | None = None
    dirty: bool = False
    opens: int = 0
    entries: dict[bytes, int] | None = None  # directory listing, loaded on demand
    blocks: dict[int, int] = field(default_factory=dict)  # idx -> chunk (0 = hole)
    windows: set[int] = field(default_factory=set)
    buffers: dict[int, DirtyChunk] = field(default_factory=dict)
    # no dirty chunk's index is above this (set by add_buffer; back to -1 once buffers
    # is empty): row_size need not look at all of a thousand dirty chunks per row save
    top_buffer: int = -1
    xattrs: dict[bytes, bytes] | None = None
    # listxattr's answer length (names + NULs) while xattrs is loaded; -1: not counted
    xattr_list: int = -1
    allocated: int | None = None  # cached count of stored or dirty blocks (st_blocks)
    # An orphan is open but in no tree (unlinked, or left behind when its snapshot
    # directory was committed): it holds no references; its chunks are pinned instead.
    orphan: bool = False
    pins: dict[int, int] = field(default_factory=dict)
    deleted: bool = False  # gone from the tree and the catalog; kept while the kernel knows it
    detached: bool = False  # open, but only in a snapshot-directory draft since committed
    damaged: int = 0  # directory entries whose names failed authentication
    read_end: int = 0  # where the last read that missed the chunk cache ended (scans)
    # Where the data in the catalog ends: the size its row had, raised by every store
    # (View.row_size: a row never claims data that is only in memory); row_short: the
    # last row written said less than size, so the next store saves the row again.
    stored_end: int = 0
    row_short: bool = False
    # For an fsync through the intent log (vfs/fs.py): the catalog commit that will carry
    # the node's last row change other than size and times (Catalog.commits when it was
    # written; when the node was loaded, for rows loaded), the attributes of its last row
    # other than size and times, and truncates under way.
    row_txn: int = 1 << 62  # unknown: never durable
    attrs_txn: int = 1 << 62  # the same for its last row save of any kind (size, times)
    saved_meta: tuple = ()
    truncating: int = 0
    logged_attrs: tuple = ()  # (size, mtime_ns, ctime_ns) of its last intent record
    log_last: int = 0  # the seq of its last intent record
    # chunks written since its last intent record (Inode.changed adds each):
    # an fsync of a file with a thousand dirty chunks need not look at each of them
    unlogged: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.stored_end = self.size
        self.saved_meta = self.meta_row()

    def add_buffer(self, idx: int, buf: DirtyChunk) -> DirtyChunk:
        """Make buf the dirty chunk idx (keeping top_buffer an upper bound)."""
        self.buffers[idx] = buf
        if idx > self.top_buffer:
            self.top_buffer = idx
        return buf

    def changed(self, idx: int, buf: DirtyChunk) -> None:
        """Dirty chunk idx was just written: a new gen (a store in flight sees it
        changed) and a chunk for the next intent record (Filesystem._intent_record)."""
        buf.gen += 1
        self.unlogged.add(idx)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def rowless(self) -> bool:
        """Deleted or detached: it has no rows to write. A request that reaches it (an
        open handle, or the kernel's inode in a request that raced with its deletion)
        changes memory only; a row written then would bring the inode back over its
        tombstone."""
        return self.deleted or self.detached

    def row(self) -> tuple:
        return (self.mode, self.nlink, self.uid, self.gid, self.size, self.atime_ns,
                self.mtime_ns, self.ctime_ns, self.rdev, self.target)

    def meta_row(self) -> tuple:
        """The attributes an intent-log record does not carry (it has size and times)."""
        return (self.mode, self.nlink, self.uid, self.gid, self.rdev, self.target)


XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
XATTR_LIST_MAX = 65536  # the kernel's limit on listxattr's answer: names, NUL-terminated


def _check_xattr_namespace(name: bytes) -> None:
    """Set only names of the namespaces Linux file systems store, and the two POSIX ACL
    names; any other (system.*, "bogus.x") gets EOPNOTSUPP as on ext4 and tmpfs. The
    kernel hands a FUSE file system every name, so this is ours to check (its
    permission checks, trusted.* for CAP_SYS_ADMIN and user.* only on files and
    directories, it does itself)."""
    if not name.startswith(XATTR_NAMESPACES) and name not in acl.NAMES:
        raise FsError(errno.EOPNOTSUPP)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)


class View:
    """One vertex's tree. kind is 'volume' (key: volume name) or 'snapshot' (key: id)."""

    def __init__(self, fs: Filesystem, kind: str, key: str | int) -> None:
        self.fs = fs
        self.graph = fs.graph
        self.cat = fs.cat
        self.meta = fs.meta  # names, targets and xattrs pass through it (encryption)
        self.kind = kind
        self.key = key
        self.inodes: dict[int, Inode] = {}
        self.chunk_size = fs.chunk_size
        self.dirty_inodes: set[int] = set()  # inodes whose attributes are not saved yet
        self._name: str | None = fs.graph.vertices[key].name if kind == "snapshot" else None
        self.dropped = False  # its vertex was deleted: every request fails with ENOENT

    # -- which vertex ------------------------------------------------------------------------
    @property
    def vertex_id(self) -> int:
        """The vertex whose contents are shown."""
        if self.dropped:
            raise FsError(errno.ENOENT)
        if self.kind == "volume":
            return self.graph.volumes[self.key]
        draft = self.graph.snapshot_drafts.get(self.key)
        return self.key if draft is None else draft

    def chain(self) -> dict[int, int]:
        """The shown vertex's ancestors-or-self by depth: which rows it sees (_pick)."""
        return self.graph.chain(self.vertex_id)

    @property
    def immutable(self) -> bool:
        """True while the view shows a committed snapshot with no draft on top."""
        return self.kind == "snapshot" and self.key not in self.graph.snapshot_drafts

    def draft_id(self) -> int:
        """The draft that takes writes, created for a snapshot view on the first write."""
        if self.dropped:
            raise FsError(errno.ENOENT)
        if self.kind == "volume":
            return self.graph.volumes[self.key]
        return self.graph.snapshot_draft(self.key, create=True).id

    def name(self) -> str:
        """The directory name: the volume's, or VOLUME@LABEL under .snapshots."""
        if self.kind == "volume":
            return self.key
        if self._name is None:
            self._name = self.graph.vertices[self.key].name
        return self._name

    def prepare_reset(self) -> None:
        """Before the shown vertex changes: resolve every open file's blocks completely."""
        for node in self.inodes.values():
            if node.opens and stat.S_ISREG(node.mode):
                self._load_all(node)

    def reset(self) -> None:
        """The shown vertex changed outside the kernel: forget what the old one showed.

        Open files stay usable: one that the new vertex also has is refreshed from it
        (later writes go to the new draft); one it lacks becomes an orphan.
        """
        kept = {}
        for ino, node in self.inodes.items():
            if not node.opens or node.deleted:
                continue
            row = self._resolve_inode(ino)
            if row is None or row[0] == 0:
                node.detached = True  # lives on in memory only: no rows, no draft
                if not node.orphan:
                    node.orphan, node.nlink = True, 0
                    for chunk in node.blocks.values():
                        self._pin(node, chunk)
            else:
                self._unpin_all(node)
                fresh = Inode(ino, *row)
                fresh.opens, fresh.orphan = node.opens, fresh.nlink == 0
                for name in Inode.__slots__:  # same object: open handles refer to it
                    setattr(node, name, getattr(fresh, name))
                node.row_txn = node.attrs_txn = self.cat.commits
            kept[ino] = node
        self.inodes = kept
        self.dirty_inodes.clear()

    def _pin(self, node: Inode, chunk: int) -> None:
        if chunk:
            node.pins[chunk] = node.pins.get(chunk, 0) + 1
            self.fs.chunks.pin([chunk])

    def _unpin(self, node: Inode, chunk: int) -> None:
        if chunk and node.pins.get(chunk):
            node.pins[chunk] -= 1
            if not node.pins[chunk]:
                del node.pins[chunk]
            self.fs.chunks.unpin([chunk])

    def _resolve_inode(self, ino: int) -> tuple | None:
        row = self._pick(self.cat.execute(
            "SELECT vertex, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, "
            "target FROM inodes WHERE ino=?", (ino,)))
        if row is None:
            return None
        return (*row[1:10], self.meta.target_dec(ino, row[10]))

    def _pick(self, rows):
        """From (vertex, ...) rows, the one of the nearest ancestor-or-self, or None."""
        chain = self.chain()
        best, best_depth = None, -1
        for row in rows:
            depth = chain.get(row[0], -1)
            if depth > best_depth:
                best, best_depth = row, depth
        return best

    # -- inodes ----------------------------------------------------------------------------
    def get(self, ino: int) -> Inode:
        node = self.inodes.get(ino)
        if node is not None and not self.dropped:
            return node
        row = self._resolve_inode(ino)
        if row is None or row[0] == 0:
            raise FsError(errno.ENOENT)
        node = Inode(ino, *row)
        node.orphan = node.nlink == 0  # left by a crash: its references are already gone
        # its rows may be in a commit not yet durable (a node forgotten and looked up
        # again): durable from the next durable commit on (Filesystem._loggable)
        node.row_txn = node.attrs_txn = self.cat.commits
        self.inodes[ino] = node
        return node

    def _save(self, node: Inode) -> None:
        if node.rowless:
            node.dirty = False
            return
        row = node.row()
        size = self.row_size(node)
        self.cat.write("INSERT OR REPLACE INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (node.ino, self.draft_id(), *row[:4], size, *row[5:9],
                        self.meta.target_enc(node.ino, row[9])))
        node.dirty, node.row_short = False, size < node.size
        node.stored_end = max(node.stored_end, size)  # all of it is in the catalog now
        node.attrs_txn = self.cat.commits
        meta = node.meta_row()
        if meta != node.saved_meta:
            # a row that changes only size and times need not be durable for a logged
            # fsync: the record carries them (a group commit saves the row of a file being
            # written every 2 s, and each would have made its next fsync a stored one)
            node.saved_meta, node.row_txn = meta, self.cat.commits

    def _save_changed(self, node: Inode) -> None:
        """After a namespace change: save node's row now if an attribute other than its
        size and times changed (nlink: what an fsync through the intent log needs in the
        catalog, see Filesystem._loggable), else leave it to the next commit, as a write
        leaves its mtime (flush_inodes; fsync, a snapshot commit and stats flush first).
        Saving the directory's new times on every create was one SQLite statement of
        the seven a create made."""
        if node.meta_row() != node.saved_meta:
            self._save(node)
        else:
            self._mark_dirty(node)

    def row_size(self, node: Inode) -> int:
        """The size the inode row may say: node.size, but not past data that is still
        only in memory. A group commit saved the size of an open file whose last chunks
        were dirty; killed then, the daemon left a log file that was zeros from end to
        end (its size committed, none of its data). When a dirty chunk reaches past where
        the catalog's data ends (Inode.stored_end: the last row's size, raised by every
        store), the row says that end instead; each store marks the inode for saving
        again, and once nothing is dirty past it the row says the whole size. A crash,
        or a snapshot sealed meanwhile, shows the file as far as it was stored, not
        zeros. Dirty chunks inside that part read as their stored content until they
        are stored, as any unsynced overwrite would.
        """
        if not node.buffers:
            node.top_buffer = -1
            return node.size
        first, top = node.stored_end // self.chunk_size, node.top_buffer  # (first+1)*cs > end
        if top < first:
            return node.size
        if top - first < len(node.buffers):
            past = any(i in node.buffers for i in range(first, top + 1))
        else:
            past = any(i >= first for i in node.buffers)
        return min(node.size, node.stored_end) if past else node.size

    def _touch(self, node: Inode, *, mtime: bool = True, now: int | None = None) -> None:
        now = now or now_ns()
        node.ctime_ns = now
        if mtime:
            node.mtime_ns = now

    def _mark_dirty(self, node: Inode) -> None:
        if node.rowless:
            return
        self.draft_id()  # a snapshot directory gets its draft at the first change
        node.dirty = True
        self.dirty_inodes.add(node.ino)

    def flush_inodes(self) -> None:
        """Write every attribute change kept in memory into the draft's rows."""
        dirty, self.dirty_inodes = self.dirty_inodes, set()
        for ino in dirty:
            node = self.inodes.get(ino)
            if node is not None and node.dirty:
                self._save(node)

    def _new_inode(self, mode: int, uid: int, gid: int, parent: Inode, *,
                   target: bytes | None = None, rdev: int = 0) -> Inode:
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = now_ns()
        size = len(target) if target is not None else 0
        node = Inode(self.graph.alloc_ino(), mode, 2 if stat.S_ISDIR(mode) else 1, uid, gid,
                     size, now, now, now, rdev, target, row_txn=self.cat.commits)
        if node.is_dir:
            node.entries = {}
        node.xattrs = {}  # a new inode has no rows to read them from
        node.xattr_list = 0
        node.windows.add(0)  # nor block rows: its first window is known (no query)
        self.inodes[node.ino] = node
        self._save(node)
        return node

    # -- directories -------------------------------------------------------------------------
    def entries(self, dir_node: Inode) -> dict[bytes, int]:
        if not dir_node.is_dir:
            raise FsError(errno.ENOTDIR)
        if dir_node.entries is None:
            best: dict[bytes, tuple[int, int]] = {}
            chain = self.chain()
            for vertex, name, ino in self.cat.execute(
                    "SELECT vertex, name, ino FROM dirents WHERE parent=?", (dir_node.ino,)):
                depth = chain.get(vertex, -1)
                if depth >= 0 and depth > best.get(name, (-1, 0))[0]:
                    best[name] = (depth, ino)
            dir_node.entries = self._decrypt_names(dir_node, best)
        return dir_node.entries

    def _decrypt_names(self, dir_node: Inode, best: dict) -> dict[bytes, int]:
        """Plain names of a directory. A damaged name is left out and logged, so that its
        siblings stay reachable by name; listing the directory then fails (EIO) rather
        than show an incomplete list."""
        entries: dict[bytes, int] = {}
        for blob, (_, ino) in best.items():
            if not ino:
                continue
            try:
                entries[self.meta.name_dec(dir_node.ino, blob)] = ino
            except IntegrityError as e:
                dir_node.damaged += 1
                log.error("directory inode %d: a damaged name is left out: %s", dir_node.ino, e)
        return entries

    def lookup(self, parent: int, name: bytes) -> Inode:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.entries(self.get(parent)).get(name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return self.get(ino)

    def _set_entry(self, dir_node: Inode, name: bytes, ino: int) -> None:
        self.entries(dir_node)[name] = ino
        self.cat.write("INSERT OR REPLACE INTO dirents VALUES (?,?,?,?)",
                       (dir_node.ino, self.meta.name_enc(dir_node.ino, name), self.draft_id(),
                        ino))

    def _del_entry(self, dir_node: Inode, name: bytes) -> None:
        del self.entries(dir_node)[name]
        draft = self.draft_id()
        name = self.meta.name_enc(dir_node.ino, name)
        inherited = self.graph.vertices[draft].parent is not None and self._pick(
            row for row in self.cat.execute(
                "SELECT vertex, ino FROM dirents WHERE parent=? AND name=?",
                (dir_node.ino, name)) if row[0] != draft)
        if inherited and inherited[1]:
            self.cat.write("INSERT OR REPLACE INTO dirents VALUES (?,?,?,0)",
                           (dir_node.ino, name, draft))
        else:
            self.cat.write("DELETE FROM dirents WHERE parent=? AND name=? AND vertex=?",
                           (dir_node.ino, name, draft))

    def listdir(self, ino: int) -> list[tuple[bytes, int]]:
        node = self.get(ino)
        entries = self.entries(node)
        if node.damaged:
            raise IntegrityError(f"directory inode {ino}: {node.damaged} damaged names")
        if sum(1 for child in entries.values() if child not in self.inodes) > 32:
            self._preload_children(ino)
        return sorted(entries.items())

    def _preload_children(self, dir_ino: int) -> None:
        """Resolve the inodes of a whole directory with one query (for readdirplus)."""
        chain = self.chain()
        best: dict[int, tuple] = {}
        for row in self.cat.execute(
                "SELECT i.vertex, i.ino, i.mode, i.nlink, i.uid, i.gid, i.size, i.atime_ns, "
                "i.mtime_ns, i.ctime_ns, i.rdev, i.target FROM inodes i WHERE i.ino IN "
                "(SELECT DISTINCT ino FROM dirents WHERE parent=?)", (dir_ino,)):
            depth = chain.get(row[0], -1)
            if depth >= 0 and depth > best.get(row[1], (-1,))[0]:
                best[row[1]] = (depth, *row[1:])
        for ino, (_, *fields) in best.items():
            if ino not in self.inodes and fields[1] != 0:
                fields[-1] = self.meta.target_dec(ino, fields[-1])
                node = self.inodes[ino] = Inode(*fields)
                node.row_txn = node.attrs_txn = self.cat.commits

    def _create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
                umask: int = 0, **kw) -> Inode:
        """A new node in parent. Its permission bits are mode's without the umask, or,
        under a directory with a default ACL, masked by that ACL instead (which a new
        directory also inherits), as on a local file system with ACLs."""
        _check_name(name)
        dir_node = self.get(parent)
        entries = self.entries(dir_node)
        if dir_node.nlink == 0:
            raise FsError(errno.ENOENT)
        if name in entries:
            raise FsError(errno.EEXIST)
        default = None if stat.S_ISLNK(mode) else self._default_acl(dir_node)
        access = None
        if default is None:
            mode &= ~(umask & 0o777)
        else:
            access, mode = acl.inherit(default, mode)
        node = self._new_inode(mode, uid, gid, dir_node, **kw)
        if default is not None and node.is_dir:
            self._put_xattr(node, acl.DEFAULT, acl.dump(default))
        if access is not None and not acl.is_minimal(access):
            self._put_xattr(node, acl.ACCESS, acl.dump(access))
        self._set_entry(dir_node, name, node.ino)
        if node.is_dir:
            dir_node.nlink += 1
        self._touch(dir_node)
        self._save_changed(dir_node)
        return node

    def _default_acl(self, dir_node: Inode) -> acl.Acl | None:
        value = self._xattrs(dir_node).get(acl.DEFAULT)
        return acl.parse(value) if value is not None else None

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
              umask: int = 0) -> Inode:
        return self._create(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid, umask)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              umask: int = 0) -> Inode:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        return self._create(parent, name, mode, uid, gid, umask, rdev=rdev)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG)
        return self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def readlink(self, ino: int) -> bytes:
        node = self.get(ino)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target or b""

    async def open_file(self, ino: int, *, truncate: bool = False) -> Inode:
        """Open a regular file (O_TRUNC: truncate is True); the caller hands out the
        handle. A file deleted between the kernel's lookup and this request (another
        process unlinked it) is refused with ENOENT, as if the unlink came first: open,
        it would take writes that nothing stores."""
        node = self.get(ino)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.EINVAL)
        if not node.deleted and truncate and node.size:
            await self.setattr(ino, size=0)
        if node.deleted:  # before, or during the truncate's awaits
            raise FsError(errno.ENOENT)
        node.opens += 1
        return node

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        _check_name(name)
        node = self.get(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        dir_node = self.get(parent)
        if name in self.entries(dir_node):
            raise FsError(errno.EEXIST)
        if node.nlink == 0:
            raise FsError(errno.ENOENT)
        self._set_entry(dir_node, name, ino)
        node.nlink += 1
        self._touch(node, mtime=False)
        self._save(node)
        self._touch(dir_node)
        self._save_changed(dir_node)
        return node

    def unlink(self, parent: int, name: bytes) -> None:
        dir_node = self.get(parent)
        node = self.lookup(parent, name)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        self._del_entry(dir_node, name)
        self._touch(dir_node)
        self._save_changed(dir_node)
        self._drop_link(node)

    def rmdir(self, parent: int, name: bytes) -> None:
        dir_node = self.get(parent)
        if name == b".":
            raise FsError(errno.EINVAL)
        node = self.lookup(parent, name)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if self.entries(node):
            raise FsError(errno.ENOTEMPTY)
        self._del_entry(dir_node, name)
        dir_node.nlink -= 1
        self._touch(dir_node)
        self._save(dir_node)
        node.nlink = 0
        self._maybe_delete(node)

    def _drop_link(self, node: Inode) -> None:
        node.nlink -= 1
        self._touch(node, mtime=False)
        if node.nlink or node.opens or node.orphan:
            self._save(node)  # else _maybe_delete writes its tombstone row over it
        if node.nlink == 0 and node.opens and not node.orphan:
            self._make_orphan(node)
        self._maybe_delete(node)

    def seal_orphans(self, draft: int) -> None:
        """Before draft is sealed into a snapshot: files unlinked but still open leave
        it as deleted (a tombstone row, their block and xattr rows dropped) and live on
        in memory only. Their chunks are pinned, not counted by the draft: sealed with
        their rows, the snapshot kept rows pointing at chunks that nothing counted, and
        the collector freed them (fsck: "points at missing chunk")."""
        for node in self.inodes.values():
            if not node.orphan or node.rowless:
                continue
            self._tombstone(node.ino, draft)
            node.detached, node.dirty = True, False
            self.dirty_inodes.discard(node.ino)

    def _make_orphan(self, node: Inode) -> None:
        """Unlinked while open: the tree no longer references it; pin its chunks instead."""
        if stat.S_ISREG(node.mode):
            self._load_all(node)
            changes: dict[int, int] = {}
            for chunk in node.blocks.values():
                if chunk:
                    changes[chunk] = changes.get(chunk, 0) - 1
                    self._pin(node, chunk)
            self.graph.adjust_refs(self.draft_id(), changes)
        node.orphan = True

    def _load_all(self, node: Inode) -> None:
        last = self._nblocks(node.size)
        self._load_windows(node, self._row_indices(node))
        for idx in [i for i in node.blocks if i >= last]:
            del node.blocks[idx]

    def stored_blocks(self, node: Inode) -> list[tuple[int, int]]:
        """(index, chunk) of every stored block of a file, in order (holes left out): the
        loaded windows from memory, the others from the catalog's rows without loading
        them. O(blocks it has), not O(size): what st_blocks, fsck, export and an import's
        accounting walk (window by window over the size, an exabyte-sized sparse file
        never ended). No query when every window is loaded (the usual small file)."""
        if node.deleted:
            return []
        n = self._nblocks(node.size)
        found = {i: c for i, c in node.blocks.items() if c and i < n}
        windows = (n + WINDOW - 1) // WINDOW
        if windows > 64 or not all(w in node.windows for w in range(windows)):
            for i, c in self._resolved_blocks(node, 0, n):
                if c and i // WINDOW not in node.windows:
                    found[i] = c
        return sorted(found.items())

    def _row_indices(self, node: Inode, first: int = 0) -> list[int]:
        """Block indices from first on that have rows in the catalog (in any vertex): with
        memory, the only places a stored block can be. O(rows), not O(size): a sparse
        file of exabytes has a handful (going window by window over its size never
        ended)."""
        return [idx for (idx,) in self.cat.execute(
            "SELECT DISTINCT idx FROM blocks WHERE ino=? AND idx>=? ORDER BY idx",
            (node.ino, first))]

    def _load_windows(self, node: Inode, indices: list[int]) -> None:
        for window in sorted({i // WINDOW for i in indices} - node.windows):
            self._load_window(node, window)

    def _maybe_delete(self, node: Inode) -> None:
        """An inode with no names and no open handles is gone: release its data."""
        if node.nlink > 0 or node.opens > 0:
            return
        if node.orphan:
            self._unpin_all(node)
            # a sealed draft had it (detached: no query needed to know)
            if node.detached or (row := self._resolve_inode(node.ino)) is None or row[0] == 0:
                self._forget_node(node)
                return
        elif stat.S_ISREG(node.mode):
            self._release_blocks(node)
        self._tombstone(node.ino, self.draft_id())
        self._forget_node(node)

    def _tombstone(self, ino: int, vertex: int) -> None:
        """ino is deleted in vertex: its block and xattr rows there go, and a mode-0 row
        hides the rows of older vertices."""
        for table in ("blocks", "xattrs"):
            self.cat.write(f"DELETE FROM {table} WHERE ino=? AND vertex=?", (ino, vertex))
        self.cat.write("INSERT OR REPLACE INTO inodes VALUES (?,?,0,0,0,0,0,0,0,0,0,NULL)",
                       (ino, vertex))

    def _forget_node(self, node: Inode) -> None:
        """The inode is deleted. It stays in memory (fstat of an open directory still
        works) until the kernel forgets it."""
        node.dirty = False
        node.deleted = True
        node.nlink = 0
        self.drop_buffers(node)
        node.blocks.clear()
        node.windows.clear()
        self.dirty_inodes.discard(node.ino)

    def _unpin_all(self, node: Inode) -> None:
        for chunk, count in list(node.pins.items()):
            for _ in range(count):
                self._unpin(node, chunk)

    def forget(self, ino: int) -> None:
        """The kernel forgot ino: drop it from memory unless it has unsaved state."""
        node = self.inodes.get(ino)
        if node is not None and (node.deleted or not (node.dirty or node.buffers or node.opens)):
            self.inodes.pop(ino, None)

    async def store_before_replace(self, old_parent: int, old_name: bytes,
                                   new_parent: int, new_name: bytes) -> None:
        """Before a rename over an existing name: store the renamed file's dirty data.

        Programs replace a file by writing a new one and renaming it over the old one,
        often without fsync. A catalog commit between the rename and the next write-back
        (group commits store first, then commit, and renames go on during the store) held
        the rename but not the data: after a crash the file was empty (found with a crash
        probe, 2026-11-27). Stored first, the data's rows precede the rename's in the
        catalog, so a crash leaves the old file or the new one, as ext4's auto_da_alloc
        does. A full disk or a damaged base does not stop the rename: that data stays
        dirty, as it would have anyway."""
        try:
            node = self.lookup(old_parent, old_name)
            replaced = new_name in self.entries(self.get(new_parent))
        except FsError:
            return  # the rename itself reports it
        if not replaced or not node.buffers or not stat.S_ISREG(node.mode):
            return
        try:
            await self.flush_data(node)
        except Exception as e:
            if not (is_disk_full(e) or isinstance(e, IntegrityError)):
                raise

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        _check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FsError(errno.EINVAL)
        src_dir, dst_dir = self.get(old_parent), self.get(new_parent)
        node = self.lookup(old_parent, old_name)
        dst_entries = self.entries(dst_dir)
        existing_ino = dst_entries.get(new_name)
        if existing_ino == node.ino:
            return  # same inode: POSIX says do nothing
        # Moving a directory into its own subtree (EINVAL) is refused by the kernel, which
        # knows the dentry ancestry, before the request reaches us.
        if flags & RENAME_EXCHANGE:
            if existing_ino is None:
                raise FsError(errno.ENOENT)
            other = self.get(existing_ino)
            self._set_entry(src_dir, old_name, other.ino)
            self._set_entry(dst_dir, new_name, node.ino)
            if node.is_dir != other.is_dir and old_parent != new_parent:
                delta = 1 if node.is_dir else -1
                dst_dir.nlink += delta
                src_dir.nlink -= delta
            now = now_ns()
            for n in (node, other):
                self._touch(n, mtime=False, now=now)
                self._save_changed(n)
            self._touch_dirs(src_dir, dst_dir, now)
            return
        if existing_ino is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            existing = self.get(existing_ino)
            if node.is_dir and not existing.is_dir:
                raise FsError(errno.ENOTDIR)
            if existing.is_dir and not node.is_dir:
                raise FsError(errno.EISDIR)
            if existing.is_dir and self.entries(existing):
                raise FsError(errno.ENOTEMPTY)
        self._del_entry(src_dir, old_name)
        self._set_entry(dst_dir, new_name, node.ino)
        now = now_ns()
        if node.is_dir and old_parent != new_parent:
            src_dir.nlink -= 1
            dst_dir.nlink += 1
        if existing_ino is not None:
            existing = self.get(existing_ino)
            if existing.is_dir:
                dst_dir.nlink -= 1
                existing.nlink = 0
                self._maybe_delete(existing)
            else:
                self._drop_link(existing)
        self._touch(node, mtime=False, now=now)
        self._save_changed(node)
        self._touch_dirs(src_dir, dst_dir, now)

    def _touch_dirs(self, a: Inode, b: Inode, now: int) -> None:
        for d in {a.ino: a, b.ino: b}.values():
            self._touch(d, now=now)
            self._save_changed(d)

    # -- attributes ---------------------------------------------------------------------------
    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Inode:
        node = self.get(ino)
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(node.mode):
                raise FsError(errno.EINVAL)
            await self.truncate(node, size)
        if mode is not None:
            node.mode = stat.S_IFMT(node.mode) | (mode & 0o7777)
            access = self._xattrs(node).get(acl.ACCESS)
            if access is not None:  # chmod changes the ACL's owner, mask and other entries
                self._put_xattr(node, acl.ACCESS, acl.dump(acl.chmod(acl.parse(access), mode)))
        if uid is not None and uid != -1 and uid != 0xFFFFFFFF:
            node.uid = uid
        if gid is not None and gid != -1 and gid != 0xFFFFFFFF:
            node.gid = gid
        if atime_ns is not None:
            node.atime_ns = _clamp_time(atime_ns)
        if mtime_ns is not None:
            node.mtime_ns = _clamp_time(mtime_ns)
        node.ctime_ns = _clamp_time(ctime_ns) if ctime_ns is not None else now_ns()
        if size is None and mode is None and uid is None and gid is None:
            # times only (the kernel sends the mtime of cached writes before each fsync):
            # kept in memory like a write's, saved by the next flush_inodes (every group
            # commit, commit and fsync); a row per request cost an SQLite statement each
            self._mark_dirty(node)
        else:
            self._save(node)
        return node

    # -- extended attributes ----------------------------------------------------------------
    def _xattrs(self, node: Inode) -> dict[bytes, bytes]:
        if node.xattrs is None:
            chain = self.chain()
            best: dict[bytes, tuple[int, bytes | None]] = {}
            for vertex, name, value in self.cat.execute(
                    "SELECT vertex, name, value FROM xattrs WHERE ino=?", (node.ino,)):
                depth = chain.get(vertex, -1)
                if depth >= 0 and depth > best.get(name, (-1, None))[0]:
                    best[name] = (depth, value)
            meta, ino = self.meta, node.ino
            xattrs = {}
            for blob, (_, value) in best.items():
                if value is not None:
                    name = meta.xname_dec(ino, blob)
                    xattrs[name] = meta.xvalue_dec(ino, name, value)
            node.xattrs = xattrs  # only once every one opened: damage is never cached
        return node.xattrs

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """The value, or None: the kernel asks for security.capability before every
        write, and the answer is almost always "none", so that path raises nothing."""
        return self._xattrs(self.get(ino)).get(name)

    def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self._xattrs(self.get(ino)))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0, *,
                 keep_sgid: bool = True) -> None:
        """Set an xattr. keep_sgid=False: the caller is neither in the file's group nor
        privileged, and setting an access ACL then clears the set-group-id bit (the
        kernel leaves that to a FUSE file system, as it does the mode: see acl.py)."""
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE)
        _check_xattr_namespace(name)
        if len(value) > 65536:
            raise FsError(errno.E2BIG)
        node = self.get(ino)
        attrs = self._xattrs(node)
        if flags & XATTR_CREATE and name in attrs:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in attrs:
            raise FsError(errno.ENODATA)
        if name not in attrs and self._xattr_list(node) + len(name) + 1 > XATTR_LIST_MAX:
            # past this the kernel cannot list the names any more (E2BIG for listxattr,
            # so getfattr -d, cp -a and rsync -X fail on the file): refuse the name instead
            raise FsError(errno.ENOSPC)
        if name in acl.NAMES:
            self._set_acl(node, name, acl.parse(value), keep_sgid)
        else:
            self._put_xattr(node, name, bytes(value))
        self._touch(node, mtime=False)
        self._save(node)

    def _set_acl(self, node: Inode, name: bytes, entries: acl.Acl, keep_sgid: bool) -> None:
        """An access ACL sets the mode's permission bits and is stored only if it says
        more than they do; a default ACL belongs to directories only."""
        if name == acl.DEFAULT:
            if not node.is_dir:
                raise FsError(errno.EACCES)
            self._put_xattr(node, name, acl.dump(entries))
            return
        node.mode = acl.with_mode(node.mode, acl.mode_bits(entries))
        if not keep_sgid:
            node.mode &= ~stat.S_ISGID
        self._put_xattr(node, name, None if acl.is_minimal(entries) else acl.dump(entries))

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an xattr (ENODATA if it has none of that name). Removing an ACL the
        node does not have succeeds, as on ext4: an access ACL that the mode says is
        not stored, and setfacl -b removes it all the same."""
        node = self.get(ino)
        attrs = self._xattrs(node)
        if name not in attrs:
            if name in acl.NAMES:
                return
            raise FsError(errno.ENODATA)
        self._put_xattr(node, name, None)
        self._touch(node, mtime=False)
        self._save(node)

    def _xattr_list(self, node: Inode) -> int:
        """The length of listxattr's answer (names, NUL-terminated): counted once, then
        kept by _put_xattr. Summed on every new name, it made setxattr cost O(names):
        stress-ng's xattr stressor sets 4,096 per file, and in-process a call took 48 us
        among the first thousand names, 225-255 us among the fourth (18 us now)."""
        if node.xattr_list < 0:
            node.xattr_list = sum(len(n) + 1 for n in self._xattrs(node))
        return node.xattr_list

    def _put_xattr(self, node: Inode, name: bytes, value: bytes | None) -> None:
        """Set (None: remove) one xattr, in memory and in the draft's rows."""
        attrs = self._xattrs(node)
        if value is None:
            if attrs.pop(name, None) is None:
                return
            grown = -(len(name) + 1)
        else:
            grown = 0 if name in attrs else len(name) + 1
            attrs[name] = value
        if node.xattr_list >= 0:
            node.xattr_list += grown
        if node.rowless:
            return
        meta, ino = self.meta, node.ino
        self.cat.write("INSERT OR REPLACE INTO xattrs VALUES (?,?,?,?)",
                       (ino, meta.xname_enc(ino, name), self.draft_id(),
                        None if value is None else meta.xvalue_enc(ino, name, value)))
        node.row_txn = self.cat.commits

    # -- file data ----------------------------------------------------------------------------
    def block(self, node: Inode, idx: int) -> int:
        """The chunk id at block idx (0 = hole), resolving a window of blocks at once."""
        chunk = node.blocks.get(idx)
        if chunk is not None:
            return chunk
        window = idx // WINDOW
        if window not in node.windows:
            self._load_window(node, window)
        return node.blocks.get(idx, 0)

    def _load_window(self, node: Inode, window: int) -> None:
        if node.deleted:  # its data is gone: the rows left are older vertices' (see truncate)
            node.windows.add(window)
            return
        for idx, chunk in self._resolved_blocks(node, window * WINDOW, (window + 1) * WINDOW):
            node.blocks.setdefault(idx, chunk)
        node.windows.add(window)

    def _resolved_blocks(self, node: Inode, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """(index, chunk) of the catalog's block rows of node in [first, stop), each index
        resolved along the chain (the nearest vertex's row wins), in index order;
        streamed, so a caller that only counts holds nothing."""
        chain = self.chain()
        cur, depth, chunk = -1, -1, 0
        for idx, vertex, c in self.cat.execute(
                "SELECT idx, vertex, chunk FROM blocks WHERE ino=? AND idx>=? AND idx<? "
                "ORDER BY idx", (node.ino, first, stop)):
            if idx != cur:
                if depth >= 0:
                    yield cur, chunk
                cur, depth, chunk = idx, -1, 0
            d = chain.get(vertex, -1)
            if d > depth:
                depth, chunk = d, c
        if depth >= 0:
            yield cur, chunk

    def set_block(self, node: Inode, idx: int, chunk: int) -> None:
        """Point block idx of node at chunk in the draft, keeping reference counts exact."""
        old = self.block(node, idx)
        if old == chunk:
            return
        if node.orphan:  # in no tree: no references, only pins
            node.blocks[idx] = chunk
            node.allocated = None
            self._pin(node, chunk)
            self._unpin(node, old)
            if not node.detached:
                # its rows stay in the draft until the last close (or, after a crash,
                # the next mount) releases them: they must never name an unpinned chunk
                # that gc may free (fsck of a crashed repository found such rows)
                self.cat.write("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?)",
                               (node.ino, idx, self.draft_id(), chunk))
                node.row_txn = self.cat.commits
            return
        draft = self.draft_id()
        changes: dict[int, int] = {}
        if old:
            changes[old] = -1
        if chunk:
            changes[chunk] = changes.get(chunk, 0) + 1
        try:  # first: a refused change leaves everything as it was
            self.graph.adjust_refs(draft, changes)
        except AssertionError as e:
            raise AssertionError(f"{e} (block {idx} of inode {node.ino})") from None
        node.blocks[idx] = chunk
        self._count_allocated(node, idx, old, chunk)
        self.cat.write("INSERT OR REPLACE INTO blocks VALUES (?,?,?,?)",
                       (node.ino, idx, draft, chunk))
        node.row_txn = self.cat.commits

    def _count_allocated(self, node: Inode, idx: int, old: int, chunk: int) -> None:
        """Keep the st_blocks count of a block that changed from old to chunk, instead of
        recounting the file (O(its blocks) at the next attribute reply: 50 us for 32 MiB,
        milliseconds for a database of GiBs fsynced after every write)."""
        if node.allocated is None:
            return
        if idx >= self._nblocks(node.size):
            node.allocated = None
            return
        dirty = idx in node.buffers
        node.allocated += (bool(chunk) or dirty) - (bool(old) or dirty)

    def allocated_blocks(self, node: Inode) -> int:
        """Blocks that hold data (stored or dirty): what st_blocks reports."""
        if node.allocated is None:
            n = self._nblocks(node.size)
            stored = {i for i, _ in self.stored_blocks(node)}
            node.allocated = len(stored) + sum(1 for i in node.buffers
                                               if i < n and i not in stored)
        return node.allocated

    def _nblocks(self, size: int) -> int:
        return (size + self.chunk_size - 1) // self.chunk_size

    def _release_blocks(self, node: Inode) -> None:
        """A regular file is being deleted: every reference its blocks hold goes, in
        one adjust_refs. Its block rows go with the tombstone that follows (setting each
        block to a hole first wrote a row per block that the tombstone then deleted:
        half the statements of deleting a large file)."""
        for idx in list(node.buffers):
            self.fs.pool.give(node.buffers.pop(idx))
        node.allocated = None
        self._load_windows(node, self._row_indices(node))
        changes: dict[int, int] = {}
        for chunk in node.blocks.values():
            if chunk:
                changes[chunk] = changes.get(chunk, 0) - 1
        try:
            self.graph.adjust_refs(self.draft_id(), changes)
        except AssertionError as e:
            raise AssertionError(f"{e} (deleting inode {node.ino})") from None
        node.blocks.clear()

    def _truncate_blocks(self, node: Inode, size: int) -> None:
        """Drop every block wholly past size (reference counts follow)."""
        first = self._nblocks(size)
        last = self._nblocks(node.size)
        for idx in [i for i in node.buffers if i >= first]:
            self.fs.pool.give(node.buffers.pop(idx))
        node.allocated = None
        if last <= first:
            return
        self._load_windows(node, self._row_indices(node, first))
        for idx in sorted(i for i, c in node.blocks.items() if i >= first and c):
            self.set_block(node, idx, 0)

    async def truncate(self, node: Inode, size: int) -> None:
        """Set the size; blocks wholly past it are dropped, the partial last one is cut.

        The awaits come first, before anything changes: loading the partial last chunk
        and, when the catalog holds a version of it, storing it cut at the new end.
        Everything else happens after them without an await, so a commit, a write or a
        store meanwhile sees the file either before the truncate or after it: never its
        size unchanged with its blocks already gone (a snapshot sealed in that window
        showed such a file), nor the new size over the old last chunk (a crash then left
        the old bytes past the end, and a truncate up brought them back: 9,900 of 10,000
        in a test, 2026-11-27)."""
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > self.fs.max_file_size:
            raise FsError(errno.EFBIG)
        node.truncating += 1  # no fsync through the intent log meanwhile
        try:
            if size < node.size and self.fs.is_logged(self, node):
                # a live record of the old size would bring it back over the cut after
                # a crash (a record's size is applied exactly): retire the log first
                await self.fs.retire_log()
            await self._truncate(node, size)
        finally:
            node.truncating -= 1

    async def _truncate(self, node: Inode, size: int) -> None:
        idx, tail = divmod(size, self.chunk_size)
        cut: tuple[int, int] | None = None  # the cut last chunk stored: (id, gen it holds)
        try:
            while size < node.size and tail and not node.deleted:
                if cut is not None:  # from a round whose buffer went meanwhile
                    self.fs.chunks.unpin([cut[0]] if cut[0] else [])
                    cut = None
                buf = await self.buffer(node, idx)
                if node.buffers.get(idx) is not buf:
                    continue  # stored or dropped during the await: again
                if not self.block(node, idx):
                    break  # the catalog has nothing there that could outlive the cut
                cut = await self._store_cut(buf, tail)
                if node.buffers.get(idx) is buf:
                    break
            if node.deleted:
                # a truncate(2) that resolved the path before an unlink deleted the file
                # (or one during the awaits above): its references are gone, and its
                # forgotten blocks would load again from the snapshot's rows (that took
                # them away twice: "negative reference count"). It keeps no data.
                self.drop_buffers(node)
                node.size = size
                self._touch(node)
                return
            if size < node.size:
                self._truncate_blocks(node, size)
                if tail:
                    self._cut_last(node, idx, tail, cut)
                node.stored_end = min(node.stored_end, size)
            node.size = size
            self._touch(node)
            self._mark_dirty(node)
        finally:
            if cut is not None and cut[0]:
                self.fs.chunks.unpin([cut[0]])

    async def _store_cut(self, buf: DirtyChunk, tail: int) -> tuple[int, int]:
        """The first tail bytes of a loaded buffer stored as a chunk: (its id, pinned, 0
        for all zeros; the buffer's gen that the chunk holds)."""
        gen = buf.gen
        n = payload_len(buf.data, min(tail, buf.length))
        if not n:
            return 0, gen
        payload = bytes(memoryview(buf.data)[:n])  # a copy: writes may go on meanwhile
        (cid,) = await self.fs.chunks.put_many([payload])
        return cid, gen

    def _cut_last(self, node: Inode, idx: int, tail: int,
                  cut: tuple[int, int] | None) -> None:
        """Cut the last chunk's buffer at tail; with cut, point the block at the stored
        cut chunk too, and drop the buffer if nothing was written into it since."""
        buf = node.buffers[idx]
        if cut is not None:
            self.set_block(node, idx, cut[0])
            if buf.gen == cut[1]:
                self.fs.pool.give(node.buffers.pop(idx))
                node.allocated = None
                return
        buf.length = min(buf.length, tail)
        node.changed(idx, buf)

    async def buffer(self, node: Inode, idx: int, *, whole: bool = False,
                     need: int = 0, sparse: bool = False) -> DirtyChunk:
        """The dirty buffer for block idx, loaded from its chunk unless whole is True.
        need: where the write about to be made ends in the chunk (0: unknown); a new
        buffer for a write that ends early is a small one (BufferPool.take_small).
        sparse: the write about to be made covers whole pages, so a stored chunk is not
        loaded but overlaid (a sparse DirtyChunk); without it a sparse buffer is
        materialized first."""
        while (buf := node.buffers.get(idx)) is not None:
            if buf.pages is None or sparse:
                return buf
            error = await materialize(self.fs, [buf])  # then look again: it may be gone
            if error is not None:
                raise error
        chunk = self.block(node, idx)
        if chunk and not whole and sparse:
            buf = node.add_buffer(idx, DirtyChunk(None, -1, 0, time.monotonic(), False,
                                                  base=chunk, pages={}))
            self.fs.note_dirty(self, node, idx)
            return buf
        if chunk and not whole:
            content = self.fs.pool.take()
            try:  # straight from the pack (or the cache) into the buffer
                length = await self.fs.chunks.read_into(chunk, memoryview(content))
            except BaseException:
                self.fs.pool.untake(content)
                raise
            buf = node.buffers.get(idx)  # another writer may have made it meanwhile
            if buf is not None:
                self.fs.pool.untake(content)
                return await self.buffer(node, idx, whole=whole, need=need)
        elif 0 < need <= SMALL_BUFFER and need < self.chunk_size:
            content, length = self.fs.pool.take_small(need), 0
        else:
            content, length = self.fs.pool.take(), 0
        buf = node.add_buffer(idx, DirtyChunk(content, length, 0, time.monotonic(),
                                              length == 0))
        node.allocated = None
        self.fs.note_dirty(self, node, idx)
        return buf

    def _write_pages(self, buf: DirtyChunk, start: int, data: bytes | memoryview) -> None:
        """Whole pages into a sparse chunk; a last partial page (at the end of the file)
        is padded with zeros. Once every page is there, the buffer becomes a whole one
        without reading its base."""
        pages = buf.pages
        assert pages is not None
        before = len(pages)
        if type(data) is bytes and len(data) == PAGE:  # the common case: kept, not copied
            pages[start // PAGE] = data
        else:
            for pos in range(0, len(data), PAGE):
                page = bytes(data[pos:pos + PAGE])
                if len(page) < PAGE:
                    page += bytes(PAGE - len(page))
                pages[(start + pos) // PAGE] = page
        pool = self.fs.pool
        pool.pages += len(pages) - before
        if len(pages) * PAGE == self.chunk_size:
            content = pool.take()
            content[:] = b"".join(pages[p] for p in range(len(pages)))
            pool.pages -= len(pages)
            buf.data, buf.pages, buf.base, buf.length = content, None, 0, self.chunk_size

    def _sparse_now(self, buf: DirtyChunk, start: int, stop: int,
                    base: bytes | None = None) -> bytes | bytearray | None:
        """data[start:stop] of a sparse chunk, its pages over its base (read, not merged:
        the merge waits for the store), if that needs nothing awaited: the read is inside
        one written page, or the base is given or in the chunk cache. Else None."""
        pages = buf.pages
        assert pages is not None
        first, last = start // PAGE, (stop - 1) // PAGE
        if first == last and first in pages:
            return pages[first][start - first * PAGE:stop - first * PAGE]
        if base is None:
            base = self.fs.chunks.cache.get(buf.base)
            if base is None:
                return None
        out = bytearray(stop - start)
        with memoryview(base) as mv:
            piece = mv[start:stop]
            out[:len(piece)] = piece
        for p in range(first, last + 1):
            page = pages.get(p)
            if page is not None:
                a, b = max(start, p * PAGE), min(stop, (p + 1) * PAGE)
                out[a - start:b - start] = page[a - p * PAGE:b - p * PAGE]
        return out

    async def _read_sparse(self, node: Inode, idx: int, buf: DirtyChunk, start: int,
                           stop: int) -> bytes | bytearray:
        """_sparse_now, reading the base when it is not in the chunk cache."""
        got = self._sparse_now(buf, start, stop)
        if got is not None:
            return got
        pages = buf.pages
        base = await self.fs.chunks.get(buf.base)
        if buf.pages is not pages:  # materialized or dropped meanwhile: read again
            return await self.read(node, idx * self.chunk_size + start, stop - start)
        return self._sparse_now(buf, start, stop, base)  # type: ignore[return-value]

    def _thaw(self, buf: DirtyChunk) -> None:
        """A store is hashing and appending buf.data itself (no copy), or a write goes
        beyond a small buffer: write into a chunk-sized copy. The old bytearray is left to
        the store(s) and then to the garbage collector."""
        data = self.fs.pool.fresh()
        with memoryview(buf.data) as old:
            data[:buf.length] = old[:buf.length]
        buf.data = data
        buf.frozen = 0

    def drop_buffers(self, node: Inode) -> None:
        """Discard a node's unstored data (deleted, or nobody can read it again)."""
        for buf in node.buffers.values():
            self.fs.pool.give(buf)
        node.buffers.clear()
        node.allocated = None

    def read_now(self, node: Inode, offset: int, size: int) -> bytes | bytearray | None:
        """The read, if it needs nothing awaited; else None (then `read`).

        The hot path of random 4 KiB reads, without a coroutine: a read inside one chunk
        that is a whole dirty buffer, a hole, a stored chunk in the chunk cache, or a
        sparse chunk whose read needs only its pages or its cached base. A read of a whole
        chunk returns the cached object itself (a full slice is not a copy).
        """
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        cs = self.chunk_size
        idx, start = divmod(offset, cs)
        stop = end - idx * cs
        if stop > cs:
            return None
        buf = node.buffers.get(idx)
        if buf is not None:
            if buf.data is None:  # sparse: None when its base has to be read
                return self._sparse_now(buf, start, stop)
            piece = buf.data[start:min(stop, buf.length)]
        else:
            chunk = self.block(node, idx)
            if not chunk:
                return bytes(end - offset)
            data = self.fs.chunks.cache.get(chunk)
            if data is None:
                return None
            piece = data[start:stop]
        return padded(piece, end - offset)

    async def read(self, node: Inode, offset: int, size: int) -> bytes | bytearray:
        got = self.read_now(node, offset, size)
        return got if got is not None else await self.read_rest(node, offset, size)

    async def read_rest(self, node: Inode, offset: int, size: int) -> bytes | bytearray:
        """`read` where read_now returned None: a chunk-cache miss (also of a sparse
        chunk's base), or a read across chunks."""
        end = min(offset + size, node.size)
        cs = self.chunk_size
        idx, start = divmod(offset, cs)
        # A whole chunk read where the last one ended is a scan (cp, cat, dd: the kernel's
        # readahead asks for 128 KiB at a time): assembled below without entering the
        # chunk cache, like reads across chunks, so a scan neither evicts what random
        # readers use nor grows the daemon by the file's size. Other reads inside one
        # chunk are cached.
        scan = end - offset == cs and offset == node.read_end
        node.read_end = end
        if end - idx * cs <= cs and not scan:
            buf = node.buffers.get(idx)
            if buf is not None and buf.data is None:
                return await self._read_sparse(node, idx, buf, start, end - idx * cs)
            data = await self.fs.chunks.get(self.block(node, idx))
            # the await may have let a writer in: read again with the chunk now cached
            got = self.read_now(node, offset, size)
            if got is not None:
                return got
            return padded(data[start:end - idx * cs], end - offset)
        # a read of several chunks is assembled in one zeroed buffer, each chunk copied
        # into its place once (stored payloads straight from the page cache): no pieces
        # to join, and holes, unstored tails and stripped zeros cost nothing
        out = bytearray(end - offset)
        mv = memoryview(out)  # slices of it are written to, in worker threads too
        self._locate_ahead(node, idx)
        pos = offset
        while pos < end:
            idx, start = divmod(pos, cs)
            stop = min(cs, end - idx * cs)
            dst = mv[pos - offset:pos - offset + stop - start]
            buf = node.buffers.get(idx)
            if buf is not None and buf.data is None:
                piece = await self._read_sparse(node, idx, buf, start, stop)
                dst[:len(piece)] = piece
            elif buf is not None:
                n = min(stop, buf.length) - start
                if n > 0:
                    with memoryview(buf.data) as src:
                        dst[:n] = src[start:start + n]
            elif chunk := self.block(node, idx):
                if start == 0:
                    await self.fs.chunks.read_into(chunk, dst)
                else:
                    data = await self.fs.chunks.get(chunk)
                    with memoryview(data) as src:
                        piece = src[start:stop]
                        dst[:len(piece)] = piece
            pos = idx * cs + stop
        return out

    def _locate_ahead(self, node: Inode, idx: int) -> None:
        """A read across chunks reaching one whose location is not known yet (the first
        scan after a mount): look up those of the next LOCATE_AHEAD blocks at once
        (ChunkManager.locate_many)."""
        chunks = self.fs.chunks
        chunk = self.block(node, idx)
        if not chunk or chunks.knows_location(chunk):
            return
        stop = min(idx + LOCATE_AHEAD, self._nblocks(node.size))
        chunks.locate_many([self.block(node, i) for i in range(idx, stop)])

    def write_now(self, node: Inode, offset: int, data: bytes) -> int | None:
        """The write, if it needs nothing awaited; else None (then `write`).

        The hot path of small writes, without a coroutine: inside one chunk that is
        already dirty (no gap before it), or whole pages into a sparse chunk.
        """
        n = len(data)
        end = offset + n
        if end > self.fs.max_file_size:
            raise FsError(errno.EFBIG)
        cs = self.chunk_size
        idx, start = divmod(offset, cs)
        buf = node.buffers.get(idx)
        if buf is None:
            return None
        if buf.data is None:
            if start % PAGE or start + n > cs or (n % PAGE and end < node.size):
                return None
            self._write_pages(buf, start, data)  # whole pages into a sparse chunk
            node.changed(idx, buf)
            self._written(node, end)
            return n
        stop = start + n
        if start > buf.length or stop > len(buf.data):
            return None
        if buf.frozen:
            self._thaw(buf)
        buf.data[start:stop] = data
        if buf.seq:
            if start != buf.length:
                buf.seq = False
            elif stop == cs:
                self.fs.note_complete(self, node, idx)
        if stop > buf.length:
            buf.length = stop
        node.changed(idx, buf)
        self._written(node, end)
        return n

    async def write(self, node: Inode, offset: int, data: bytes) -> int:
        done = self.write_now(node, offset, data)
        return done if done is not None else await self.write_rest(node, offset, data)

    async def write_rest(self, node: Inode, offset: int, data: bytes) -> int:
        """`write` where write_now returned None: chunks to load or to create, writes
        across chunks."""
        n = len(data)
        end = offset + n
        cs = self.chunk_size
        view = memoryview(data)
        pos = offset
        while pos < end:
            idx, start = divmod(pos, cs)
            stop = min(cs, end - idx * cs)
            whole = start == 0 and (stop == cs or idx * cs >= node.size)
            # whole pages (the last may end the file) need not load a stored chunk
            sparse = not start % PAGE and (not stop % PAGE or end >= node.size)
            buf = await self.buffer(node, idx, whole=whole, need=stop, sparse=sparse)
            if buf.data is None:
                self._write_pages(buf, start, view[pos - offset:pos - offset + stop - start])
                node.changed(idx, buf)
                pos = idx * cs + stop
                continue
            if buf.frozen or stop > len(buf.data):
                self._thaw(buf)
            if buf.seq and start != buf.length:
                buf.seq = False
            if buf.length < start:  # a gap inside the chunk reads as zeros
                buf.data[buf.length:start] = bytes(start - buf.length)
            buf.data[start:stop] = view[pos - offset: pos - offset + stop - start]
            if buf.seq and stop == cs:
                self.fs.note_complete(self, node, idx)
            if stop > buf.length:
                buf.length = stop
            node.changed(idx, buf)
            pos = idx * cs + stop
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = now_ns()
        self._mark_dirty(node)
        return len(data)

    def _written(self, node: Inode, end: int) -> None:
        """After a write ending at end: size, times, and the inode on the dirty list."""
        if end > node.size:
            node.size = end
        node.mtime_ns = node.ctime_ns = now_ns()
        if not node.dirty:
            self._mark_dirty(node)

    async def flush_blocks(self, node: Inode, idxs: list[int], sync: bool = False) -> None:
        """Store dirty buffers as chunks (deduplicated) and point the blocks at them."""
        await store_buffers(self.fs.chunks, [(self, node, idx) for idx in idxs], sync)

    async def flush_data(self, node: Inode, batch: int = STORE_BATCH,
                         sync: bool = False) -> None:
        """Store the file's dirty buffers, STORE_WIDTH batches at once (store_batches);
        sync=True (an fsync) also makes the records durable, in the same worker-thread
        hop as their append."""
        for _ in range(8):
            if not node.buffers:
                return
            idxs = sorted(node.buffers)
            await store_batches(self.fs.chunks, [[(self, node, idx) for idx in idxs[i:i + batch]]
                                                 for i in range(0, len(idxs), batch)], sync)


async def store_batches(chunks, batches: list[list[tuple[View, Inode, int]]],
                        sync: bool = False, width: int = STORE_WIDTH) -> None:
    """store_buffers for each batch, up to width of them at once.

    One batch at a time leaves a core idle: its base reads, the catalog rows and the
    merging run on the event loop's thread while the pack appends and hashing wait,
    and the other way round. Two at a time, one batch's Python overlaps the other's
    threads (a 1 GiB flush after 150,000 random writes: 3.3-4.1 s -> 2.1-2.5 s here).

    Only batches inside the data already stored run beside others. One that reaches
    past a file's stored_end waits for the others and runs alone: stores raise
    stored_end to what they stored, and a later batch finishing first would let the
    row claim an earlier chunk still only in memory (zeros after a crash; see
    View.row_size). The first error is raised as itself once the batches under way
    have ended; no batch starts after it.
    """
    if len(batches) <= 1 or width <= 1:
        for items in batches:
            await store_buffers(chunks, items, sync)
        return
    errors: list[BaseException] = []
    slots = trio.Semaphore(width)

    async def store(items: list[tuple[View, Inode, int]], held: int) -> None:
        try:
            await store_buffers(chunks, items, sync)
        except BaseException as e:  # noqa: BLE001 - raised below, after the others end
            errors.append(e)
        finally:
            for _ in range(held):
                slots.release()

    async with trio.open_nursery() as nursery:
        for items in batches:
            await slots.acquire()
            held = 1
            if not _inside_stored(items):
                while held < width:
                    await slots.acquire()
                    held += 1
            if errors:
                for _ in range(held):
                    slots.release()
                break
            nursery.start_soon(store, items, held)
    if errors:
        raise errors[0]


def _inside_stored(items: list[tuple[View, Inode, int]]) -> bool:
    """Whether every chunk of a batch ends within its file's stored data (stored_end):
    storing it cannot move stored_end."""
    return all(min((idx + 1) * view.chunk_size, node.size) <= node.stored_end
               for view, node, idx in items)


async def store_buffers(chunks, items: list[tuple[View, Inode, int]],
                        sync: bool = False) -> None:
    """Store a batch of dirty buffers, of any inodes and views, with one put_many
    (sync: and make the records durable, see ChunkManager.put_many).

    Small files are stored many to a batch: one thread hop for hashing and one for the
    pack write serve them all. A buffer written again while it was being stored stays
    dirty; one truncated away or deleted meanwhile is dropped.
    """
    # The payloads are views of the buffers themselves, not copies: each buffer is
    # frozen while the store reads it, and a write into a frozen buffer thaws it first
    # (View._thaw), so what is hashed is exactly what is appended.
    sparse = [buf for _, node, idx in items
              if (buf := node.buffers.get(idx)) is not None and buf.data is None]
    error = await materialize(items[0][0].fs, sparse) if sparse else None
    work = []
    seen: set[int] = set()  # buffers already in the batch (an item may come twice)
    for view, node, idx in items:
        buf = node.buffers.get(idx)
        if buf is None or buf.data is None or id(buf) in seen:
            continue
        seen.add(id(buf))
        cs = view.chunk_size
        valid = min(cs, max(0, node.size - idx * cs))
        n = payload_len(buf.data, min(valid, buf.length))
        buf.frozen += 1
        payload = memoryview(buf.data)[:n] if n else None
        work.append((view, node, idx, buf, buf.gen, payload, buf.data,
                     idx * cs + min(valid, buf.length), idx * cs + n, buf.log_seq))
    stored = [w[5] for w in work if w[5] is not None]
    ids: list[int] = []
    try:
        ids = await chunks.put_many(stored, sync=sync) if stored else []
    finally:
        for w in work:
            if w[5] is not None:
                w[5].release()
            if w[3].data is w[6]:  # not thawed meanwhile
                w[3].frozen -= 1
    try:
        it = iter(ids)
        for view, node, idx, buf, gen, payload, _data, end, reach, logged in work:
            chunk = next(it) if payload is not None else 0
            if node.buffers.get(idx) is not buf or view.dropped:
                continue
            if node.deleted:  # made dirty by a request that raced with the deletion
                view.fs.pool.give(node.buffers.pop(idx))
                continue
            if reach > node.size:  # truncated meanwhile: old bytes past the end, never
                continue  # in a row (the buffer, cut, stays dirty)
            view.set_block(node, idx, chunk)
            buf.stored_log = max(buf.stored_log, logged)  # what the log held is stored
            if end > node.stored_end:
                node.stored_end = min(end, node.size)
            if node.row_short:  # its row may say more now (View.row_size)
                view._mark_dirty(node)
            if buf.gen == gen:
                view.fs.pool.give(node.buffers.pop(idx))
                if not chunk:  # all zeros, stored as a hole: the block is no longer counted
                    node.allocated = None
    finally:
        chunks.unpin(ids)
    if error is not None:  # a damaged base: its chunk stays dirty, the caller hears of it
        raise error


class PinnedView(View):
    """A read-only view of exactly one vertex, whatever its kind (fsck, diff, export).

    chain: the vertex's ancestry when the graph does not know it yet (a snapshot being
    imported, whose rows are in the catalog before its vertex is added: exchange)."""

    def __init__(self, fs: Filesystem, vid: int, chain: dict[int, int] | None = None) -> None:
        super().__init__(fs, "pinned", vid)
        self._chain = chain

    @property
    def vertex_id(self) -> int:
        return self.key

    def chain(self) -> dict[int, int]:
        return self.graph.chain(self.key) if self._chain is None else self._chain

    def draft_id(self) -> int:
        raise FsError(errno.EROFS)
