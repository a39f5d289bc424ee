"""The snapshot graph: vertices, volumes, commit, and the chunk reference bookkeeping.

Every vertex v knows its parent and two sets of chunk ids, kept as Roaring bitmaps:
added(v) = C(v) - C(p(v)) and removed(v) = C(p(v)) - C(v). delta(v) = #added(v). These are
all the accounting needs (graph/accounting.py); they change only where data changes, so
a commit costs O(1) beyond flushing the draft, whatever the size of the volume.

C(v) membership is decided by reference counts, because a deduplicated chunk can be
referenced from many places in one tree. Each vertex stores, per chunk whose count it
changed, refs = its count minus its parent's count (table vertex_chunks). The count in v
is the sum of refs over v's ancestors-or-self; a draft caches its parent's count for the
chunks it touches, so a write costs one indexed query per newly touched chunk.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from pyroaring import BitMap

from snapfs.errors import AlreadyExists, NotFound, Refused, UsageError
from snapfs.store.catalog import Catalog
from snapfs.types import ROOT_INO, VertexId

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,199}")

# Ancestor chains kept in memory (most recently used first out last). A chain is a dict of
# depth entries, so caching one for every vertex of a line of N snapshots costs O(N^2)
# memory (3.4 GB at 10,000 snapshots); the views in use need a handful.
CHAIN_CACHE = 32

# Inode numbers reserved per catalog write (alloc_ino): a create wrote the meta row
# "next_ino" and read it back, two of its seven SQLite statements.
INO_BATCH = 1024


@dataclass
class Vertex:
    id: VertexId
    parent: VertexId | None
    kind: str  # 'snapshot' | 'draft'
    volume: str
    label: str | None
    created: float
    delta: int = 0
    referenced: int = 0
    added: BitMap = field(default_factory=BitMap)
    removed: BitMap = field(default_factory=BitMap)

    @property
    def name(self) -> str | None:
        return f"{self.volume}@{self.label}" if self.kind == "snapshot" else None

    @property
    def is_draft(self) -> bool:
        return self.kind == "draft"


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid {kind} name {name!r}: use 1-200 characters from letters, digits and "
            "_ . + : - (not starting with . or -; no / or @)"
        )
    return name


class DraftRefs:
    """Reference-count bookkeeping of one draft: its own rows and its parent's counts."""

    def __init__(self) -> None:
        self.own: dict[int, list[int]] = {}  # chunk -> [refs, presence]
        self.base: dict[int, int] = {}  # chunk -> count in the parent


