"""The catalog: all metadata in one SQLite database (WAL mode).

Schema (format 1). Everything a vertex changes is a row tagged with that vertex, so a
snapshot shares every unchanged row with its ancestors and a commit writes nothing but
the vertex row itself. The version of an item seen from vertex v is the row whose vertex
is the nearest ancestor-or-self of v (see vfs/view.py).

    meta(key, value)               format, next_ino, next_vertex, purge (vertex ids
                                   whose rows are garbage: deleted vertices, imports
                                   not finished; graph/delete.py)...
    vertices(id, parent, kind, volume, label, name, created, sealed, delta, referenced,
             added, removed)
        kind 'snapshot' (immutable, named VOLUME@LABEL) or 'draft' (writable).
        parent NULL for a root. delta = #added chunks, referenced = #C(v).
        added/removed: the serialized Roaring bitmaps of chunk ids that entered/left C(v)
        (written when a draft is sealed; a draft's are rebuilt from vertex_chunks).
    volumes(name, draft, created)  the volume's draft; its head is the draft's parent
    snapshot_drafts(snapshot, draft)  the draft shown under .snapshots/SNAPSHOT
    inodes(ino, vertex, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev,
           target)             mode 0 = the inode is gone in this vertex
    dirents(parent, name, vertex, ino)        ino 0 = a whiteout (name removed here)
    blocks(ino, idx, vertex, chunk)           chunk 0 = a hole (or truncated away)
    xattrs(ino, name, vertex, value)          value NULL = removed here
    chunks(id, hash, pack, offset, length, raw_len)
        hash = keyed BLAKE3 (format 1: HMAC-SHA256) of the plaintext under the id key:
        the identity used for deduplication.
        A chunk in no vertex's added set is held by nothing: garbage for the collector.
    site_keys(site, wrapped)   keys of remote sites, wrapped under a repository key
    imports(bundle, vertex, imported)   bundles already imported (a replay is a no-op)
    intent_files(vertex, ino, seq)   the last intent-log record of a file that the rows
        hold since: its records up to seq never apply again (vfs/fs.py). Emptied with
        each new meta.intent_epoch.
    vertex_chunks(vertex, chunk, refs, presence)
        refs: change in the number of references to chunk in this vertex vs its parent;
        presence: +1 chunk entered C(v) here (in delta), -1 left it, 0 no change.

Concurrency contract: one Connection, used only from the trio thread of the daemon (or
the one thread of a CLI command). Statements are short index lookups; a transaction is
kept open and committed in groups (group commit) by Catalog.commit(). Checkpoints copy
the bulk of the WAL on a second connection in a worker thread (Catalog.checkpoint), and
the few frames committed meanwhile on this connection right after a commit
(Catalog.finish_checkpoint), which is what lets SQLite reuse the WAL from its start.

A failed commit leaves the changes in place. SQLite rolls a transaction back when its
COMMIT fails on a full disk (SQLITE_FULL) or an I/O error, while the daemon's memory
(inodes, directories, the graph) already shows those changes. So every write of the open
transaction is also kept in a redo list until its commit succeeds; after such a
rollback the list is replayed at once into a new transaction (same statements, same
order, same starting state: the same rows and ids), and the commit error is raised for
the caller to report (ENOSPC). The next commit, once there is room, writes it all.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable

from snapfs.errors import DiskFull, FormatError
from snapfs.store.packs import fsync_dir

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
JOURNAL_SIZE_LIMIT = 16 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vertices (
    id INTEGER PRIMARY KEY,
    parent INTEGER,
    kind TEXT NOT NULL CHECK (kind IN ('snapshot', 'draft')),
    volume TEXT NOT NULL,
    label TEXT,
    name TEXT UNIQUE,
    created REAL NOT NULL,
    sealed REAL,
    delta INTEGER NOT NULL DEFAULT 0,
    referenced INTEGER NOT NULL DEFAULT 0,
    added BLOB,
    removed BLOB,
    uuid TEXT UNIQUE  -- a snapshot's identity across sites (export/import)
);
CREATE INDEX IF NOT EXISTS vertices_by_parent ON vertices (parent);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    draft INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshot_drafts (
    snapshot INTEGER PRIMARY KEY,
    draft INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER NOT NULL, vertex INTEGER NOT NULL,
    mode INTEGER NOT NULL, nlink INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL, atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, rdev INTEGER NOT NULL, target BLOB,
    PRIMARY KEY (ino, vertex)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inodes_by_vertex ON inodes (vertex);
-- files unlinked while open (released at last close, or at the next mount after a crash)
CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes (ino, vertex) WHERE nlink = 0 AND mode != 0;
CREATE TABLE IF NOT EXISTS dirents (
    parent INTEGER NOT NULL, name BLOB NOT NULL, vertex INTEGER NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name, vertex)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dirents_by_vertex ON dirents (vertex);
CREATE INDEX IF NOT EXISTS dirents_by_ino ON dirents (ino);  -- path of an inode (diff)
CREATE TABLE IF NOT EXISTS blocks (
    ino INTEGER NOT NULL, idx INTEGER NOT NULL, vertex INTEGER NOT NULL, chunk INTEGER NOT NULL,
    PRIMARY KEY (ino, idx, vertex)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_vertex ON blocks (vertex);
CREATE INDEX IF NOT EXISTS blocks_by_chunk ON blocks (chunk);  -- a place holding a chunk
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL, name BLOB NOT NULL, vertex INTEGER NOT NULL, value BLOB,
    PRIMARY KEY (ino, name, vertex)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS xattrs_by_vertex ON xattrs (vertex);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id can't name new data
    hash BLOB NOT NULL UNIQUE,
    pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    raw_len INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vertex_chunks (
    vertex INTEGER NOT NULL, chunk INTEGER NOT NULL,
    refs INTEGER NOT NULL, presence INTEGER NOT NULL,
    PRIMARY KEY (vertex, chunk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vertex_chunks_by_chunk ON vertex_chunks (chunk, vertex);
CREATE TABLE IF NOT EXISTS site_keys (site TEXT PRIMARY KEY, wrapped TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS imports (bundle TEXT PRIMARY KEY, vertex INTEGER, imported REAL);
CREATE TABLE IF NOT EXISTS intent_files (
    vertex INTEGER NOT NULL, ino INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (vertex, ino)
) WITHOUT ROWID;
"""


