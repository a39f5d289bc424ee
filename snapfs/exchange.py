"""Exporting snapshots to another site and importing them (SPEC section 7).

A bundle is an authenticated record stream (crypto/sitekeys.py) under a site key that
both sites hold. Its records, in order:

    b"H" + JSON   header: source repository, chunk size, the snapshot (uuid, volume,
                  label, created) and its base (uuid, name) for an incremental bundle
    b"C" + u64 + payload   one delta chunk (plaintext inside the site's encryption)
    b"R" + JSON   a batch of rows: inodes, dirents, blocks, xattrs (bytes as hex)
    trailer JSON  counts

Full bundle: every row of the snapshot's tree, every chunk it references.
Incremental bundle (--since P, an ancestor): the rows written on the path from P down to
the snapshot, resolved (the nearest version of each key, tombstones included), and only
the chunks the snapshot holds that P does not: exactly its delta over P. A block whose
chunk P already has is sent as a reference to a place in P that holds it ("p", ino,
idx), which the receiver resolves in its own copy of P; a new one as ("d", n), the n-th
chunk record. Inode numbers travel unchanged: they are unique along every chain.

Import verifies the whole bundle (spooled to a file first) before it changes anything,
refuses a bundle whose base it lacks (naming it), a bundle from itself, and a second
import of the same bundle (a no-op while the snapshot it made exists). The bundle's
chunks are stored first, in batches, without keeping their data in memory; then the
snapshot's rows are written, in slices between the daemon's other requests, under a
vertex id listed for purging, and its vertex is added last (and the id unlisted): one
durable commit makes the snapshot whole. A kill in the middle leaves the repository as
it was, plus rows the next mount purges and unreferenced chunks for the collector.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import stat
import struct
import sys
import tempfile
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from typing import BinaryIO

import trio
from pyroaring import BitMap

from snapfs.crypto.aead import Aead, hkdf
from snapfs.crypto.sitekeys import (
    BundleReader,
    BundleWriter,
    SiteKey,
    check_site_name,
    create_site_key,
    unwrap_site_key,
    verify_all,
    wrap_site_key,
    write_site_key_file,
)
from snapfs.errors import AlreadyExists, FormatError, NotFound, Refused, UsageError
from snapfs.fsck import tree_count_steps
from snapfs.graph import accounting
from snapfs.graph.delete import list_for_purge, unlist
from snapfs.graph.graph import Vertex
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem
from snapfs.vfs.view import PinnedView, View

log = logging.getLogger(__name__)
U64 = struct.Struct("<Q")
ROWS_PER_RECORD = 2000
# inodes or keys an export reads between two yields (control.run_in_slices gives the loop
# a turn after every 2 ms of them)
ROW_STEP = 64
BUNDLE_KIND = "snapfs-bundle"


# -- site keys -----------------------------------------------------------------------------
def _site_wrapper(fs: Filesystem) -> Aead:
    keys = fs.repo.keys
    base = keys.meta_key if keys is not None else fs.repo.config.id_key
    return Aead(hkdf(base, b"snapfs/v1/site-keys"))


def store_site_key(fs: Filesystem, site_key: SiteKey) -> None:
    if fs.cat.execute("SELECT 1 FROM site_keys WHERE site=?", (site_key.site,)).fetchone():
        raise AlreadyExists(f"site {site_key.site} already has a key in this repository")
    wrapped = json.dumps(wrap_site_key(_site_wrapper(fs), site_key))
    fs.cat.write("INSERT INTO site_keys VALUES (?,?)", (site_key.site, wrapped))


def site_key(fs: Filesystem, site: str) -> SiteKey:
    row = fs.cat.execute("SELECT wrapped FROM site_keys WHERE site=?", (site,)).fetchone()
    if row is None:
        raise NotFound(f"this repository has no key for site {site!r}: create one with "
                       f"`snapfs site-key create {site} -o FILE` or add the site's file with "
                       f"`snapfs site-key import {site} FILE`")
    return unwrap_site_key(_site_wrapper(fs), json.loads(row[0]))


def create_site(fs: Filesystem, site: str, path: str) -> None:
    check_site_name(site)
    key = SiteKey(site, create_site_key(site))
    store_site_key(fs, key)
    write_site_key_file(path, key)


# -- export ----------------------------------------------------------------------------------
def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: str | None) -> bytes | None:
    return None if s is None else bytes.fromhex(s)


class _Rows:
    """The rows of a bundle, in plaintext, and the chunks they need."""

    def __init__(self) -> None:
        self.inodes: list = []
        self.dirents: list = []
        self.blocks: list = []  # (ino, idx, chunk id at the source)
        self.xattrs: list = []
        self.max_ino = ROOT_INO


def _inode_row(node) -> list:
    return [node.ino, node.mode, node.nlink, node.uid, node.gid, node.size, node.atime_ns,
            node.mtime_ns, node.ctime_ns, node.rdev, _hex(node.target)]


def _full_rows(view: View, rows: _Rows) -> Generator[None, None, None]:
    """Every row of view's tree into rows; yields every ROW_STEP inodes (walking 50,000
    files in one step held a mount for 1.3 s)."""
    stack, seen = [ROOT_INO], set()
    while stack:
        ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        if len(seen) % ROW_STEP == 0:
            yield
        node = view.get(ino)
        rows.inodes.append(_inode_row(node))
        rows.max_ino = max(rows.max_ino, ino)
        for name, value in view._xattrs(node).items():
            rows.xattrs.append([ino, name.hex(), value.hex()])
        if node.is_dir:
            for name, child in view.listdir(ino):
                rows.dirents.append([ino, name.hex(), child])
                stack.append(child)
        elif stat.S_ISREG(node.mode):
            for idx, chunk in view.stored_blocks(node):
                rows.blocks.append((ino, idx, chunk))


def _incremental_rows(fs: Filesystem, view: View, base: Vertex, snap: Vertex,
                      rows: _Rows) -> Generator[None, None, None]:
    """The resolved rows written on the path from base (exclusive) down to snap, into
    rows; yields every ROW_STEP keys. The keys of each table are read first (a query
    left open across a yield would see the writes made meanwhile)."""
    chain = fs.graph.chain(snap.id)
    path = [v for v, depth in chain.items() if depth > chain[base.id]]
    marks = ",".join(map(str, path)) or "NULL"
    meta = fs.meta

    def keys(sql: str) -> Generator[None, None, list]:
        found = fs.cat.execute(sql).fetchall()
        yield
        return found

    for i, (ino,) in enumerate((yield from keys(
            f"SELECT DISTINCT ino FROM inodes WHERE vertex IN ({marks})"))):
        if i % ROW_STEP == ROW_STEP - 1:
            yield
        row = view._resolve_inode(ino)
        if row is not None:
            rows.inodes.append([ino, *row[:9], _hex(row[9])])
            rows.max_ino = max(rows.max_ino, ino)
    for i, (parent, blob) in enumerate((yield from keys(
            f"SELECT DISTINCT parent, name FROM dirents WHERE vertex IN ({marks})"))):
        if i % ROW_STEP == ROW_STEP - 1:
            yield
        picked = view._pick(fs.cat.execute(
            "SELECT vertex, ino FROM dirents WHERE parent=? AND name=?", (parent, blob)))
        rows.dirents.append([parent, meta.name_dec(parent, blob).hex(), picked[1]])
    for i, (ino, idx) in enumerate((yield from keys(
            f"SELECT DISTINCT ino, idx FROM blocks WHERE vertex IN ({marks})"))):
        if i % ROW_STEP == ROW_STEP - 1:
            yield
        picked = view._pick(fs.cat.execute(
            "SELECT vertex, chunk FROM blocks WHERE ino=? AND idx=?", (ino, idx)))
        rows.blocks.append((ino, idx, picked[1]))
    for i, (ino, blob) in enumerate((yield from keys(
            f"SELECT DISTINCT ino, name FROM xattrs WHERE vertex IN ({marks})"))):
        if i % ROW_STEP == ROW_STEP - 1:
            yield
        picked = view._pick(fs.cat.execute(
            "SELECT vertex, value FROM xattrs WHERE ino=? AND name=?", (ino, blob)))
        name = meta.xname_dec(ino, blob)
        value = meta.xvalue_dec(ino, name, picked[1])
        rows.xattrs.append([ino, name.hex(), _hex(value)])


def _live_inodes(view: View, inos: set[int]) -> Generator[None, None, set[int]]:
    live = set()
    for i, ino in enumerate(inos):
        if i % ROW_STEP == ROW_STEP - 1:
            yield
        try:
            if view.get(ino).nlink:
                live.add(ino)
        except Exception:  # noqa: BLE001 - gone in this tree
            continue
    return live


def _place_in(view: View, chunk: int) -> tuple[int, int] | None:
    """A block of view's tree that holds chunk: how the receiver finds it in its copy."""
    for ino, idx in view.cat.execute("SELECT DISTINCT ino, idx FROM blocks WHERE chunk=?",
                                     (chunk,)):
        try:
            node = view.get(ino)
        except Exception:  # noqa: BLE001 - not in this tree
            continue
        if node.nlink and idx < view._nblocks(node.size) and view.block(node, idx) == chunk:
            return ino, idx
    return None


