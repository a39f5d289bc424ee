"""Mounting: the daemon process, its log, its signals and its clean shutdown.

`snapfs mount` forks before trio starts. The child opens the repository (taking the
lock), mounts, writes its pid and tells the parent through a pipe that the mount is
ready (or why it failed); the parent returns only then. On unmount or SIGTERM the daemon
stores every dirty buffer, syncs, and releases the lock.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import signal
import sys

import pyfuse3
import trio

from snapfs import control
from snapfs.errors import SnapfsError, UsageError
from snapfs.fuse import gcpolicy, kernelcache
from snapfs.fuse.loopwatch import LoopWatch
from snapfs.fuse.ops import SnapfsOperations
from snapfs.repository import Repository
from snapfs.vfs.fs import Filesystem

log = logging.getLogger("snapfs.daemon")


def setup_logging(path: str | None, debug: bool = False) -> None:
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s: %(message)s",
        "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # `kill -USR1 PID` writes every thread's stack to the log, even when the event loop
    # thread is stuck in a system call: what a hung mount is doing, without a debugger.
    faulthandler.register(signal.SIGUSR1, file=handler.stream, all_threads=True)


def tune_malloc() -> None:
    """Keep 128 KiB chunk buffers off glibc's mmap path.

    With the default dynamic mmap threshold, every pair of chunk-sized buffers alive at
    once is mapped and unmapped per allocation: a page-fault storm that cut decrypt +
    re-seal throughput from ~2.7 to ~0.9 GiB/s here. A fixed 4 MiB threshold and a
    256 MiB trim threshold keep them in the heap.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def check_mountpoint(mnt: str) -> str:
    """The mount point, resolved (as /proc/self/mountinfo will name it), if usable."""
    mnt = os.path.realpath(mnt)
    if not os.path.isdir(mnt):
        raise UsageError(f"mount point {mnt} is not a directory: create it first (mkdir -p {mnt})")
    if os.path.ismount(mnt):
        raise UsageError(f"{mnt} is already a mount point: unmount it first (snapfs umount {mnt})")
    return mnt


def mount(repo_path: str, mnt: str, *, foreground: bool, allow_other: bool,
          commit_every: float | None, debug: bool = False, secret: bytes | None = None,
          cache_bytes: int | None = None, dirty_limit: int | None = None) -> int:
    """secret (for an encrypted repository) was obtained by the caller, before the fork,
    so that a wrong passphrase is reported before anything is mounted."""
    mnt = check_mountpoint(mnt)
    tune_malloc()
    if foreground:
        setup_logging(None, debug)
        return _run(repo_path, mnt, allow_other, commit_every, None, secret, cache_bytes,
                    dirty_limit)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg.startswith("ready"):
            return 0
        os.waitpid(pid, 0)
        raise SnapfsError(msg.strip() or "the daemon died while mounting; see REPO/snapfs.log")
    # the daemon
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        setup_logging(os.path.join(os.path.abspath(repo_path), "snapfs.log"), debug)
        code = _run(repo_path, mnt, allow_other, commit_every, wfd, secret, cache_bytes,
                    dirty_limit)
    except SnapfsError as e:
        _tell(wfd, str(e))
    except BaseException as e:  # noqa: BLE001 - the daemon must report, not traceback
        logging.getLogger("snapfs.daemon").exception("daemon failed")
        _tell(wfd, f"the snapfs daemon failed: {e}")
    os._exit(code)


def _tell(fd: int | None, msg: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, msg.encode())
        os.close(fd)
    except OSError:
        pass


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one; returns the limit in force.

    The daemon keeps a read descriptor per pack file (128 MiB each): Debian's default
    soft limit of 1,024 would make reads fail with EMFILE past about 120 GiB of data.
    The hard limit (524,288 by default under systemd) covers petabytes."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            pass
    return soft


def _run(repo_path: str, mnt: str, allow_other: bool, commit_every: float | None,
         ready_fd: int | None, secret: bytes | None = None,
         cache_bytes: int | None = None, dirty_limit: int | None = None) -> int:
    fd_limit = raise_fd_limit()
    repo = Repository(repo_path, holder=f"the snapfs mount at {mnt}", secret=secret,
                      cache_bytes=cache_bytes)
    fs = Filesystem(repo, dirty_limit=dirty_limit)
    try:
        trio.run(fs.recover)  # fsynced writes only the intent log holds, before the mount
    except BaseException:
        repo.close()
        raise
    ops = SnapfsOperations(fs)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"default_permissions", f"fsname={repo.paths.root}", "subtype=snapfs"}
    options.discard("fsname=pyfuse3")
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(ops, mnt, options)
    except RuntimeError as e:
        repo.close()
        raise SnapfsError(f"cannot mount at {mnt}: {e}")
    kernelcache.raise_dirty_limit(mnt, fs.dirty_limit)
    fs.pull_kernel_pages = functools.partial(pull_kernel_pages, mnt, ops,
                                             kernelcache.fuse_device_fd())
    with open(repo.paths.pid, "w") as f:
        f.write(f"{os.getpid()}\n")
    log.info("mounted %s at %s (chunk size %d, open files up to %d)", repo.paths.root, mnt,
             repo.chunk_size, fd_limit)
    ok = False
    try:
        watch = LoopWatch(lambda: ops.requests)
        fs.extra_stats["event_loop"] = watch.report
        fs.extra_stats["chunk_reads"] = repo.chunks.read_stats
        trio.run(_main, fs, repo, commit_every, ready_fd, watch)
        ok = True
    finally:
        pyfuse3.close(unmount=ok)
        try:
            repo.close()
        finally:
            for p in (repo.paths.pid, repo.paths.sock):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        log.info("unmounted %s", mnt)
    return 0


