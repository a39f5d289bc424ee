"""Counting the FUSE requests a job makes, per opcode (``tools/bench --requests``).

The kernel's ``fuse:fuse_request_send`` tracepoint fires once per request sent to a FUSE
daemon, with the connection (the mount's device number) and the opcode. ``perf stat``
counts it, one counter per opcode filtered on the target's connection, plus one for all
opcodes ("other" is the difference). Counting is started and stopped through perf's
control FIFOs, so only the timed part is counted.

Every request then passes one filter per counter in the kernel (a few microseconds per
request in all): the rates of a run with --requests are not comparable with a run
without it; the request counts are exact.

Needs root, perf, and the tracefs (mounted on /sys/kernel/tracing by tools/bench if it
is not, and unmounted at the end).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENT = "fuse:fuse_request_send"
FORMAT = TRACEFS / "events/fuse/fuse_request_send/format"
TIMEOUT = 15.0

# The opcodes counted one by one (the FUSE protocol's numbers, include/uapi/linux/fuse.h).
OPCODES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK",
    14: "OPEN", 15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC",
    21: "SETXATTR", 22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH",
    27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 34: "ACCESS",
    35: "CREATE", 36: "INTERRUPT", 42: "BATCH_FORGET", 43: "FALLOCATE",
    44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE", 52: "STATX",
}


class TraceUnavailable(Exception):
    pass


_mounted_by_us = False


def prepare() -> None:
    """Check perf and the tracepoint; mount the tracefs if needed (TraceUnavailable)."""
    global _mounted_by_us
    if shutil.which("perf") is None:
        raise TraceUnavailable("perf is not installed (apt-get install linux-perf)")
    if not FORMAT.exists() and not (TRACEFS / "events").exists():
        proc = subprocess.run(["mount", "-t", "tracefs", "nodev", os.fspath(TRACEFS)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TraceUnavailable(f"cannot mount the tracefs: {proc.stderr.strip()}")
        _mounted_by_us = True
    if not FORMAT.exists():
        raise TraceUnavailable(f"this kernel has no {EVENT} tracepoint")


def finish() -> None:
    """Unmount the tracefs if prepare() mounted it."""
    global _mounted_by_us
    if _mounted_by_us:
        subprocess.run(["umount", os.fspath(TRACEFS)], capture_output=True, check=False)
        _mounted_by_us = False


def connection(mountpoint: Path) -> int:
    """The connection number the tracepoint reports: the mount's dev_t as the kernel
    encodes it (major << 20 | minor)."""
    st = os.stat(mountpoint)
    return os.major(st.st_dev) << 20 | os.minor(st.st_dev)


class RequestCounter:
    """perf stat counting one connection's requests per opcode, between start and stop."""

    def __init__(self, conn: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-perf-"))
        self.ctl, self.ack, self.out = self.tmp / "ctl", self.tmp / "ack", self.tmp / "out"
        os.mkfifo(self.ctl)
        os.mkfifo(self.ack)
        argv = ["perf", "stat", "-x,", "-a", "-D", "-1",
                f"--control=fifo:{self.ctl},{self.ack}", "-o", os.fspath(self.out)]
        self.ops = list(OPCODES)
        for op in self.ops:
            argv += ["-e", EVENT, "--filter", f"connection=={conn}&&opcode=={op}"]
        argv += ["-e", EVENT, "--filter", f"connection=={conn}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.ctl_fd = self.ack_fd = -1
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:  # perf opens the FIFOs once its counters are set up
                try:
                    self.ctl_fd = os.open(self.ctl, os.O_WRONLY | os.O_NONBLOCK)
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise TraceUnavailable("perf stat did not start") from None
                    time.sleep(0.02)
            self.ack_fd = os.open(self.ack, os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            self.close()
            raise

    def _command(self, cmd: str) -> None:
        os.write(self.ctl_fd, cmd.encode() + b"\n")
        deadline = time.monotonic() + TIMEOUT
        got = b""
        while b"ack" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise TraceUnavailable(f"perf stat did not acknowledge {cmd!r}")
            ready, _, _ = select.select([self.ack_fd], [], [], left)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    got += os.read(self.ack_fd, 64)

    def start(self) -> None:
        self._command("enable")

    def stop(self) -> dict[str, int]:
        """Stop counting; the requests per opcode name (and "total")."""
        try:
            self._command("disable")
        finally:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        counts = [int(m.group(1)) for m in
                  re.finditer(r"^(\d+),[^,]*,fuse:fuse_request_send", self.out.read_text(), re.M)]
        self.close()
        if len(counts) != len(self.ops) + 1:
            raise TraceUnavailable(f"perf stat gave {len(counts)} counts, expected "
                                   f"{len(self.ops) + 1}")
        result = {OPCODES[op]: n for op, n in zip(self.ops, counts, strict=False) if n}
        total = counts[-1]
        other = total - sum(counts[:-1])
        if other:
            result["other"] = other
        result["total"] = total
        return result

    def close(self) -> None:
        for fd in (self.ctl_fd, self.ack_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.ctl_fd = self.ack_fd = -1
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
