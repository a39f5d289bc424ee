"""Metadata on a mounted volume: mode, owner, timestamps (ns), ctime, xattrs, statfs."""

import errno
import os
import stat
import struct
import subprocess
import time

import pytest
from fusehelpers import IS_SNAPFS, drop_caches, expect_errno, read_bytes, write_bytes

TICK = 0.05  # longer than the coarse clock's granularity


def _ctime_changes(path, action, follow=True):
    before = os.stat(path, follow_symlinks=follow)
    time.sleep(TICK)
    action()
    after = os.stat(path, follow_symlinks=follow)
    return before, after


# --------------------------------------------------------------------------- mode / owner


@pytest.mark.parametrize("mode", [0o000, 0o640, 0o777, 0o4755, 0o2711, 0o1777])
def test_chmod_sets_mode_bits(wd, mode):
    write_bytes(wd / "f", b"x")
    os.chmod(wd / "f", mode)
    drop_caches()
    st = os.stat(wd / "f")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_chmod_directory_sticky(wd):
    os.mkdir(wd / "d")
    os.chmod(wd / "d", 0o1777)
    st = os.stat(wd / "d")
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o1777


def test_fchmod_through_descriptor(wd):
    fd = os.open(wd / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.fchmod(fd, 0o604)
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(wd / "f").st_mode) == 0o604