def export_steps(fs: Filesystem, snapshot: str, since: str | None, site: str,
                 out: BinaryIO, progress: Callable[[str], None] | None = None,
                 ) -> Generator[None, None, dict]:
    """Write the bundle of snapshot (its changes since an ancestor) for site to out, in
    steps of about one chunk each: the daemon serves FUSE requests between them
    (control.run_in_slices); the generator's return value is the summary. The snapshot
    and the base are immutable, and pinned against deletion until the generator ends;
    chunks the collector moves meanwhile are found again by ChunkManager's retry after a
    relocation."""
    g = fs.graph
    snap = g.snapshot(snapshot)
    base = g.snapshot(since) if since else None
    pinned = [snap.id] if base is None else [snap.id, base.id]
    for vid in pinned:  # before pinning either: a refusal leaves nothing pinned
        g.check_not_deleting(vid)
    for vid in pinned:
        fs.pin(vid)
    try:
        return (yield from _export(fs, snap, base, site, out, progress))
    finally:
        for vid in pinned:
            fs.unpin(vid)


def _export(fs: Filesystem, snap: Vertex, base: Vertex | None, site: str, out: BinaryIO,
            progress: Callable[[str], None] | None) -> Generator[None, None, dict]:
    g = fs.graph
    snapshot, since = snap.name, base.name if base is not None else None
    if base is not None and base.id not in g.chain(snap.id):
        raise UsageError(f"--since {since} is not an ancestor of {snapshot}: an incremental "
                         "bundle follows one line of snapshots")
    key = site_key(fs, site)
    view = PinnedView(fs, snap.id)
    rows = _Rows()
    yield from (_full_rows(view, rows) if base is None
                else _incremental_rows(fs, view, base, snap, rows))
    base_view = PinnedView(fs, base.id) if base is not None else None
    base_chunks = accounting.contents(g, base.id) if base is not None else BitMap()
    delta: dict[int, int] = {}  # source chunk id -> index in the bundle
    block_rows = []
    live = yield from _live_inodes(view, {ino for ino, _, _ in rows.blocks})
    for i, (ino, idx, chunk) in enumerate(rows.blocks):
        if i % 256 == 255:
            yield
        if ino not in live:
            continue  # a deleted file: its tombstone is enough
        if not chunk:
            block_rows.append([ino, idx, 0])
        elif chunk in base_chunks and (place := _place_in(base_view, chunk)) is not None:
            block_rows.append([ino, idx, ["p", *place]])
        else:
            n = delta.setdefault(chunk, len(delta))
            block_rows.append([ino, idx, ["d", n]])
    header = {
        "kind": BUNDLE_KIND, "version": 1, "source_repo": fs.repo.config.repo_id,
        "chunk_size": fs.chunk_size, "max_ino": rows.max_ino,
        "snapshot": {"uuid": _uuid_of(fs, snap), "volume": snap.volume, "label": snap.label,
                     "created": snap.created},
        "base": None if base is None else {"uuid": _uuid_of(fs, base), "name": base.name},
    }
    writer = BundleWriter(out, key)
    writer.write_record(b"H" + json.dumps(header).encode())
    sent = 0
    started = time.monotonic()
    for chunk, n in sorted(delta.items(), key=lambda kv: kv[1]):
        yield
        payload = fs.chunks.get_sync(chunk)
        writer.write_record(b"C" + U64.pack(n) + payload)
        sent += len(payload)
        if progress and n % 512 == 511:
            rate = sent / max(time.monotonic() - started, 1e-6) / 2**20
            progress(f"exported {n + 1}/{len(delta)} chunks, {sent / 2**20:.0f} MiB "
                     f"({rate:.0f} MiB/s)")
    for kind, items in (("inodes", rows.inodes), ("dirents", rows.dirents),
                        ("blocks", block_rows), ("xattrs", rows.xattrs)):
        for i in range(0, len(items), ROWS_PER_RECORD):
            writer.write_record(b"R" + json.dumps({kind: items[i:i + ROWS_PER_RECORD]}).encode())
            yield
    summary = {"snapshot": snapshot, "base": since, "chunks": len(delta), "chunk_bytes": sent,
               "inodes": len(rows.inodes), "blocks": len(block_rows)}
    writer.close(json.dumps(summary).encode())
    summary["bundle_bytes"] = writer.bytes_written
    log.info("exported %s%s for site %s: %d chunks", snapshot,
             f" since {since}" if since else "", site, len(delta))
    return summary