class Graph:
    """All vertices and volumes of a repository, cached in memory, persisted in the catalog.

    Methods are synchronous and must be called from one thread (the trio thread in the
    daemon): each one is atomic with respect to FUSE handlers.
    """

    def __init__(self, catalog: Catalog) -> None:
        self.cat = catalog
        self.vertices: dict[int, Vertex] = {}
        self.children: dict[int, set[int]] = {}
        self.volumes: dict[str, int] = {}  # volume name -> its draft
        self.snapshot_drafts: dict[int, int] = {}  # snapshot id -> draft shown over it
        self.by_name: dict[str, int] = {}
        self._refs: dict[int, DraftRefs] = {}
        self._chains: OrderedDict[int, dict[int, int]] = OrderedDict()
        # vertices being deleted in steps (graph/delete.py): they get no new child
        self.deleting: set[int] = set()
        self.version = 0  # bumped on every structural change (stats consistency, caches)
        # inode numbers reserved in the catalog and not yet handed out: [_ino_next, _ino_end)
        self._ino_next = self._ino_end = 0
        # drafts whose delta/referenced changed since the catalog's last commit: their
        # rows are written once, at the commit (_save_counters), not per changed chunk
        self._counters_changed: set[int] = set()
        catalog.before_commit.append(self._save_counters)
        self._load()

    # -- loading ---------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read everything from the catalog (after a rolled-back transaction)."""
        self._save_counters()  # what _load reads: the rows must say what memory does
        self.vertices.clear()
        self.children.clear()
        self.by_name.clear()
        self._refs.clear()
        self._chains.clear()
        self._ino_next = self._ino_end = 0  # the reservation may have been rolled back
        self.version += 1
        self._load()

    def _load(self) -> None:
        rows = self.cat.execute(
            "SELECT id, parent, kind, volume, label, created, delta, referenced, added, removed "
            "FROM vertices").fetchall()
        for vid, parent, kind, volume, label, created, delta, ref, added, removed in rows:
            v = Vertex(vid, parent, kind, volume, label, created, delta, ref)
            if kind == "snapshot":
                v.added = BitMap.deserialize(added) if added else BitMap()
                v.removed = BitMap.deserialize(removed) if removed else BitMap()
            self._add_vertex(v)
        for vid, chunk, presence in self.cat.execute(
            "SELECT vc.vertex, vc.chunk, vc.presence FROM vertex_chunks vc "
            "JOIN vertices v ON v.id = vc.vertex WHERE v.kind='draft' AND vc.presence != 0"):
            (self.vertices[vid].added if presence > 0 else self.vertices[vid].removed).add(chunk)
        self.volumes = dict(self.cat.execute("SELECT name, draft FROM volumes").fetchall())
        self.snapshot_drafts = dict(
            self.cat.execute("SELECT snapshot, draft FROM snapshot_drafts").fetchall())

    def _add_vertex(self, v: Vertex) -> None:
        self.vertices[v.id] = v
        self.children.setdefault(v.id, set())
        if v.parent is not None:
            self.children.setdefault(v.parent, set()).add(v.id)
        if v.kind == "snapshot":
            self.by_name[v.name] = v.id

    # -- lookups -----------------------------------------------------------------------------
    def snapshot(self, name: str) -> Vertex:
        vid = self.by_name.get(name)
        if vid is None:
            raise NotFound(f"no snapshot named {name!r} (see `snapfs snapshot list`)")
        return self.vertices[vid]

    def volume_draft(self, name: str) -> Vertex:
        vid = self.volumes.get(name)
        if vid is None:
            raise NotFound(f"no volume named {name!r} (see `snapfs volume list`)")
        return self.vertices[vid]

    def volume_head(self, name: str) -> Vertex | None:
        parent = self.volume_draft(name).parent
        return None if parent is None else self.vertices[parent]

    def snapshots(self) -> list[Vertex]:
        return [v for v in self.vertices.values() if v.kind == "snapshot"]

    def chain(self, vid: int) -> dict[int, int]:
        """Ancestors-or-self of vid mapped to their depth (root = 0).

        The result is shared: callers must not change it. The last CHAIN_CACHE chains used
        are cached; a missing one is built from the nearest cached ancestor's (a C-speed
        dict copy) or by walking to the root.
        """
        chains = self._chains
        chain = chains.get(vid)
        if chain is not None:
            chains.move_to_end(vid)
            return chain
        path = []
        cur: int | None = vid
        base: dict[int, int] | None = None
        while cur is not None:
            base = chains.get(cur)
            if base is not None:
                break
            path.append(cur)
            cur = self.vertices[cur].parent
        if base is not None:
            chain = dict(base)
            depth = len(base)
        else:
            chain, depth = {}, 0
        for v in reversed(path):
            chain[v] = depth
            depth += 1
        chains[vid] = chain
        while len(chains) > CHAIN_CACHE:
            chains.popitem(last=False)
        return chain

    def depths(self) -> dict[int, int]:
        """Every vertex's depth (root = 0), in O(vertices) time and memory."""
        depth: dict[int, int] = {}
        for vid in self.vertices:
            path = []
            cur: int | None = vid
            while cur is not None and cur not in depth:
                path.append(cur)
                cur = self.vertices[cur].parent
            d = -1 if cur is None else depth[cur]
            for v in reversed(path):
                d += 1
                depth[v] = d
        return depth

    # -- creating vertices ------------------------------------------------------------------
    def _next_id(self, key: str) -> int:
        value = int(self.cat.meta_get(key, 1))
        self.cat.meta_set(key, value + 1)
        return value

    def alloc_ino(self) -> int:
        """A new inode number, never handed out before.

        Numbers are reserved INO_BATCH at a time: the catalog's next_ino moves past the
        batch before its first number is handed out, in the same transaction as the
        rows naming that number or an earlier one (a rolled-back transaction is redone
        whole: Catalog.begin). So a crash loses at most the rest of a batch, and a
        number is never given twice, not even by a later process.
        """
        if self._ino_next >= self._ino_end:
            start = int(self.cat.meta_get("next_ino", 2))
            self.cat.meta_set("next_ino", start + INO_BATCH)
            self._ino_next, self._ino_end = start, start + INO_BATCH
        ino = self._ino_next
        self._ino_next += 1
        return ino

    def raise_next_ino(self, first_free: int) -> None:
        """Hand out no number below first_free from now on (an import brings inodes
        numbered up to first_free - 1, kept as they were at the source)."""
        if int(self.cat.meta_get("next_ino", 2)) < first_free:
            self.cat.meta_set("next_ino", first_free)
        if self._ino_next < first_free:
            self._ino_next = self._ino_end = 0  # the next alloc_ino reserves past it

    def inos_used(self) -> int:
        """How many inode numbers were handed out (the root's included): statfs."""
        if self._ino_next < self._ino_end:
            return self._ino_next - 1
        return int(self.cat.meta_get("next_ino", 2)) - 1

    def _new_vertex(self, parent: int | None, kind: str, volume: str,
                    label: str | None = None) -> Vertex:
        vid = VertexId(self._next_id("next_vertex"))
        ref = self.vertices[parent].referenced if parent is not None else 0
        v = Vertex(vid, parent, kind, volume, label, time.time(), 0, ref)
        self.cat.write(
            "INSERT INTO vertices (id, parent, kind, volume, label, name, created, delta, "
            "referenced) VALUES (?,?,?,?,?,?,?,?,?)",
            (vid, parent, kind, volume, label, v.name, v.created, 0, ref))
        self._add_vertex(v)
        self.version += 1
        return v

    def reserve_vertex_id(self) -> VertexId:
        """A vertex id no vertex has or will get, for rows written before their vertex
        is added (an import: add_imported)."""
        return VertexId(self._next_id("next_vertex"))

    def add_imported(self, parent: int | None, volume: str, label: str, created: float,
                     uuid_: str, vid: VertexId | None = None) -> Vertex:
        """A snapshot vertex arriving from another site (its rows are added by the caller,
        under vid, from reserve_vertex_id, when given)."""
        self.check_label(volume, label)
        vid = self.reserve_vertex_id() if vid is None else vid
        v = Vertex(vid, parent, "snapshot", volume, label, created)
        self.cat.write(
            "INSERT INTO vertices (id, parent, kind, volume, label, name, created, sealed, "
            "uuid) VALUES (?,?,?,?,?,?,?,?,?)",
            (vid, parent, "snapshot", volume, label, v.name, created, time.time(), uuid_))
        self._add_vertex(v)
        self.version += 1
        return v

    def create_volume(self, name: str, source: str | None = None) -> Vertex:
        """A new volume: an empty root draft, or a clone (a draft over a snapshot, O(1))."""
        check_name("volume", name)
        if name in self.volumes:
            raise AlreadyExists(f"volume {name!r} already exists")
        if source is not None:
            self.check_not_deleting(self.snapshot(source).id)
        if source is None:
            draft = self._new_vertex(None, "draft", name)
            now = time.time_ns()
            self.cat.write(
                "INSERT INTO inodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (ROOT_INO, draft.id, 0o40755, 2, 0, 0, 0, now, now, now, 0, None))
        else:
            draft = self._new_vertex(self.snapshot(source).id, "draft", name)
        self.cat.write("INSERT INTO volumes VALUES (?,?,?)", (name, draft.id, time.time()))
        self.volumes[name] = draft.id
        return draft

    def snapshot_draft(self, snapshot_id: int, create: bool) -> Vertex | None:
        """The draft written under .snapshots/S, created on the first write."""
        vid = self.snapshot_drafts.get(snapshot_id)
        if vid is not None:
            return self.vertices[vid]
        if not create:
            return None
        self.check_not_deleting(snapshot_id)
        snap = self.vertices[snapshot_id]
        draft = self._new_vertex(snap.id, "draft", snap.volume)
        self.cat.write("INSERT INTO snapshot_drafts VALUES (?,?)", (snap.id, draft.id))
        self.snapshot_drafts[snap.id] = draft.id
        return draft

    def commit(self, draft_id: int, label: str | None) -> Vertex:
        """Seal a draft into a snapshot. O(1) plus the size of its own added/removed sets.

        For a volume's draft the volume continues from the new snapshot with a fresh empty
        draft. For the draft over .snapshots/S the new snapshot is a branch off S and the
        directory shows S again (its draft is dropped).
        """
        draft = self.vertices[draft_id]
        if not draft.is_draft:
            raise Refused(f"vertex {draft_id} is already a snapshot")
        if draft.parent is not None and self.snapshot_drafts.get(draft.parent) == draft.id:
            self.check_not_deleting(draft.parent)  # it would become a child of it
        if label is None:
            label = self._default_label(draft.volume)
        name = self.check_label(draft.volume, label)
        draft.kind, draft.label = "snapshot", label
        self.cat.write(
            "UPDATE vertices SET kind='snapshot', label=?, name=?, sealed=?, delta=?, "
            "referenced=?, added=?, removed=?, uuid=? WHERE id=?",
            (label, name, time.time(), draft.delta, draft.referenced,
             draft.added.serialize(), draft.removed.serialize(), str(uuid.uuid4()), draft.id))
        self.by_name[name] = draft.id
        self._refs.pop(draft.id, None)
        self.version += 1
        for vol, vid in self.volumes.items():
            if vid == draft.id:
                nxt = self._new_vertex(draft.id, "draft", vol)
                self.cat.write("UPDATE volumes SET draft=? WHERE name=?", (nxt.id, vol))
                self.volumes[vol] = nxt.id
                return draft
        for snap, vid in list(self.snapshot_drafts.items()):
            if vid == draft.id:
                self.cat.write("DELETE FROM snapshot_drafts WHERE snapshot=?", (snap,))
                del self.snapshot_drafts[snap]
        return draft

    def check_label(self, volume: str, label: str) -> str:
        """Validate a label for a new snapshot of volume; returns the snapshot's name."""
        check_name("label", label)
        name = f"{volume}@{label}"
        if name in self.by_name:
            raise AlreadyExists(f"snapshot {name} already exists: choose another --label")
        return name

    def _default_label(self, volume: str) -> str:
        base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        label, n = base, 1
        while f"{volume}@{label}" in self.by_name:
            n += 1
            label = f"{base}.{n}"
        return label

    # -- chunk references ---------------------------------------------------------------------
    def _draft_refs(self, draft_id: int) -> DraftRefs:
        refs = self._refs.get(draft_id)
        if refs is None:
            refs = self._refs[draft_id] = DraftRefs()
        return refs

    def count_in(self, vid: int, chunk: int, *, below: int | None = None) -> int:
        """How many references vertex vid holds to chunk (sum of refs over its chain).

        below: a child of vid whose chain is at hand (a draft's, which its view uses);
        its chain minus itself is vid's, so vid's own chain need not be built.
        """
        if below is not None:
            chain, skip = self.chain(below), below
        else:
            chain, skip = self.chain(vid), None
        total = 0
        for vertex, refs in self.cat.execute(
                "SELECT vertex, refs FROM vertex_chunks WHERE chunk=?", (chunk,)):
            if vertex in chain and vertex != skip:
                total += refs
        return total

    def adjust_refs(self, draft_id: int, changes: dict[int, int]) -> None:
        """Apply reference-count changes in a draft and keep added/removed/delta exact."""
        draft = self.vertices[draft_id]
        state = self._draft_refs(draft_id)
        changes = {c: n for c, n in changes.items() if n and c}
        for chunk, change in changes.items():  # check all first: a refusal changes nothing
            if self._counts(draft, state, chunk)[0] + change < 0:
                raise AssertionError(f"negative reference count for chunk {chunk} in "
                                     f"vertex {draft_id}")
        for chunk, change in changes.items():
            count, own, base = self._counts(draft, state, chunk)
            own[0] += change
            count += change
            presence = (1 if base == 0 and count > 0 else -1 if base > 0 and count == 0 else 0)
            self._set_presence(draft, chunk, own[1], presence)
            own[1] = presence
            if own[0] == 0 and presence == 0:
                self.cat.write("DELETE FROM vertex_chunks WHERE vertex=? AND chunk=?",
                               (draft_id, chunk))
            else:
                self.cat.write("INSERT OR REPLACE INTO vertex_chunks VALUES (?,?,?,?)",
                               (draft_id, chunk, own[0], presence))

    def _counts(self, draft: Vertex, state: DraftRefs, chunk: int) -> tuple[int, list, int]:
        """(references to chunk in the draft's chain, the draft's own [refs, presence]
        (cached, mutable), the references in its parent's chain (cached))."""
        own = state.own.get(chunk)
        if own is None:
            row = self.cat.execute(
                "SELECT refs, presence FROM vertex_chunks WHERE vertex=? AND chunk=?",
                (draft.id, chunk)).fetchone()
            own = state.own[chunk] = list(row) if row else [0, 0]
        base = state.base.get(chunk)
        if base is None:
            base = (0 if draft.parent is None else
                    self.count_in(draft.parent, chunk, below=draft.id))
            state.base[chunk] = base
        return base + own[0], own, base

    def _set_presence(self, v: Vertex, chunk: int, old: int, new: int) -> None:
        if old == new:
            return
        if old == 1:
            v.added.discard(chunk)
            v.delta -= 1
            v.referenced -= 1
        elif old == -1:
            v.removed.discard(chunk)
            v.referenced += 1
        if new == 1:
            v.added.add(chunk)
            v.delta += 1
            v.referenced += 1
        elif new == -1:
            v.removed.add(chunk)
            v.referenced -= 1
        self._counters_changed.add(v.id)

    def _save_counters(self) -> None:
        """Write the changed drafts' delta and referenced into their rows, in the
        transaction that holds the vertex_chunks rows they follow from (called by
        Catalog.commit). Written per changed chunk, two of the six statements that
        storing a chunk over another cost went to rewriting one row."""
        for vid in sorted(self._counters_changed):
            v = self.vertices.get(vid)
            if v is not None and v.is_draft:  # (a sealed one's row was written whole)
                self.cat.write("UPDATE vertices SET delta=?, referenced=? WHERE id=?",
                               (v.delta, v.referenced, v.id))
            self._counters_changed.discard(vid)  # not before: a refused write is redone

    # -- deleting ------------------------------------------------------------------------------
    def draft_has_changes(self, draft_id: int) -> bool:
        """Has the draft any row of its own? (A root draft's first root inode is not a
        change: every new volume has one.)"""
        root = self.vertices[draft_id].parent is None
        for table in ("inodes", "dirents", "xattrs", "blocks"):
            extra = f" AND NOT (ino={ROOT_INO} AND mtime_ns=ctime_ns AND ctime_ns=atime_ns)" \
                if root and table == "inodes" else ""
            if self.cat.execute(f"SELECT 1 FROM {table} WHERE vertex=?{extra} LIMIT 1",
                                (draft_id,)).fetchone():
                return True
        return False

    def check_not_deleting(self, vid: int) -> None:
        """Refuse a new child (or pin) of a vertex being deleted."""
        if vid in self.deleting:
            raise Refused(f"snapshot {self.vertices[vid].name} is being deleted", errno=16)

    def drop_snapshot_draft(self, snapshot_id: int) -> int | None:
        """Forget the draft shown under .snapshots/S (the caller deletes its vertex)."""
        draft = self.snapshot_drafts.pop(snapshot_id, None)
        if draft is not None:
            self.cat.write("DELETE FROM snapshot_drafts WHERE snapshot=?", (snapshot_id,))
        return draft

    def drop_volume(self, name: str) -> int:
        """Forget a volume; returns its draft (the caller deletes that vertex). Its
        snapshots stay (delete them one by one)."""
        draft = self.volume_draft(name)
        del self.volumes[name]
        self.cat.write("DELETE FROM volumes WHERE name=?", (name,))
        return draft.id
