"""POSIX ACLs below the kernel: the xattr format, the mode rules of fs/posix_acl.c, and
what a view stores. tests/fuse/posix_probe.py (scenario "acls") checks the same through
the kernel against ext4."""

from __future__ import annotations

import errno
import stat

import pytest
from test_vfs_view import raises_errno
from unithelpers import mkfile, trio_test

from snapfs.errors import FsError
from snapfs.types import ROOT_INO
from snapfs.vfs import acl
from snapfs.vfs.acl import GROUP, GROUP_OBJ, MASK, OTHER, USER, USER_OBJ, Entry

BASE = (Entry(USER_OBJ, 6), Entry(GROUP_OBJ, 4), Entry(OTHER, 0))
NAMED = (Entry(USER_OBJ, 6), Entry(USER, 6, 1001), Entry(GROUP_OBJ, 4),
         Entry(GROUP, 5, 2001), Entry(MASK, 6), Entry(OTHER, 0))


def test_parse_and_dump_round_trip():
    for entries in (BASE, NAMED):
        assert acl.parse(acl.dump(entries)) == entries
    # the kernel's encoding: version 2, then (tag, perm, id) little-endian
    assert acl.dump(BASE)[:4] == b"\x02\x00\x00\x00" and len(acl.dump(NAMED)) == 4 + 6 * 8


@pytest.mark.parametrize("value", [
    b"", b"\x02\x00\x00", b"\x02\x00\x00\x00" + b"\x01\x00",
    acl.dump(BASE[:2]),  # no other entry
    acl.dump((Entry(USER_OBJ, 6), Entry(USER, 6, 5), Entry(GROUP_OBJ, 4), Entry(OTHER, 0))),
    acl.dump((Entry(GROUP_OBJ, 4), Entry(USER_OBJ, 6), Entry(OTHER, 0))),  # out of order
    acl.dump((Entry(USER_OBJ, 6), Entry(USER, 6, 5), Entry(USER, 4, 5), Entry(GROUP_OBJ, 4),
              Entry(MASK, 6), Entry(OTHER, 0))),  # the same user twice
    acl.dump((Entry(USER_OBJ, 8), Entry(GROUP_OBJ, 4), Entry(OTHER, 0))),  # perm > 7
    acl.dump((Entry(USER_OBJ, 6), Entry(0x40, 4), Entry(OTHER, 0))),  # unknown tag
])
def test_malformed_acls_are_refused(value):
    with pytest.raises(FsError) as e:
        acl.parse(value)
    assert e.value.errno == errno.EINVAL


def test_mode_bits_chmod_and_minimal():
    assert acl.mode_bits(BASE) == 0o640
    assert acl.mode_bits(NAMED) == 0o660  # the mask, not the group entry, gives group bits
    assert acl.is_minimal(BASE) and not acl.is_minimal(NAMED)
    assert not acl.is_minimal((Entry(USER_OBJ, 7), Entry(GROUP_OBJ, 4), Entry(MASK, 5),
                               Entry(OTHER, 0)))
    changed = acl.chmod(NAMED, 0o705)
    assert acl.mode_bits(changed) == 0o705
    assert changed[1] == Entry(USER, 6, 1001) and changed[2] == Entry(GROUP_OBJ, 4)
    assert acl.chmod(BASE, 0o751) == (Entry(USER_OBJ, 7), Entry(GROUP_OBJ, 5), Entry(OTHER, 1))


def test_inherit_masks_the_default_by_the_mode_asked_for():
    default = (Entry(USER_OBJ, 7), Entry(USER, 7, 1001), Entry(GROUP_OBJ, 5), Entry(MASK, 7),
               Entry(OTHER, 0))
    access, mode = acl.inherit(default, stat.S_IFREG | 0o666)
    assert mode == stat.S_IFREG | 0o660
    assert access == (Entry(USER_OBJ, 6), Entry(USER, 7, 1001), Entry(GROUP_OBJ, 5),
                      Entry(MASK, 6), Entry(OTHER, 0))
    access, mode = acl.inherit(BASE, stat.S_IFDIR | 0o777)
    assert mode == stat.S_IFDIR | 0o640 and acl.is_minimal(access)