def _uuid_of(fs: Filesystem, v: Vertex) -> str:
    row = fs.cat.execute("SELECT uuid FROM vertices WHERE id=?", (v.id,)).fetchone()
    if row and row[0]:
        return row[0]
    value = str(uuidlib.uuid4())  # a snapshot made before uuids: give it one now
    fs.cat.write("UPDATE vertices SET uuid=? WHERE id=?", (value, v.id))
    return value


# -- import -------------------------------------------------------------------------------------
def verify_into(path: str, spool: BinaryIO, lookup: Callable[[str], SiteKey]) -> str:
    """Import, first step: authenticate the whole bundle at path while copying it to
    spool (a pipe can be read once); return its id. It touches nothing of the repository
    but lookup, so the daemon runs it in a worker thread."""
    with open(path, "rb") as f:
        return verify_all(f, lookup, copy_to=spool).hex()


async def apply_verified(fs: Filesystem, spool: BinaryIO, bundle_id: str) -> dict:
    """Import, second step: add the snapshot of a spooled, verified bundle (unless it was
    imported before).

    The chunks are stored first, a batch at a time (hashing, encryption and pack writes in
    worker threads; the daemon serves FUSE requests meanwhile), and stay pinned against
    the collector; only their ids are kept in memory, not the bundle's data. Then the
    snapshot's rows and accounting (_add_snapshot), then a durable commit. If anything
    fails or the process dies before that commit, the stored chunks are unreferenced
    garbage for the collector and the repository is otherwise as it was."""
    if (done := _already_imported(fs, bundle_id)) is not None:
        return done
    spool.seek(0)
    records = iter(BundleReader(spool, lambda site: site_key(fs, site)))
    first = next(records, None)
    if not first or first[:1] != b"H":
        raise FormatError("bundle has no header record")
    header = json.loads(first[1:])
    _check_header(fs, header)  # fail before storing anything
    ids: dict[int, int] = {}  # chunk record n -> chunk id (pinned; 0 for a hole)
    try:
        rows = await _store_chunks(fs, records, ids)
        async with fs.import_lock:
            result = await _add_snapshot(fs, header, rows, ids, bundle_id)
        await fs.commit_catalog(durable=True)  # durable before the answer
        return result
    finally:
        fs.chunks.unpin([cid for cid in ids.values() if cid])


