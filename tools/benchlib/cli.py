"""tools/bench: run every job on every target, interleaved, and report side by side.

Order: for each repeat, for each job, every target in turn (the order of the targets
rotates from one repeat to the next), so that slow drifts of the machine (the virtual
disk's throughput swings) hit every target alike. All targets stay mounted for the whole
run and are always unmounted at the end, also on failure, Ctrl-C or SIGTERM.

Exit status: 0 when every job passed; 1 when a job failed (including fio data
verification) or, with --smoke, when a target could not be set up and is not listed in
--allow-missing; 2 for usage errors; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from . import fusetrace
from .jobs import JOBS, Config, JobContext, Sample, Tree
from .pyspy import available as profile_available
from .report import (
    request_rows,
    request_table,
    summarize,
    table,
    variant_rows,
    variant_table,
    write_json,
)
from .targets import TARGET_NAMES, Target, cleanup_runroot, is_target_name, make_target
from .tree import build_tree
from .util import (
    GiB,
    JobError,
    MiB,
    TargetUnavailable,
    Watchdog,
    fio_has_engine,
    log,
    machine_info,
    mounts_under,
    safe_rmtree,
)

# Targets whose absence is never an error, even with --smoke (none: every target exists).
ALWAYS_OPTIONAL: set[str] = set()
LOCK_WAIT = 1800.0  # seconds to wait for another run in the same work directory

PRESETS: dict[str, dict[str, object]] = {
    # the sizes: files of at least 2 GiB, 10,000 small files
    "full": dict(seq_size=2 * GiB, rand_size=1 * GiB, runtime=30.0, files=10_000,
                 listdir_repeat=5, tree_files=None, git_runs=10, job_timeout=1800.0,
                 history=1000),
    # about two minutes for plain + passthrough + snapfs
    "quick": dict(seq_size=256 * MiB, rand_size=128 * MiB, runtime=3.0, files=2_000,
                  listdir_repeat=3, tree_files=1_500, git_runs=3, job_timeout=600.0,
                  history=1000),
    # seconds: proves that every job and target still runs (make test)
    "smoke": dict(seq_size=8 * MiB, rand_size=4 * MiB, runtime=None, files=100,
                  listdir_repeat=1, tree_files=100, git_runs=1, job_timeout=120.0,
                  history=20),
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 256M)")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    return int(float(m.group(1)) * factor[m.group(2).lower()])


def csv_list(choices: tuple[str, ...] | list[str],
             known: Callable[[str], bool] | None = None) -> Callable[[str], list[str]]:
    """A comma-separated list of names from choices (or accepted by known)."""
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items
                   if item not in choices and not (known and known(item))]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)} (choose from {', '.join(choices)})")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/bench",
        description="Benchmark snapfs side by side with a plain directory and a tuned "
                    "pyfuse3 passthrough (issue 5). See BENCHMARKS.md.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about two minutes, small sizes")
    mode.add_argument("--smoke", action="store_true",
                      help="seconds, tiny sizes: proves every job and target still runs")
    p.add_argument("--targets", type=csv_list(TARGET_NAMES, is_target_name),
                   default=list(TARGET_NAMES),
                   help=f"comma-separated, default {','.join(TARGET_NAMES)}; also "
                        "snapfs-<N>k: snapfs with N KiB chunks (snapfs-32k, snapfs-64k...)")
    p.add_argument("--jobs", type=csv_list(list(JOBS)), default=list(JOBS),
                   help=f"comma-separated, default all: {','.join(JOBS)}")
    p.add_argument("--repeat", type=int, default=1, help="run everything N times (spread)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/snapfs-bench"))
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--allow-missing", type=csv_list(TARGET_NAMES), default=[],
                   help="with --smoke: targets that may fail to set up (skipped)")
    p.add_argument("--seq-size", type=parse_size, help="sequential file size (default 2G)")
    p.add_argument("--rand-size", type=parse_size, help="random-I/O file size (default 1G)")
    p.add_argument("--runtime", type=float, help="seconds per random job (default 30)")
    p.add_argument("--files", type=int, help="files of the metadata job (default 10000)")
    p.add_argument("--tree-files", type=int, help="files of the source tree (default all)")
    p.add_argument("--job-timeout", type=float, help="kill a target's daemon after this")
    p.add_argument("--history", type=int,
                   help="commits made on snapfs-history before the jobs (default 1000; "
                        "20 with --smoke)")
    p.add_argument("--keep", action="store_true", help="keep the targets' data afterwards")
    p.add_argument("--requests", action="store_true",
                   help="count the FUSE requests of every timed part per opcode (perf and "
                        "the fuse:fuse_request_send tracepoint; slows the daemons down a "
                        "little: compare rates only between runs without it)")
    p.add_argument("--profile", action="store_true",
                   help="record py-spy profiles of the FUSE daemons during every timed part "
                        "into WORKDIR/profiles (see tools/benchlib/pyspy.py)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.history is not None and args.history < 1:
        p.error("--history must be at least 1")
    return args


def make_config(args: argparse.Namespace) -> Config:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = dict(PRESETS[mode])
    for key in ("seq_size", "rand_size", "runtime", "files", "tree_files", "job_timeout",
                "history"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    preset["requests"] = args.requests
    if args.profile:
        preset["profile_dir"] = os.fspath(args.workdir.resolve() / "profiles")
    return Config(mode=mode, **preset)  # type: ignore[arg-type]


class Interrupted(BaseException):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _fmt_sample(s: Sample) -> str:
    if s.error:
        return f"ERROR: {s.error}"
    cpu = "" if s.cpu_norm is None else f"   daemon CPU {s.cpu_norm:.3g} {s.cpu_unit}"
    return f"{s.value:,.1f} {s.unit}{cpu}"


def run_job(job: str, ctx: JobContext, watchdog: Watchdog, timeout: float) -> list[Sample]:
    target = ctx.target
    first_metric = JOBS[job].metrics[0]
    try:
        target.check()
        # untimed: no dirty data of an earlier job is written back during this one (syncfs
        # of this target's filesystems only: see util.sync_fs)
        target.sync()
        with watchdog.arm(timeout, target.kill):
            return JOBS[job].fn(ctx)
    except (JobError, OSError) as exc:
        return [Sample(first_metric, target.name, ctx.rep, None, "", error=str(exc))]
    except Exception as exc:  # a bug in a job must not leave mounts behind or stop the run
        error = f"{type(exc).__name__}: {exc}"
        return [Sample(first_metric, target.name, ctx.rep, None, "", error=error)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    workdir: Path = args.workdir.resolve()
    jobs: list[str] = args.jobs
    errors: list[str] = []

    if shutil.which("fio") is None and any(j not in ("meta", "untar", "rmrf", "gitstatus")
                                           for j in jobs):
        log("error: fio is not installed (apt-get install fio)")
        return 1
    if any(j.endswith("-aio") or j == "randrw" for j in jobs) and not fio_has_engine("libaio"):
        log("error: this fio has no libaio engine")
        return 1

    if args.profile and not profile_available():
        log("error: --profile needs py-spy (.venv/bin/pip install py-spy)")
        return 1

    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / ".lock", "w")  # noqa: SIM115 - held for the whole run
    deadline = time.monotonic() + LOCK_WAIT
    while True:  # one run at a time per work directory (make test may run concurrently)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log(f"error: another tools/bench is still running in {workdir}")
                return 1
            if deadline - time.monotonic() > LOCK_WAIT - 1:
                log(f"waiting for another tools/bench running in {workdir} ...")
            time.sleep(1)
    if args.requests:
        try:
            fusetrace.prepare()  # may mount the tracefs: unmounted by finish() below
        except fusetrace.TraceUnavailable as exc:
            log(f"error: --requests: {exc}")
            return 1

    machine = machine_info(workdir)
    log(f"tools/bench ({cfg.mode}): targets {','.join(args.targets)}; jobs {','.join(jobs)}; "
        f"repeat {args.repeat}; workdir {workdir} ({machine['workdir_fs']})")

    old_handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    runroot = workdir / "run"
    started: list[Target] = []  # everything that may have mounted something
    targets: list[Target] = []  # set up and usable
    status: dict[str, dict[str, str]] = {}
    samples: list[Sample] = []
    tree: Tree | None = None
    interrupted = False
    try:
        cleanup_runroot(runroot)
        runroot.mkdir()
        # ext4: spread the targets' directories over block groups (Orlov "top directory"),
        # so that one target's deleted files do not slow down another's creates (ext4
        # without a journal avoids reusing recently deleted inodes, and checking them is
        # slow: see BENCHMARKS.md).
        subprocess.run(["chattr", "+T", runroot], capture_output=True, check=False)
        if any(JOBS[j].needs_tree for j in jobs):
            tree = build_tree(workdir / "cache", cfg.tree_files)
            log(f"source tree: {tree.entries} entries, {tree.files} files, "
                f"{tree.bytes / MiB:.0f} MiB")

        optional = set(args.allow_missing) | ALWAYS_OPTIONAL
        for name in args.targets:
            target = make_target(name, runroot, history=cfg.history)
            started.append(target)
            try:
                target.setup()
            except (TargetUnavailable, JobError, OSError) as exc:
                target.teardown()
                status[name] = {"status": "unavailable", "reason": str(exc)}
                if cfg.mode == "smoke" and name not in optional:
                    errors.append(f"target {name} unavailable: {exc}")
                    log(f"ERROR: target {name} is unavailable: {exc}")
                else:
                    log(f"skipping target {name}: {exc}")
                continue
            targets.append(target)
            status[name] = {"status": "ok", "base": os.fspath(target.base), **target.info}
            log(f"target {name}: ready at {target.base}"
                + (f" (daemon pid {target.pid})" if target.pid else ""))

        watchdog = Watchdog()
        for rep in range(args.repeat):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)] if targets else []
            for job in jobs:
                for target in order:
                    ctx = JobContext(cfg, target, rep, tree)
                    t0 = time.monotonic()
                    got = run_job(job, ctx, watchdog, cfg.job_timeout)
                    samples += got
                    for s in got:
                        log(f"[{rep + 1}/{args.repeat}] {s.metric:<15} {target.name:<12} "
                            f"{_fmt_sample(s)}")
                        if s.error:
                            errors.append(f"{s.metric} on {target.name}: {s.error}")
                    log(f"{'':>6}({job} on {target.name}: {time.monotonic() - t0:.1f} s)")
    except (KeyboardInterrupt, Interrupted) as exc:
        interrupted = True
        errors.append(f"interrupted ({exc or 'SIGINT'})")
        log("interrupted: unmounting")
    finally:
        # Ctrl-C again must not interrupt the unmounting.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for target in reversed(started):
            try:
                target.teardown()
            except Exception as exc:  # keep going: every mount must go
                log(f"WARNING: teardown of {target.name} failed: {exc}")
        for target in started:
            for path in target.logs():
                if path.exists():
                    (workdir / "logs").mkdir(exist_ok=True)
                    with contextlib.suppress(OSError):
                        shutil.copy(path, workdir / "logs" / f"{target.name}.log")
        leftover = mounts_under(runroot)
        if leftover:
            errors.append(f"could not unmount: {', '.join(leftover)}")
            log(f"ERROR: still mounted: {', '.join(leftover)}")
        elif not args.keep:
            with contextlib.suppress(OSError, RuntimeError):
                safe_rmtree(runroot)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        fusetrace.finish()

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    ran = [t.name for t in targets]
    rows = summarize(samples, ran, jobs)
    print(f"\n## tools/bench ({cfg.mode}) — {machine['date']}\n")
    print(f"machine: {machine['nproc']} CPUs ({machine['cpu']}), kernel {machine['kernel']}, "
          f"workdir {machine['workdir']} on {machine['workdir_fs']}")
    print(f"load average (1, 5, 15 min) at start {machine['loadavg_start']}, "
          f"at end {machine['loadavg_end']}")
    print(f"sizes: seq {cfg.seq_size / MiB:.0f} MiB, rand {cfg.rand_size / MiB:.0f} MiB, "
          f"runtime {cfg.runtime or 'one pass'}"
          f"{' s' if cfg.runtime else ''}, files {cfg.files}, "
          f"tree {tree.entries if tree else '-'} entries, repeat {args.repeat}")
    for name, st in status.items():
        if st["status"] != "ok":
            print(f"skipped: {name}: {st['reason']}")
        elif "history" in st:
            h = st["history"]
            print(f"{name}: history of {h['commits']} commits made in {h['seconds']} s "
                  f"(median commit {h['commit_median_ms']} ms, max {h['commit_max_ms']} ms)")
    print()
    print(table(rows))
    variants = variant_table(variant_rows(rows))
    if variants:
        print("\nsnapfs variants (rates: above 1.00x is faster; daemon CPU: above 1.00x "
              "costs more):\n")
        print(variants)
    requests = request_table(request_rows(samples))
    if requests:
        print("\nFUSE requests (--requests; summed over the repeats):\n")
        print(requests)
    if errors:
        print("\nerrors:")
        for e in errors:
            print(f"- {e}")
    if args.json:
        config = {**asdict(cfg), "targets": args.targets, "jobs": jobs, "repeat": args.repeat,
                  "workdir": os.fspath(workdir)}
        write_json(args.json, machine=machine, config=config, targets=status,
                   samples=samples, rows=rows, errors=errors)
        log(f"wrote {args.json}")
    if interrupted:
        return 130
    return 1 if errors else 0
