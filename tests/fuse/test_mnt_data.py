"""File data on a mounted volume: reads and writes at unaligned offsets across chunk
boundaries, truncate, sparse files, large files. The repository uses 64 KiB chunks so
that small files already span many chunks."""

import hashlib
import os
import random

import pytest
from fusehelpers import GiB, KiB, MiB, data, drop_caches, read_bytes, write_bytes

CHUNK_SIZE = "64K"
CH = 64 * KiB


def check_file(path, ref: bytes, cold: bool = True):
    """The file's size and every byte equal REF (after dropping the page cache, so the
    bytes come from the filesystem, not the kernel's cache)."""
    if cold:
        drop_caches()
    assert os.stat(path).st_size == len(ref)
    got = read_bytes(path)
    if got != ref:
        n = min(len(got), len(ref))
        first = next((i for i in range(n) if got[i] != ref[i]), n)
        raise AssertionError(f"{path}: content differs from reference at byte {first} "
                             f"(len {len(got)} vs {len(ref)})")


def test_create_write_read_small_file(wd):
    p = wd / "small"
    write_bytes(p, b"hello, snapfs\n")
    assert p.read_bytes() == b"hello, snapfs\n"
    check_file(p, b"hello, snapfs\n")


def test_empty_file_has_size_zero_and_reads_empty(wd):
    p = wd / "empty"
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    assert os.stat(p).st_size == 0
    assert read_bytes(p, 0, 100) == b""


def test_random_unaligned_writes_match_reference(wd):
    rng = random.Random(1234)
    p = wd / "rand"
    ref = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(300):
            if rng.random() < 0.4:  # straddle a chunk boundary by a few bytes
                off = rng.randrange(1, 12) * CH - rng.randrange(0, 300)
                n = rng.randrange(1, 1000)
            else:
                off = rng.randrange(0, 10 * CH)
                n = rng.choice([1, 7, 4095, 4097, CH - 1, CH, CH + 1, rng.randrange(1, 3 * CH)])
            buf = data(n, seed=i)
            assert os.pwrite(fd, buf, off) == n
            if off > len(ref):
                ref += bytes(off - len(ref))
            ref[off:off + n] = buf
            if i % 50 == 49:  # unaligned reads through the same descriptor
                for _ in range(20):
                    ro = rng.randrange(0, len(ref))
                    rn = rng.randrange(1, 3 * CH)
                    assert os.pread(fd, rn, ro) == bytes(ref[ro:ro + rn]), (i, ro, rn)
    finally:
        os.close(fd)
    check_file(p, bytes(ref))


def test_overwrite_across_boundaries_keeps_surrounding_bytes(wd):
    p = wd / "over"
    ref = bytearray(data(3 * CH + 100, seed="base"))
    write_bytes(p, bytes(ref))
    for off, n in [(CH - 6, 20), (2 * CH - 1, 2), (0, 1), (3 * CH + 99, 1), (100, 2 * CH)]:
        buf = data(n, seed=off)
        write_bytes(p, buf, off)
        ref[off:off + n] = buf
    check_file(p, bytes(ref))


def test_write_beyond_eof_leaves_zero_gap(wd):
    p = wd / "gap"
    write_bytes(p, b"0123456789")
    write_bytes(p, b"tail", 3 * CH + 17)
    ref = b"0123456789" + bytes(3 * CH + 17 - 10) + b"tail"
    check_file(p, ref)


def test_read_at_and_past_eof(wd):
    p = wd / "eof"
    write_bytes(p, data(CH + 5))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, CH) == data(CH + 5)[CH:]
        assert os.pread(fd, 100, CH + 5) == b""
        assert os.pread(fd, 100, 10 * CH) == b""
    finally:
        os.close(fd)


def test_buffered_small_writes_and_reads(wd):
    p = wd / "lines.txt"
    lines = [f"line {i} {'x' * (i % 97)}\n" for i in range(20000)]
    with open(p, "w") as f:
        f.writelines(lines)
    drop_caches()
    with open(p) as f:
        assert f.readlines() == lines


def test_two_descriptors_see_each_others_writes(wd):
    p = wd / "shared"
    write_bytes(p, bytes(2 * CH))
    a = os.open(p, os.O_RDWR)
    b = os.open(p, os.O_RDWR)
    try:
        os.pwrite(a, b"AAAA", CH - 2)
        assert os.pread(b, 8, CH - 4) == b"\0\0AAAA\0\0"
        os.pwrite(b, b"BB", CH)
        assert os.pread(a, 8, CH - 4) == b"\0\0AABB\0\0"
    finally:
        os.close(a)
        os.close(b)


def test_copy_file_range_unaligned(wd):
    src, dst = wd / "cfr-src", wd / "cfr-dst"
    payload = data(5 * CH + 123, seed="cfr")
    write_bytes(src, payload)
    write_bytes(dst, b"")
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY)
    try:
        done = 0
        want = 4 * CH + 7
        while done < want:
            n = os.copy_file_range(fi, fo, want - done, 1000 + done, done)
            assert n > 0
            done += n
    finally:
        os.close(fi)
        os.close(fo)
    check_file(dst, payload[1000:1000 + want])