IMPORT_BATCH = 64  # chunk records stored with one put_many
# Rows written, or inodes accounted, between two yields to the daemon's other requests:
# about 10 ms of the event loop's time (an import of 50,000 files held the mount for
# 1.25 s in one piece before).
IMPORT_SLICE = 2000
COUNT_SLICE = 200  # inodes counted between two yields: one is a query (about 50 us)


def _already_imported(fs: Filesystem, bundle_id: str) -> dict | None:
    """The answer for a bundle imported before (a retried import is a no-op), or None.
    A bundle whose snapshot was deleted since imports again: that is what its user asks."""
    done = fs.cat.execute("SELECT vertex FROM imports WHERE bundle=?",
                          (bundle_id,)).fetchone()
    if done is None or done[0] not in fs.graph.vertices:
        return None
    return {"snapshot": fs.graph.vertices[done[0]].name, "already_imported": True}


async def _store_chunks(fs: Filesystem, records, ids: dict[int, int]) -> dict[str, list]:
    """Store the bundle's chunk records in batches; collect its rows. The records are
    read from the spool and decrypted in a worker thread, a batch at a time (on the
    event loop's thread a batch held it for up to 150 ms)."""
    rows: dict[str, list] = {"inodes": [], "dirents": [], "blocks": [], "xattrs": []}
    batch: list[tuple[int, memoryview]] = []

    async def flush() -> None:
        stored = [(n, p) for n, p in batch if p]
        ids.update((n, 0) for n, p in batch if not p)
        batch.clear()
        if stored:
            new = await fs.chunks.put_many([p for _, p in stored])
            ids.update(zip((n for n, _ in stored), new, strict=True))

    def read_batch() -> list[bytes]:
        return list(itertools.islice(records, IMPORT_BATCH))

    while recs := await trio.to_thread.run_sync(read_batch):
        for rec in recs:
            if rec[:1] == b"C":
                (n,) = U64.unpack_from(rec, 1)
                # a view, not bytes: imported chunks are not worth the read cache
                batch.append((n, memoryview(rec)[9:]))
                if len(batch) >= IMPORT_BATCH:
                    await flush()
            elif rec[:1] == b"R":
                for kind, items in json.loads(rec[1:]).items():
                    rows[kind].extend(items)
            else:
                raise FormatError("unknown record in bundle")
    await flush()
    return rows