async def _main(fs: Filesystem, repo: Repository, commit_every: float | None,
                ready_fd: int | None, watch: LoopWatch) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        nursery.start_soon(gcpolicy.run, watch.activity)
        nursery.start_soon(functools.partial(fs.background, activity=watch.activity))
        nursery.start_soon(control.serve, fs, repo.paths.sock)
        nursery.start_soon(_signals, fs)
        if commit_every:
            nursery.start_soon(_auto_commit, fs, commit_every)
        await trio.sleep(0)
        _tell(ready_fd, "ready")
        await pyfuse3.main()
        await fs.shutdown()
        nursery.cancel_scope.cancel()


PULL_POLL = 0.001  # seconds between two looks for writes still on their way
PULL_QUIET_ROUNDS = 5


async def pull_kernel_pages(mnt: str, ops: SnapfsOperations, fuse_fd: int | None) -> None:
    """Bring every page written before this call and still held by the kernel into the
    daemon (Filesystem.pull_kernel_pages): before a commit, the figures, a signalled
    unmount. syncfs(2), from a worker thread while this loop serves the WRITE requests
    it causes, only queues them; they have all been answered once the kernel has no
    request waiting to be read and no WRITE or SETATTR is being handled here (a look
    between two requests: pyfuse3 reads a request and enters its handler with no
    checkpoint in between)."""
    await trio.to_thread.run_sync(kernelcache.syncfs, mnt, abandon_on_cancel=True)
    if fuse_fd is None:
        return
    quiet = 0
    while ops.writes_active or kernelcache.requests_queued(fuse_fd):
        seen, handled = ops.writes_seen, ops.requests
        await trio.sleep(PULL_POLL)
        # On a busy mount other requests keep the device readable: once requests have
        # been answered for a few rounds with no write among them, the writes queued
        # before them (both queues are first in, first out) are in.
        if ops.writes_seen == seen and not ops.writes_active and ops.requests > handled:
            quiet += 1
            if quiet >= PULL_QUIET_ROUNDS:
                return
        else:
            quiet = 0


# How long a signalled daemon waits for the kernel to hand over the written pages it holds.
PULL_ON_SIGNAL_TIMEOUT = 120.0


async def _signals(fs: Filesystem) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("signal received: unmounting")
            # Once the loop stops, pages the kernel still holds for the mount could not
            # reach the daemon any more (fusermount -u needs no such step: it refuses
            # while a file is open, and a file's last close waits for its pages):
            # bring them in first, so that shutdown stores them.
            if fs.pull_kernel_pages is not None:
                with trio.move_on_after(PULL_ON_SIGNAL_TIMEOUT) as scope:
                    await fs.pull_kernel_pages()
                if scope.cancelled_caught:
                    log.warning("the kernel did not hand over its written pages within "
                                "%.0f s; unmounting without them", PULL_ON_SIGNAL_TIMEOUT)
            pyfuse3.terminate()
            return


async def _auto_commit(fs: Filesystem, every: float) -> None:
    """--commit-every: commit every volume whose draft changed, on a timer (with the
    written pages the kernel still held: fs.pull_kernel_pages)."""
    while True:
        await trio.sleep(every)
        if fs.pull_kernel_pages is not None:
            await fs.pull_kernel_pages()
        for name in sorted(fs.graph.volumes):
            view = fs.volume_view(name)
            draft = fs.graph.vertices[fs.graph.volumes[name]]
            dirty = any(v is view for v, _ in fs._dirty.values())
            if draft.delta or draft.removed or dirty or _has_rows(fs, draft.id):
                try:
                    await fs.commit(view, None)
                except SnapfsError as e:
                    log.warning("automatic commit of %s failed: %s", name, e)
                except Exception:  # a full disk, say: the mount stays up, the next turn retries
                    log.exception("automatic commit of %s failed; will retry", name)


def _has_rows(fs: Filesystem, vid: int) -> bool:
    for table in ("inodes", "dirents"):
        if fs.cat.execute(f"SELECT 1 FROM {table} WHERE vertex=? LIMIT 1", (vid,)).fetchone():
            return True
    return False
