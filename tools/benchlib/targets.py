"""The filesystems under test.

Each target prepares a directory ``base`` in which jobs run, knows the pid of its FUSE
daemon (for CPU accounting) and always unmounts in ``teardown``:

- ``plain``: a directory on the disk that holds the work directory.
- ``passthrough``: tools/passthrough.py (the yardstick) over a directory on that disk.
  Neither has snapshots: their ``commit`` copies the files in the directory under the
  mount (see Target.commit), so that the snapshot jobs have a reference.
- ``snapfs`` / ``snapfs-enc``: a snapfs repository (the latter encrypted), mounted, with
  a writable volume ``bench``; snapshots appear at ``MNT/.snapshots/bench@LABEL``.
- ``snapfs-<N>k`` (``snapfs-32k``, ``snapfs-64k``...): like ``snapfs``, in a repository
  initialised with ``--chunk-size <N>K``, to choose the default chunk size by measurement.
- ``snapfs-history``: like ``snapfs``, but before the jobs the volume gets a long history:
  ``history`` commits (1,000; 20 with --smoke), each after rewriting one small file
  (``history.txt``), committed through the daemon's control socket (``REPO/snapfs.sock``,
  the request ``snapfs commit`` sends). The jobs then run in a draft 1,000 vertices deep,
  to compare with ``snapfs`` (whose draft has no history): the cost of reads must not
  grow with history depth.

snapfs contract (``.venv/bin/snapfs``): ``init REPO``; ``mount REPO MNT`` daemonizes and
returns when mounted, the daemon writes ``REPO/snapfs.pid`` and logs to ``REPO/snapfs.log``;
``-C MNT volume create bench``; ``commit MNT/bench --label NAME``; ``umount MNT``.
For ``snapfs-enc`` the encryption arguments of ``init`` are an assumption until the CLI
exists: ``$SNAPFS_BENCH_ENC_INIT`` (default ``--encrypt``), with the passphrase in
``$SNAPFS_PASSPHRASE`` (default ``snapfs-bench``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .util import (
    JobError,
    TargetUnavailable,
    is_mounted,
    log,
    mounts_under,
    pid_alive,
    proc_cpu,
    read_pidfile,
    run,
    safe_rmtree,
    stop_process,
    sync_fs,
    unmount,
    wait_mounted,
)

TOOLS = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 60.0


class Target:
    """A directory to benchmark; subclasses mount something there."""

    name = "?"

    def __init__(self, root: Path) -> None:
        self.root = root  # private scratch directory of this target
        self.base = root  # where the jobs run (set by setup)
        self.pid: int | None = None
        self.state: dict[str, Any] = {}  # per-run job state (e.g. the git repo)
        self.info: dict[str, Any] = {}  # facts about the set-up, reported in the JSON

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def teardown(self) -> None:
        pass

    @property
    def mountpoint(self) -> Path | None:
        """The FUSE mount (None: not a FUSE target)."""
        return None

    def cpu(self) -> float | None:
        """CPU seconds used so far by the FUSE daemon (None: no daemon)."""
        return proc_cpu(self.pid)

    def check(self) -> None:
        """Raise JobError if the target is not usable any more (daemon died...)."""

    def sync(self) -> None:
        """Write back the dirty data of this target: the kernel's pages of the mount (for
        FUSE targets: WRITE requests to the daemon), then the disk holding its data."""
        sync_fs(self.base, self.root)

    def kill(self) -> None:
        """Kill the daemon (the watchdog's last resort for a hung job)."""

    def logs(self) -> list[Path]:
        return []

    def commit(self, label: str) -> Path:
        """The top-level files of base, frozen, as a directory to read: a snapshot where
        the target has them (SnapfsTarget). Here: a copy made in the directory under the
        mount, not through it (the previous copy goes). Its files are new inodes to the
        kernel, whose data the store below has cached (the copy just wrote it): what a
        snapfs snapshot's files are right after a commit. The first read of such a file
        is what snapread measures; comparing it with a re-read of a file the kernel
        has read before (seqread) measured the kernel's first read, not snapfs."""
        under = self.underlying()
        for old in under.glob(".copy-*"):
            safe_rmtree(old)
        copy = under / f".copy-{label}"
        copy.mkdir()
        for item in sorted(under.iterdir()):
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, copy / item.name)
        sync_fs(self.root)
        return self.base / copy.name

    def underlying(self) -> Path:
        """The directory that holds base's files (base itself when nothing is mounted)."""
        return self.base


