"""The workloads. Each job runs on one target and returns samples (one per metric).

Only the part between ``with ctx.timed() as t`` and the end of that block is measured:
wall time, and the CPU time of the target's FUSE daemon. Set-up (laying out files,
extracting the tree for rm -rf, building the git repository) and verification (fio
``verify=crc32c`` read-back of everything written, ``tar --compare``) are not timed.

fio file layout per target: ``seq.dat`` (seq_size, written in 1 MiB blocks with crc32c
headers) and ``rand.dat`` (rand_size, crc32c headers every 4 KiB). Every job that writes
keeps the headers valid, and is followed by a read-back of the whole file with
``verify=crc32c verify_fatal=1``; a mismatch fails the job.

Cold and warm: "cold" jobs use fio's default ``invalidate=1`` (the file's page cache on
the target is dropped first: on FUSE targets that is the kernel's cache of the FUSE file,
the backing files stay cached; on plain it means reading the disk). ``randread`` and the
libaio jobs use O_DIRECT, so every request reaches the daemon. "Warm" jobs read a file
that was just read in full, with ``invalidate=0``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .fusetrace import RequestCounter, TraceUnavailable, connection
from .pyspy import Recorder
from .targets import Target
from .util import (
    FioResult,
    GiB,
    JobError,
    MiB,
    can_drop_caches,
    drop_caches,
    fio,
    read_whole,
    run,
)


@dataclass
class Config:
    mode: str  # full, quick or smoke
    seq_size: int  # bytes, sequential jobs
    rand_size: int  # bytes, the file of the random jobs
    runtime: float | None  # seconds per random job; None: one pass over rand_size
    files: int  # metadata job: number of files
    listdir_repeat: int
    tree_files: int | None  # files of the source tree (None: all)
    git_runs: int
    job_timeout: float
    history: int = 1000  # commits made on snapfs-history before the jobs
    profile_dir: str | None = None  # --profile: py-spy profiles of the daemons go here
    requests: bool = False  # --requests: count the FUSE requests of each timed part


@dataclass
class Sample:
    metric: str
    target: str
    rep: int
    value: float | None  # a rate: MiB/s, or operations per second
    unit: str  # "MiB/s", "IOPS", "ops/s", "files/s", "entries/s"
    seconds: float | None = None  # wall time of the timed part
    amount: float | None = None  # bytes (MiB/s) or operations (all other units)
    cpu: float | None = None  # daemon CPU seconds during the timed part
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def per_bytes(self) -> bool:
        return self.unit == "MiB/s"

    @property
    def cpu_norm(self) -> float | None:
        """Daemon CPU seconds per GiB (MiB/s metrics) or per 1,000 operations."""
        if self.cpu is None or not self.amount:
            return None
        return self.cpu / (self.amount / GiB) if self.per_bytes else self.cpu * 1000 / self.amount

    @property
    def cpu_unit(self) -> str:
        return "s/GiB" if self.per_bytes else "s/1k ops"


@dataclass
class Timing:
    seconds: float = 0.0
    cpu: float | None = None
    requests: dict[str, int] | None = None  # FUSE requests per opcode (--requests)


@dataclass
class Tree:
    """A tarball of a real source tree, built once and cached in the work directory."""

    tarball: Path
    entries: int  # files, directories and symlinks
    files: int  # files and symlinks (what git tracks)
    bytes: int


class JobContext:
    def __init__(self, cfg: Config, target: Target, rep: int, tree: Tree | None) -> None:
        self.cfg = cfg
        self.target = target
        self.rep = rep
        self.tree = tree
        self.base = target.base

    @contextlib.contextmanager
    def timed(self, metric: str = "") -> Iterator[Timing]:
        timing = Timing()
        recorder = counter = None
        if self.cfg.profile_dir and self.target.pid:
            name = f"{self.target.name}.{metric or 'job'}.r{self.rep}.txt"
            recorder = Recorder(self.target.pid, Path(self.cfg.profile_dir) / name)
        if self.cfg.requests and self.target.mountpoint is not None:
            try:
                counter = RequestCounter(connection(self.target.mountpoint))
                counter.start()
            except (TraceUnavailable, OSError) as exc:
                if counter is not None:
                    counter.close()
                if recorder is not None:
                    recorder.stop()
                raise JobError(f"--requests: {exc}") from None
        cpu0 = self.target.cpu()
        start = time.perf_counter()
        try:
            yield timing
        finally:
            timing.seconds = time.perf_counter() - start
            cpu1 = self.target.cpu()
            if counter is not None:
                try:
                    timing.requests = counter.stop()
                except (TraceUnavailable, OSError) as exc:
                    counter.close()
                    raise JobError(f"--requests: {exc}") from None
            if recorder is not None:
                recorder.stop()
        if cpu0 is not None and cpu1 is not None:
            timing.cpu = cpu1 - cpu0

    def sample(self, metric: str, value: float, unit: str, t: Timing, amount: float,
               **extra: object) -> Sample:
        if t.requests is not None:
            extra["fuse_requests"] = t.requests
        return Sample(metric, self.target.name, self.rep, value, unit, t.seconds, amount,
                      t.cpu, extra=dict(extra))

    def fio(self, name: str, path: Path, **options: object) -> FioResult:
        return fio(name, path, options, timeout=self.cfg.job_timeout)

    def fio_sample(self, metric: str, r: FioResult, t: Timing, rate: str) -> Sample:
        if rate == "MiB/s":
            value = r.bytes / MiB / r.runtime
            return self.sample(metric, value, "MiB/s", t, r.bytes, fio_runtime=r.runtime)
        return self.sample(metric, r.read_iops + r.write_iops, "IOPS", t, r.ios,
                           fio_runtime=r.runtime, read_iops=round(r.read_iops),
                           write_iops=round(r.write_iops))


# -- fio files ---------------------------------------------------------------------------

SEQ_VERIFY = {"verify": "crc32c", "verify_interval": MiB}
RAND_VERIFY = {"verify": "crc32c", "verify_interval": 4096}


def _size_ok(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write_seq(ctx: JobContext, path: Path, timed: bool) -> tuple[FioResult, Timing]:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with ctx.timed("seqwrite" if timed else "seq-layout") as t:
        r = ctx.fio("seqwrite", path, rw="write", bs="1M", size=ctx.cfg.seq_size,
                    end_fsync=1, do_verify=0, **SEQ_VERIFY)
    if not timed:
        t = Timing()
    return r, t


def _verify(ctx: JobContext, path: Path, size: int, verify: dict[str, object]) -> None:
    """Read the whole file back and check every crc32c header (untimed)."""
    r = ctx.fio("verify", path, rw="read", bs="1M", size=size, verify_fatal=1, **verify)
    if r.read_bytes != size:
        raise JobError(f"verify of {path.name}: read {r.read_bytes} of {size} bytes")


def seq_file(ctx: JobContext) -> Path:
    path = ctx.base / "seq.dat"
    if not _size_ok(path, ctx.cfg.seq_size):
        _write_seq(ctx, path, timed=False)
    return path


def rand_file(ctx: JobContext) -> Path:
    path = ctx.base / "rand.dat"
    if not _size_ok(path, ctx.cfg.rand_size):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        ctx.fio("layout", path, rw="write", bs="1M", size=ctx.cfg.rand_size, end_fsync=1,
                do_verify=0, **RAND_VERIFY)
    return path


def _rand_options(ctx: JobContext, **options: object) -> dict[str, object]:
    options = {"bs": "4k", "size": ctx.cfg.rand_size, **options}
    if ctx.cfg.runtime:
        options.update(time_based=1, runtime=f"{ctx.cfg.runtime:g}s")
    return options


# -- fio jobs ----------------------------------------------------------------------------


def job_seqwrite(ctx: JobContext) -> list[Sample]:
    path = ctx.base / "seq.dat"
    r, t = _write_seq(ctx, path, timed=True)
    _verify(ctx, path, ctx.cfg.seq_size, SEQ_VERIFY)
    return [ctx.fio_sample("seqwrite", r, t, "MiB/s")]


def _read_cold_warm(ctx: JobContext, path: Path, metric: str) -> list[Sample]:
    size = path.stat().st_size
    with ctx.timed(metric) as cold:
        r_cold = ctx.fio(metric, path, rw="read", bs="1M", size=size, invalidate=1)
    with ctx.timed(metric + "-warm") as warm:
        r_warm = ctx.fio(metric + "-warm", path, rw="read", bs="1M", size=size, invalidate=0)
    return [ctx.fio_sample(metric, r_cold, cold, "MiB/s"),
            ctx.fio_sample(metric + "-warm", r_warm, warm, "MiB/s")]


def job_seqread(ctx: JobContext) -> list[Sample]:
    return _read_cold_warm(ctx, seq_file(ctx), "seqread")


def job_snapread(ctx: JobContext) -> list[Sample]:
    """The read jobs on an immutable snapshot directory.

    Commits the volume (``seq.dat`` and ``rand.dat`` in it), then reads the snapshot's
    copies: ``seq.dat`` sequentially, first read then warm (as ``seqread``), and
    ``rand.dat`` at random, 4 KiB with ``direct=1`` (every read reaches the daemon, as
    ``randread``) and buffered after a full read (as ``randread-warm``: the kernel
    cache). Then both files are verified (crc32c). On targets without snapshots,
    Target.commit gives a copy made under the mount: the same first read of new inodes
    over cached data, for the yardstick's figures to compare with.
    """
    seq_file(ctx)
    rand_file(ctx)
    snap = ctx.target.commit(f"snapread{ctx.rep}-{time.strftime('%H%M%S')}")
    seq, rand = snap / "seq.dat", snap / "rand.dat"
    for path, size in ((seq, ctx.cfg.seq_size), (rand, ctx.cfg.rand_size)):
        if not _size_ok(path, size):
            raise JobError(f"{path} is missing or has the wrong size")
    samples = _read_cold_warm(ctx, seq, "snapread")
    with ctx.timed("snaprandread") as t:
        r = ctx.fio("snaprandread", rand, **_rand_options(ctx, rw="randread", ioengine="psync",
                                                            direct=1))
    samples.append(ctx.fio_sample("snaprandread", r, t, "IOPS"))
    read_whole(rand)  # untimed: fills the page cache
    with ctx.timed("snaprandread-warm") as t:
        r = ctx.fio("snaprandread-warm", rand, **_rand_options(
            ctx, rw="randread", ioengine="psync", invalidate=0))
    samples.append(ctx.fio_sample("snaprandread-warm", r, t, "IOPS"))
    _verify(ctx, seq, ctx.cfg.seq_size, SEQ_VERIFY)
    _verify(ctx, rand, ctx.cfg.rand_size, RAND_VERIFY)
    return samples


def _rand_job(ctx: JobContext, metric: str, writes: bool, **options: object) -> list[Sample]:
    path = rand_file(ctx)
    if writes:
        options.update(do_verify=0, **RAND_VERIFY)
    with ctx.timed(metric) as t:
        r = ctx.fio(metric, path, **_rand_options(ctx, **options))
    if writes:
        _verify(ctx, path, ctx.cfg.rand_size, RAND_VERIFY)
    return [ctx.fio_sample(metric, r, t, "IOPS")]


def job_randwrite(ctx: JobContext) -> list[Sample]:
    return _rand_job(ctx, "randwrite", True, rw="randwrite", ioengine="psync", end_fsync=1)


def job_randwrite_fsync(ctx: JobContext) -> list[Sample]:
    """A database's pattern: every 4 KiB write followed by fsync (fio fsync=1)."""
    return _rand_job(ctx, "randwrite-fsync", True, rw="randwrite", ioengine="psync",
                     fsync=1)