def _check_header(fs: Filesystem, header: dict) -> int | None:
    """Refuse a bundle this repository cannot take; the id of its base vertex here."""
    g, cat = fs.graph, fs.cat
    if header.get("kind") != BUNDLE_KIND or header.get("version") != 1:
        raise FormatError("not a snapfs bundle of a version this snapfs reads")
    if header["source_repo"] == fs.repo.config.repo_id:
        raise Refused("this bundle was exported by this repository itself")
    if header["chunk_size"] != fs.chunk_size:
        raise Refused(f"bundle chunk size {header['chunk_size']} differs from this "
                      f"repository's {fs.chunk_size}")
    snap = header["snapshot"]
    if cat.execute("SELECT 1 FROM vertices WHERE uuid=?", (snap["uuid"],)).fetchone():
        raise AlreadyExists(f"this repository already has snapshot {snap['volume']}@"
                            f"{snap['label']} (same identity)")
    name = f"{snap['volume']}@{snap['label']}"
    if name in g.by_name:
        raise AlreadyExists(f"a different snapshot named {name} exists here")
    if header["base"] is None:
        return None
    row = cat.execute("SELECT id FROM vertices WHERE uuid=?",
                      (header["base"]["uuid"],)).fetchone()
    if row is None:
        raise NotFound(f"this repository lacks the bundle's base snapshot "
                       f"{header['base']['name']}: import that first")
    return row[0]