class PlainTarget(Target):
    name = "plain"

    def setup(self) -> None:
        super().setup()
        self.base = self.root / "data"
        self.base.mkdir()


class FuseTarget(Target):
    """Common part of the targets that mount a FUSE filesystem at ``self.mnt``."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.mnt = root / "mnt"

    @property
    def mountpoint(self) -> Path | None:
        return self.mnt

    def check(self) -> None:
        if self.pid is not None and not pid_alive(self.pid):
            raise JobError(f"{self.name}: the FUSE daemon (pid {self.pid}) died")
        if not is_mounted(self.mnt):
            raise JobError(f"{self.name}: {self.mnt} is not mounted any more")

    def kill(self) -> None:
        log(f"  watchdog: killing the {self.name} daemon (pid {self.pid})")
        stop_process(self.pid, timeout=2)
        unmount(self.mnt)

    def _unmount(self) -> None:
        if is_mounted(self.mnt) and not unmount(self.mnt):
            log(f"WARNING: could not unmount {self.mnt}")
        stop_process(self.pid)


class PassthroughTarget(FuseTarget):
    name = "passthrough"

    def setup(self) -> None:
        super().setup()
        src = self.root / "src"
        src.mkdir()
        self.mnt.mkdir()
        pidfile = self.root / "passthrough.pid"
        run(
            [sys.executable, TOOLS / "passthrough.py", src, self.mnt,
             "--pidfile", pidfile, "--log", self.root / "passthrough.log"],
            timeout=MOUNT_TIMEOUT,
            what="passthrough mount",
        )
        if not wait_mounted(self.mnt, 10):
            raise TargetUnavailable(f"passthrough: {self.mnt} not mounted")
        self.pid = read_pidfile(pidfile, wait=5)
        if self.pid is None:
            raise TargetUnavailable("passthrough: no pidfile")
        self.base = self.mnt

    def teardown(self) -> None:
        self._unmount()

    def underlying(self) -> Path:
        return self.root / "src"

    def logs(self) -> list[Path]:
        return [self.root / "passthrough.log"]


class SnapfsTarget(FuseTarget):
    name = "snapfs"
    volume = "bench"

    def __init__(self, root: Path, encrypted: bool = False, history: int = 0,
                 chunk_kib: int | None = None) -> None:
        super().__init__(root)
        self.encrypted = encrypted
        self.history = history  # commits made before the jobs (snapfs-history)
        self.chunk_kib = chunk_kib  # None: the default of `snapfs init`
        if encrypted:
            self.name = "snapfs-enc"
        elif history:
            self.name = "snapfs-history"
        elif chunk_kib:
            self.name = f"snapfs-{chunk_kib}k"
        self.repo = root / "repo"
        self.env = dict(os.environ)
        if encrypted:
            self.env.setdefault("SNAPFS_PASSPHRASE", "snapfs-bench")
        self.exe = self._find_exe()
        self.mounted_by_us = False

    @staticmethod
    def _find_exe() -> str | None:
        local = Path(sys.executable).parent / "snapfs"
        if local.exists():
            return os.fspath(local)
        return shutil.which("snapfs")

    def snapfs(self, *args: str | os.PathLike[str], timeout: float = MOUNT_TIMEOUT,
               what: str | None = None) -> None:
        assert self.exe is not None
        run([self.exe, *args], timeout=timeout, env=self.env,
            what=what or f"snapfs {args[0]}")

    def setup(self) -> None:
        super().setup()
        if self.exe is None:
            raise TargetUnavailable("no snapfs executable (pip install -e . ?)")
        init_args = []
        if self.encrypted:
            init_args = shlex.split(os.environ.get("SNAPFS_BENCH_ENC_INIT", "--encrypt"))
        if self.chunk_kib:
            init_args = ["--chunk-size", f"{self.chunk_kib}K"]
        steps = "snapfs init"
        try:
            self.snapfs("init", *init_args, self.repo, what="snapfs init")
            if not self.repo.is_dir():
                raise TargetUnavailable(f"`snapfs init` exited 0 but did not create {self.repo}")
            self.mnt.mkdir()
            steps = "snapfs mount"
            self.mounted_by_us = True
            self.snapfs("mount", self.repo, self.mnt, what="snapfs mount")
            if not wait_mounted(self.mnt, 10):
                raise TargetUnavailable(f"`snapfs mount` returned but {self.mnt} is not mounted")
            self.pid = read_pidfile(self.repo / "snapfs.pid", wait=5)
            if self.pid is None:
                log(f"WARNING: {self.name}: no {self.repo}/snapfs.pid: daemon CPU not measured")
            steps = "snapfs volume create"
            self.snapfs("-C", self.mnt, "volume", "create", self.volume,
                        what="snapfs volume create")
            self.base = self.mnt / self.volume
            if not self.base.is_dir():
                raise TargetUnavailable(f"`snapfs volume create` did not create {self.base}")
            if self.history:
                steps = f"making a history of {self.history} commits"
                self._make_history(self.history)
        except JobError as exc:
            raise TargetUnavailable(f"{steps} failed: {exc}") from None

    def _make_history(self, commits: int) -> None:
        """Rewrite one small file and commit, ``commits`` times (untimed set-up).

        Commits go through the daemon's control socket from this process: the request of
        ``snapfs commit``, without starting a Python CLI per commit (1,000 of them would
        take minutes). The time it took is reported in ``self.info``.
        """
        sys.path.insert(0, os.fspath(TOOLS.parent))
        from snapfs import control  # the project's own package (repository root)

        sock = os.fspath(self.repo / "snapfs.sock")
        path = self.base / "history.txt"
        start = time.perf_counter()
        commit_times = []
        for i in range(commits):
            with open(path, "w") as f:  # O_TRUNC: the file's one block is rewritten
                f.write(f"history commit {i}\n" * 40)  # about 800 bytes
            t0 = time.perf_counter()
            try:
                control.call(sock, {"op": "commit", "where": self.volume, "label": f"h{i}"},
                             timeout=MOUNT_TIMEOUT)
            except Exception as exc:  # SnapfsError, OSError: the daemon's own message
                raise JobError(f"commit {i + 1} of {commits}: {exc}") from None
            commit_times.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - start
        commit_times.sort()
        self.info["history"] = {
            "commits": commits,
            "seconds": round(seconds, 2),
            "commit_median_ms": round(commit_times[len(commit_times) // 2] * 1000, 2),
            "commit_max_ms": round(commit_times[-1] * 1000, 2),
        }
        log(f"  {self.name}: {commits} commits in {seconds:.1f} s (median commit "
            f"{self.info['history']['commit_median_ms']} ms)")

    def commit(self, label: str) -> Path:
        self.snapfs("commit", self.base, "--label", label, what="snapfs commit")
        snap = self.mnt / ".snapshots" / f"{self.volume}@{label}"
        deadline = time.monotonic() + 10
        while not snap.is_dir():
            if time.monotonic() > deadline:
                raise JobError(f"snapfs commit: {snap} did not appear")
            time.sleep(0.05)
        return snap

    def teardown(self) -> None:
        if self.mounted_by_us and is_mounted(self.mnt) and self.exe is not None:
            with contextlib.suppress(JobError):
                self.snapfs("umount", self.mnt, what="snapfs umount")
        self._unmount()

    def logs(self) -> list[Path]:
        return [self.repo / "snapfs.log"]


TARGET_NAMES = ("plain", "passthrough", "snapfs", "snapfs-enc", "snapfs-history")
CHUNK_VARIANT = re.compile(r"snapfs-([0-9]+)k")  # snapfs-64k: a repository of 64 KiB chunks


def chunk_variant(name: str) -> int | None:
    """The chunk size in KiB of a ``snapfs-<N>k`` target name, else None."""
    m = CHUNK_VARIANT.fullmatch(name)
    if m is None:
        return None
    kib = int(m.group(1))
    return kib if kib >= 4 and kib & (kib - 1) == 0 else None


def is_target_name(name: str) -> bool:
    return name in TARGET_NAMES or chunk_variant(name) is not None


def make_target(name: str, runroot: Path, history: int = 1000) -> Target:
    root = runroot / name
    if name == "plain":
        return PlainTarget(root)
    if name == "passthrough":
        return PassthroughTarget(root)
    if name == "snapfs":
        return SnapfsTarget(root)
    if name == "snapfs-enc":
        return SnapfsTarget(root, encrypted=True)
    if name == "snapfs-history":
        return SnapfsTarget(root, history=max(1, history))
    if (kib := chunk_variant(name)) is not None:
        return SnapfsTarget(root, chunk_kib=kib)
    raise ValueError(name)


def cleanup_runroot(runroot: Path) -> None:
    """Unmount whatever a previous (crashed) run left under runroot, then delete it."""
    for mnt in mounts_under(runroot):
        log(f"unmounting a leftover mount: {mnt}")
        if not unmount(mnt):
            raise RuntimeError(f"cannot unmount leftover {mnt}")
    safe_rmtree(runroot)
