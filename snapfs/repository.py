"""An open repository: configuration, lock, catalog, pack store, chunk manager and graph.

This is the composition root used by both the daemon and CLI commands run against an
unmounted repository. Opening takes the single-writer lock first, so a second mount or a
second writer fails with RepositoryLocked before anything is read or changed.
"""

from __future__ import annotations

from snapfs.crypto.aead import Aead
from snapfs.crypto.keys import Keys, derive, unwrap
from snapfs.crypto.meta import EncryptedMeta, PlainMeta
from snapfs.errors import UsageError
from snapfs.graph.graph import Graph
from snapfs.store.catalog import Catalog
from snapfs.store.chunks import ChunkManager
from snapfs.store.packs import PackStore
from snapfs.store.repo import RepoLock, RepoPaths, load_config


class Repository:
    """secret opens an encrypted repository: the passphrase or key-file secret that
    unwraps its master key (see open_secret in the CLI). A wrong one raises WrongKey
    before anything is read. cache_bytes sizes the plaintext chunk cache (None: the
    default, chunks.default_cache_bytes)."""

    def __init__(self, path: str, *, holder: str = "a snapfs command",
                 secret: bytes | None = None, cache_bytes: int | None = None) -> None:
        self.paths = RepoPaths(path)
        self.config = load_config(path)
        self.keys = self._unlock(secret)
        self.meta = PlainMeta() if self.keys is None else EncryptedMeta(self.keys)
        self.lock = RepoLock(self.paths)
        self.lock.acquire(holder)
        try:
            self.cat = Catalog(self.paths.db)
            self.packs = PackStore(self.paths.packs, writable=True)
            id_key = self.config.id_key if self.keys is None else self.keys.id_key
            aead = None if self.keys is None else Aead(self.keys.data_key)
            self.chunks = ChunkManager(self.cat, self.packs, id_key, aead=aead,
                                       id_hash=self.config.id_hash,
                                       cache_bytes=cache_bytes)
            self.graph = Graph(self.cat)
            self.cat.commit()
        except BaseException:
            self.lock.release()
            raise

    def _unlock(self, secret: bytes | None) -> Keys | None:
        enc = self.config.encryption
        if not enc:
            return None
        if secret is None:
            raise UsageError(f"{self.paths.root} is encrypted: give its passphrase "
                             "(prompt, SNAPFS_PASSPHRASE or SNAPFS_PASSPHRASE_FD) or --key-file")
        return derive(unwrap(enc["wrapped"], secret))

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

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
