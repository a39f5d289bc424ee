"""Helpers for the mounted tests: the Mount object (snapfs or a passthrough yardstick)
and small syscall utilities. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TARGET = os.environ.get("SNAPFS_TEST_TARGET", "snapfs")
if TARGET not in ("snapfs", "passthrough"):
    raise RuntimeError(f"SNAPFS_TEST_TARGET must be 'snapfs' or 'passthrough', not {TARGET!r}")
IS_SNAPFS = TARGET == "snapfs"
# SNAPFS_TEST_ENCRYPT=1 runs the whole suite on an encrypted repository (issue 4: the
# POSIX suite must pass unchanged there). The passphrase comes from the environment.
ENCRYPT = os.environ.get("SNAPFS_TEST_ENCRYPT") == "1"
if ENCRYPT:
    os.environ.setdefault("SNAPFS_PASSPHRASE", "snapfs test passphrase")
    os.environ.setdefault("SNAPFS_SCRYPT_N", "4096")

# Lines of the daemon log that mean something went wrong.
LOG_PROBLEM = re.compile(r" WARNING | ERROR | CRITICAL |Traceback")

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10


# --------------------------------------------------------------------------- small utils


def snapfs_bin() -> str:
    env = os.environ.get("SNAPFS_BIN")
    if env:
        return env
    cand = Path(sys.executable).with_name("snapfs")
    if cand.exists():
        return str(cand)
    cand = ROOT / ".venv" / "bin" / "snapfs"
    return str(cand)


def passthrough_script() -> str:
    env = os.environ.get("SNAPFS_TEST_PASSTHROUGH")
    path = Path(env) if env else ROOT / "tools" / "passthrough.py"
    if not path.exists():
        pytest.fail(f"SNAPFS_TEST_TARGET=passthrough but {path} does not exist "
                    "(set SNAPFS_TEST_PASSTHROUGH=/path/to/passthrough.py)")
    return str(path)


def _unescape_mount_field(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mounted(path: os.PathLike | str) -> bool:
    """True if PATH is a mount point, also for a dead FUSE mount (where stat fails with
    ENOTCONN and os.path.ismount says False)."""
    want = os.path.abspath(os.fspath(path))
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and _unescape_mount_field(fields[1]) == want:
                return True
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except OSError:
        return False
    return True


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def lazy_unmount(path: os.PathLike | str) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)],
                       capture_output=True, timeout=60)


def data(n: int, seed: int | str = 0) -> bytes:
    """N deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def read_bytes(path, offset: int = 0, size: int = -1) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if size < 0:
            size = os.fstat(fd).st_size - offset
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(fd, min(size - len(out), 4 * MiB), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def write_bytes(path, payload: bytes, offset: int = 0, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        view = memoryview(payload)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def expect_errno(expected, fn, *args, **kwargs):
    """Call fn and assert it fails with one of the errno values in EXPECTED."""
    if isinstance(expected, int):
        expected = (expected,)
    try:
        fn(*args, **kwargs)
    except OSError as e:
        names = "/".join(errno.errorcode.get(x, str(x)) for x in expected)
        got = errno.errorcode.get(e.errno, str(e.errno))
        assert e.errno in expected, f"{fn.__name__}{args}: expected {names}, got {got} ({e})"
        return e.errno
    names = "/".join(errno.errorcode.get(x, str(x)) for x in expected)
    raise AssertionError(f"{fn.__name__}{args} succeeded, expected {names}")


def drop_caches() -> None:
    """Drop the kernel's clean page cache, dentries and inodes so that the next reads
    go to the filesystem daemon instead of the page cache (root only; best effort)."""
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old, new, flags: int) -> None:
    AT_FDCWD = -100
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                          ctypes.c_uint(flags))
    if res != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(old), None, os.fspath(new))


def tree_contents(root) -> dict:
    """relpath -> ('d', mode) | ('f', mode, bytes) | ('l', target), for comparing trees."""
    out = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), read_bytes(p))
    return out


