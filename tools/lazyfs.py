#!/usr/bin/env python3
"""A passthrough that keeps every write in memory until it is fsynced: power loss, simulated.

Usage::

    python tools/lazyfs.py SOURCE MOUNTPOINT [--pidfile FILE] [--log FILE] [--foreground]

    kill -USR1 PID   # power cut: a random part of the unsynced pages reaches SOURCE, then exit
    kill -KILL PID   # power cut in which no unsynced page reaches SOURCE

Put a repository on the mount, run a workload, cut the power, clear the dead mount
(``fusermount3 -u -z``), mount SOURCE again and check what survived: only what was
fsynced is certain, as after a real power loss. A process kill (what tools/crashprobe does)
loses nothing the kernel had, so it cannot tell an fsync that works from one that does
nothing; this can. The idea is that of LazyFS, a FUSE layer built for the same kind of
testing; this is a small Python version on tools/passthrough.py.

The model, page by page (4 KiB):

- ``write`` and a truncate change only the file's pending state: its touched pages and its
  size. Reads and ``stat`` see the pending state, so the file behaves as usual.
- ``fsync``/``fdatasync`` writes the file's pending state to SOURCE and fsyncs it there.
- On SIGUSR1 each file's pending pages reach SOURCE as the kernel's writeback or a disk
  cache might have left them when the power went: for each file one of all, none, or each
  page with probability 1/2, in no particular order. A page past the durable end of the
  file extends it (holes read as zeros); a pending truncate happens or not. Files differ,
  so a small file written whole beside a large one written not at all is a likely
  outcome: what catches a program that does not order its syncs. SIGKILL writes none.
- Namespace changes (create, rename, unlink, mkdir, link, chmod...) and xattrs go to SOURCE
  at once: they are taken as durable immediately. So the test is of file data and sizes,
  and it is more lenient than ext4 there: a file created but never made durable in its
  directory would vanish on a real disk.

No writeback cache (every write must reach this daemon), no O_DIRECT. A test tool: it holds
every unsynced byte in memory.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from passthrough import Passthrough, _errno, main  # noqa: E402

log = logging.getLogger("lazyfs")
PAGE = 4096


class PendingFile:
    """What was written to one file since its last fsync.

    pages: page index -> the page's whole pending content. size: the file's size as
    programs see it. floor: the lowest size since the last fsync; SOURCE's bytes at or past
    it are stale (a truncate cut them) and read as zeros unless a pending page covers them.
    fd: a read-write descriptor of the backing file (also for files opened read-only, and
    after an unlink).
    """

    __slots__ = ("pages", "size", "floor", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = self.floor = os.fstat(fd).st_size
        self.pages: dict[int, bytearray] = {}

    def page(self, index: int) -> bytearray:
        """The pending page, made from SOURCE's bytes (or zeros) when first touched."""
        buf = self.pages.get(index)
        if buf is None:
            start = index * PAGE
            old = os.pread(self.fd, PAGE, start) if start < self.floor else b""
            old = old[:max(0, self.floor - start)]
            buf = self.pages[index] = bytearray(old.ljust(PAGE, b"\0"))
        return buf

    def write(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            index, inner = divmod(off + pos, PAGE)
            n = min(PAGE - inner, len(view) - pos)
            self.page(index)[inner:inner + n] = view[pos:pos + n]
            pos += n
        self.size = max(self.size, off + len(data))

    def truncate(self, size: int) -> None:
        if size < self.size:
            for index in [i for i in self.pages if i * PAGE >= size]:
                del self.pages[index]
            index, inner = divmod(size, PAGE)
            if inner and index in self.pages:
                self.pages[index][inner:] = bytes(PAGE - inner)
            self.floor = min(self.floor, size)
        self.size = size

    def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        out = bytearray()
        pos = off
        while pos < end:
            index, inner = divmod(pos, PAGE)
            n = min(PAGE - inner, end - pos)
            buf = self.pages.get(index)
            if buf is not None:
                out += buf[inner:inner + n]
            else:
                old = os.pread(self.fd, n, pos) if pos < self.floor else b""
                out += old[:max(0, self.floor - pos)].ljust(n, b"\0")
            pos += n
        return bytes(out)

    def apply(self, keep: float = 1.0, rng: random.Random | None = None) -> None:
        """Write the pending state to SOURCE: all of it (keep=1), or each page and the
        truncate with probability keep, in the order rng shuffles them into."""
        durable = os.fstat(self.fd).st_size
        if self.floor < durable and (keep >= 1 or (keep > 0 and rng.random() < 0.5)):
            os.ftruncate(self.fd, self.floor)
            durable = self.floor
        indexes = list(self.pages)
        if keep < 1:
            indexes = [i for i in indexes if rng.random() < keep]
            rng.shuffle(indexes)
        for index in indexes:
            start = index * PAGE
            n = min(PAGE, self.size - start)
            if n > 0:
                os.pwrite(self.fd, bytes(self.pages[index][:n]), start)
                durable = max(durable, start + n)
        if keep >= 1 and durable != self.size:
            os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        os.close(self.fd)


class LazyFS(Passthrough):
    """tools/passthrough.py with file data held back until fsync (see the module)."""

    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.pending: dict[int, PendingFile] = {}  # inode -> its unsynced state
        signal.signal(signal.SIGUSR1, self._power_cut)

    def _power_cut(self, signum: int, frame: object) -> None:
        """Write some of the pending pages (see the module), then die unmounted."""
        rng = random.Random()
        files = list(self.pending.values())
        rng.shuffle(files)
        for pf in files:
            try:
                pf.apply(keep=rng.choice((0.0, 0.5, 1.0)), rng=rng)
            except OSError:
                pass  # an unlinked file's pages need not reach anything
        os._exit(0)

    def _pending(self, ino: int, fh: int) -> PendingFile:
        pf = self.pending.get(ino)
        if pf is None:
            fd = os.open(f"/proc/self/fd/{fh}", os.O_RDWR | os.O_CLOEXEC)
            pf = self.pending[ino] = PendingFile(fd)
        return pf

    def _drop(self, ino: int) -> None:
        pf = self.pending.pop(ino, None)
        if pf is not None:
            pf.close()

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        attr = Passthrough._attr(st, ino)
        pf = self.pending.get(ino)
        if pf is not None:
            attr.st_size = pf.size
        return attr

    @staticmethod
    def _open_flags(flags: int) -> int:
        # O_TRUNC becomes a pending truncate (open below), never a cut of SOURCE
        return Passthrough._open_flags(flags) & ~os.O_TRUNC

    @_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        info = await super().open(inode, flags, ctx)
        if flags & os.O_TRUNC:
            self._pending(inode, info.fh).truncate(0)
        return info

    @_errno
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        existed = os.path.lexists(path)
        info, attr = await super().create(parent_inode, name, mode, flags, ctx)
        if not existed:
            self._drop(attr.st_ino)  # a new file that got a dead file's inode number
        elif flags & os.O_TRUNC:
            self._pending(attr.st_ino, info.fh).truncate(0)
            attr.st_size = 0
        return info, attr

    @_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        pf = self.pending.get(self.fds[fh])
        return os.pread(fh, size, off) if pf is None else pf.read(off, size)

    @_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._pending(self.fds[fh], fh).write(off, buf)
        return len(buf)

    @_errno
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            pf = self.pending.get(inode)
            if pf is None:
                handle = fh if fh is not None else next(
                    (f for f, i in self.fds.items() if i == inode), None)
                if handle is None:  # no open handle: open one for the pending state
                    handle = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        pf = self._pending(inode, handle)
                    finally:
                        os.close(handle)
                else:
                    pf = self._pending(inode, handle)
            pf.truncate(attr.st_size)
        return await super().setattr(inode, attr, _WithoutSize(fields), fh, ctx)

    @_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        ino = self.fds[fh]
        pf = self.pending.pop(ino, None)
        if pf is not None:
            try:
                pf.apply()
            except BaseException:
                self.pending[ino] = pf
                raise
            pf.close()
        await super().fsync(fh, datasync)


class _WithoutSize:
    """The setattr fields with the size change taken out (LazyFS keeps it pending)."""

    def __init__(self, fields: pyfuse3.SetattrFields) -> None:
        self._fields = fields
        self.update_size = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._fields, name)