def job_randread(ctx: JobContext) -> list[Sample]:
    return _rand_job(ctx, "randread", False, rw="randread", ioengine="psync", direct=1)


def job_randwrite_aio(ctx: JobContext) -> list[Sample]:
    return _rand_job(ctx, "randwrite-aio", True, rw="randwrite", ioengine="libaio",
                     iodepth=16, direct=1, end_fsync=1)


def job_randread_aio(ctx: JobContext) -> list[Sample]:
    return _rand_job(ctx, "randread-aio", False, rw="randread", ioengine="libaio",
                     iodepth=16, direct=1)


def job_randread_warm(ctx: JobContext) -> list[Sample]:
    read_whole(rand_file(ctx))  # untimed: fills the page cache
    return _rand_job(ctx, "randread-warm", False, rw="randread", ioengine="psync",
                     invalidate=0)


def job_randrw(ctx: JobContext) -> list[Sample]:
    return _rand_job(ctx, "randrw", True, rw="randrw", rwmixread=70, ioengine="libaio",
                     iodepth=16, direct=1, end_fsync=1)


# -- metadata ----------------------------------------------------------------------------


def job_meta(ctx: JobContext) -> list[Sample]:
    """create (1 KiB each), stat, listdir, rename and unlink of N files in one directory."""
    n = ctx.cfg.files
    d = ctx.base / "meta"
    if d.exists():
        run(["rm", "-rf", d], timeout=ctx.cfg.job_timeout)
    d.mkdir()
    names = [os.fspath(d / f"f{i:07d}") for i in range(n)]
    renamed = [os.fspath(d / f"g{i:07d}") for i in range(n)]
    payload = os.urandom(1024)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    samples = []

    def phase(metric: str, fn: Callable[[], None], ops: int, unit: str = "ops/s") -> None:
        with ctx.timed(metric) as t:
            fn()
        samples.append(ctx.sample(metric, ops / t.seconds, unit, t, ops))

    def create() -> None:
        for name in names:
            fd = os.open(name, flags, 0o644)
            os.write(fd, payload)
            os.close(fd)

    def stat_all() -> None:
        for name in names:
            os.stat(name)

    def listdir() -> None:
        for _ in range(ctx.cfg.listdir_repeat):
            if len(os.listdir(d)) != n:
                raise JobError(f"listdir of {d} did not return {n} entries")

    def rename() -> None:
        for old, new in zip(names, renamed, strict=True):
            os.rename(old, new)

    def unlink() -> None:
        for name in renamed:
            os.unlink(name)

    phase("meta-create", create, n)
    phase("meta-stat", stat_all, n)
    if can_drop_caches():
        # dentries and inodes: stat must ask the filesystem again
        drop_caches(2, ctx.target.sync)
        phase("meta-stat-cold", stat_all, n)
    phase("meta-listdir", listdir, n * ctx.cfg.listdir_repeat, "entries/s")
    phase("meta-rename", rename, n)
    phase("meta-unlink", unlink, n)
    if os.listdir(d):
        raise JobError(f"{d} is not empty after unlinking every file")
    d.rmdir()
    return samples


