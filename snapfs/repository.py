"""An open repository: configuration, lock, catalog, pack store, chunk manager and graph.

This is the composition root used by both the daemon and CLI commands run against an
unmounted repository. Opening takes the single-writer lock first, so a second mount or a
second writer fails with RepositoryLocked before anything is read or changed.
"""

from __future__ import annotations

from snapfs.graph.graph import Graph
from snapfs.store.catalog import Catalog
from snapfs.store.chunks import ChunkManager
from snapfs.store.packs import PackStore
from snapfs.store.repo import RepoLock, RepoPaths, load_config


class Repository:
    def __init__(self, path: str, *, holder: str = "a snapfs command") -> None:
        self.paths = RepoPaths(path)
        self.config = load_config(path)
        self.lock = RepoLock(self.paths)
        self.lock.acquire(holder)
        try:
            self.cat = Catalog(self.paths.db)
            self.packs = PackStore(self.paths.packs, writable=True)
            self.chunks = ChunkManager(self.cat, self.packs, self.config.id_key)
            self.graph = Graph(self.cat)
            self.cat.commit()
        except BaseException:
            self.lock.release()
            raise

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    def sync(self) -> None:
        """Durability point: pack data first, then the catalog that references it."""
        self.packs.sync()
        self.cat.commit()
        self.cat.sync_wal()

    def close(self) -> None:
        try:
            self.sync()
            self.cat.close()
            self.packs.close()
        finally:
            self.lock.release()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.cat.rollback()
        self.close()
