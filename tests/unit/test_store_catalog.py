"""The SQLite catalog: schema, group commit, WAL sync and checkpoints (snapfs/store/catalog.py)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from snapfs.errors import FormatError
from snapfs.store.catalog import SCHEMA_VERSION, Catalog

TABLES = {"meta", "vertices", "volumes", "snapshot_drafts", "inodes", "dirents", "blocks",
          "xattrs", "chunks", "vertex_chunks"}


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "meta.db")


@pytest.fixture
def cat(db_path):
    c = Catalog(db_path)
    yield c
    c.close()


def other_connection(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=5)


def test_schema_created(cat, db_path):
    names = {r[0] for r in cat.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names >= TABLES
    assert cat.meta_get("schema") == SCHEMA_VERSION
    assert cat.meta_get("next_ino") == 2
    assert cat.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # the schema rows are committed at open: another connection sees them
    con = other_connection(db_path)
    try:
        assert con.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (1,)
    finally:
        con.close()


def test_reopen_keeps_data_and_does_not_reset_meta(db_path):
    c = Catalog(db_path)
    c.meta_set("next_ino", 77)
    c.write("INSERT INTO volumes VALUES ('v', 1, 0)")
    c.close()
    c = Catalog(db_path)
    try:
        assert c.meta_get("next_ino") == 77
        assert c.execute("SELECT name, draft FROM volumes").fetchall() == [("v", 1)]
    finally:
        c.close()


def test_wrong_schema_version_is_refused(db_path):
    c = Catalog(db_path)
    c.meta_set("schema", SCHEMA_VERSION + 1)
    c.close()
    with pytest.raises(FormatError, match="schema"):
        Catalog(db_path)


def test_a_file_that_is_not_a_database(db_path):
    with open(db_path, "wb") as f:
        f.write(b"this is not an sqlite database, just junk " * 100)
    with pytest.raises(FormatError, match="snapfs fsck"):
        Catalog(db_path)


def test_readonly_needs_an_existing_catalog(db_path):
    with pytest.raises(FormatError, match="missing"):
        Catalog(db_path, readonly=True)


def test_readonly_reads(db_path):
    c = Catalog(db_path)
    c.meta_set("k", "v")
    c.close()
    ro = Catalog(db_path, readonly=True)
    try:
        assert ro.meta_get("k") == "v"
        assert ro.meta_get("absent", 5) == 5
    finally:
        ro.close()


def test_group_commit_makes_writes_visible_together(cat, db_path):
    con = other_connection(db_path)
    try:
        cat.meta_set("a", 1)
        cat.write("INSERT INTO volumes VALUES ('x', 1, 0)")
        assert cat._in_tx
        assert cat.meta_get("a") == 1  # visible to its own connection
        assert con.execute("SELECT value FROM meta WHERE key='a'").fetchone() is None
        assert con.execute("SELECT COUNT(*) FROM volumes").fetchone() == (0,)
        cat.commit()
        assert not cat._in_tx
        assert con.execute("SELECT value FROM meta WHERE key='a'").fetchone() == (1,)
        assert con.execute("SELECT COUNT(*) FROM volumes").fetchone() == (1,)
        cat.commit()  # nothing open: a no-op
    finally:
        con.close()


def test_rollback_drops_everything_since_the_last_commit(cat):
    cat.meta_set("kept", 1)
    cat.commit()
    cat.meta_set("kept", 2)
    cat.meta_set("dropped", 3)
    cat.writemany("INSERT INTO volumes VALUES (?, ?, 0)", [("a", 1), ("b", 2)])
    cat.rollback()
    assert not cat._in_tx
    assert cat.meta_get("kept") == 1
    assert cat.meta_get("dropped") is None
    assert cat.execute("SELECT COUNT(*) FROM volumes").fetchone() == (0,)
    cat.rollback()  # nothing open: a no-op
    cat.meta_set("after", 4)  # a new transaction starts on the next write
    cat.commit()
    assert cat.meta_get("after") == 4


def test_close_commits_the_open_group(db_path):
    c = Catalog(db_path)
    c.meta_set("late", "yes")
    c.close()
    c = Catalog(db_path)
    try:
        assert c.meta_get("late") == "yes"
    finally:
        c.close()


def test_writer_holds_the_write_lock_until_commit(cat, db_path):
    cat.meta_set("x", 1)  # BEGIN IMMEDIATE: the write lock is taken now
    con = sqlite3.connect(db_path, isolation_level=None, timeout=0.05)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            con.execute("BEGIN IMMEDIATE")
        cat.commit()
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_sync_wal_and_checkpoint_from_threads_do_not_disturb_the_connection(cat, db_path):
    """The daemon checkpoints and fsyncs the WAL from worker threads while the trio
    thread keeps writing on the main connection, with a transaction open."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def background():
        try:
            while not stop.is_set():
                cat.checkpoint()
                cat.sync_wal()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=background)
    t.start()
    try:
        for i in range(300):
            cat.write("INSERT INTO chunks (hash, pack, offset, length, raw_len) "
                      "VALUES (?, 1, ?, 10, 10)", (i.to_bytes(4, "big"), i))
            if i % 10 == 9:
                cat.commit()
        cat.commit()
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert cat.execute("SELECT COUNT(*) FROM chunks").fetchone() == (300,)
    cat.checkpoint()
    con = other_connection(db_path)
    try:
        assert con.execute("SELECT COUNT(*) FROM chunks").fetchone() == (300,)
    finally:
        con.close()