# -- source tree: untar, rm -rf, git status ----------------------------------------------


def _extract(ctx: JobContext, dest: Path) -> None:
    assert ctx.tree is not None
    dest.mkdir()
    run(["tar", "-xf", ctx.tree.tarball, "-C", dest, "--no-same-owner"],
        timeout=ctx.cfg.job_timeout, what="tar -x")


def job_untar(ctx: JobContext) -> list[Sample]:
    assert ctx.tree is not None
    dest = ctx.base / "tree"
    if dest.exists():
        run(["rm", "-rf", dest], timeout=ctx.cfg.job_timeout)
    with ctx.timed("untar") as t:
        _extract(ctx, dest)
    # untimed: every file's content, size, mode and mtime must match the archive
    run(["tar", "--compare", "-f", ctx.tree.tarball, "-C", dest],
        timeout=ctx.cfg.job_timeout, what="tar --compare (verification)")
    return [ctx.sample("untar", ctx.tree.entries / t.seconds, "files/s", t, ctx.tree.entries,
                       mib_per_s=round(ctx.tree.bytes / MiB / t.seconds, 1))]


def job_rmrf(ctx: JobContext) -> list[Sample]:
    assert ctx.tree is not None
    dest = ctx.base / "tree"
    if not dest.exists():
        _extract(ctx, dest)
    with ctx.timed("rmrf") as t:
        run(["rm", "-rf", dest], timeout=ctx.cfg.job_timeout)
    if dest.exists():
        raise JobError(f"{dest} still exists after rm -rf")
    return [ctx.sample("rmrf", ctx.tree.entries / t.seconds, "files/s", t, ctx.tree.entries)]


GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
       "-c", "commit.gpgsign=false", "-c", "core.fsmonitor=false", "-c", "safe.directory=*"]
GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "LC_ALL": "C"}


def _git(ctx: JobContext, repo: Path, *args: str) -> str:
    return run([*GIT, "-C", repo, *args], timeout=ctx.cfg.job_timeout, env=GIT_ENV,
               what=f"git {args[0]}").stdout


def _git_repo(ctx: JobContext) -> tuple[Path, int]:
    """A committed checkout of the source tree (built once per target and run)."""
    repo = ctx.base / "git"
    if ctx.target.state.get("git") != repo:
        if repo.exists():
            run(["rm", "-rf", repo], timeout=ctx.cfg.job_timeout)
        _extract(ctx, repo)
        _git(ctx, repo, "init", "-q")
        _git(ctx, repo, "add", "-A")
        _git(ctx, repo, "commit", "-q", "-m", "source tree")
        ctx.target.state["git"] = repo
        ctx.target.state["git_files"] = _git(ctx, repo, "ls-files", "-z").count("\0")
    return repo, ctx.target.state["git_files"]


def job_gitstatus(ctx: JobContext) -> list[Sample]:
    repo, files = _git_repo(ctx)
    _git(ctx, repo, "status", "--porcelain")  # warm-up; may refresh the index
    runs = ctx.cfg.git_runs

    def status() -> None:
        out = _git(ctx, repo, "status", "--porcelain")
        if out.strip():
            raise JobError(f"git status is not clean: {out.strip()[:200]}")

    samples = []
    with ctx.timed("gitstatus") as t:
        for _ in range(runs):
            status()
    samples.append(ctx.sample("gitstatus", files * runs / t.seconds, "files/s", t,
                              files * runs, ms_per_run=round(t.seconds * 1000 / runs, 1)))
    if can_drop_caches():
        drop_caches(2, ctx.target.sync)
        with ctx.timed("gitstatus-cold") as t:
            status()
        samples.append(ctx.sample("gitstatus-cold", files / t.seconds, "files/s", t, files,
                                  ms_per_run=round(t.seconds * 1000, 1)))
    return samples


