"""I/O semantics on a mounted volume: fsync/fdatasync, mmap, O_APPEND, files that are
unlinked while open."""

import errno
import mmap
import os

from fusehelpers import KiB, data, drop_caches, expect_errno, read_bytes, write_bytes

CHUNK_SIZE = "64K"
CH = 64 * KiB

# --------------------------------------------------------------------------- fsync


def test_fsync_and_fdatasync_after_writes(wd):
    fd = os.open(wd / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data(3 * CH + 1))
        os.fsync(fd)
        os.pwrite(fd, b"more", 5)
        os.fdatasync(fd)
        os.fsync(fd)  # nothing dirty: still fine
    finally:
        os.close(fd)
    assert read_bytes(wd / "f")[5:9] == b"more"


def test_fsync_on_read_only_descriptor(wd):
    write_bytes(wd / "f", b"x")
    fd = os.open(wd / "f", os.O_RDONLY)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def test_fsync_on_directory(wd):
    write_bytes(wd / "f", b"x")
    fd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_fsynced_data_survives_remount(mount, vd):
    payload = data(2 * CH + 77, seed="fsync")
    fd = os.open(vd / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    mount.remount()
    assert read_bytes(vd / "f") == payload


def test_o_sync_writes(wd):
    fd = os.open(wd / "f", os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    try:
        for i in range(10):
            os.write(fd, bytes([i]) * 1000)
    finally:
        os.close(fd)
    assert read_bytes(wd / "f") == b"".join(bytes([i]) * 1000 for i in range(10))


# --------------------------------------------------------------------------- mmap


def test_mmap_read(wd):
    payload = data(3 * CH + 123, seed="mmap-r")
    write_bytes(wd / "f", payload)
    drop_caches()
    with open(wd / "f", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert len(m) == len(payload)
        assert m[CH - 3:CH + 3] == payload[CH - 3:CH + 3]
        assert m[:] == payload


def test_mmap_shared_write_msync_then_read(wd):
    payload = bytearray(data(3 * CH, seed="mmap-w"))
    write_bytes(wd / "f", bytes(payload))
    fd = os.open(wd / "f", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED) as m:
            for off in (0, CH - 1, 2 * CH + 1000, 3 * CH - 2):
                m[off:off + 2] = b"MM"
                payload[off:off + 2] = b"MM"
            m.flush()  # msync(MS_SYNC)
    finally:
        os.close(fd)
    drop_caches()
    assert read_bytes(wd / "f") == bytes(payload)


def test_mmap_write_visible_to_read_without_msync(wd):
    write_bytes(wd / "f", bytes(CH + 10))
    with open(wd / "f", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[CH - 1:CH + 1] = b"ab"
        # same page cache: a read() through another descriptor sees it immediately
        assert read_bytes(wd / "f", CH - 1, 2) == b"ab"


def test_mmap_write_persists_after_unmap_and_close(mount, vd):
    payload = bytearray(data(2 * CH, seed="mmap-p"))
    write_bytes(vd / "f", bytes(payload))
    with open(vd / "f", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[100:110] = b"0123456789"
        payload[100:110] = b"0123456789"
    mount.remount()
    assert read_bytes(vd / "f") == bytes(payload)


def test_write_visible_in_existing_mapping(wd):
    write_bytes(wd / "f", bytes(2 * CH))
    with open(wd / "f", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[CH:CH + 4] == bytes(4)
        write_bytes(wd / "f", b"live", CH)
        assert m[CH:CH + 4] == b"live"


# --------------------------------------------------------------------------- O_APPEND


def test_o_append_from_two_descriptors(wd):
    p = wd / "log"
    write_bytes(p, b"start\n")
    a = os.open(p, os.O_WRONLY | os.O_APPEND)
    b = os.open(p, os.O_WRONLY | os.O_APPEND)
    expected = b"start\n"
    try:
        for i in range(50):
            fd, tag = (a, b"A") if i % 3 else (b, b"B")
            line = tag + str(i).encode() * (i % 7 + 1) + b"\n"
            os.lseek(fd, 0, os.SEEK_SET)  # ignored for O_APPEND writes
            os.write(fd, line)
            expected += line
    finally:
        os.close(a)
        os.close(b)
    drop_caches()
    assert read_bytes(p) == expected


def test_o_append_ignores_seek_position(wd):
    p = wd / "f"
    write_bytes(p, data(CH + 3))
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 10, os.SEEK_SET)
        os.write(fd, b"END")
        assert os.lseek(fd, 0, os.SEEK_CUR) == CH + 6
    finally:
        os.close(fd)
    assert read_bytes(p) == data(CH + 3) + b"END"


def test_append_mode_after_other_writer_extends(wd):
    p = wd / "f"
    write_bytes(p, b"abc")
    ap = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        write_bytes(p, b"XYZ", 3)  # another writer extends the file
        os.write(ap, b"!")
    finally:
        os.close(ap)
    assert read_bytes(p) == b"abcXYZ!"


# --------------------------------------------------------------------------- unlinked but open


def test_unlinked_open_file_keeps_working(wd):
    p = wd / "ghost"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data(2 * CH, seed="ghost"))
        os.unlink(p)
        assert "ghost" not in os.listdir(wd)
        expect_errno(errno.ENOENT, os.stat, p)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 10, CH - 5) == data(2 * CH, seed="ghost")[CH - 5:CH + 5]
        os.pwrite(fd, b"still writable", 3 * CH)
        os.fsync(fd)
        assert os.fstat(fd).st_size == 3 * CH + 14
        assert os.pread(fd, 14, 3 * CH) == b"still writable"
        assert os.pread(fd, 10, 2 * CH) == bytes(10)
        os.ftruncate(fd, 100)
        assert os.fstat(fd).st_size == 100
    finally:
        os.close(fd)
    assert os.listdir(wd) == []


def test_unlinked_open_file_name_can_be_reused(wd):
    p = wd / "name"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"old inode")
        os.unlink(p)
        write_bytes(p, b"new inode")
        assert os.pread(fd, 100, 0) == b"old inode"
        assert read_bytes(p) == b"new inode"
        os.pwrite(fd, b"OLD", 0)
        assert read_bytes(p) == b"new inode"
    finally:
        os.close(fd)
    assert read_bytes(p) == b"new inode"


def test_unlinked_open_directory_handle(wd):
    os.mkdir(wd / "d")
    fd = os.open(wd / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(wd / "d")
        os.fstat(fd)
        assert os.listdir(fd) == []
        expect_errno(errno.ENOENT, os.open, "new", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
    finally:
        os.close(fd)


def test_unlinked_open_file_is_gone_after_remount(mount, vd):
    fd = os.open(vd / "tmp", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"scratch")
        os.unlink(vd / "tmp")
    finally:
        os.close(fd)
    mount.remount()
    assert os.listdir(vd) == []


# --------------------------------------------------------------------------- the read path

def _direct_read_all(path, size: int, block: int) -> bytes:
    """Read with O_DIRECT, block by block, so every read reaches the daemon."""
    buf = mmap.mmap(-1, block)  # page aligned
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while len(out) < size:
            n = os.preadv(fd, [buf], len(out))
            if n <= 0:
                break
            out += buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def _dir_bytes(path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path))


def test_dirty_limit_option_bounds_unstored_data_of_an_open_file(tmp_path):
    """--dirty-limit (here by $SNAPFS_DIRTY_LIMIT): random writes to an open file that
    touch more chunks than the limit holds store chunks as they go; the data stays right."""
    import random

    from fusehelpers import Mount

    m = Mount(tmp_path, CHUNK_SIZE, env={"SNAPFS_DIRTY_LIMIT": "16M"})
    m.require_snapfs("the dirty limit")
    m.setup()
    try:
        size = 48 << 20
        rng = random.Random(7)
        expected = bytearray(size)
        end = 0
        fd = os.open(m.vol / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            block = bytearray(rng.randbytes(4096))
            buf = mmap.mmap(-1, 4096)
            for i in range(3000):
                off = rng.randrange(size // 4096) * 4096
                block[:8] = i.to_bytes(8, "little")
                buf[:] = block
                os.pwritev(fd, [buf], off)
                expected[off:off + 4096] = block
                end = max(end, off + 4096)
            # more chunks were touched than fit: the excess was stored while the file stayed
            # open (the default limit would have kept all of it in memory for 30 s)
            assert _dir_bytes(os.path.join(m.repo, "packs")) >= 16 << 20
            os.fsync(fd)
            assert m.stats()["dirty_limit"] == 16 << 20
            buf.close()
        finally:
            os.close(fd)
        with open(m.vol / "f", "rb") as f:
            assert f.read() == bytes(expected[:end])
    finally:
        m.close()


def test_page_writes_into_a_stored_file_hold_pages_under_the_dirty_limit(tmp_path):
    """Random 4 KiB writes into a file already stored keep only the written pages in
    memory (sparse chunks), not a loaded chunk per write: 3,000 of them over 64 MiB stay
    within a 16 MiB limit with nothing stored until fsync, which merges them (loading
    each chunk written into would have taken nearly the whole file, 64 MiB)."""
    import random

    from fusehelpers import Mount

    m = Mount(tmp_path, CHUNK_SIZE, env={"SNAPFS_DIRTY_LIMIT": "16M"})
    m.require_snapfs("the dirty limit")
    m.setup()
    try:
        size = 64 << 20
        rng = random.Random(8)
        expected = bytearray(rng.randbytes(size))
        with open(m.vol / "f", "wb") as f:
            f.write(expected)
            os.fsync(f.fileno())
        packs = _dir_bytes(os.path.join(m.repo, "packs"))
        fd = os.open(m.vol / "f", os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            touched = set()
            for _ in range(3000):
                off = rng.randrange(size // 4096) * 4096
                buf[:] = rng.randbytes(4096)
                os.pwritev(fd, [buf], off)
                expected[off:off + 4096] = buf[:]
                touched.add(off)
            assert _dir_bytes(os.path.join(m.repo, "packs")) == packs  # nothing stored
            os.fsync(fd)
            cs = 64 << 10
            chunks = {off // cs for off in touched}  # each stored once, merged
            grown = _dir_bytes(os.path.join(m.repo, "packs")) - packs
            assert len(chunks) * cs <= grown < len(chunks) * (cs + 4096)
            buf.close()
        finally:
            os.close(fd)
        with open(m.vol / "f", "rb") as f:
            assert f.read() == bytes(expected)
    finally:
        m.close()


def test_cache_size_option_and_chunk_reads_from_the_packs(tmp_path):
    """--cache-size (here by $SNAPFS_CACHE_SIZE) bounds the chunk cache; chunks that do not
    fit are read back from the packs (inline from the page cache, or in a worker thread)
    and are still right."""
    from fusehelpers import Mount

    m = Mount(tmp_path, CHUNK_SIZE, env={"SNAPFS_CACHE_SIZE": "256K"})
    m.require_snapfs("the chunk cache")
    m.setup()
    try:
        payload = data(20 * CH + 123, seed="cache")
        write_bytes(m.vol / "f", payload)
        snap = m.commit(m.vol, "s")  # stored as chunks: reads no longer see the buffers
        before = m.stats()["chunk_reads"]
        assert before["cache_limit"] == 256 * KiB
        for _ in range(2):
            assert _direct_read_all(snap / "f", len(payload), CH) == payload
            assert _direct_read_all(snap / "f", len(payload), 4 * KiB) == payload
        after = m.stats()["chunk_reads"]
        assert after["cache_bytes"] <= 256 * KiB
        # 21 chunks through a 4-chunk cache, four times over: most come from the packs
        assert (after["inline"] + after["thread"]) - (before["inline"] + before["thread"]) >= 60
    finally:
        m.close()