def rsync_diff(src, dst) -> str:
    """Itemized differences between two trees by content checksum, hard links, ACLs and
    xattrs ('' means identical)."""
    r = subprocess.run(["rsync", "-anciHAX", "--delete", f"{src}/", f"{dst}/"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"rsync compare failed: {r.stderr}"
    return r.stdout + r.stderr


# --------------------------------------------------------------------------- the mount


class Mount:
    """One repository mounted at .mnt with a volume 'vol' (.vol).

    Target snapfs: REPO is a snapfs repository, mounted with `snapfs mount`.
    Target passthrough: REPO is a plain directory mounted with the passthrough yardstick;
    volumes are plain directories, and snapfs-only helpers skip the test."""

    def __init__(self, base: Path, chunk_size: str | None = None, *,
                 env: dict[str, str | None] | None = None, encrypt: bool | None = None,
                 allow_other: bool = False):
        self.base = Path(base)
        self.allow_other = allow_other  # other users may enter (suites run as them)
        # extra environment of every snapfs command and of the daemon (e.g. the
        # passphrase; a None value removes a variable); None: the test's environment
        self.env = env
        self.encrypt = ENCRYPT if encrypt is None else encrypt
        self.repo = self.base / "repo"
        self.mnt = self.base / "mnt"
        self.vol = self.mnt / "vol"
        self.chunk_size = chunk_size
        self.is_snapfs = IS_SNAPFS
        self.allowed_log: list[re.Pattern] = []
        self._log_pos = 0
        self._pt_log = self.base / "passthrough.log"
        self._pt_pid = self.base / "passthrough.pid"
        self._snap_base: Path | None = None

    # ---------------------------------------------------------------- lifecycle

    def setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.is_snapfs:
            args = ["init", str(self.repo)]
            if self.encrypt:
                args.append("--encrypt")
            if self.chunk_size:
                args += ["--chunk-size", self.chunk_size]
            self.run_cli(*args)
        else:
            self.repo.mkdir(parents=True, exist_ok=True)
        self.mount()
        self.volume_create("vol")

    def mount(self) -> None:
        assert not is_mounted(self.mnt), f"{self.mnt} is already mounted"
        if self.is_snapfs:
            cmd = [snapfs_bin(), "mount", str(self.repo), str(self.mnt)]
        else:
            cmd = [sys.executable, passthrough_script(), str(self.repo), str(self.mnt),
                   "--pidfile", str(self._pt_pid), "--log", str(self._pt_log)]
        if self.allow_other:
            cmd.append("--allow-other")
        # output to a file, not a pipe: a daemon that keeps the pipe open must not hang us
        out = self.base / "mount-command.out"
        with open(out, "w+") as f:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=120,
                               env=self.environ())
            f.seek(0)
            text = f.read()
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: {text}"
        assert is_mounted(self.mnt), "the mount command returned before the mount was ready"
        os.stat(self.mnt)  # the mount answers

    def daemon_pid(self) -> int:
        pidfile = self.repo / "snapfs.pid" if self.is_snapfs else self._pt_pid
        return int(pidfile.read_text().split()[0])

    def umount(self) -> None:
        """Unmount cleanly and wait for the daemon to exit. Always leaves the mount point
        unmounted; raises AssertionError if anything went wrong on the way."""
        problems = []
        pid = None
        with contextlib.suppress(Exception):
            pid = self.daemon_pid()
        try:
            if self.is_snapfs:
                r = self.run_cli("umount", str(self.mnt), check=False, timeout=180)
                if r.returncode != 0:
                    problems.append(f"snapfs umount exited {r.returncode}: {r.stderr.strip()}")
            else:
                r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                                   text=True, timeout=60)
                if r.returncode != 0:
                    problems.append(f"fusermount3 -u: {r.stderr.strip()}")
        except subprocess.TimeoutExpired as e:
            problems.append(f"unmount timed out: {e}")
        grace = 120  # a clean unmount may take a while to sync
        if is_mounted(self.mnt):
            problems.append("still mounted after unmount; lazily unmounted")
            lazy_unmount(self.mnt)
            grace = 20
        if pid is not None and not wait_pid_gone(pid, grace):
            problems.append(f"daemon {pid} still running {grace} s after unmount; killed")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            wait_pid_gone(pid, 10)
        if problems:
            raise AssertionError("; ".join(problems))

    def remount(self) -> None:
        self.umount()
        self.mount()

    def dump_stacks(self) -> str:
        """Ask the daemon for every thread's stack (SIGUSR1) and return the log's tail:
        what a test that timed out shows about a hung daemon."""
        if not self.is_snapfs:
            return ""
        with contextlib.suppress(OSError, ValueError):
            os.kill(self.daemon_pid(), signal.SIGUSR1)
            time.sleep(1)
            return "daemon log tail:\n" + "".join(self.log_path.read_text().splitlines(True)[-80:])
        return "(no daemon to ask for its stacks)"

    def kill_daemon(self) -> None:
        """SIGKILL the daemon (a crash), then clear the dead mount like an admin would."""
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        assert wait_pid_gone(pid, 30), f"daemon {pid} survived SIGKILL"
        r = subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True,
                           text=True, timeout=60)
        assert not is_mounted(self.mnt), f"dead mount not cleared: {r.stderr}"

    def close(self) -> None:
        """Teardown: unmount (even after failures), then fsck and the log check."""
        problems = []
        try:
            self.umount()
        except Exception as e:
            problems.append(f"unmount: {e}")
        finally:
            lazy_unmount(self.mnt)
        if self.is_snapfs and self.repo.exists():
            try:
                self.fsck()
            except Exception as e:
                problems.append(str(e))
        problems += self.new_log_problems()
        if problems:
            pytest.fail("mount teardown: " + "\n".join(problems), pytrace=False)

    # ---------------------------------------------------------------- log

    @property
    def log_path(self) -> Path:
        return self.repo / "snapfs.log" if self.is_snapfs else self._pt_log

    def expect_log(self, pattern: str) -> None:
        """Declare that log lines matching PATTERN (a regex) are expected from now on."""
        self.allowed_log.append(re.compile(pattern))

    def new_log_problems(self) -> list[str]:
        """Unexpected WARNING/ERROR/Traceback lines logged since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < self._log_pos:  # log was rotated/truncated
                    self._log_pos = 0
                f.seek(self._log_pos)
                text = f.read().decode(errors="replace")
                self._log_pos = size
        except FileNotFoundError:
            return []
        bad = []
        for line in text.splitlines():
            if LOG_PROBLEM.search(line) and not any(p.search(line) for p in self.allowed_log):
                bad.append(line)
        return [f"unexpected log line: {b}" for b in bad[:20]]

    # ---------------------------------------------------------------- CLI & snapfs bits

    def run_cli(self, *args, check: bool = True, timeout: float = 120,
                cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run([snapfs_bin(), *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd,
                           env=self.environ())
        if check and r.returncode != 0:
            raise AssertionError(f"snapfs {' '.join(map(str, args))} exited {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def environ(self) -> dict[str, str] | None:
        """The environment of snapfs commands: the test's, changed by self.env."""
        if self.env is None:
            return None
        return {k: v for k, v in {**os.environ, **self.env}.items() if v is not None}

    def require_snapfs(self, what: str = "this check") -> None:
        if not self.is_snapfs:
            pytest.skip(f"{what} needs snapfs (target is {TARGET})")

    def volume_create(self, name: str) -> Path:
        if self.is_snapfs:
            self.run_cli("-C", self.mnt, "volume", "create", name)
        else:
            (self.mnt / name).mkdir()
        path = self.mnt / name
        assert path.is_dir(), f"volume {name} does not appear as {path}"
        return path

    def commit(self, directory, label: str) -> Path:
        """Commit the draft under DIRECTORY (a volume or .snapshots/S); returns the new
        snapshot's directory under .snapshots."""
        self.require_snapfs("commit")
        directory = Path(directory)
        self.run_cli("commit", directory, "--label", label)
        if directory.parent == self.mnt / ".snapshots":
            volume = directory.name.rsplit("@", 1)[0]
        else:
            volume = directory.name
        snap = self.mnt / ".snapshots" / f"{volume}@{label}"
        assert snap.is_dir(), f"after commit, {snap} does not exist"
        return snap

    def snapshot_base(self) -> Path:
        """A committed snapshot of 'vol' (made once) whose directory tests may write in."""
        self.require_snapfs("snapshot directories")
        if self._snap_base is None:
            (self.vol / ".base-marker").write_text("base\n")
            self._snap_base = self.commit(self.vol, "base")
        return self._snap_base

    def stats(self) -> dict:
        self.require_snapfs(".snapfs/stats")
        with open(self.mnt / ".snapfs" / "stats") as f:
            return json.load(f)

    def fsck(self) -> None:
        assert not is_mounted(self.mnt), "fsck must run on an unmounted repository"
        r = self.run_cli("fsck", self.repo, check=False, timeout=600)
        assert r.returncode == 0, (f"snapfs fsck {self.repo} exited {r.returncode}\n"
                                   f"{r.stdout}\n{r.stderr}")