def test_data_survives_remount(mount, vd):
    p = vd / "persist"
    payload = data(4 * CH + 3, seed="persist")
    write_bytes(p, payload)
    mount.remount()
    check_file(p, payload)


# --------------------------------------------------------------------------- truncate


def test_truncate_shrink(wd):
    p = wd / "t"
    payload = data(3 * CH + 10)
    write_bytes(p, payload)
    os.truncate(p, CH + 5)
    check_file(p, payload[:CH + 5])


def test_truncate_extend_reads_zeros(wd):
    p = wd / "t"
    write_bytes(p, b"abc")
    os.truncate(p, 2 * CH + 1)
    check_file(p, b"abc" + bytes(2 * CH + 1 - 3))


def test_truncate_shrink_then_extend_reads_zeros_not_old_data(wd):
    p = wd / "t"
    payload = data(4 * CH, seed="old")
    write_bytes(p, payload)
    os.truncate(p, CH + 100)  # mid-chunk: the rest of that chunk must not come back
    os.truncate(p, 4 * CH)
    check_file(p, payload[:CH + 100] + bytes(4 * CH - CH - 100))


def test_shrink_then_write_past_end_reads_zeros_in_gap(wd):
    p = wd / "t"
    payload = data(3 * CH, seed="old2")
    write_bytes(p, payload)
    os.truncate(p, 10)
    write_bytes(p, b"Z", 2 * CH + 5)
    check_file(p, payload[:10] + bytes(2 * CH + 5 - 10) + b"Z")


def test_ftruncate_through_open_descriptor(wd):
    p = wd / "t"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data(CH * 2, seed=3))
        os.ftruncate(fd, 777)
        assert os.fstat(fd).st_size == 777
        assert os.pread(fd, 2000, 0) == data(CH * 2, seed=3)[:777]
    finally:
        os.close(fd)
    check_file(p, data(CH * 2, seed=3)[:777])


def test_open_with_o_trunc_empties_file(wd):
    p = wd / "t"
    write_bytes(p, data(CH + 1))
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    check_file(p, b"new")


# --------------------------------------------------------------------------- sparse / large


def test_sparse_write_at_3gib(wd):
    p = wd / "sparse"
    off = 3 * GiB
    tail = data(5000, seed="sparse")
    write_bytes(p, tail, off)
    st = os.stat(p)
    assert st.st_size == off + len(tail)
    drop_caches()
    for probe in (0, 1, CH - 1, GiB + 12345, 2 * GiB, off - 4096):
        assert read_bytes(p, probe, 4096) == bytes(4096), f"hole at {probe} is not zeros"
    assert read_bytes(p, off - 10, 5010) == bytes(10) + tail
    assert st.st_blocks * 512 < 64 * MiB, f"sparse file allocates {st.st_blocks} blocks"
    assert st.st_blocks * 512 < st.st_size


def test_file_extended_by_truncate_is_sparse(wd):
    p = wd / "sparse2"
    write_bytes(p, b"x")
    os.truncate(p, 2 * GiB)
    st = os.stat(p)
    assert st.st_size == 2 * GiB
    assert st.st_blocks * 512 < 64 * MiB
    assert read_bytes(p, GiB, 1000) == bytes(1000)


@pytest.mark.slow
def test_multi_gib_file_writes_at_offsets(wd):
    p = wd / "big"
    offsets = [0, GiB + 12345, 2 * GiB - 4097, 4 * GiB + 1, 5 * GiB - MiB]
    for i, off in enumerate(offsets):
        write_bytes(p, data(MiB, seed=i), off)
    assert os.stat(p).st_size == 5 * GiB
    drop_caches()
    for i, off in enumerate(offsets):
        assert read_bytes(p, off, MiB) == data(MiB, seed=i), f"block at {off}"
    for a, b in zip(offsets, offsets[1:], strict=False):
        mid = (a + MiB + b) // 2
        assert read_bytes(p, mid, 64 * KiB) == bytes(64 * KiB), f"hole at {mid}"
    # overwrite straddling the 4 GiB line (32-bit offset overflow) and re-read
    write_bytes(p, b"Y" * 8192, 4 * GiB - 4096)
    drop_caches()
    assert read_bytes(p, 4 * GiB - 4097, 8194) == b"\0" + b"Y" * 8192 + data(MiB, seed=3)[4095:4096]


@pytest.mark.slow
def test_sequential_256mib_roundtrip(wd):
    p = wd / "seq"
    h = hashlib.sha256()
    block = bytearray(data(MiB, seed="seq"))
    with open(p, "wb") as f:
        for i in range(256):
            block[:8] = i.to_bytes(8, "little")
            h.update(block)
            f.write(block)
    assert os.stat(p).st_size == 256 * MiB
    drop_caches()
    h2 = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(4 * MiB):
            h2.update(chunk)
    assert h2.hexdigest() == h.hexdigest()
