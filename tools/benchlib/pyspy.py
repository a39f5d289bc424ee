"""py-spy profiles of the FUSE daemons during the timed part of each job (``--profile``).

``tools/bench --profile`` starts ``py-spy record -f raw`` on the target's daemon when a
timed part begins and stops it (SIGINT: py-spy then writes its file) when it ends. Files:
``WORKDIR/profiles/<target>.<metric>.r<repeat>.txt``, one line per distinct stack
("frame;frame;... count", outermost frame first). Idle threads are not sampled, so the
samples are where the daemon's threads were running (or waiting for the GIL).

Summarise one or more of them (the share of samples per function, self and inclusive)::

    .venv/bin/python tools/benchlib/pyspy.py WORKDIR/profiles/snapfs.randread.r0.txt

The sampling rate is low on purpose (50 Hz): ``py-spy record`` once hung at 500 Hz here,
and every sample stops the daemon for a moment. A short job gives few samples; read the
shares, not the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 50  # samples per second
STOP_TIMEOUT = 30.0


class Recorder:
    """``py-spy record`` attached to one process, until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = RATE) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(exe):
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", os.fspath(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:  # a hung py-spy must not hang the benchmark
            self.proc.kill()
            self.proc.wait()


def available() -> bool:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return os.path.exists(exe)


_LINE = re.compile(r"^(.*) (\d+)$")


def load(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            stacks[tuple(m.group(1).split(";"))] += int(m.group(2))
    return stacks


def _func(frame: str) -> str:
    """'write (snapfs/vfs/view.py:123)' -> 'write (snapfs/vfs/view.py)'."""
    return re.sub(r":\d+\)$", ")", frame)


# Leaf frames where a thread waits although py-spy counts it as active: an idle trio
# worker thread (its lock acquire) and the event loop's epoll wait.
IDLE_LEAVES = ("WorkerThread._work (trio/_core/_thread_cache.py",
               "EpollIOManager.get_events (trio/_core/_io_epoll.py")


def is_idle(stack: tuple[str, ...]) -> bool:
    """Also the loop watch's watchdog thread between its looks (snapfs/fuse/loopwatch.py):
    py-spy counts a timed Event.wait as running."""
    return not stack or stack[-1].startswith(IDLE_LEAVES) or (
        stack[-1].startswith("Condition.wait (threading.py")
        and any(f.startswith("LoopWatch._watchdog (") for f in stack))


SNAPFS_WORK = ("snapfs/fuse/ops.py", "snapfs/vfs/", "snapfs/store/", "snapfs/graph/",
               "snapfs/crypto/", "snapfs/control.py")


def category(stack: tuple[str, ...]) -> str:
    """Where a (busy) sample's time goes, coarsely: by thread, then by the leaf frame."""
    leaf = stack[-1]
    text = ";".join(stack)
    if "_handle_job (trio/_core/_thread_cache.py" in text:
        jobs = [f for f in stack if f.split(" (")[-1].startswith(SNAPFS_WORK)]
        if jobs and not leaf.startswith(("trio/", "outcome/")) and "(trio/" not in leaf:
            return "worker thread: " + _func(jobs[0]).split(" (")[0]
        return "worker thread: trio (job hand-over)"
    if leaf.startswith("async_wrapper.<locals>.wrapper (") and "_pyfuse3.py" in leaf:
        return "trio thread: pyfuse3 Cython (read request, parse, reply)"
    if "(trio/" in leaf or "(outcome/" in leaf:
        if "to_thread_run_sync" in text or "_entry_queue.py" in text or \
                "_wakeup_socketpair.py" in text:
            return "trio thread: thread hops (to_thread, wakeups)"
        return "trio thread: trio scheduling, instrumentation"
    if "Catalog." in leaf or "sqlite" in leaf:
        return "trio thread: SQLite"
    if any(f.split(" (")[-1].startswith(SNAPFS_WORK) for f in stack):
        return "trio thread: snapfs Python (" + _func(leaf).split(" (")[0] + ")" \
            if leaf.split(" (")[-1].startswith(SNAPFS_WORK) else \
            "trio thread: called by snapfs (" + _func(leaf) + ")"
    return "trio thread: other (" + _func(leaf) + ")"


def summary(stacks: Counter[tuple[str, ...]], top: int = 25, idle: bool = False) -> str:
    all_samples = sum(stacks.values())
    if not idle:
        stacks = Counter({k: n for k, n in stacks.items() if not is_idle(k)})
    total = sum(stacks.values())
    if not total:
        return "no samples"
    cats: Counter[str] = Counter()
    for stack, n in stacks.items():
        cats[category(stack)] += n
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    lines_own: Counter[str] = Counter()
    for stack, n in stacks.items():
        if not stack:
            continue
        own[_func(stack[-1])] += n
        lines_own[stack[-1]] += n
        for f in {_func(f) for f in stack}:
            incl[f] += n
    out = [f"{total} busy samples of {all_samples}" + (" (idle included)" if idle else
                                                      " (idle waits left out)")]
    out.append("\nby category:")
    out += [f"  {n * 100 / total:5.1f}%  {c}" for c, n in cats.most_common(top)]
    out.append("\nself (the function running):")
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("\nself, by line:")
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in lines_own.most_common(top)]
    out.append("\ninclusive (the function or what it called):")
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in incl.most_common(top * 2)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarise py-spy raw profiles (tools/bench "
                                            "--profile)")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--idle", action="store_true", help="keep the samples of idle waits")
    args = p.parse_args(argv)
    stacks: Counter[tuple[str, ...]] = Counter()
    for f in args.files:
        stacks.update(load(f))
    print(summary(stacks, args.top, args.idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
