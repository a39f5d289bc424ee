"""Identifiers and the two storage interfaces (SPEC section 10).

snapfs keeps chunk data and the graph behind two narrow interfaces so that the embedded
backends (pack files, SQLite) can later be replaced by an object store and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType, Protocol

ChunkId = NewType("ChunkId", int)  # row id in the chunk index; 0 means "hole"
VertexId = NewType("VertexId", int)  # a snapshot or a draft
Ino = NewType("Ino", int)  # repository-wide inode number, shared by all versions of a file

HOLE = ChunkId(0)
ROOT_INO = Ino(1)


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a stored chunk lives: pack file, byte offset of its record, record length."""

    pack: int
    offset: int
    length: int


class ChunkStore(Protocol):
    """Immutable chunk records, addressed by location. Implemented by store.packs.PackStore."""

    def append(self, chunk_id: int, payload: bytes, raw_len: int, flags: int) -> ChunkLocation: ...

    def read(self, chunk_id: int, loc: ChunkLocation) -> tuple[bytes, int]: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...
