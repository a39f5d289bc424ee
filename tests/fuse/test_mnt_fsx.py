"""File-exerciser torture: thousands of random reads, writes, truncates, mmap writes,
fsyncs, reopenings, cache drops and commits on one file, each checked against an
in-memory model of what the file must contain (the idea of fsx, written for snapfs).

A mismatch names the operation number and the seed, and the last operations are in the
failure message, so a failure can be replayed with SNAPFS_FSX_SEED.
"""

from __future__ import annotations

import mmap
import os
import random

import pytest
from fusehelpers import IS_SNAPFS, KiB, MiB, drop_caches, read_bytes

MAX_SIZE = 2 * MiB + 3 * KiB  # crosses many 128 KiB chunk boundaries, not aligned
OPS = int(os.environ.get("SNAPFS_FSX_OPS", "2000"))


class Exerciser:
    def __init__(self, path, rng: random.Random, mount) -> None:
        self.path = path
        self.rng = rng
        self.mount = mount
        self.model = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.log: list[str] = []
        self.snapshots: list[tuple[str, bytes]] = []

    # -- operations ------------------------------------------------------------------------
    def write(self) -> None:
        off = self.rng.randrange(0, MAX_SIZE)
        n = min(self.rng.choice([1, 7, 512, 4096, 65536, 131072, 300_000]), MAX_SIZE - off)
        payload = self.rng.randbytes(n)
        self.log.append(f"write {off}+{n}")
        assert os.pwrite(self.fd, payload, off) == n
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off:off + n] = payload

    def truncate(self) -> None:
        size = self.rng.choice([0, self.rng.randrange(0, MAX_SIZE),
                                max(0, len(self.model) - self.rng.randrange(1, 5000)),
                                len(self.model) + self.rng.randrange(1, 300_000)])
        size = min(size, MAX_SIZE)
        self.log.append(f"truncate {size}")
        os.ftruncate(self.fd, size)
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))

    def read(self) -> None:
        off = self.rng.randrange(0, MAX_SIZE)
        n = self.rng.choice([1, 4096, 100_000, 262_144])
        self.log.append(f"read {off}+{n}")
        got = os.pread(self.fd, n, off)
        want = bytes(self.model[off:off + n])
        self.check(got == want, f"read {off}+{n}: {len(got)} bytes, expected {len(want)}",
                   got, want)

    def map_write(self) -> None:
        if len(self.model) < 2:
            return
        off = self.rng.randrange(0, len(self.model) - 1)
        n = min(self.rng.choice([1, 100, 5000, 70_000]), len(self.model) - off)
        payload = self.rng.randbytes(n)
        self.log.append(f"mmap write {off}+{n}")
        with mmap.mmap(self.fd, len(self.model)) as m:
            m[off:off + n] = payload
            if self.rng.random() < 0.5:
                m.flush()
        self.model[off:off + n] = payload

    def map_read(self) -> None:
        if not self.model:
            return
        self.log.append(f"mmap read all ({len(self.model)})")
        with mmap.mmap(self.fd, len(self.model), prot=mmap.PROT_READ) as m:
            got = m[:]
        self.check(got == bytes(self.model), "mmap read", got, bytes(self.model))

    def fsync(self) -> None:
        self.log.append("fsync")
        os.fsync(self.fd)

    def reopen(self) -> None:
        self.log.append("close+reopen")
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDWR)

    def drop(self) -> None:
        self.log.append("fsync+drop caches")
        os.fsync(self.fd)
        drop_caches()

    def commit(self) -> None:
        label = f"fsx{len(self.snapshots)}"
        self.log.append(f"commit {label}")
        os.fsync(self.fd)
        snap = self.mount.commit(self.mount.vol, label)
        self.snapshots.append((str(snap / self.path.relative_to(self.mount.vol)),
                               bytes(self.model)))

    # -- checking --------------------------------------------------------------------------
    def check(self, ok: bool, what: str, got: bytes, want: bytes) -> None:
        if ok:
            return
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                     min(len(got), len(want)))
        recent = "\n  ".join(self.log[-15:])
        pytest.fail(f"op {len(self.log)}: {what} differs from the model at byte {first}; "
                    f"last operations:\n  {recent}", pytrace=False)

    def verify_all(self) -> None:
        st = os.fstat(self.fd)
        assert st.st_size == len(self.model), f"size {st.st_size}, model {len(self.model)}"
        self.check(read_bytes(self.path) == bytes(self.model), "whole file",
                   read_bytes(self.path), bytes(self.model))
        for snap_path, content in self.snapshots:  # snapshots never change
            got = read_bytes(snap_path)
            self.check(got == content, f"snapshot {snap_path}", got, content)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [int(os.environ.get("SNAPFS_FSX_SEED", "1")), 2])
def test_random_operations_match_the_model(fresh_mount, seed):
    m = fresh_mount
    rng = random.Random(seed)
    ex = Exerciser(m.vol / f"fsx-{seed}", rng, m)
    ops = [(ex.write, 30), (ex.read, 25), (ex.truncate, 8), (ex.map_write, 8),
           (ex.map_read, 4), (ex.fsync, 5), (ex.reopen, 5), (ex.drop, 1)]
    if IS_SNAPFS:
        ops.append((ex.commit, 1))
    fns, weights = zip(*ops, strict=True)
    try:
        for i in range(OPS):
            rng.choices(fns, weights)[0]()
            if i % 250 == 249:
                ex.verify_all()
        ex.verify_all()
    finally:
        os.close(ex.fd)
    m.remount()  # and everything survives an unmount
    ex.fd = os.open(ex.path, os.O_RDONLY)
    try:
        ex.verify_all()
    finally:
        os.close(ex.fd)