# --------------------------------------------------------------------------- many repositories


class RepoSet:
    """Repositories one test makes itself (tests of encryption and exchange need several,
    each with its own passphrase or key file, mounted or not). Each is a Mount at
    BASE/NAME/{repo,mnt}; close() unmounts what is still mounted, then runs fsck (unless
    a test cleared .fsck_at_close) and the log check on every one."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.repos: list[Mount] = []

    def make(self, name: str, *, passphrase: str | None = None, key_file=None,
             chunk_size: str | None = None, volume: str | None = None,
             mounted: bool = False) -> Mount:
        """init a repository: encrypted with PASSPHRASE or KEY_FILE (created if missing),
        or plain; optionally mount it and create VOLUME."""
        env: dict[str, str | None] = {"SNAPFS_SCRYPT_N": "4096", "SNAPFS_PASSPHRASE": None,
                                      "SNAPFS_PASSPHRASE_FD": None, "SNAPFS_KEY_FILE": None}
        if passphrase is not None:
            env["SNAPFS_PASSPHRASE"] = passphrase
        if key_file is not None:
            env["SNAPFS_KEY_FILE"] = os.fspath(key_file)
        m = Mount(self.base / name, chunk_size, env=env,
                  encrypt=passphrase is not None or key_file is not None)
        m.fsck_at_close = True
        self.repos.append(m)
        m.mnt.mkdir(parents=True)
        args = ["init", m.repo]
        if key_file is not None:
            args = ["--key-file", key_file, *args]
        if m.encrypt:
            args.append("--encrypt")
        if chunk_size:
            args += ["--chunk-size", chunk_size]
        m.run_cli(*args)
        if mounted or volume:
            m.mount()
        if volume:
            m.volume_create(volume)
            m.vol = m.mnt / volume
        return m

    def close(self) -> None:
        problems = []
        for m in self.repos:
            try:
                if is_mounted(m.mnt):
                    m.umount()
            except Exception as e:
                problems.append(f"{m.base.name}: unmount: {e}")
            finally:
                lazy_unmount(m.mnt)
        for m in self.repos:
            if m.fsck_at_close and m.repo.exists():
                try:
                    m.fsck()
                except Exception as e:
                    problems.append(f"{m.base.name}: {e}")
            problems += [f"{m.base.name}: {p}" for p in m.new_log_problems()]
        if problems:
            pytest.fail("repositories at teardown: " + "\n".join(problems), pytrace=False)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused command: non-zero exit, exactly one line on stderr (no traceback) that
    contains every needle (case-insensitive); returns that line."""
    err = r.stderr.strip()
    assert r.returncode != 0, f"expected a failure, got exit 0: {r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert len(err.splitlines()) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in the error: {err}"
    return err
