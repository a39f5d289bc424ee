#!/usr/bin/env python3
"""A minimal, tuned pyfuse3 passthrough filesystem: the yardstick for snapfs (issue 5).

Usage::

    python tools/passthrough.py SOURCE MOUNTPOINT [--foreground] [--allow-other]
                                [--pidfile FILE] [--log FILE]

It mirrors the directory SOURCE at MOUNTPOINT. Without ``--foreground`` it forks before trio
starts and the parent returns only once the mount is in place (pipe handshake); the daemon
unmounts on SIGTERM, SIGINT or SIGHUP, and ``fusermount3 -u MOUNTPOINT`` stops it too.

What makes it "tuned" (see issue 5 and docs in /work/shared/pyfuse3-notes.md):

- ``enable_writeback_cache``: the kernel merges small writes and owns size and mtime (it
  sends them through ``setattr``). Handles opened write-only are therefore opened
  read-write on the backing file (the kernel may read through them), without O_APPEND.
- Entry and attribute timeouts of 300 s, negative lookups cached, ``keep_cache`` on open:
  the kernel answers stat and cached reads without calling Python.
- ``os.pread``/``os.pwrite`` on one backing descriptor per open handle, a real ``fsync``,
  a no-op ``flush`` (durability belongs to fsync).
- ``readdir`` reads the directory once per listing (at offset 0) and serves later
  batches from that snapshot, with the entry index as a stable cursor.
- Lookup counting: every lookup, create, mknod, mkdir, symlink, link and every entry
  accepted by ``readdir_reply`` counts one; ``forget`` drops the count and the inode.

Inodes: the FUSE inode number is the backing file's ``st_ino`` (stable across forgets, so
tools such as git see stable inode numbers), with the root directory swapped with inode 1.
Files on other devices below SOURCE (nested mounts) get synthetic numbers. Each known
inode remembers the (parent inode, name) pairs it was seen under, so a path is rebuilt by
walking up parents; renaming a directory therefore needs no update of its descendants.

Limitations (it is a yardstick, not a product): SOURCE must not be modified behind the
mount's back while it is mounted (the kernel caches for 300 s); O_DIRECT is not passed to
the backing file (Python buffers are not aligned); no file locks, fallocate or ioctl
(pyfuse3 has no handlers for them); the generation number is always 0.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

log = logging.getLogger("passthrough")

TIMEOUT = 300.0  # seconds: entry and attribute cache timeouts given to the kernel
ROOT = pyfuse3.ROOT_INODE
SYNTHETIC_BASE = 1 << 62  # inode numbers for files on other devices than SOURCE
CAPS = b"security.capability"

P = ParamSpec("P")
R = TypeVar("R")
Self = TypeVar("Self", bound="Passthrough")


def _errno(
    fn: Callable[Concatenate[Self, P], Awaitable[R]],
) -> Callable[Concatenate[Self, P], Awaitable[R]]:
    """Let only FUSEError (the one exception pyfuse3 accepts) escape a handler: OSError
    becomes its errno, anything else (a bug) is logged and becomes EIO."""

    @functools.wraps(fn)
    async def wrapper(self: Self, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE flags (os.rename has none)."""
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class DirHandle:
    """An open directory: the names read at offset 0, served to later readdir calls."""

    __slots__ = ("inode", "names")

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self.names: list[bytes] = []


