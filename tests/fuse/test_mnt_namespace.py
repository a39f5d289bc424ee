"""Names on a mounted volume: directories, symlinks, hard links, rename, long names."""

import errno
import os
import stat

import pytest
from fusehelpers import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    drop_caches,
    expect_errno,
    read_bytes,
    renameat2,
    write_bytes,
)

# --------------------------------------------------------------------------- directories


def test_mkdir_creates_empty_directory(wd):
    d = wd / "d"
    os.mkdir(d, 0o755)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o755 & ~_umask()
    assert os.listdir(d) == []


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_mkdir_existing_gives_eexist(wd):
    os.mkdir(wd / "d")
    expect_errno(errno.EEXIST, os.mkdir, wd / "d")
    write_bytes(wd / "f", b"")
    expect_errno(errno.EEXIST, os.mkdir, wd / "f")


def test_mkdir_in_missing_parent_gives_enoent(wd):
    expect_errno(errno.ENOENT, os.mkdir, wd / "nope" / "d")


def test_mkdir_under_file_gives_enotdir(wd):
    write_bytes(wd / "f", b"x")
    expect_errno(errno.ENOTDIR, os.mkdir, wd / "f" / "d")
    expect_errno(errno.ENOTDIR, os.stat, wd / "f" / "x")


def test_rmdir_empty_directory(wd):
    os.mkdir(wd / "d")
    os.rmdir(wd / "d")
    assert not os.path.lexists(wd / "d")
    assert os.listdir(wd) == []