def _nearly_full(directory: str) -> bool:
    """Less than 1 MiB free (what opening and one small commit need)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


class Catalog:
    """The SQLite connection plus group commit and background checkpoints."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._wal_dir_synced = 0  # inode number of the WAL whose name sync_wal made durable
        existed = os.path.exists(path)
        if readonly and not existed:
            raise FormatError(f"catalog {path} is missing")
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        if not existed:
            # SQLite creates the file 0644 and gives its -wal and -shm files the same
            # mode: the catalog (names, xattrs) is the owner's alone
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                      check_same_thread=False, cached_statements=256)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit writes the WAL without fsync (survives a killed process);
            # durability for fsync() and snapshot commits comes from sync_wal().
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=0")
            # when the WAL restarts after a checkpoint its file is cut back to this (it
            # otherwise keeps its peak); the daemon checkpoints when the file grows past
            # it (vfs/fs.py), i.e. when its content does
            self.db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self.db.execute("PRAGMA cache_size=-65536")
            self.db.execute("PRAGMA temp_store=MEMORY")
            if not readonly:
                self.db.executescript(SCHEMA)
                self._check_format(existed)
        except sqlite3.DatabaseError as e:
            if not readonly and _nearly_full(os.path.dirname(path) or "."):
                # opening in WAL mode creates its -wal and -shm files: on a full disk
                # SQLite says "disk I/O error", which is not damage
                raise DiskFull(f"cannot open the catalog {path}: the disk holding the "
                               f"repository is full ({e}); free some space first")
            raise FormatError(f"catalog {path} cannot be read ({e}); run `snapfs fsck`")
        self._in_tx = False
        self._redo: list[tuple[str, object, bool]] = []  # the open transaction's writes
        self._replay_pending = False  # rolled back by SQLite, not yet replayed
        self._finish_checkpoint = False
        self.last_commit = time.monotonic()
        # Called by commit() before it ends a transaction, to write what their owners
        # keep in memory between commits (Graph: the drafts' chunk counters)
        self.before_commit: list[Callable[[], None]] = []
        # Commits ended by this connection: a row written while commits == n is part of
        # the (n+1)th commit. vfs/fs.py compares it to know which rows are durable.
        self.commits = 0

    def _check_format(self, existed: bool) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('next_ino', 2)")
        elif row[0] != SCHEMA_VERSION:
            raise FormatError(f"catalog schema {row[0]} is not supported (want {SCHEMA_VERSION})")

    # -- transactions ------------------------------------------------------------------
    def begin(self) -> None:
        """Make sure a write transaction is open; the caller's changes join it. If SQLite
        rolled the open one back (a statement or a COMMIT that met a full disk), its
        writes are redone first."""
        if self._in_tx and not self.db.in_transaction:
            self._in_tx = False
            self._replay_pending = True
        if not self._in_tx:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            if self._replay_pending:
                self._replay()

    def _replay(self) -> None:
        """Redo the writes SQLite rolled back, in the transaction just begun."""
        try:
            for sql, args, many in self._redo:
                if many:
                    self.db.executemany(sql, args)  # type: ignore[arg-type]
                else:
                    self.db.execute(sql, args)  # type: ignore[arg-type]
        except BaseException:
            self.db.execute("ROLLBACK")
            self._in_tx = False
            raise
        self._replay_pending = False

    def execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    def write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        self.begin()
        cursor = self.db.execute(sql, args)
        self._redo.append((sql, args, False))
        return cursor

    def writemany(self, sql: str, rows) -> None:
        self.begin()
        rows = rows if isinstance(rows, list) else list(rows)  # kept for a replay
        self.db.executemany(sql, rows)
        self._redo.append((sql, rows, True))

    def commit(self) -> None:
        """End the group transaction (WAL append, no fsync: see sync_wal). On failure
        the changes stay in an open transaction (see the module docstring)."""
        for write_pending in self.before_commit:
            write_pending()
        if self._replay_pending or (self._in_tx and not self.db.in_transaction):
            self.begin()  # redo what SQLite rolled back, then commit it with the rest
        if self._in_tx:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                if not self.db.in_transaction:  # SQLite rolled it back: redo it now
                    try:
                        self.begin()
                    except sqlite3.Error as e:
                        log.warning("redoing a rolled-back transaction failed (%s); the "
                                    "next commit tries again", e)
                raise
            self._in_tx = False
            self._redo.clear()
        self.commits += 1
        self.last_commit = time.monotonic()
        if self._finish_checkpoint:
            try:
                self.finish_checkpoint()
            except sqlite3.Error as e:  # the commit above stands; the next round retries
                self._finish_checkpoint = False
                log.warning("finishing a WAL checkpoint failed: %s", e)

    def rollback(self) -> None:
        """Discard the open transaction (the caller's own, just begun: see exchange)."""
        if self._in_tx:
            self.db.execute("ROLLBACK")
            self._in_tx = False
        self._redo.clear()
        self._replay_pending = False

    def sync_wal(self) -> None:
        """fsync the WAL file: everything committed so far survives a power loss.

        Only the WAL: a commit writes nothing else, and SQLite itself syncs the database
        file after every checkpoint, before the WAL it copied may be reused (synchronous
        NORMAL or FULL). An fsync of the database here cost 40-150 us per file fsync.
        Safe to call from a worker thread: it touches only the file, not the connection.
        """
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:  # no WAL: everything is in the database, synced
            return
        try:
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        if ino != self._wal_dir_synced:
            # A WAL SQLite created since: SQLite syncs its directory only in its own
            # first sync of it (a checkpoint); until then the name could be lost.
            fsync_dir(os.path.dirname(self.path) or ".")
            self._wal_dir_synced = ino

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL back into the database; runs on its own connection (any thread).

        Returns SQLite's (busy, frames in the WAL, frames checkpointed). This alone never
        lets the WAL shrink while writes go on: SQLite starts writing the WAL from its
        beginning again only when a write transaction *begins* after a checkpoint that
        copied every frame, and the daemon's connection has usually begun its next group
        transaction by the time a worker thread's checkpoint ends, whose frames the next
        checkpoint finds again (the WAL grew to 979 MB over 10,000 commits). So call
        request_restart() after it: see finish_checkpoint.
        """
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            return tuple(con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        finally:
            con.close()

    def request_restart(self) -> None:
        """Finish the checkpoint at the next commit (see finish_checkpoint)."""
        self._finish_checkpoint = True

    def finish_checkpoint(self) -> tuple[int, int, int] | None:
        """Between two transactions of this connection: copy the frames committed since
        the worker thread's checkpoint (few: that one did the bulk), so that the next write
        transaction begins with the whole WAL in the database and SQLite restarts the WAL
        from its beginning (journal_size_limit then cuts the file back). PASSIVE never
        waits for a lock. Crash safety is SQLite's own: the WAL is synced before frames are
        copied and the database is synced before the WAL is reused. The cost on the
        calling (trio) thread is that small copy and those two syncs, once per checkpoint.
        """
        if self._in_tx or self.readonly:
            return None
        self._finish_checkpoint = False
        return tuple(self.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())

    def wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            return 0

    # -- small helpers -------------------------------------------------------------------
    def meta_get(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def meta_set(self, key: str, value) -> None:
        self.write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def close(self) -> None:
        if not self.readonly:
            self.commit()
        self.db.close()