class Passthrough(pyfuse3.Operations):
    """Mirror of the directory ``source``; see the module docstring."""

    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.root = os.fsencode(os.path.realpath(source)).rstrip(b"/") or b"/"
        st = os.lstat(self.root)
        self.dev = st.st_dev
        self.root_ino = st.st_ino
        self.lookups: dict[int, int] = {ROOT: 1}  # inode -> kernel lookup count
        self.names: dict[int, set[tuple[int, bytes]]] = {}  # inode -> {(parent, name)}
        self.synthetic: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> inode
        self.fds: dict[int, int] = {}  # open file handle (backing fd) -> inode
        self.dirs: dict[int, DirHandle] = {}
        self.next_dir_fh = 1
        self.no_caps: set[int] = set()  # inodes known to have no security.capability
        self.chown_needed = os.geteuid() == 0

    # -- inode bookkeeping --------------------------------------------------------------

    def _inode(self, st: os.stat_result) -> int:
        """The FUSE inode number of a backing file."""
        if st.st_dev != self.dev:
            key = (st.st_dev, st.st_ino)
            ino = self.synthetic.get(key)
            if ino is None:
                ino = self.synthetic[key] = SYNTHETIC_BASE + len(self.synthetic)
            return ino
        if st.st_ino == self.root_ino:
            return ROOT
        if st.st_ino == ROOT:
            return self.root_ino
        return st.st_ino

    def _remember(self, st: os.stat_result, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """Count one kernel lookup of (parent, name) and return its attributes."""
        ino = self._inode(st)
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        if ino != ROOT:
            self.names.setdefault(ino, set()).add((parent, name))
        return self._attr(st, ino)

    def _drop_name(self, parent: int, name: bytes, st: os.stat_result) -> None:
        names = self.names.get(self._inode(st))
        if names is not None:
            names.discard((parent, name))

    def _path(self, ino: int) -> bytes:
        """A backing path of a known inode (any of its names whose parent is known)."""
        if ino == ROOT:
            return self.root
        for parent, name in self.names.get(ino, ()):
            if parent == ROOT or parent in self.lookups:
                return self._path(parent) + b"/" + name
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _child(self, parent: int, name: bytes) -> bytes:
        return self._path(parent) + b"/" + name

    def _stat(self, ino: int) -> os.stat_result:
        """lstat of a known inode; falls back to an open handle for unlinked files."""
        try:
            return os.lstat(self._path(ino))
        except (pyfuse3.FUSEError, FileNotFoundError):
            for fd, fd_ino in self.fds.items():
                if fd_ino == ino:
                    return os.fstat(fd)
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    @staticmethod
    def _attr(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.generation = 0
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.st_mode = st.st_mode
        attr.st_nlink = st.st_nlink
        attr.st_uid = st.st_uid
        attr.st_gid = st.st_gid
        attr.st_rdev = st.st_rdev
        attr.st_size = st.st_size
        attr.st_blksize = st.st_blksize
        attr.st_blocks = st.st_blocks
        attr.st_atime_ns = st.st_atime_ns
        attr.st_mtime_ns = st.st_mtime_ns
        attr.st_ctime_ns = st.st_ctime_ns
        return attr

    def _own(self, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        """Give a new file to the calling user (the daemon usually runs as root)."""
        if self.chown_needed and (ctx.uid or ctx.gid):
            os.chown(path, ctx.uid, self._new_gid(path, ctx), follow_symlinks=False)

    @staticmethod
    def _new_gid(path: bytes, ctx: pyfuse3.RequestContext) -> int:
        """The caller's group, unless the parent directory is set-group-ID: then the
        backing filesystem already gave the new file the directory's group (-1 keeps it)."""
        parent = os.path.dirname(path) or b"."
        return -1 if os.stat(parent).st_mode & stat.S_ISGID else ctx.gid

    def _new_entry(
        self, parent: int, name: bytes, path: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._own(path, ctx)
        return self._remember(os.lstat(path), parent, name)

    # -- lookups and attributes ---------------------------------------------------------

    @_errno
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._child(parent_inode, name))
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the miss
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._remember(st, parent_inode, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            if ino == ROOT:
                continue  # the root is never forgotten while mounted
            count = self.lookups.get(ino, 0) - nlookup
            if count > 0:
                self.lookups[ino] = count
            else:
                self.lookups.pop(ino, None)
                self.names.pop(ino, None)
                self.no_caps.discard(ino)

    @_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._stat(inode), inode)

    @_errno
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # A handle, when given, also works for files that are already unlinked.
        target: int | bytes = fh if fh is not None else self._path(inode)
        nofollow = fh is None
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if nofollow:
                os.chown(target, uid, gid, follow_symlinks=False)
            else:
                os.chown(target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(target, follow_symlinks=not nofollow)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            if nofollow:
                os.utime(target, ns=(atime, mtime), follow_symlinks=False)
            else:
                os.utime(target, ns=(atime, mtime))
        st = os.fstat(fh) if fh is not None else os.lstat(target)
        return self._attr(st, inode)

    @_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(self._path(inode))

    @_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.root)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                      "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    # -- namespace ----------------------------------------------------------------------

    @_errno
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mknod(path, mode, rdev)
        return self._new_entry(parent_inode, name, path, ctx)

    @_errno
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        return self._new_entry(parent_inode, name, path, ctx)

    @_errno
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(target, path)
        return self._new_entry(parent_inode, name, path, ctx)

    @_errno
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self._path(inode), path, follow_symlinks=False)
        return self._remember(os.lstat(path), new_parent_inode, new_name)

    @_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.unlink(path)
        self._drop_name(parent_inode, name, st)

    @_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        st = os.lstat(path)
        os.rmdir(path)
        self._drop_name(parent_inode, name, st)

    @_errno
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        st_old = os.lstat(old)
        try:
            st_new: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            st_new = None
        if flags:
            _renameat2(old, new, flags)
        else:
            os.rename(old, new)
        self._drop_name(parent_inode_old, name_old, st_old)
        if st_new is not None:
            self._drop_name(parent_inode_new, name_new, st_new)
        if self._inode(st_old) in self.lookups:
            self.names.setdefault(self._inode(st_old), set()).add((parent_inode_new, name_new))
        if st_new is not None and flags & pyfuse3.RENAME_EXCHANGE:
            ino_new = self._inode(st_new)
            if ino_new in self.lookups:
                self.names.setdefault(ino_new, set()).add((parent_inode_old, name_old))

    # -- files --------------------------------------------------------------------------

    @staticmethod
    def _open_flags(flags: int) -> int:
        # With the writeback cache the kernel may read through write-only handles and
        # handles O_APPEND itself; Python buffers cannot satisfy O_DIRECT alignment.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~(os.O_APPEND | os.O_DIRECT)

    def _open_backing(self, path: bytes, flags: int, mode: int = 0o600) -> int:
        try:
            return os.open(path, self._open_flags(flags), mode)
        except PermissionError:  # write-only file (mode -w-) and not root: no upgrade
            return os.open(path, flags & ~(os.O_APPEND | os.O_DIRECT), mode)

    @_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = self._open_backing(self._path(inode), flags)
        self.fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_errno
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd = self._open_backing(path, flags | os.O_CREAT, mode)
        try:
            if self.chown_needed and (ctx.uid or ctx.gid):
                os.fchown(fd, ctx.uid, self._new_gid(path, ctx))
            attr = self._remember(os.fstat(fd), parent_inode, name)
        except OSError:
            os.close(fd)
            raise
        self.fds[fd] = attr.st_ino
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), attr

    @_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass  # runs on every close() of every duplicate: durability belongs to fsync

    @_errno
    async def release(self, fh: int) -> None:
        self.fds.pop(fh, None)
        os.close(fh)

    @_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    # -- directories --------------------------------------------------------------------

    @_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._stat(inode).st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self.next_dir_fh
        self.next_dir_fh += 1
        self.dirs[fh] = DirHandle(inode)
        return fh

    @_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        path = self._path(handle.inode)
        if start_id == 0:  # a new listing (or rewinddir): read the directory once
            handle.names = [b".", b"..", *os.listdir(path)]
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            dots = index < 2  # the kernel takes no lookup reference on . and ..
            if dots and (name == b"." or handle.inode == ROOT):
                st, ino = os.lstat(path), handle.inode
            else:
                try:
                    st = os.lstat(path + b"/" + name)
                except FileNotFoundError:
                    continue  # removed since the listing was read
                ino = self._inode(st)
            if not pyfuse3.readdir_reply(token, name, self._attr(st, ino), index + 1):
                break
            if not dots:
                self._remember(st, handle.inode, name)  # counted only once accepted

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(self.dirs[fh].inode), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- extended attributes ------------------------------------------------------------

    # The kernel asks for security.capability before every write(2) (pyfuse3 cannot
    # negotiate FUSE_HANDLE_KILLPRIV_V2, which would let it skip that), so its absence is
    # cached per inode; only changes made through this mount are seen.

    @_errno
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if name == CAPS:
            self.no_caps.discard(inode)
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_errno
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == CAPS:
            if inode in self.no_caps:
                raise pyfuse3.FUSEError(errno.ENODATA)
            try:
                return os.getxattr(self._path(inode), name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                    self.no_caps.add(inode)
                raise
        return os.getxattr(self._path(inode), name, follow_symlinks=False)

    @_errno
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]
        if ctx.uid != 0:  # the daemon is root; ext4 lists trusted.* only to CAP_SYS_ADMIN
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @_errno
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name == CAPS:
            self.no_caps.discard(inode)
        os.removexattr(self._path(inode), name, follow_symlinks=False)


# -- mounting ---------------------------------------------------------------------------


async def _serve() -> None:
    """Run pyfuse3's main loop; a termination signal unmounts cleanly."""

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for _ in sigs:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _daemonize() -> int:
    """Fork; the parent waits for the child's readiness message and exits with its status.

    Returns the write end of the handshake pipe (in the child only).
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read()
        if message == b"ok":
            os._exit(0)
        sys.stderr.write(message.decode(errors="replace") or "passthrough: daemon died\n")
        os._exit(1)
    os.close(read_end)
    os.setsid()
    return write_end


def main(argv: list[str] | None = None, ops_class: type[Passthrough] = Passthrough,
         name: str = "passthrough", description: str | None = None) -> int:
    """Mount ops_class(SOURCE) at MOUNTPOINT (tools/lazyfs.py reuses this with its own)."""
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint")
    parser.add_argument("--foreground", action="store_true", help="do not daemonize")
    parser.add_argument("--allow-other", action="store_true", help="let other users in")
    parser.add_argument("--pidfile", help="write the daemon's pid here")
    parser.add_argument("--log", help="log file (default: stderr in the foreground)")
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)

    for path in (args.source, args.mountpoint):
        if not os.path.isdir(path):
            parser.error(f"not a directory: {path}")
    handshake = None if args.foreground else _daemonize()

    def fail(message: str) -> int:
        if handshake is None:
            sys.stderr.write(message)
        else:
            os.write(handshake, message.encode())
        return 1

    level = logging.DEBUG if args.debug else logging.INFO
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    if args.log:
        logging.basicConfig(filename=args.log, level=level, format=fmt)
    elif handshake is None:
        logging.basicConfig(level=level, format=fmt)
    try:
        ops = ops_class(args.source)
        options = set(pyfuse3.default_options)  # default_permissions
        options |= {f"fsname={name}", f"subtype={name}"}
        if args.allow_other:
            options.add("allow_other")
        os.umask(0)  # the kernel already applied the caller's umask to modes
        pyfuse3.init(ops, args.mountpoint, options)
    except Exception as exc:  # reported to the waiting parent
        return fail(f"{name}: cannot mount {args.mountpoint}: {exc}\n")

    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if handshake is not None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(handshake, b"ok")
        os.close(handshake)
    failed = False
    try:
        trio.run(_serve)
    except BaseException:
        failed = True
        log.exception("main loop failed")
        raise
    finally:
        # Unmount in every case: a dead mount ("Transport endpoint is not connected")
        # helps nobody.
        try:
            pyfuse3.close(unmount=True)
        except Exception:
            log.exception("close failed")
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass
        log.info("unmounted%s", " after an error" if failed else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
