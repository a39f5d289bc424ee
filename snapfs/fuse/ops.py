"""The pyfuse3 adapter: maps kernel inodes to (view, inode) and requests to vfs calls.

No storage logic lives here. The mounted tree (SPEC section 3)::

    /                 volumes (each a View of the volume's draft), .snapshots, .snapfs
    /.snapshots/      one directory per committed snapshot (a View of it)
    /.snapfs/stats    virtual JSON, generated on open, served with direct_io

Kernel inode numbers are (view slot, inode) pairs, so the same file seen in two
snapshots is two different files to the kernel, hard links inside one view share a
number, and a number never changes while the mount lives. Only FUSEError leaves a
handler: vfs errors carry their errno, damaged data is EIO with a log line, anything
else is logged as a bug and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from typing import Any

import pyfuse3
import trio

from snapfs.errors import FsError, IntegrityError, SnapfsError, is_disk_full
from snapfs.ratelimit import Every
from snapfs.types import ROOT_INO
from snapfs.vfs import acl
from snapfs.vfs.fs import Filesystem
from snapfs.vfs.view import Inode, View

log = logging.getLogger(__name__)

MNT_ROOT = pyfuse3.ROOT_INODE  # 1
SNAPSHOTS_INO = 2
SNAPFS_INO = 3
STATS_INO = 4
FIRST_DYNAMIC = 16
SLOT_SHIFT = 40  # kernel inode = (view slot << 40) | repository inode number
INO_MASK = (1 << SLOT_SHIFT) - 1
SNAPSHOTS = b".snapshots"
SNAPFS = b".snapfs"
STATS = b"stats"
VIRTUAL_TIMEOUT = 1.0
# Inodes the kernel forgot (FORGET after memory pressure or drop_caches) stay in the daemon
# this long, in LRU order: looking them up again (git status after a cold start, find) is
# then a dictionary hit instead of catalog queries. Only clean inodes are ever dropped.
RETAIN_FORGOTTEN = 65536
TIMEOUT = 300.0


_REPORTED: set[str] = set()


def _report_damage(op: str, e: IntegrityError) -> None:
    """One ERROR line per damaged object, however often the kernel retries the read."""
    text = str(e)
    if text not in _REPORTED:
        if len(_REPORTED) < 10000:
            _REPORTED.add(text)
        log.error("%s failed: damaged data: %s", op, text)


def fuse_error(op: str, e: BaseException) -> pyfuse3.FUSEError:
    """The FUSEError to answer with for an exception that a handler let out (logging the
    bugs and the damage): only FUSEError may leave a pyfuse3 handler."""
    if isinstance(e, pyfuse3.FUSEError):
        return e
    if isinstance(e, FsError):
        return pyfuse3.FUSEError(e.errno)
    if isinstance(e, IntegrityError):
        _report_damage(op, e)
        return pyfuse3.FUSEError(errno.EIO)
    if isinstance(e, SnapfsError):
        log.info("%s refused: %s", op, e)
        return pyfuse3.FUSEError(e.errno)
    if is_disk_full(e):
        _warn_disk_full(op, e)
        return pyfuse3.FUSEError(errno.ENOSPC)
    if isinstance(e, OSError):
        log.error("%s failed", op, exc_info=e)
    else:
        log.error("bug in %s", op, exc_info=e)
    return pyfuse3.FUSEError(errno.EIO)


# an application retrying in a loop would otherwise fill the log, on that same disk
_disk_full_log = Every(10.0)


def _warn_disk_full(op: str, e: BaseException) -> None:
    if _disk_full_log():
        log.warning("%s: disk full: %s", op, e)


def handler(fn):
    """Turn every exception into a FUSEError with the right errno (and log the bugs)."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args):
        self.requests += 1
        try:
            return await fn(self, *args)
        except Exception as e:
            raise fuse_error(name, e) from None

    return wrapper


class Handle:
    __slots__ = ("view", "node", "data", "listing", "vdir")

    def __init__(self, view: View | None, node: Inode | None, data: bytes | None = None,
                 listing: list | None = None, vdir: int = 0) -> None:
        self.view = view
        self.node = node
        self.data = data  # the generated content of a virtual file
        self.listing = listing  # a directory listing taken at opendir
        self.vdir = vdir  # the virtual directory listed, if not a view's