@dataclass
class JobSpec:
    fn: Callable[[JobContext], list[Sample]]
    metrics: tuple[str, ...]
    needs_tree: bool = False


JOBS: dict[str, JobSpec] = {
    "seqwrite": JobSpec(job_seqwrite, ("seqwrite",)),
    "seqread": JobSpec(job_seqread, ("seqread", "seqread-warm")),
    "snapread": JobSpec(job_snapread, ("snapread", "snapread-warm", "snaprandread",
                                       "snaprandread-warm")),
    "randwrite": JobSpec(job_randwrite, ("randwrite",)),
    "randwrite-fsync": JobSpec(job_randwrite_fsync, ("randwrite-fsync",)),
    "randread": JobSpec(job_randread, ("randread",)),
    "randwrite-aio": JobSpec(job_randwrite_aio, ("randwrite-aio",)),
    "randread-aio": JobSpec(job_randread_aio, ("randread-aio",)),
    "randread-warm": JobSpec(job_randread_warm, ("randread-warm",)),
    "randrw": JobSpec(job_randrw, ("randrw",)),
    "meta": JobSpec(job_meta, ("meta-create", "meta-stat", "meta-stat-cold", "meta-listdir",
                               "meta-rename", "meta-unlink")),
    "untar": JobSpec(job_untar, ("untar",), needs_tree=True),
    "rmrf": JobSpec(job_rmrf, ("rmrf",), needs_tree=True),
    "gitstatus": JobSpec(job_gitstatus, ("gitstatus", "gitstatus-cold"), needs_tree=True),
}