def test_rmdir_non_empty_gives_enotempty(wd):
    os.makedirs(wd / "d" / "sub")
    expect_errno(errno.ENOTEMPTY, os.rmdir, wd / "d")
    os.mkdir(wd / "e")
    write_bytes(wd / "e" / "f", b"x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, wd / "e")
    assert os.path.isdir(wd / "d" / "sub")
    assert (wd / "e" / "f").read_bytes() == b"x"


def test_rmdir_of_file_gives_enotdir(wd):
    write_bytes(wd / "f", b"x")
    expect_errno(errno.ENOTDIR, os.rmdir, wd / "f")


def test_rmdir_missing_gives_enoent(wd):
    expect_errno(errno.ENOENT, os.rmdir, wd / "missing")


def test_unlink_of_directory_gives_eisdir(wd):
    os.mkdir(wd / "d")
    expect_errno(errno.EISDIR, os.unlink, wd / "d")
    assert os.path.isdir(wd / "d")


def test_open_directory_for_writing_gives_eisdir(wd):
    os.mkdir(wd / "d")
    expect_errno(errno.EISDIR, os.open, wd / "d", os.O_WRONLY)
    expect_errno(errno.EISDIR, os.open, wd / "d", os.O_RDWR)


def test_open_o_directory_on_file_gives_enotdir(wd):
    write_bytes(wd / "f", b"x")
    expect_errno(errno.ENOTDIR, os.open, wd / "f", os.O_RDONLY | os.O_DIRECTORY)


def test_o_excl_on_existing_gives_eexist(wd):
    write_bytes(wd / "f", b"x")
    expect_errno(errno.EEXIST, os.open, wd / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_directory_nlink_counts_subdirectories(wd):
    os.mkdir(wd / "d")
    for i in range(3):
        os.mkdir(wd / "d" / f"s{i}")
    write_bytes(wd / "d" / "file", b"")
    nlink = os.stat(wd / "d").st_nlink
    # 2 + subdirectories like ext4, or 1 ("unknown", like btrfs): anything else misleads
    # find(1)'s leaf optimisation into skipping subdirectories.
    assert nlink in (1, 5), nlink
    if nlink == 5:
        os.rmdir(wd / "d" / "s0")
        assert os.stat(wd / "d").st_nlink == 4


def test_readdir_lists_every_kind_once(wd):
    os.mkdir(wd / "dir")
    write_bytes(wd / "file", b"x")
    os.symlink("file", wd / "link")
    os.link(wd / "file", wd / "hard")
    names = os.listdir(wd)
    assert sorted(names) == ["dir", "file", "hard", "link"]
    kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in os.scandir(wd)}
    assert kinds == {"dir": (True, False), "file": (False, False), "hard": (False, False),
                     "link": (False, True)}


def test_deep_directory_tree(wd):
    p = wd
    for i in range(60):
        p = p / f"level{i}"
    os.makedirs(p)
    write_bytes(p / "leaf", b"deep")
    drop_caches()
    assert (p / "leaf").read_bytes() == b"deep"


# --------------------------------------------------------------------------- symlinks


def test_symlink_readlink_and_lstat(wd):
    write_bytes(wd / "target", b"content")
    os.symlink("target", wd / "link")
    st = os.lstat(wd / "link")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert os.readlink(wd / "link") == "target"
    assert (wd / "link").read_bytes() == b"content"
    assert os.stat(wd / "link").st_ino == os.stat(wd / "target").st_ino


def test_dangling_symlink(wd):
    os.symlink("does/not/exist", wd / "dangling")
    assert stat.S_ISLNK(os.lstat(wd / "dangling").st_mode)
    assert os.readlink(wd / "dangling") == "does/not/exist"
    expect_errno(errno.ENOENT, os.stat, wd / "dangling")
    expect_errno(errno.ENOENT, os.open, wd / "dangling", os.O_RDONLY)
    assert "dangling" in os.listdir(wd)


def test_symlink_long_and_absolute_targets(wd):
    long_target = "/".join(["x" * 200] * 20)[:4000]
    os.symlink(long_target, wd / "long")
    os.symlink("/etc/hostname", wd / "abs")
    drop_caches()
    assert os.readlink(wd / "long") == long_target
    assert os.lstat(wd / "long").st_size == len(long_target)
    assert os.readlink(wd / "abs") == "/etc/hostname"


def test_symlink_to_directory_is_traversed(wd):
    os.mkdir(wd / "real")
    write_bytes(wd / "real" / "f", b"via link")
    os.symlink("real", wd / "alias")
    assert (wd / "alias" / "f").read_bytes() == b"via link"
    assert os.listdir(wd / "alias") == ["f"]


def test_symlink_over_existing_gives_eexist(wd):
    write_bytes(wd / "f", b"")
    expect_errno(errno.EEXIST, os.symlink, "x", wd / "f")


def test_symlink_loop_gives_eloop(wd):
    os.symlink("b", wd / "a")
    os.symlink("a", wd / "b")
    expect_errno(errno.ELOOP, os.stat, wd / "a")


def test_open_nofollow_on_symlink_gives_eloop(wd):
    write_bytes(wd / "t", b"x")
    os.symlink("t", wd / "l")
    expect_errno(errno.ELOOP, os.open, wd / "l", os.O_RDONLY | os.O_NOFOLLOW)


def test_unlink_symlink_keeps_target(wd):
    write_bytes(wd / "t", b"keep")
    os.symlink("t", wd / "l")
    os.unlink(wd / "l")
    assert not os.path.lexists(wd / "l")
    assert (wd / "t").read_bytes() == b"keep"


# --------------------------------------------------------------------------- hard links


def test_hard_link_shares_inode_and_counts_links(wd):
    write_bytes(wd / "a", b"shared")
    assert os.stat(wd / "a").st_nlink == 1
    os.link(wd / "a", wd / "b")
    sa, sb = os.stat(wd / "a"), os.stat(wd / "b")
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    os.mkdir(wd / "sub")
    os.link(wd / "a", wd / "sub" / "c")
    assert os.stat(wd / "b").st_nlink == 3


def test_hard_link_content_is_shared(wd):
    write_bytes(wd / "a", b"0123456789")
    os.link(wd / "a", wd / "b")
    write_bytes(wd / "b", b"XY", 3)
    assert (wd / "a").read_bytes() == b"012XY56789"
    with open(wd / "a", "ab") as f:
        f.write(b"tail")
    drop_caches()
    assert (wd / "b").read_bytes() == b"012XY56789tail"
    os.truncate(wd / "b", 2)
    assert (wd / "a").read_bytes() == b"01"


def test_hard_link_metadata_is_shared(wd):
    write_bytes(wd / "a", b"x")
    os.link(wd / "a", wd / "b")
    os.chmod(wd / "b", 0o600)
    os.utime(wd / "b", ns=(1_000_000_007, 2_000_000_009))
    st = os.stat(wd / "a")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == 2_000_000_009


def test_unlink_one_hard_link_keeps_the_other(wd):
    write_bytes(wd / "a", b"survivor")
    os.link(wd / "a", wd / "b")
    os.unlink(wd / "a")
    assert not os.path.lexists(wd / "a")
    st = os.stat(wd / "b")
    assert st.st_nlink == 1
    drop_caches()
    assert (wd / "b").read_bytes() == b"survivor"


def test_hard_link_survives_remount(mount, vd):
    write_bytes(vd / "a", b"linked")
    os.link(vd / "a", vd / "b")
    mount.remount()
    sa, sb = os.stat(vd / "a"), os.stat(vd / "b")
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == 2
    write_bytes(vd / "a", b"L", 0)
    assert (vd / "b").read_bytes() == b"Linked"


def test_hard_link_to_directory_gives_eperm(wd):
    os.mkdir(wd / "d")
    expect_errno(errno.EPERM, os.link, wd / "d", wd / "d2")


def test_hard_link_onto_existing_name_gives_eexist(wd):
    write_bytes(wd / "a", b"")
    write_bytes(wd / "b", b"")
    expect_errno(errno.EEXIST, os.link, wd / "a", wd / "b")


def test_hard_link_of_missing_source_gives_enoent(wd):
    expect_errno(errno.ENOENT, os.link, wd / "missing", wd / "b")


# --------------------------------------------------------------------------- rename


def test_rename_file_within_directory(wd):
    write_bytes(wd / "a", b"moved")
    ino = os.stat(wd / "a").st_ino
    os.rename(wd / "a", wd / "b")
    assert not os.path.lexists(wd / "a")
    assert (wd / "b").read_bytes() == b"moved"
    assert os.stat(wd / "b").st_ino == ino


def test_rename_over_existing_file_replaces_it(wd):
    write_bytes(wd / "a", b"new")
    write_bytes(wd / "b", b"old content")
    fd = os.open(wd / "b", os.O_RDONLY)  # the replaced file stays readable while open
    try:
        os.rename(wd / "a", wd / "b")
        assert sorted(os.listdir(wd)) == ["b"]
        drop_caches()
        assert (wd / "b").read_bytes() == b"new"
        assert os.pread(fd, 100, 0) == b"old content"
    finally:
        os.close(fd)


def test_rename_over_hard_link_of_same_inode_is_noop(wd):
    write_bytes(wd / "a", b"x")
    os.link(wd / "a", wd / "b")
    os.rename(wd / "a", wd / "b")
    assert sorted(os.listdir(wd)) == ["a", "b"]
    assert os.stat(wd / "b").st_nlink == 2


def test_rename_directory_over_empty_directory(wd):
    os.makedirs(wd / "src" / "inner")
    write_bytes(wd / "src" / "inner" / "f", b"payload")
    os.mkdir(wd / "dst")
    os.rename(wd / "src", wd / "dst")
    assert sorted(os.listdir(wd)) == ["dst"]
    assert (wd / "dst" / "inner" / "f").read_bytes() == b"payload"


def test_rename_directory_onto_non_empty_directory_gives_enotempty(wd):
    os.mkdir(wd / "src")
    os.mkdir(wd / "dst")
    write_bytes(wd / "dst" / "keep", b"k")
    expect_errno((errno.ENOTEMPTY, errno.EEXIST), os.rename, wd / "src", wd / "dst")
    assert (wd / "dst" / "keep").read_bytes() == b"k"
    assert os.path.isdir(wd / "src")


def test_rename_file_onto_directory_gives_eisdir(wd):
    write_bytes(wd / "f", b"")
    os.mkdir(wd / "d")
    expect_errno(errno.EISDIR, os.rename, wd / "f", wd / "d")


def test_rename_directory_onto_file_gives_enotdir(wd):
    os.mkdir(wd / "d")
    write_bytes(wd / "f", b"")
    expect_errno(errno.ENOTDIR, os.rename, wd / "d", wd / "f")


def test_rename_file_across_directories(wd):
    os.mkdir(wd / "x")
    os.mkdir(wd / "y")
    write_bytes(wd / "x" / "f", b"travels")
    os.rename(wd / "x" / "f", wd / "y" / "g")
    assert os.listdir(wd / "x") == []
    assert os.listdir(wd / "y") == ["g"]
    drop_caches()
    assert (wd / "y" / "g").read_bytes() == b"travels"


def test_rename_directory_tree_across_directories(wd):
    os.makedirs(wd / "a" / "tree" / "sub")
    write_bytes(wd / "a" / "tree" / "sub" / "f", b"deep")
    os.symlink("sub/f", wd / "a" / "tree" / "lnk")
    os.makedirs(wd / "b" / "c")
    os.rename(wd / "a" / "tree", wd / "b" / "c" / "moved")
    assert os.listdir(wd / "a") == []
    drop_caches()
    assert (wd / "b" / "c" / "moved" / "sub" / "f").read_bytes() == b"deep"
    assert (wd / "b" / "c" / "moved" / "lnk").read_bytes() == b"deep"
    if os.stat(wd / "a").st_nlink != 1:  # ".." moved along: parent link counts follow
        assert os.stat(wd / "a").st_nlink == 2
        assert os.stat(wd / "b" / "c").st_nlink == 3
    # '..' of the moved directory is its new parent
    assert os.stat(wd / "b" / "c" / "moved" / "..").st_ino == os.stat(wd / "b" / "c").st_ino


def test_rename_directory_into_own_subdirectory_gives_einval(wd):
    os.makedirs(wd / "d" / "sub")
    expect_errno(errno.EINVAL, os.rename, wd / "d", wd / "d" / "sub" / "d")
    assert os.path.isdir(wd / "d" / "sub")


def test_rename_missing_source_gives_enoent(wd):
    expect_errno(errno.ENOENT, os.rename, wd / "missing", wd / "x")


def test_rename_to_same_name_is_noop(wd):
    write_bytes(wd / "a", b"same")
    os.rename(wd / "a", wd / "a")
    assert (wd / "a").read_bytes() == b"same"


def test_rename_noreplace_refuses_existing_target(wd):
    write_bytes(wd / "a", b"A")
    write_bytes(wd / "b", b"B")
    expect_errno(errno.EEXIST, renameat2, wd / "a", wd / "b", RENAME_NOREPLACE)
    assert (wd / "a").read_bytes() == b"A"
    assert (wd / "b").read_bytes() == b"B"


def test_rename_noreplace_to_free_name(wd):
    write_bytes(wd / "a", b"A")
    renameat2(wd / "a", wd / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(wd)) == ["c"]
    assert (wd / "c").read_bytes() == b"A"


def test_rename_exchange_swaps_two_files(wd):
    write_bytes(wd / "a", b"AAA")
    write_bytes(wd / "b", b"B")
    ia, ib = os.stat(wd / "a").st_ino, os.stat(wd / "b").st_ino
    renameat2(wd / "a", wd / "b", RENAME_EXCHANGE)
    drop_caches()
    assert (wd / "a").read_bytes() == b"B"
    assert (wd / "b").read_bytes() == b"AAA"
    assert (os.stat(wd / "a").st_ino, os.stat(wd / "b").st_ino) == (ib, ia)


def test_rename_exchange_file_and_directory_across_parents(wd):
    os.makedirs(wd / "p" / "dir")
    write_bytes(wd / "p" / "dir" / "inside", b"i")
    os.mkdir(wd / "q")
    write_bytes(wd / "q" / "file", b"f")
    renameat2(wd / "p" / "dir", wd / "q" / "file", RENAME_EXCHANGE)
    assert (wd / "p" / "dir").read_bytes() == b"f"
    assert (wd / "q" / "file" / "inside").read_bytes() == b"i"


def test_rename_exchange_with_missing_target_gives_enoent(wd):
    write_bytes(wd / "a", b"A")
    expect_errno(errno.ENOENT, renameat2, wd / "a", wd / "missing", RENAME_EXCHANGE)
    assert (wd / "a").read_bytes() == b"A"


def test_renamed_open_file_keeps_working(wd):
    fd = os.open(wd / "a", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before ")
        os.mkdir(wd / "elsewhere")
        os.rename(wd / "a", wd / "elsewhere" / "b")
        os.write(fd, b"after")
    finally:
        os.close(fd)
    assert (wd / "elsewhere" / "b").read_bytes() == b"before after"


# --------------------------------------------------------------------------- names


def test_255_byte_names_work(wd):
    name = "n" * 255
    write_bytes(wd / name, b"long")
    os.mkdir(wd / ("d" * 255))
    os.symlink(name, wd / ("s" * 255))
    drop_caches()
    assert sorted(os.listdir(wd)) == sorted([name, "d" * 255, "s" * 255])
    assert (wd / ("s" * 255)).read_bytes() == b"long"
    os.rename(wd / name, wd / ("r" * 255))
    assert (wd / ("r" * 255)).read_bytes() == b"long"


def test_255_byte_multibyte_utf8_name(wd):
    name = "\u20ac" * 85  # 3 bytes each
    assert len(name.encode()) == 255
    write_bytes(wd / name, b"euro")
    assert os.listdir(wd) == [name]
    assert (wd / name).read_bytes() == b"euro"


@pytest.mark.parametrize("op", ["create", "mkdir", "symlink", "link", "rename", "stat"])
def test_256_byte_name_gives_enametoolong(wd, op):
    long = wd / ("x" * 256)
    write_bytes(wd / "src", b"")
    calls = {
        "create": lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        "mkdir": lambda: os.mkdir(long),
        "symlink": lambda: os.symlink("src", long),
        "link": lambda: os.link(wd / "src", long),
        "rename": lambda: os.rename(wd / "src", long),
        "stat": lambda: os.stat(long),
    }
    expect_errno(errno.ENAMETOOLONG, calls[op])
    assert sorted(os.listdir(wd)) == ["src"]


def test_non_utf8_and_special_character_names(wd):
    names = [b"\xff\xfe-not-utf8", b"sp ace", b"new\nline", b"tab\tand*?[]", b"-dash",
             b"..dots", b"\xe2\x98\x83", b"quote'\"", b"back\\slash", b"a" * 200]
    for i, n in enumerate(names):
        write_bytes(os.path.join(os.fsencode(wd), n), bytes([i]))
    drop_caches()
    assert sorted(os.listdir(os.fsencode(wd))) == sorted(names)
    for i, n in enumerate(names):
        assert read_bytes(os.path.join(os.fsencode(wd), n)) == bytes([i])


def test_names_are_case_sensitive(wd):
    write_bytes(wd / "File", b"upper")
    write_bytes(wd / "file", b"lower")
    assert sorted(os.listdir(wd)) == ["File", "file"]
    assert (wd / "File").read_bytes() == b"upper"


def test_unlink_missing_gives_enoent(wd):
    expect_errno(errno.ENOENT, os.unlink, wd / "missing")
    expect_errno(errno.ENOENT, os.open, wd / "missing", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.lstat, wd / "missing")


def test_unlink_then_recreate_gets_new_content(wd):
    write_bytes(wd / "f", b"first version, long")
    os.unlink(wd / "f")
    write_bytes(wd / "f", b"second")
    drop_caches()
    assert (wd / "f").read_bytes() == b"second"
    assert read_bytes(wd / "f") == b"second"