class SnapfsOperations(pyfuse3.Operations):
    enable_writeback_cache = True
    enable_acl = True  # the kernel enforces POSIX ACLs; vfs/acl.py keeps modes in step

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started = time.time_ns()
        self.requests = 0  # handled so far: tells the loop watch that someone is waiting
        # WRITE and SETATTR requests being handled: the kernel's written pages are all
        # here once none is and it has no request queued (daemon.pull_kernel_pages)
        self.writes_active = 0
        self.writes_seen = 0
        self._views: dict[int, View] = {}  # slot -> view (kept for the whole mount)
        self._slot_of: dict[View, int] = {}
        self._lookups: dict[int, int] = {}
        self._forgotten: OrderedDict[int, None] = OrderedDict()  # kernel inodes, oldest first
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        fs.on_view_changed = self._view_changed

    # -- inode mapping -----------------------------------------------------------------------
    def _fino(self, view: View, ino: int) -> int:
        """(view slot << 40) | repository inode: stable for the whole mount, so st_ino
        never changes when the kernel forgets and looks a file up again (git relies on it)."""
        slot = self._slot_of.get(view)
        if slot is None:
            slot = self._slot_of[view] = len(self._views) + 1
            self._views[slot] = view
        return (slot << SLOT_SHIFT) | ino

    def _entry(self, fino: int) -> tuple[View, int]:
        view = self._views.get(fino >> SLOT_SHIFT)
        if view is None:
            raise FsError(errno.ENOENT)
        return view, fino & INO_MASK

    def _resolve(self, fino: int) -> tuple[View, Inode]:
        view, ino = self._entry(fino)
        return view, view.get(ino)

    def _resolve_dir(self, fino: int) -> tuple[View, Inode]:
        if fino < FIRST_DYNAMIC:
            raise FsError(errno.EPERM)
        return self._resolve(fino)

    def _view_changed(self, view: View) -> None:
        """A snapshot directory shows other content now: drop the kernel's caches of it."""
        name = view.name().encode()
        parent = MNT_ROOT if view.kind == "volume" else SNAPSHOTS_INO
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        slot = self._slot_of.get(view)
        finos = [fino for fino in self._lookups if fino >> SLOT_SHIFT == slot]
        # invalidate_inode blocks in the kernel: never call it from a handler's thread.
        threading.Thread(target=_invalidate_inodes, args=(finos,), daemon=True).start()

    def _counted(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        fino = attrs.st_ino
        self._lookups[fino] = self._lookups.get(fino, 0) + 1
        return attrs

    # -- attributes -----------------------------------------------------------------------------
    def _attrs(self, view: View, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._fino(view, node.ino)
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = min(view.chunk_size, 1 << 20)
        a.st_blocks = self._blocks(view, node)
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _blocks(self, view: View, node: Inode) -> int:
        if not stat.S_ISREG(node.mode):
            return (node.size + 511) // 512
        used = view.allocated_blocks(node) * view.chunk_size
        return min(used, (node.size + 4095) // 4096 * 4096) // 512

    def _virtual_attrs(self, fino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = fino
        a.entry_timeout = VIRTUAL_TIMEOUT
        a.attr_timeout = VIRTUAL_TIMEOUT
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        a.st_blksize = 4096
        if fino == STATS_INO:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = 0
        else:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        return a

    # -- lookup and friends --------------------------------------------------------------------
    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self._counted(await self._lookup(parent_inode, name))
        except FsError as e:
            if e.errno != errno.ENOENT or parent_inode < FIRST_DYNAMIC:
                raise
        return _negative_entry()

    async def _lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if len(name) > 255:
            raise FsError(errno.ENAMETOOLONG)
        if parent == MNT_ROOT:
            if name == SNAPSHOTS:
                return self._virtual_attrs(SNAPSHOTS_INO)
            if name == SNAPFS:
                return self._virtual_attrs(SNAPFS_INO)
            view = self._volume_view(name)
            return self._attrs(view, view.get(ROOT_INO))
        if parent == SNAPSHOTS_INO:
            try:
                view = self.fs.snapshot_view(name.decode())
            except (SnapfsError, UnicodeDecodeError):
                raise FsError(errno.ENOENT)
            return self._attrs(view, view.get(ROOT_INO))
        if parent == SNAPFS_INO:
            if name == STATS:
                return self._virtual_attrs(STATS_INO)
            raise FsError(errno.ENOENT)
        view, _ = self._resolve_dir(parent)
        return self._attrs(view, view.lookup(parent & INO_MASK, name))

    def _volume_view(self, name: bytes) -> View:
        try:
            return self.fs.volume_view(name.decode())
        except (SnapfsError, UnicodeDecodeError):
            raise FsError(errno.ENOENT)

    async def forget(self, inode_list):
        for fino, nlookup in inode_list:
            left = self._lookups.get(fino, 0) - nlookup
            if left > 0:
                self._lookups[fino] = left
                continue
            self._lookups.pop(fino, None)
            view = self._views.get(fino >> SLOT_SHIFT)
            node = view.inodes.get(fino & INO_MASK) if view is not None else None
            if node is not None and node.deleted:
                self._drop(fino)  # nothing to look up again
            else:
                self._forgotten[fino] = None
                self._forgotten.move_to_end(fino)
        while len(self._forgotten) > RETAIN_FORGOTTEN:
            fino, _ = self._forgotten.popitem(last=False)
            if fino not in self._lookups:  # not looked up again meanwhile
                self._drop(fino)

    def _drop(self, fino: int) -> None:
        """Let the view free an inode the kernel no longer knows (if it is clean)."""
        view = self._views.get(fino >> SLOT_SHIFT)
        if view is None:
            return
        node = view.inodes.get(fino & INO_MASK)
        if node is not None and node.opens > 0:
            return
        try:
            view.forget(fino & INO_MASK)
        except Exception:
            log.exception("forget failed")

    @handler
    async def getattr(self, inode, ctx=None):
        if inode < FIRST_DYNAMIC:
            return self._virtual_attrs(inode)
        view, node = self._resolve(inode)
        return self._attrs(view, node)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode < FIRST_DYNAMIC:
            raise FsError(errno.EPERM)
        view, node = self._resolve(inode)
        kw: dict[str, Any] = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if getattr(fields, "update_ctime", False):
            kw["ctime_ns"] = attr.st_ctime_ns
        self.writes_active += 1
        self.writes_seen += 1
        try:
            node = await view.setattr(node.ino, **kw)
        finally:
            self.writes_active -= 1
        return self._attrs(view, node)

    @handler
    async def readlink(self, inode, ctx):
        view, node = self._resolve(inode)
        return view.readlink(node.ino)

    # -- namespace changes ------------------------------------------------------------------------
    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        if parent_inode == MNT_ROOT:
            return self._counted(self._mkdir_volume(name))
        if parent_inode == SNAPSHOTS_INO:
            return self._counted(await self._mkdir_snapshot(name))
        view, pnode = self._resolve_dir(parent_inode)
        node = view.mkdir(pnode.ino, name, mode, ctx.uid, ctx.gid, ctx.umask)
        return self._counted(self._attrs(view, node))

    def _mkdir_volume(self, name: bytes) -> pyfuse3.EntryAttributes:
        try:
            self.fs.graph.create_volume(name.decode())
        except UnicodeDecodeError:
            raise FsError(errno.EINVAL)
        view = self._volume_view(name)
        return self._attrs(view, view.get(ROOT_INO))

    async def _mkdir_snapshot(self, name: bytes) -> pyfuse3.EntryAttributes:
        """mkdir .snapshots/VOLUME@LABEL commits VOLUME (like mkdir .zfs/snapshot/NAME)."""
        text = name.decode(errors="replace")
        volume, sep, label = text.partition("@")
        if not sep or volume not in self.fs.graph.volumes:
            raise FsError(errno.EINVAL, f"{text}: use mkdir .snapshots/VOLUME@LABEL")
        if text in self.fs.graph.by_name:
            raise FsError(errno.EEXIST)
        await self.fs.commit(self.fs.volume_view(volume), label)
        view = self.fs.snapshot_view(text)
        return self._attrs(view, view.get(ROOT_INO))

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        view, pnode = self._resolve_dir(parent_inode)
        node = view.mknod(pnode.ino, name, mode, rdev, ctx.uid, ctx.gid, ctx.umask)
        return self._counted(self._attrs(view, node))

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        view, pnode = self._resolve_dir(parent_inode)
        node = view.symlink(pnode.ino, name, target, ctx.uid, ctx.gid)
        return self._counted(self._attrs(view, node))

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        if new_parent_inode < FIRST_DYNAMIC:
            raise FsError(errno.EPERM)
        view, node = self._resolve(inode)
        dview, dnode = self._resolve_dir(new_parent_inode)
        if dview is not view:
            raise FsError(errno.EXDEV)
        node = view.link(node.ino, dnode.ino, new_name)
        return self._counted(self._attrs(view, node))

    @handler
    async def unlink(self, parent_inode, name, ctx):
        if parent_inode == SNAPFS_INO:
            raise FsError(errno.EPERM)
        view, pnode = self._resolve_dir(parent_inode)
        view.unlink(pnode.ino, name)

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        if parent_inode == SNAPSHOTS_INO:
            # like rmdir .zfs/snapshot/NAME: deletes the snapshot
            try:
                text = name.decode()
                self.fs.graph.snapshot(text)
            except (UnicodeDecodeError, SnapfsError):
                raise FsError(errno.ENOENT)
            await self.fs.delete_snapshot(text)
            return
        if parent_inode in (MNT_ROOT, SNAPFS_INO):
            raise FsError(errno.EPERM)
        view, pnode = self._resolve_dir(parent_inode)
        view.rmdir(pnode.ino, name)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if parent_inode_old < FIRST_DYNAMIC or parent_inode_new < FIRST_DYNAMIC:
            raise FsError(errno.EXDEV if parent_inode_old != parent_inode_new else errno.EPERM)
        sview, snode = self._resolve_dir(parent_inode_old)
        dview, dnode = self._resolve_dir(parent_inode_new)
        if sview is not dview:
            raise FsError(errno.EXDEV)
        await sview.store_before_replace(snode.ino, name_old, dnode.ino, name_new)
        sview.rename(snode.ino, name_old, dnode.ino, name_new, flags)

    # -- files ------------------------------------------------------------------------------
    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    @handler
    async def open(self, inode, flags, ctx):
        if inode == STATS_INO:
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise FsError(errno.EROFS)
            await self.fs.flush_for_figures()
            data = self.fs.stats_json().encode()
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(None, None, data)), direct_io=True)
        if inode < FIRST_DYNAMIC:
            raise FsError(errno.EISDIR)
        view, node = self._resolve(inode)
        node = await view.open_file(node.ino, truncate=bool(
            flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR)))
        return pyfuse3.FileInfo(fh=self._new_fh(Handle(view, node)), keep_cache=True)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        view, pnode = self._resolve_dir(parent_inode)
        node = view.mknod(pnode.ino, name, stat.S_IFREG | (mode & 0o7777), 0,
                          ctx.uid, ctx.gid, ctx.umask)
        node.opens += 1
        fh = self._new_fh(Handle(view, node))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._counted(self._attrs(view, node))

    async def read(self, fh, off, size):
        # not wrapped in @handler: one coroutine less on the hottest request (a 4 KiB read
        # served from the chunk cache runs no coroutine of snapfs at all)
        self.requests += 1
        try:
            h = self._handles[fh]
            if h.data is not None:
                return h.data[off:off + size]
            got = h.view.read_now(h.node, off, size)
            if got is None:
                got = await h.view.read_rest(h.node, off, size)
            return got
        except Exception as e:
            raise fuse_error("read", e) from None

    async def write(self, fh, off, buf):
        # not wrapped in @handler, like read: a write into a dirty chunk awaits nothing
        self.requests += 1
        self.writes_active += 1
        self.writes_seen += 1
        try:
            h = self._handles[fh]
            if h.view is None:
                raise FsError(errno.EBADF)
            n = h.view.write_now(h.node, off, buf)
            if n is None:
                n = await h.view.write_rest(h.node, off, buf)
            fs = self.fs
            if fs.over_limit():
                await fs.throttle()
            return n
        except Exception as e:
            raise fuse_error("write", e) from None
        finally:
            self.writes_active -= 1

    @handler
    async def flush(self, fh):
        return None

    @handler
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is None or h.view is None:
            return
        h.node.opens -= 1
        if h.node.nlink == 0 and h.node.opens == 0 and not h.node.deleted:
            h.view.drop_buffers(h.node)  # nobody can read it again: nothing to store
            h.view._maybe_delete(h.node)

    @handler
    async def fsync(self, fh, datasync):
        h = self._handles[fh]
        if h.view is not None:
            await self.fs.sync(h.view, h.node)

    # -- directories -----------------------------------------------------------------------------
    @handler
    async def opendir(self, inode, ctx):
        if inode == MNT_ROOT:
            names = [SNAPSHOTS, SNAPFS, *sorted(n.encode() for n in self.fs.graph.volumes)]
            listing = [(n, None) for n in names]
            return self._new_fh(Handle(None, None, listing=listing, vdir=MNT_ROOT))
        if inode == SNAPSHOTS_INO:
            listing = [(v.name.encode(), None) for v in
                       sorted(self.fs.graph.snapshots(), key=lambda v: v.id)]
            return self._new_fh(Handle(None, None, listing=listing, vdir=SNAPSHOTS_INO))
        if inode == SNAPFS_INO:
            return self._new_fh(Handle(None, None, listing=[(STATS, None)], vdir=SNAPFS_INO))
        view, node = self._resolve_dir(inode)
        listing = view.listdir(node.ino)
        return self._new_fh(Handle(view, node, listing=listing))

    @handler
    async def readdir(self, fh, start_id, token):
        h = self._handles[fh]
        listing = h.listing
        parent = h.node
        for i in range(start_id, len(listing) + 2):
            if i == 0:
                name = b"."
                attrs = (self._attrs(h.view, parent) if h.view else self._virtual_attrs(MNT_ROOT))
            elif i == 1:
                name = b".."
                attrs = self._virtual_attrs(MNT_ROOT)
            else:
                name, ino = listing[i - 2]
                try:
                    attrs = await self._entry_attrs(h, name, ino)
                except FsError:
                    continue
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return
            if i >= 2:
                self._counted(attrs)

    async def _entry_attrs(self, h: Handle, name: bytes, ino: int | None):
        if h.view is not None:
            return self._attrs(h.view, h.view.get(ino))
        return await self._lookup(h.vdir, name)

    @handler
    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    @handler
    async def fsyncdir(self, fh, datasync):
        await self.fs.sync_metadata()

    # -- xattrs --------------------------------------------------------------------------------
    @handler
    async def setxattr(self, inode, name, value, ctx):
        view, node = self._resolve_dir(inode)
        view.setxattr(node.ino, name, value,
                      keep_sgid=name != acl.ACCESS or _in_group_or_capable(ctx, node.gid))

    async def getxattr(self, inode, name, ctx):
        # not wrapped in @handler: the kernel asks for security.capability before every
        # write, and the answer, "none", is one exception raised straight to pyfuse3
        self.requests += 1
        try:
            value = None
            if inode >= FIRST_DYNAMIC:
                view, node = self._resolve(inode)
                value = view.find_xattr(node.ino, name)
        except Exception as e:
            raise fuse_error("getxattr", e) from None
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, inode, ctx):
        if inode < FIRST_DYNAMIC:
            return []
        view, node = self._resolve(inode)
        names = view.listxattr(node.ino)
        if ctx.uid != 0:  # like ext4: trusted.* is listed only to CAP_SYS_ADMIN
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @handler
    async def removexattr(self, inode, name, ctx):
        view, node = self._resolve_dir(inode)
        view.removexattr(node.ino, name)

    @handler
    async def statfs(self, ctx):
        st = os.statvfs(self.fs.repo.paths.root)
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = st.f_blocks, st.f_bfree, st.f_bavail
        # inode numbers are never reused: "used" is how many were handed out (df -i
        # showed 50 % used on an empty volume when free was simply half the total)
        used = self.fs.graph.inos_used()
        s.f_files = max(st.f_files, 1 << 32, 2 * used)
        s.f_ffree = s.f_favail = s.f_files - used
        s.f_namemax = 255
        return s