async def _add_snapshot(fs: Filesystem, header: dict, rows: dict[str, list],
                        ids: dict[int, int], bundle_id: str) -> dict:
    """The snapshot's rows and reference counts, then its vertex; the caller holds
    fs.import_lock (imports one at a time).

    The rows are written and the trees counted in slices, with the daemon's other
    requests served in between, under a vertex id the graph does not know yet: no view's
    chain holds it, so nothing sees them. The id is listed for purging first (meta
    'purge', graph/delete.py), in the same transaction as the rows: group commits and
    fsyncs go on meanwhile and may make some of the rows durable, and after a crash the
    next mount deletes them (fsck does not check them). The base is pinned against
    deletion meanwhile. The vertex itself is added last, in one step without an await,
    after the header is checked again (a commit may have made a snapshot of the same
    name meanwhile), and the id unlisted in that same step. On a failure the id stays
    listed and the collector's next pass deletes the rows: not a rollback, which would
    take other requests' writes in the open transaction with them."""
    g = fs.graph
    if (done := _already_imported(fs, bundle_id)) is not None:
        return done  # the same bundle, imported by another request while this one stored
    parent = _check_header(fs, header)
    with _pinned(fs, parent):  # its rows are read between slices: not deletable meanwhile
        vid = g.reserve_vertex_id()
        list_for_purge(fs.cat, vid)
        fs.importing.add(vid)
        try:
            g.raise_next_ino(header["max_ino"] + 1)  # before any create
            await _write_rows(fs, vid, parent, rows, ids)
            mine, base = await _count_trees(fs, vid, parent)
            changes = await _write_vertex_chunks(fs, vid, mine, base)
            _check_header(fs, header)  # a commit may have made a snapshot of that name
            snap = header["snapshot"]
            v = g.add_imported(parent, snap["volume"], snap["label"], snap["created"],
                               snap["uuid"], vid=vid)
            _account(fs, v, changes, len(mine))
            fs.cat.write("INSERT OR REPLACE INTO imports VALUES (?,?,?)",
                         (bundle_id, v.id, time.time()))
            unlist(fs.cat, vid)  # the rows are the snapshot's now
        except BaseException:
            _abandon(fs, vid)
            raise
        finally:
            fs.importing.discard(vid)
    log.info("imported %s (delta %d chunks, %d new)", v.name, v.delta, len(ids))
    return {"snapshot": v.name, "parent": g.vertices[parent].name if parent else None,
            "delta": v.delta, "chunks_received": len(ids)}


async def _write_rows(fs: Filesystem, vid: int, parent: int | None, rows: dict[str, list],
                      ids: dict[int, int]) -> None:
    """The bundle's rows as the catalog's, under vertex vid, IMPORT_SLICE at a time."""
    meta, pv = fs.meta, PinnedView(fs, parent) if parent is not None else None

    def block_chunk(ref) -> int:
        if ref == 0:
            return 0
        if ref[0] == "d":
            return ids[ref[1]]
        chunk = pv.block(pv.get(ref[1]), ref[2]) if pv is not None else 0
        if not chunk:
            raise FormatError("bundle refers to a block its base does not have here")
        return chunk

    tables: list[tuple[str, list, Callable]] = [
        ("INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows["inodes"],
         lambda r: (r[0], vid, *r[1:10], meta.target_enc(r[0], _unhex(r[10])))),
        ("INSERT INTO dirents VALUES (?,?,?,?)", rows["dirents"],
         lambda r: (r[0], meta.name_enc(r[0], bytes.fromhex(r[1])), vid, r[2])),
        ("INSERT INTO blocks VALUES (?,?,?,?)", rows["blocks"],
         lambda r: (r[0], r[1], vid, block_chunk(r[2]))),
        ("INSERT INTO xattrs VALUES (?,?,?,?)", rows["xattrs"],
         lambda r: (r[0], meta.xname_enc(r[0], bytes.fromhex(r[1])), vid,
                    meta.xvalue_enc(r[0], bytes.fromhex(r[1]), _unhex(r[2])))),
    ]
    for sql, items, make in tables:
        for i in range(0, len(items), IMPORT_SLICE):
            start = time.monotonic()
            fs.cat.writemany(sql, [make(r) for r in items[i:i + IMPORT_SLICE]])
            await fs.between_slices(time.monotonic() - start)


