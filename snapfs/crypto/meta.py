"""Encryption of the metadata that reveals content: names, symlink targets, xattrs.

The vfs layer calls one MetaCipher at the points where it reads or writes those columns
of the catalog. PlainMeta passes everything through; EncryptedMeta seals names
deterministically (bound to the parent directory, padded to 32 bytes so lengths leak
only coarsely) so that a lookup can seal the name it looks for, and seals targets and
xattr values with random nonces bound to their inode (and xattr name). Sizes, modes,
times and the tree's shape stay in clear (see docs/design.md).
"""

from __future__ import annotations

import struct

from snapfs.crypto.aead import Aead
from snapfs.crypto.keys import Keys

_INO = struct.Struct("<Q")


class PlainMeta:
    encrypted = False

    def name_enc(self, parent: int, name: bytes) -> bytes:
        return name

    def name_dec(self, parent: int, blob: bytes) -> bytes:
        return blob

    def target_enc(self, ino: int, target: bytes | None) -> bytes | None:
        return target

    def target_dec(self, ino: int, blob: bytes | None) -> bytes | None:
        return blob

    def xname_enc(self, ino: int, name: bytes) -> bytes:
        return name

    def xname_dec(self, ino: int, blob: bytes) -> bytes:
        return blob

    def xvalue_enc(self, ino: int, name: bytes, value: bytes | None) -> bytes | None:
        return value

    def xvalue_dec(self, ino: int, name: bytes, blob: bytes | None) -> bytes | None:
        return blob


class EncryptedMeta(PlainMeta):
    encrypted = True

    def __init__(self, keys: Keys) -> None:
        self._names = Aead(keys.name_key)
        self._meta = Aead(keys.meta_key)

    def name_enc(self, parent: int, name: bytes) -> bytes:
        return self._names.seal_det(name, b"name" + _INO.pack(parent), pad_to=32)

    def name_dec(self, parent: int, blob: bytes) -> bytes:
        return self._names.open_det(blob, b"name" + _INO.pack(parent),
                                    f"a name in directory inode {parent}")

    def target_enc(self, ino: int, target: bytes | None) -> bytes | None:
        if target is None:
            return None
        return self._meta.seal(target, b"target" + _INO.pack(ino), pad_to=32)

    def target_dec(self, ino: int, blob: bytes | None) -> bytes | None:
        if blob is None:
            return None
        return self._meta.open(blob, b"target" + _INO.pack(ino),
                               f"the symlink target of inode {ino}")

    def xname_enc(self, ino: int, name: bytes) -> bytes:
        return self._names.seal_det(name, b"xattr" + _INO.pack(ino), pad_to=16)

    def xname_dec(self, ino: int, blob: bytes) -> bytes:
        return self._names.open_det(blob, b"xattr" + _INO.pack(ino),
                                    f"an xattr name of inode {ino}")

    def xvalue_enc(self, ino: int, name: bytes, value: bytes | None) -> bytes | None:
        if value is None:
            return None
        return self._meta.seal(value, b"xvalue" + _INO.pack(ino) + name)

    def xvalue_dec(self, ino: int, name: bytes, blob: bytes | None) -> bytes | None:
        if blob is None:
            return None
        return self._meta.open(blob, b"xvalue" + _INO.pack(ino) + name,
                               f"an xattr value of inode {ino}")