def test_access_acl_sets_the_mode_and_is_stored_only_when_it_says_more(view):
    f = mkfile(view, b"f")  # 0644
    view.setxattr(f.ino, acl.ACCESS, acl.dump(NAMED))
    assert stat.S_IMODE(f.mode) == 0o660
    assert acl.parse(view.getxattr(f.ino, acl.ACCESS)) == NAMED
    view.setxattr(f.ino, acl.ACCESS, acl.dump((Entry(USER_OBJ, 7), Entry(GROUP_OBJ, 0),
                                               Entry(OTHER, 4))))
    assert stat.S_IMODE(f.mode) == 0o704
    assert acl.ACCESS not in view.listxattr(f.ino)  # the mode says it all: not stored
    view.removexattr(f.ino, acl.ACCESS)  # removing an ACL that is not there is no error
    with raises_errno(errno.ENODATA):
        view.removexattr(f.ino, b"user.none")


@trio_test
async def test_chmod_changes_the_access_acl(view):
    f = mkfile(view, b"f")
    view.setxattr(f.ino, acl.ACCESS, acl.dump(NAMED))
    await view.setattr(f.ino, mode=0o604)
    assert acl.parse(view.getxattr(f.ino, acl.ACCESS)) == acl.chmod(NAMED, 0o604)
    view.inodes.clear()  # from the rows
    assert acl.parse(view.getxattr(f.ino, acl.ACCESS))[4] == Entry(MASK, 0)


def test_default_acl_is_inherited_instead_of_the_umask(view):
    d = view.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with raises_errno(errno.EACCES):
        view.setxattr(mkfile(view, b"f").ino, acl.DEFAULT, acl.dump(BASE))
    default = (Entry(USER_OBJ, 7), Entry(USER, 7, 1001), Entry(GROUP_OBJ, 5), Entry(MASK, 7),
               Entry(OTHER, 5))
    view.setxattr(d.ino, acl.DEFAULT, acl.dump(default))
    f = view.mknod(d.ino, b"f", stat.S_IFREG | 0o666, 0, 1, 1, umask=0o077)
    sub = view.mkdir(d.ino, b"sub", 0o750, 1, 1, umask=0o077)
    link = view.symlink(d.ino, b"l", b"f", 1, 1)
    assert stat.S_IMODE(f.mode) == 0o664 and stat.S_IMODE(sub.mode) == 0o750
    assert acl.parse(view.getxattr(f.ino, acl.ACCESS)) == acl.inherit(default, 0o666)[0]
    assert acl.DEFAULT not in view.listxattr(f.ino)
    assert view.getxattr(sub.ino, acl.DEFAULT) == acl.dump(default)  # directories pass it on
    assert view.listxattr(link.ino) == [] and stat.S_IMODE(link.mode) == 0o777
    plain = view.mknod(ROOT_INO, b"p", stat.S_IFREG | 0o666, 0, 1, 1, umask=0o027)
    assert stat.S_IMODE(plain.mode) == 0o640 and view.listxattr(plain.ino) == []
    view.removexattr(d.ino, acl.DEFAULT)
    g = view.mknod(d.ino, b"g", stat.S_IFREG | 0o666, 0, 1, 1, umask=0o022)
    assert stat.S_IMODE(g.mode) == 0o644 and view.listxattr(g.ino) == []


def test_setting_an_access_acl_outside_the_group_clears_setgid(view):
    f = mkfile(view, b"f", mode=stat.S_IFREG | 0o2775)
    view.setxattr(f.ino, acl.ACCESS, acl.dump(NAMED), keep_sgid=True)
    assert f.mode & stat.S_ISGID
    view.setxattr(f.ino, acl.ACCESS, acl.dump(NAMED), keep_sgid=False)
    assert not f.mode & stat.S_ISGID and stat.S_IMODE(f.mode) == 0o660


@trio_test
async def test_a_snapshot_keeps_its_acl(fs, view):
    f = mkfile(view, b"f")
    view.setxattr(f.ino, acl.ACCESS, acl.dump(NAMED))
    await fs.commit(view, "s1")
    f = view.lookup(ROOT_INO, b"f")
    await view.setattr(f.ino, mode=0o600)
    view.removexattr(f.ino, acl.ACCESS)
    snap = fs.snapshot_view("v@s1")
    g = snap.lookup(ROOT_INO, b"f")
    assert stat.S_IMODE(g.mode) == 0o660
    assert acl.parse(snap.getxattr(g.ino, acl.ACCESS)) == NAMED
    assert acl.ACCESS not in view.listxattr(f.ino)