def _in_group_or_capable(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    """Whether the caller may keep a file's set-group-id bit (the kernel's
    in_group_or_capable): root, or gid is its file system gid or a supplementary group.
    pyfuse3 passes no supplementary groups, so they are read from /proc."""
    if ctx.uid == 0 or ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return gid in {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return False


def _negative_entry() -> pyfuse3.EntryAttributes:
    """The answer to a lookup of a missing name in a view's directory: inode 0 with a
    timeout, which the kernel keeps as a negative dentry, so the next lookup of that name
    (a build probing include paths, Python's imports, git, a shell's PATH, unlink or stat
    of a name that is not there) is answered without a request: a repeated stat of a
    missing name took 54-57 us, now 2-3 us. Every change of a name in a view comes
    through the kernel, which turns the negative dentry positive itself, except those of
    _view_changed (a snapshot directory reset by a commit, a deleted view), which drops
    the view's whole subtree of dentries, negative ones included. Names at the top, under
    .snapshots and .snapfs appear from the daemon's side (volume create, commit,
    import): their misses are never cached."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = TIMEOUT
    return a


def _invalidate_inodes(finos: list[int]) -> None:
    for fino in finos:
        try:
            pyfuse3.invalidate_inode(fino)
        except OSError:
            pass  # the kernel no longer knows it: nothing to invalidate


async def run_filesystem(fs: Filesystem, ops: SnapfsOperations,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.background)
        task_status.started()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