def test_create_mode_honours_umask(wd):
    old = os.umask(0o027)
    try:
        os.close(os.open(wd / "f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(wd / "d", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(wd / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(wd / "d").st_mode) == 0o750


def test_chmod_updates_ctime_not_mtime(wd):
    write_bytes(wd / "f", b"x")
    before, after = _ctime_changes(wd / "f", lambda: os.chmod(wd / "f", 0o600))
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == before.st_mtime_ns


def test_new_file_belongs_to_caller(wd):
    write_bytes(wd / "f", b"")
    os.mkdir(wd / "d")
    for p in (wd / "f", wd / "d"):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_chown_sets_owner_and_group(wd):
    write_bytes(wd / "f", b"x")
    os.chown(wd / "f", 1234, 5678)
    drop_caches()
    st = os.stat(wd / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(wd / "f", -1, 42)  # -1 keeps the owner
    st = os.stat(wd / "f")
    assert (st.st_uid, st.st_gid) == (1234, 42)


def test_chown_updates_ctime(wd):
    write_bytes(wd / "f", b"x")
    before, after = _ctime_changes(wd / "f", lambda: os.chown(wd / "f", 1, 2))
    assert after.st_ctime_ns > before.st_ctime_ns


def test_lchown_changes_symlink_not_target(wd):
    write_bytes(wd / "t", b"x")
    os.symlink("t", wd / "l")
    os.lchown(wd / "l", 4321, 8765)
    lst = os.lstat(wd / "l")
    assert (lst.st_uid, lst.st_gid) == (4321, 8765)
    st = os.stat(wd / "t")
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_setgid_directory_is_inherited(wd):
    os.mkdir(wd / "g")
    os.chown(wd / "g", -1, 4242)
    os.chmod(wd / "g", 0o2775)
    write_bytes(wd / "g" / "f", b"")
    os.mkdir(wd / "g" / "sub")
    assert os.stat(wd / "g" / "f").st_gid == 4242
    sub = os.stat(wd / "g" / "sub")
    assert sub.st_gid == 4242
    assert sub.st_mode & stat.S_ISGID


# --------------------------------------------------------------------------- timestamps


def test_utimens_nanosecond_precision(wd):
    write_bytes(wd / "f", b"x")
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    os.utime(wd / "f", ns=(atime, mtime))
    drop_caches()
    st = os.stat(wd / "f")
    assert st.st_mtime_ns == mtime
    assert st.st_atime_ns == atime


def test_utimens_before_1970_and_after_2038(wd):
    write_bytes(wd / "old", b"")
    write_bytes(wd / "new", b"")
    old = -946_684_800_000_000_000 + 7  # 1940
    new = 4_102_444_800_000_000_001  # 2100
    os.utime(wd / "old", ns=(old, old))
    os.utime(wd / "new", ns=(new, new))
    drop_caches()
    assert os.stat(wd / "old").st_mtime_ns == old
    assert os.stat(wd / "new").st_mtime_ns == new


def test_utimens_beyond_the_64_bit_nanosecond_range_is_clamped(mount, vd):
    """Like ext4 outside its range: clamped, not an error; and the inode stays savable
    (an unclamped time used to make every later save of it fail)."""
    write_bytes(vd / "f", b"")
    far, before = 17_179_869_184 * 10**9, -(10**19)  # year 2514, year 1653
    os.utime(vd / "f", ns=(before, far))
    os.chmod(vd / "f", 0o600)  # saves the inode again
    mount.remount()
    st = os.stat(vd / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (-(1 << 63), (1 << 63) - 1)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_writes_up_to_the_kernels_file_size_limit_are_kept(mount, vd):
    """The kernel accepts writes up to its own limit for FUSE files and reports success
    before the daemon sees them (writeback cache), so the daemon's limit must be the
    same: a lower one lost such a write silently."""
    fd = os.open(vd / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        end = (1 << 63) - 1
        assert os.pwrite(fd, b"far", end - 3) == 3
        assert os.pwrite(fd, b"petabyte", 1 << 50) == 8
        os.fsync(fd)
    finally:
        os.close(fd)
    mount.remount()
    assert os.stat(vd / "f").st_size == (1 << 63) - 1
    assert read_bytes(vd / "f", (1 << 50) - 2, 12) == b"\0\0petabyte\0\0"
    assert read_bytes(vd / "f", end - 3, 3) == b"far"
    os.truncate(vd / "f", end)  # the largest size there is: accepted
    os.truncate(vd / "f", 1 << 40)
    assert os.stat(vd / "f").st_size == 1 << 40


def test_utimens_on_directory(wd):
    os.mkdir(wd / "d")
    os.utime(wd / "d", ns=(10**18 + 1, 10**18 + 3))
    assert os.stat(wd / "d").st_mtime_ns == 10**18 + 3


def test_utimens_updates_ctime(wd):
    write_bytes(wd / "f", b"x")
    before, after = _ctime_changes(wd / "f", lambda: os.utime(wd / "f", ns=(5, 5)))
    assert after.st_ctime_ns > before.st_ctime_ns
    assert after.st_mtime_ns == 5


def test_touch_sets_current_time(wd):
    write_bytes(wd / "f", b"x")
    os.utime(wd / "f", ns=(1, 1))
    t0 = time.time_ns()
    os.utime(wd / "f")  # UTIME_NOW
    t1 = time.time_ns()
    m = os.stat(wd / "f").st_mtime_ns
    assert t0 - 10**9 <= m <= t1 + 10**9


def test_utimens_on_symlink_itself(wd):
    write_bytes(wd / "t", b"x")
    os.utime(wd / "t", ns=(7 * 10**17, 7 * 10**17))
    os.symlink("t", wd / "l")
    os.utime(wd / "l", ns=(3 * 10**17 + 3, 3 * 10**17 + 9), follow_symlinks=False)
    assert os.lstat(wd / "l").st_mtime_ns == 3 * 10**17 + 9
    assert os.stat(wd / "t").st_mtime_ns == 7 * 10**17


def test_write_updates_mtime_and_ctime(wd):
    write_bytes(wd / "f", b"x")
    os.utime(wd / "f", ns=(10**18, 10**18))
    before, after = _ctime_changes(wd / "f", lambda: write_bytes(wd / "f", b"more", 1))
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_truncate_updates_mtime(wd):
    write_bytes(wd / "f", b"xxxx")
    os.utime(wd / "f", ns=(10**18, 10**18))
    os.truncate(wd / "f", 1)
    assert os.stat(wd / "f").st_mtime_ns != 10**18


def test_directory_mtime_changes_when_entries_change(wd):
    os.mkdir(wd / "d")
    for action in (lambda: write_bytes(wd / "d" / "f", b""),
                   lambda: os.rename(wd / "d" / "f", wd / "d" / "g"),
                   lambda: os.unlink(wd / "d" / "g"),
                   lambda: os.mkdir(wd / "d" / "sub")):
        os.utime(wd / "d", ns=(10**18, 10**18))
        action()
        assert os.stat(wd / "d").st_mtime_ns != 10**18


# --------------------------------------------------------------------------- xattrs


def test_xattr_set_get_list_remove(wd):
    p = wd / "f"
    write_bytes(p, b"x")
    assert os.listxattr(p) == []
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.two", b"second value")
    drop_caches()
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.two") == b"second value"
    assert sorted(os.listxattr(p)) == ["user.one", "user.two"]
    os.setxattr(p, "user.one", b"replaced")
    assert os.getxattr(p, "user.one") == b"replaced"
    os.removexattr(p, "user.one")
    assert os.listxattr(p) == ["user.two"]


def test_xattr_missing_gives_enodata(wd):
    write_bytes(wd / "f", b"x")
    expect_errno(errno.ENODATA, os.getxattr, wd / "f", "user.missing")
    expect_errno(errno.ENODATA, os.removexattr, wd / "f", "user.missing")


def test_xattr_create_flag_refuses_existing(wd):
    p = wd / "f"
    write_bytes(p, b"x")
    os.setxattr(p, "user.a", b"first", os.XATTR_CREATE)
    expect_errno(errno.EEXIST, os.setxattr, p, "user.a", b"second", os.XATTR_CREATE)
    assert os.getxattr(p, "user.a") == b"first"


def test_xattr_replace_flag_needs_existing(wd):
    p = wd / "f"
    write_bytes(p, b"x")
    expect_errno(errno.ENODATA, os.setxattr, p, "user.a", b"v", os.XATTR_REPLACE)
    assert os.listxattr(p) == []
    os.setxattr(p, "user.a", b"v1")
    os.setxattr(p, "user.a", b"v2", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.a") == b"v2"


def test_xattr_binary_empty_and_large_values(wd):
    p = wd / "f"
    write_bytes(p, b"x")
    binary = bytes(range(256)) + b"\0\0end"
    os.setxattr(p, "user.bin", binary)
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.big", b"B" * 2000)
    drop_caches()
    assert os.getxattr(p, "user.bin") == binary
    assert os.getxattr(p, "user.empty") == b""
    assert os.getxattr(p, "user.big") == b"B" * 2000


def test_xattr_many_names(wd):
    p = wd / "f"
    write_bytes(p, b"x")
    names = [f"user.attr{i:02d}" for i in range(20)]
    for n in names:
        os.setxattr(p, n, n.encode())
    assert sorted(os.listxattr(p)) == names
    for n in names:
        assert os.getxattr(p, n) == n.encode()


def test_xattr_on_directory(wd):
    os.mkdir(wd / "d")
    os.setxattr(wd / "d", "user.dir", b"yes")
    assert os.getxattr(wd / "d", "user.dir") == b"yes"
    assert os.listxattr(wd / "d") == ["user.dir"]


def test_xattr_change_updates_ctime(wd):
    write_bytes(wd / "f", b"x")
    before, after = _ctime_changes(wd / "f", lambda: os.setxattr(wd / "f", "user.c", b"1"))
    assert after.st_ctime_ns > before.st_ctime_ns


def test_xattr_follows_hard_links(wd):
    write_bytes(wd / "a", b"x")
    os.link(wd / "a", wd / "b")
    os.setxattr(wd / "a", "user.shared", b"s")
    assert os.getxattr(wd / "b", "user.shared") == b"s"


def test_xattr_survives_remount(mount, vd):
    write_bytes(vd / "f", b"x")
    os.setxattr(vd / "f", "user.persist", b"\x00stays\xff")
    mount.remount()
    assert os.getxattr(vd / "f", "user.persist") == b"\x00stays\xff"


def test_xattr_tools_roundtrip(wd):
    write_bytes(wd / "f", b"x")
    subprocess.run(["setfattr", "-n", "user.tool", "-v", "via setfattr", str(wd / "f")],
                   check=True)
    r = subprocess.run(["getfattr", "--only-values", "-n", "user.tool", str(wd / "f")],
                       check=True, capture_output=True)
    assert r.stdout == b"via setfattr"


# --------------------------------------------------------------------------- statfs


def _check_statvfs(sv):
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0
    assert 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert 0 <= sv.f_ffree <= sv.f_files or sv.f_files == 0
    assert sv.f_namemax == 255


def test_statvfs_is_sane_on_volume_file_and_root(mount, wd):
    write_bytes(wd / "f", b"x")
    for p in (mount.mnt, mount.vol, wd, wd / "f"):
        _check_statvfs(os.statvfs(p))


def test_free_inodes_go_down_as_files_are_created(mount, vd):
    mount.require_snapfs("inode numbers handed out")
    before = os.statvfs(vd)
    assert before.f_files - before.f_ffree < before.f_files // 1000  # not "50 % used"
    for i in range(10):
        write_bytes(vd / f"f{i}", b"")
    after = os.statvfs(vd)
    assert before.f_ffree - after.f_ffree == 10


def test_df_reports_the_mount(mount):
    r = subprocess.run(["df", "-P", str(mount.vol)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(mount.mnt) in r.stdout


def _acl_xattr(user: int, group: int, other: int) -> bytes:
    """A minimal system.posix_acl_access value (version 2, three base entries)."""
    entries = [(0x01, user), (0x04, group), (0x20, other)]  # USER_OBJ, GROUP_OBJ, OTHER
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
                                           for tag, perm in entries)


def test_xattr_names_stop_where_listxattr_could_no_longer_list_them(wd):
    """ext4 runs out of room far earlier (ENOSPC); past 64 KiB of names the kernel's
    listxattr fails with E2BIG, and with it getfattr -d, cp -a and rsync -X."""
    write_bytes(wd / "f", b"x")
    names = []
    with pytest.raises(OSError) as e:
        for i in range(4000):
            names.append(f"user.{'n' * 40}{i:05d}")
            os.setxattr(wd / "f", names[-1], b"v")
    assert e.value.errno == errno.ENOSPC
    listed = os.listxattr(wd / "f")
    assert len(listed) == len(names) - 1 and sum(len(n) + 1 for n in listed) <= 65536
    os.setxattr(wd / "f", names[0], b"replaced")  # an existing name can still change
    os.removexattr(wd / "f", names[1])
    os.setxattr(wd / "f", names[-1], b"v")  # room again


def test_xattr_outside_the_known_namespaces_is_refused_as_on_ext4(wd):
    write_bytes(wd / "f", b"x")
    for name in ("bogus.name", "system.foo", "userx.name"):
        expect_errno(errno.EOPNOTSUPP, os.setxattr, wd / "f", name, b"1")
    os.setxattr(wd / "f", "trusted.ok", b"1")  # root: CAP_SYS_ADMIN
    os.setxattr(wd / "f", "security.ok", b"1")
    assert {"trusted.ok", "security.ok"} <= set(os.listxattr(wd / "f"))


def test_posix_acl_is_applied_or_refused(wd):
    """cp -a and rsync -A set modes through ACL xattrs: a filesystem must either apply
    them to the mode or refuse them (EOPNOTSUPP), never store them and ignore them.
    snapfs applies them (vfs/acl.py); the yardstick may refuse."""
    write_bytes(wd / "f", b"x")
    os.chmod(wd / "f", 0o700)
    try:
        os.setxattr(wd / "f", "system.posix_acl_access", _acl_xattr(6, 4, 0))
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP and not IS_SNAPFS, e
        return
    drop_caches()
    assert stat.S_IMODE(os.stat(wd / "f").st_mode) == 0o640


def _getfacl(path) -> list[str]:
    r = subprocess.run(["getfacl", "-cn", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _setfacl(*args) -> None:
    r = subprocess.run(["setfacl", *map(str, args)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_acl_survives_remount_and_drop_caches(mount, wd):
    """ACLs are rows like other xattrs: what getfacl shows comes back from the catalog,
    not only from the kernel's cache."""
    write_bytes(wd / "f", b"x")
    os.chmod(wd / "f", 0o600)
    os.mkdir(wd / "d")
    _setfacl("-m", "u:1234:rw,m::r", wd / "f")
    _setfacl("-d", "-m", "u:1234:rwx", wd / "d")
    want_f, want_d = _getfacl(wd / "f"), _getfacl(wd / "d")
    assert "user:1234:rw-" in want_f and "mask::r--" in want_f
    assert stat.S_IMODE(os.stat(wd / "f").st_mode) == 0o640  # group bits = the mask
    mount.remount()
    drop_caches()
    assert _getfacl(wd / "f") == want_f and _getfacl(wd / "d") == want_d


@pytest.mark.snapfs_only
def test_acl_set_under_a_snapshot_goes_with_its_commit(mount, vd):
    """An ACL set in .snapshots/S belongs to S's draft: committing that draft makes the
    directory show S again, and the kernel must not keep serving the draft's ACL."""
    write_bytes(vd / "f", b"x")
    os.chmod(vd / "f", 0o640)
    s = mount.commit(mount.vol, "acl-base")
    before = _getfacl(s / vd.name / "f")
    _setfacl("-m", "u:1234:rw", s / vd.name / "f")
    drafted = _getfacl(s / vd.name / "f")
    assert "user:1234:rw-" in drafted and drafted != before
    assert stat.S_IMODE(os.stat(s / vd.name / "f").st_mode) == 0o660
    branch = mount.commit(s, "acl-branch")
    assert _getfacl(s / vd.name / "f") == before
    assert stat.S_IMODE(os.stat(s / vd.name / "f").st_mode) == 0o640
    assert _getfacl(branch / vd.name / "f") == drafted
    assert _getfacl(vd / "f") == before


@pytest.mark.snapfs_only
def test_umask_still_applies_under_a_default_acl(wd):
    """ext4 leaves the umask out under a default ACL; through FUSE the kernel applies it
    before snapfs sees the mode (pyfuse3 cannot ask for FUSE_DONT_MASK), so a new node
    gets the default ACL masked by mode & ~umask (README, "Limits"). This notices if
    that ever changes."""
    os.mkdir(wd / "d")
    _setfacl("-d", "-m", "u::rwx,g::rwx,o::rwx,u:1234:rwx", wd / "d")
    old = os.umask(0o027)
    try:
        os.close(os.open(wd / "d" / "f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(wd / "d" / "s", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(wd / "d" / "f").st_mode) == 0o640  # ext4: 0o666
    assert stat.S_IMODE(os.stat(wd / "d" / "s").st_mode) == 0o750  # ext4: 0o777
    assert "mask::r--" in _getfacl(wd / "d" / "f")
