"""How much written data the kernel may hold for the mount before the daemon sees it.

With the writeback cache, a write(2) lands in the kernel's page cache and reaches the
daemon later, as WRITE requests of whole dirty pages. The kernel caps the dirty pages of
every FUSE mount at 1 % of its dirty threshold (about 47 MB here) with a strict per-mount
limit: beyond that, it writes pages back at once and makes the writer wait. A program
writing 4 KiB at random then costs the daemon nearly a WRITE request per write on top of
the GETXATTR (security.capability) the kernel sends before each one, and is throttled
to the pace at which the daemon answers them.

A mount of this daemon is trusted as a disk is (it runs as root, and holds as much dirty
data itself): `raise_dirty_limit` gives the mount the same dirty budget as the daemon
(`--dirty-limit`, a tenth of the memory by default) through the backing device's sysfs
file `max_bytes` (Linux 6.2 and newer, root only). Pages written again before they are
written back then cost nothing more, and adjacent pages go out together as one WRITE of
up to 1 MiB (BENCHMARKS.md, "The kernel's dirty limit for the mount").

What stays the same: fsync(2) and close(2) write the file's pages back first
(close(2): FUSE's flush), a commit, the figures and an unmount by signal take them in
first (daemon.pull_kernel_pages, with syncfs and requests_queued below), and unsynced
data may be lost in a crash, whether it waited in the kernel or in the daemon.
"""

from __future__ import annotations

import logging
import os
import select

log = logging.getLogger("snapfs.daemon")

SYSFS_BDI = "/sys/class/bdi"


def unescape_mountinfo(field: str) -> str:
    """A path field of /proc/self/mountinfo, whose space, tab, newline and backslash are
    octal escapes (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The major:minor of the file system mounted last at mountpoint, a resolved path (its
    backing device info is /sys/class/bdi/MAJOR:MINOR). Read without a stat, and the
    path is not resolved here (realpath stats it): the daemon must not send its own
    mount a request before its loop serves them. It hung in D state when it did."""
    target = mountpoint
    found = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and unescape_mountinfo(fields[4]) == target:
                    found = fields[2]
    except OSError:
        return None
    return found


def raise_dirty_limit(mountpoint: str, limit: int, *, sysfs: str = SYSFS_BDI,
                      mountinfo: str = "/proc/self/mountinfo") -> int | None:
    """Let the kernel hold up to limit bytes of dirty pages for the mount; returns the
    limit the kernel took (it rounds), or None when it could not be set (not root, an
    older kernel, no such device): the mount works as before, only slower for small
    random writes."""
    dev = mount_device(mountpoint, mountinfo)
    if dev is None:
        log.info("kernel dirty limit left as it is: %s not found in mountinfo", mountpoint)
        return None
    path = os.path.join(sysfs, dev, "max_bytes")
    try:
        with open(path) as f:
            before = int(f.read())
        if before >= limit:
            return before
        with open(path, "w") as f:
            f.write(f"{limit}\n")
        with open(path) as f:
            after = int(f.read())
    except (OSError, ValueError) as e:
        log.info("kernel dirty limit of the mount left at its default (%s)", e)
        return None
    log.info("the kernel may hold %d MiB of written data for the mount (was %d MiB)",
             after >> 20, before >> 20)
    return after


def syncfs(path: str) -> None:
    """Start writing the kernel's dirty pages of the mount holding path back (syncfs(2)).
    On FUSE it returns once the WRITE requests are queued, not answered: see
    requests_queued for the rest. Never call it on the event loop's thread of the
    daemon serving that mount. Best effort: nothing happens if the call is not
    available."""
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def fuse_device_fd() -> int | None:
    """This process's /dev/fuse descriptor (pyfuse3 does not export its session's)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def requests_queued(fuse_fd: int) -> bool:
    """Whether the kernel has a request waiting for the daemon to read it. Writeback
    requests beyond the kernel's max_background wait in its own queue, and one moves to
    the device as each one in flight is answered: no request readable and none being
    handled means that none is left."""
    poller = select.poll()
    poller.register(fuse_fd, select.POLLIN)
    return bool(poller.poll(0))