async def _count_trees(fs: Filesystem, vid: int, parent: int | None
                       ) -> tuple[Counter, Counter]:
    """References to each chunk from the imported tree and from its base's, counted
    COUNT_SLICE inodes at a time (the imported vertex through the chain it will have)."""
    base_chain = {} if parent is None else fs.graph.chain(parent)
    chain = {**base_chain, vid: len(base_chain)}  # depths count from 0 at the root
    mine: Counter = Counter()
    base: Counter = Counter()
    views = [(PinnedView(fs, vid, chain), mine)]
    if parent is not None:
        views.append((PinnedView(fs, parent), base))
    for view, counts in views:
        start = time.monotonic()
        for _ in tree_count_steps(view, counts, COUNT_SLICE):
            await fs.between_slices(time.monotonic() - start)
            start = time.monotonic()
    return mine, base


@contextlib.contextmanager
def _pinned(fs: Filesystem, vid: int | None) -> Iterator[None]:
    if vid is None:
        yield
        return
    fs.pin(vid)
    try:
        yield
    finally:
        fs.unpin(vid)


def _abandon(fs: Filesystem, vid: int) -> None:
    """After a failed import: the vertex goes if it was added (no await: the graph is
    re-read from the catalog), and the rows written under vid are left to the purge."""
    if vid in fs.graph.vertices:
        fs.cat.write("DELETE FROM vertices WHERE id=?", (vid,))
        fs.cat.write("DELETE FROM imports WHERE vertex=?", (vid,))
        fs.graph.reload()
    list_for_purge(fs.cat, vid)
    fs.want_gc()


async def _write_vertex_chunks(fs: Filesystem, vid: int, mine: Counter, base: Counter
                              ) -> list[tuple[int, int, int, int]]:
    """The vertex's reference counts against its parent, from both trees, as its
    vertex_chunks rows (vertex, chunk, refs, presence), written IMPORT_SLICE at a time."""
    changes = []
    chunks = list(mine.keys() | base.keys())
    for i in range(0, len(chunks), IMPORT_SLICE):
        start = time.monotonic()
        rows = []
        for chunk in chunks[i:i + IMPORT_SLICE]:
            refs = mine[chunk] - base[chunk]
            if refs:
                presence = 1 if base[chunk] == 0 else -1 if mine[chunk] == 0 else 0
                rows.append((vid, chunk, refs, presence))
        if rows:
            fs.cat.writemany("INSERT INTO vertex_chunks VALUES (?,?,?,?)", rows)
            changes += rows
        await fs.between_slices(time.monotonic() - start)
    return changes


def _account(fs: Filesystem, v: Vertex, changes: list[tuple[int, int, int, int]],
             referenced: int) -> None:
    """The vertex's accounting from its vertex_chunks rows (in memory and its row)."""
    v.added.update(chunk for _, chunk, _, presence in changes if presence == 1)
    v.removed.update(chunk for _, chunk, _, presence in changes if presence == -1)
    v.delta, v.referenced = len(v.added), referenced
    fs.cat.write("UPDATE vertices SET delta=?, referenced=?, added=?, removed=? WHERE id=?",
                 (v.delta, v.referenced, v.added.serialize(), v.removed.serialize(), v.id))


def spool_stdin() -> str:
    """`snapfs import -`: the bundle from a pipe, spooled to a file first."""
    fd, path = tempfile.mkstemp(prefix="snapfs-bundle-")
    with os.fdopen(fd, "wb") as f:
        while data := sys.stdin.buffer.read(1 << 20):
            f.write(data)
    return path
