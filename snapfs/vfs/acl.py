"""POSIX ACLs: the part of their semantics that Linux leaves to a FUSE file system.

With ``FUSE_POSIX_ACL`` (pyfuse3's ``enable_acl``) the kernel parses, caches and enforces
ACLs in its permission checks, and stores them through the file system as the xattrs
``system.posix_acl_access`` and ``system.posix_acl_default``. What a local file system's
own ACL code does besides is ours (fs/fuse/acl.c says so): keep the mode's permission
bits in step with the access ACL (setting an ACL changes the mode, chmod changes the
ACL), store no access ACL that the mode says already, and give a new file or directory
the default ACL of its parent, masked by the mode asked for, instead of the umask. The
rules below are those of the kernel's fs/posix_acl.c, so that ``getfacl``, ``ls -l`` and
every access decision come out as on ext4.

The xattr value (``posix_acl_xattr``): a little-endian u32 version (2), then entries of
u16 tag, u16 permission bits (rwx = 4, 2, 1), u32 uid or gid (named entries only).
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

from snapfs.errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_TAG_ORDER = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)


class Entry(NamedTuple):
    tag: int
    perm: int
    id: int = UNDEFINED_ID


Acl = tuple[Entry, ...]


def parse(value: bytes) -> Acl:
    """The entries of an xattr value, checked as the kernel's posix_acl_valid checks them
    (EINVAL otherwise): the kernel validates what it sends, but a value read back from an
    imported bundle or an older catalog should not be trusted blindly."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "malformed POSIX ACL")
    (version,) = _HEADER.unpack_from(value)
    if version != VERSION:
        raise FsError(errno.EOPNOTSUPP, f"POSIX ACL version {version}")
    acl = tuple(Entry(*_ENTRY.unpack_from(value, off))
                for off in range(_HEADER.size, len(value), _ENTRY.size))
    _validate(acl)
    return acl


def _validate(acl: Acl) -> None:
    last = (-1, -1)
    for tag, perm, ident in acl:
        if tag not in _TAG_ORDER or perm & ~7:
            raise FsError(errno.EINVAL, "malformed POSIX ACL")
        key = (_TAG_ORDER.index(tag), ident if tag in (USER, GROUP) else 0)
        if key <= last:
            raise FsError(errno.EINVAL, "POSIX ACL entries out of order or repeated")
        last = key
    tags = [e.tag for e in acl]
    if any(t not in tags for t in (USER_OBJ, GROUP_OBJ, OTHER)):
        raise FsError(errno.EINVAL, "POSIX ACL without its owner, group or other entry")
    if (USER in tags or GROUP in tags) and MASK not in tags:
        raise FsError(errno.EINVAL, "POSIX ACL with named entries needs a mask")


def dump(acl: Acl) -> bytes:
    """The xattr value, named entries with their id, the others with UNDEFINED_ID."""
    return _HEADER.pack(VERSION) + b"".join(
        _ENTRY.pack(e.tag, e.perm, e.id if e.tag in (USER, GROUP) else UNDEFINED_ID)
        for e in acl)


def _find(acl: Acl, tag: int) -> Entry | None:
    return next((e for e in acl if e.tag == tag), None)


def is_minimal(acl: Acl) -> bool:
    """The ACL says nothing the mode does not (posix_acl_equiv_mode): no named entries
    and no mask. Such an access ACL is not stored, as on ext4: the mode alone says it."""
    return not any(e.tag in (USER, GROUP, MASK) for e in acl)


def mode_bits(acl: Acl) -> int:
    """The permission bits of the mode an access ACL implies: owner from the owner entry,
    group from the mask (or the group entry without one), other from the other entry."""
    group = _find(acl, MASK) or _find(acl, GROUP_OBJ)
    owner, other = _find(acl, USER_OBJ), _find(acl, OTHER)
    assert owner and group and other  # parse() checked
    return owner.perm << 6 | group.perm << 3 | other.perm


def with_mode(mode: int, acl_mode: int) -> int:
    """mode with its rwx bits replaced by acl_mode's (file type and set-id bits kept)."""
    return (mode & ~0o777) | (acl_mode & 0o777)


def chmod(acl: Acl, mode: int) -> Acl:
    """An access ACL after chmod (posix_acl_chmod): the owner, mask (or group, without a
    mask) and other entries take the new bits; named entries keep theirs and stay
    limited by the mask."""
    group_tag = MASK if _find(acl, MASK) else GROUP_OBJ
    bits = {USER_OBJ: mode >> 6 & 7, group_tag: mode >> 3 & 7, OTHER: mode & 7}
    return tuple(e._replace(perm=bits[e.tag]) if e.tag in bits else e for e in acl)


def inherit(default: Acl, mode: int) -> tuple[Acl, int]:
    """The access ACL and mode of a new node under a directory with a default ACL
    (posix_acl_create): the default ACL masked by the mode asked for, the umask left
    out. Returns the ACL (minimal when it says no more than the mode) and the mode."""
    perms = mode & 0o777
    group_tag = MASK if _find(default, MASK) else GROUP_OBJ
    shift = {USER_OBJ: 6, group_tag: 3, OTHER: 0}
    acl = tuple(e._replace(perm=e.perm & (perms >> shift[e.tag] & 7)) if e.tag in shift
                else e for e in default)
    return acl, with_mode(mode, mode_bits(acl))