class LazyDisk:
    """lazyfs over DISK mounted at MNT, run and cut from another process (the power-loss
    test, tools/crashprobe --power-loss, tools/torture --power-loss)."""

    def __init__(self, disk: Path, mnt: Path, pidfile: Path) -> None:
        self.disk, self.mnt, self.pidfile = Path(disk), Path(mnt), Path(pidfile)
        self.disk.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), str(self.disk),
                            str(self.mnt), "--pidfile", str(self.pidfile)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode:
            raise RuntimeError(f"lazyfs: {r.stderr.strip()}")

    def cut_power(self, sig: int = signal.SIGUSR1) -> None:
        """SIGUSR1: some unsynced pages reach DISK; SIGKILL: none; SIGTERM: a clean
        unmount (the unsynced pages are dropped all the same). Clears the mount."""
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text())
            try:
                os.kill(pid, sig)
                for _ in range(1200):
                    os.kill(pid, 0)
                    time.sleep(0.05)
                raise RuntimeError(f"lazyfs {pid} survived signal {sig}")
            except ProcessLookupError:
                pass
            self.pidfile.unlink(missing_ok=True)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True,
                       timeout=60)

    def power_cycle(self, sig: int = signal.SIGUSR1) -> None:
        self.cut_power(sig)
        self.start()


if __name__ == "__main__":
    sys.exit(main(ops_class=LazyFS, name="lazyfs",
                  description=__doc__.split("\n\n")[0]))
