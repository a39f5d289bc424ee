"""Processes, mounts, daemon CPU accounting, fio, kernel caches, machine description."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


class JobError(Exception):
    """A job failed (the run goes on, but the exit status will be non-zero)."""


class TargetUnavailable(Exception):
    """A target could not be set up (skipped, or an error in --smoke mode)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(text: str | bytes | None, lines: int = 8) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; JobError on failure or timeout."""
    argv = [os.fspath(a) for a in argv]
    what = what or " ".join(argv[:3])
    try:
        # Its own process group, so that a timeout, Ctrl-C or SIGTERM kills all of it
        # (fio forks its workers) before the targets are unmounted.
        child = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        raise JobError(f"{what}: {exc}") from None
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise JobError(f"{what}: timed out after {timeout:.0f} s") from None
        raise
    proc = subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        detail = tail(proc.stderr) or tail(proc.stdout)
        raise JobError(f"{what}: exit status {proc.returncode}: {detail}")
    return proc


# -- daemon CPU --------------------------------------------------------------------------


def proc_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pidfile(path: Path, wait: float = 0.0) -> int | None:
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def stop_process(pid: int | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after timeout, one process that this tool started."""
    if not pid_alive(pid):
        return
    assert pid is not None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


# -- mounts ------------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points() -> list[str]:
    """Every mount point in this mount namespace (dead FUSE mounts included)."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape_mountinfo(line.split()[4]) for line in f]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return os.path.realpath(path) in mount_points()


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    root = os.path.realpath(path)
    return sorted(
        (m for m in mount_points() if m == root or m.startswith(root.rstrip("/") + "/")),
        key=len,
        reverse=True,
    )


def unmount(path: str | os.PathLike[str], timeout: float = 30.0) -> bool:
    """Unmount a FUSE mount: fusermount3 -u, then lazily (-uz). True if gone."""
    for args in (["-u"], ["-uz"]):
        if not is_mounted(path):
            return True
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                ["fusermount3", *args, os.fspath(path)],
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
    if is_mounted(path) and os.geteuid() == 0:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(["umount", "-l", os.fspath(path)], timeout=timeout,
                           stdin=subprocess.DEVNULL, capture_output=True)
    return not is_mounted(path)


def wait_mounted(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def safe_rmtree(path: Path) -> None:
    """rm -rf that refuses to descend into a mount (unmount first)."""
    if not path.exists() and not path.is_symlink():
        return
    mounted = mounts_under(path)
    if mounted:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)


# -- kernel caches -----------------------------------------------------------------------


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_fs(*paths: str | os.PathLike[str]) -> None:
    """syncfs(2) of the filesystems holding these paths, not sync(2) of every filesystem:
    on a shared machine another process's busy filesystem (a btrfs with quotas, a loop
    device) made each sync(2) take up to two minutes, and a btrfs busy with quota work
    blocked it for many minutes. A path that is gone has nothing to sync; a failed
    syncfs is skipped (never a global sync(2))."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)


def drop_caches(level: int, sync: Callable[[], None]) -> None:
    """sync (by default every filesystem), then drop clean caches: 1 page cache,
    2 dentries and inodes, 3 both."""
    sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{level}\n")


def read_whole(path: Path) -> int:
    """Read a file to warm the page cache; returns its size."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            total += len(chunk)
    return total


# -- watchdog ----------------------------------------------------------------------------


class Watchdog:
    """Calls ``on_timeout`` if a job runs longer than its deadline (a hung FUSE daemon
    would otherwise block a test run forever: killing the daemon unblocks the job)."""

    @contextlib.contextmanager
    def arm(self, seconds: float, on_timeout: Callable[[], None]) -> Iterator[None]:
        timer = threading.Timer(seconds, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()


# -- fio ---------------------------------------------------------------------------------

VERIFY_MESSAGES = re.compile(r"verify failed|verify: bad|bad magic|bad header", re.IGNORECASE)


@dataclass
class FioResult:
    job: dict
    read_bytes: int
    write_bytes: int
    read_ios: int
    write_ios: int
    read_iops: float
    write_iops: float
    runtime: float  # seconds, as fio measured it (includes end_fsync)

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def ios(self) -> int:
        return self.read_ios + self.write_ios


def fio_escape(path: Path) -> str:
    return os.fspath(path).replace(":", "\\:")


def fio(name: str, path: Path, options: dict[str, object], timeout: float) -> FioResult:
    """Run one fio job on one file; JobError on any error, including verification."""
    argv = ["fio", f"--name={name}", f"--filename={fio_escape(path)}",
            "--output-format=json", "--fallocate=none", "--verify_state_save=0"]
    argv += [f"--{key}={value}" for key, value in options.items()]
    # cwd: fio may leave state files in its working directory
    proc = run(argv, timeout=timeout, check=False, what=f"fio {name}", cwd=tempfile.gettempdir())
    messages = proc.stderr.strip()
    start = proc.stdout.find("{")
    job: dict | None = None
    if start >= 0:
        messages = (proc.stdout[:start].strip() + "\n" + messages).strip()
        with contextlib.suppress(ValueError, KeyError, IndexError):
            job = json.JSONDecoder().raw_decode(proc.stdout[start:])[0]["jobs"][0]
    if VERIFY_MESSAGES.search(messages):
        raise JobError(f"fio {name}: DATA VERIFICATION FAILED: {tail(messages, 6)}")
    if proc.returncode != 0 or job is None or job.get("error"):
        err = job.get("error") if job else None
        raise JobError(
            f"fio {name}: exit status {proc.returncode}, error {err}: {tail(messages, 6)}"
        )
    r, w = job["read"], job["write"]
    return FioResult(
        job=job,
        read_bytes=r["io_bytes"],
        write_bytes=w["io_bytes"],
        read_ios=r["total_ios"],
        write_ios=w["total_ios"],
        read_iops=r["iops"],
        write_iops=w["iops"],
        runtime=max(r["runtime"], w["runtime"]) / 1000.0,
    )


# -- machine -----------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else "unavailable"


def machine_info(workdir: Path) -> dict[str, object]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    fs = " ".join(_first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T",
                               os.fspath(workdir)]).split())
    try:
        import pyfuse3

        pyfuse3_version = pyfuse3.__version__
    except ImportError:
        pyfuse3_version = "not installed"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": os.uname().release,
        "cpu": cpu,
        "memory_gib": mem_gib,
        "workdir": os.fspath(workdir),
        "workdir_fs": fs,
        "fio": _first_line(["fio", "--version"]),
        "libfuse": _first_line(["fusermount3", "-V"]),
        "pyfuse3": pyfuse3_version,
        "python": sys.version.split()[0],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def fio_has_engine(engine: str) -> bool:
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL).stdout
    return any(line.strip() == engine for line in out.splitlines())