def test_checkpoint_with_an_open_transaction(cat, db_path):
    cat.meta_set("committed", 1)
    cat.commit()
    cat.meta_set("pending", 2)  # open transaction on the main connection
    t = threading.Thread(target=cat.checkpoint)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a PASSIVE checkpoint must not wait for the writer"
    cat.sync_wal()
    assert cat._in_tx and cat.meta_get("pending") == 2
    cat.commit()
    con = other_connection(db_path)
    try:
        assert dict(con.execute("SELECT key, value FROM meta").fetchall())["pending"] == 2
    finally:
        con.close()


def test_checkpoint_moves_committed_data_into_the_database_file(db_path):
    c = Catalog(db_path)
    c.writemany("INSERT INTO volumes VALUES (?, ?, 0)", [(f"v{i}", i) for i in range(50)])
    c.commit()
    c.checkpoint()
    # copy only the main database file: what a checkpoint wrote must be in it
    import shutil

    copy = db_path + ".copy"
    shutil.copyfile(db_path, copy)
    c.close()
    con = sqlite3.connect(copy)
    try:
        assert con.execute("SELECT COUNT(*) FROM volumes").fetchone() == (50,)
    finally:
        con.close()


class _FullOnCommit:
    """The catalog's connection, whose next COMMIT fails as on a full disk: SQLite rolls
    the transaction back and reports SQLITE_FULL (what a real full disk does; the mounted
    tests in tests/fuse/test_mnt_diskfull.py do it for real)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.failures = 1

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_a_commit_sqlite_rolled_back_is_redone_not_lost(db_path):
    cat = Catalog(db_path)
    cat.write("INSERT INTO meta VALUES ('a', 1)")
    cid = cat.write("INSERT INTO chunks (hash, pack, offset, length, raw_len) "
                    "VALUES (?, 0, 0, 0, 0)", (b"h1",)).lastrowid
    cat.writemany("INSERT INTO meta VALUES (?, ?)", ((f"k{i}", i) for i in range(100)))
    real, cat.db = cat.db, _FullOnCommit(cat.db)
    with pytest.raises(sqlite3.OperationalError):
        cat.commit()
    # back in an open transaction at once: reads see every change, with the same ids
    assert cat.db.in_transaction
    assert cat.meta_get("a") == 1 and cat.meta_get("k99") == 99
    assert cat.execute("SELECT id FROM chunks WHERE hash=?", (b"h1",)).fetchone()[0] == cid
    cat.write("INSERT INTO meta VALUES ('b', 2)")
    cat.commit()
    cat.db = real
    cat.close()
    again = Catalog(db_path)
    try:
        assert [again.meta_get(k) for k in ("a", "b", "k0", "k99")] == [1, 2, 0, 99]
        assert again.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 1
    finally:
        again.close()


def test_a_rolled_back_commit_with_nothing_new_is_redone_by_the_next_commit(db_path):
    cat = Catalog(db_path)
    cat.write("INSERT INTO meta VALUES ('a', 1)")
    real, cat.db = cat.db, _FullOnCommit(cat.db)
    with pytest.raises(sqlite3.OperationalError):
        cat.commit()
    cat.commit()
    cat.db = real
    cat.close()
    again = Catalog(db_path)
    try:
        assert again.meta_get("a") == 1
    finally:
        again.close()


def test_rollback_discards_the_redo_list(db_path):
    cat = Catalog(db_path)
    cat.write("INSERT INTO meta VALUES ('a', 1)")
    cat.commit()
    cat.write("INSERT INTO meta VALUES ('gone', 1)")
    cat.rollback()
    real, cat.db = cat.db, _FullOnCommit(cat.db)
    cat.write("INSERT INTO meta VALUES ('b', 2)")
    with pytest.raises(sqlite3.OperationalError):
        cat.commit()
    cat.commit()
    cat.db = real
    assert [cat.meta_get(k) for k in ("a", "gone", "b")] == [1, None, 2]
    cat.close()


class _FullOnStatement(_FullOnCommit):
    """Fails one INSERT as a full disk can in the middle of a transaction (a page
    cache spill): SQLite rolls the whole transaction back."""

    def execute(self, sql, *args):
        if sql.startswith("INSERT INTO meta") and args and args[0][:1] == ("fail",) \
                and self.failures:
            self.failures -= 1
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)


def test_a_statement_whose_failure_rolled_back_the_transaction_is_redone(db_path):
    cat = Catalog(db_path)
    cid = cat.write("INSERT INTO chunks (hash, pack, offset, length, raw_len) "
                    "VALUES (?, 0, 0, 0, 0)", (b"h1",)).lastrowid
    cat.write("INSERT INTO meta VALUES ('a', 1)")
    real, cat.db = cat.db, _FullOnStatement(cat.db)
    with pytest.raises(sqlite3.OperationalError):
        cat.write("INSERT INTO meta VALUES (?, ?)", ("fail", 0))
    # the next write finds the transaction gone, redoes it, and joins it: nothing is
    # written twice or in autocommit mode
    cat.write("INSERT INTO meta VALUES ('b', 2)")
    assert cat.db.in_transaction
    assert cat.execute("SELECT id FROM chunks WHERE hash=?", (b"h1",)).fetchone()[0] == cid
    cat.commit()
    cat.db = real
    assert [cat.meta_get(k) for k in ("a", "b", "fail")] == [1, 2, None]
    assert cat.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 1
    cat.close()


def test_sync_wal_makes_a_new_wal_s_name_durable_once(cat, db_path, monkeypatch):
    """Our sync_wal fsyncs the WAL behind SQLite's back, and SQLite syncs the directory
    of a WAL it created only in its own first sync of it: so sync_wal syncs the directory
    once per WAL file (a new one after the last connection closed and removed it)."""
    import snapfs.store.catalog as catalog_module

    synced = []
    monkeypatch.setattr(catalog_module, "fsync_dir", synced.append)
    cat.write("INSERT INTO meta(key, value) VALUES ('a', '1')")
    cat.commit()
    cat.sync_wal()
    cat.sync_wal()
    assert synced == [str(db_path.rsplit("/", 1)[0])]
    cat.close()
    again = Catalog(db_path)  # the close removed the WAL: the next one is a new file
    try:
        again.write("INSERT INTO meta(key, value) VALUES ('b', '2')")
        again.commit()
        again.sync_wal()
        again.sync_wal()
    finally:
        again.close()
    assert len(synced) == 2
