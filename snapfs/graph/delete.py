"""Deleting a vertex anywhere in the graph, re-parenting its children (SPEC section 5, inv. 5).

Deleting v (leaf, middle, branch point or root):

1. v's rows (inodes, dirents, blocks, xattrs) are merged into each child w wherever w has
   no row of its own for the same key, so every child shows exactly what it showed before.
   Cost: O(rows of v x children).
2. Each child's reference-count changes become relative to its new parent p(v):
   refs'(w, c) = refs(v, c) + refs(w, c) for the chunks in rows of v, and presence,
   added(w), removed(w) and delta(w) are recomputed from the counts for those chunks only
   (for a chunk v has no row for, p(v)'s count equals v's and w's refs stay: nothing
   changes). A child of a deleted root becomes a root: its count is its own refs.
3. The vertex is removed and listed in meta 'purge'; then its rows are deleted. Chunks
   that no added set holds any more are garbage; the collector (store/gc.py) frees them.

It runs in steps so that a mounted filesystem keeps answering between them (in one
step, deleting a 50,000-file snapshot held the event loop for 0.37-0.66 s):

* Deletion.steps(): the merge (1), the counts that step 2 needs, and the new counts of
  the children that are snapshots, in slices of about SLICE rows. Invisible: a child
  resolves a copied row exactly as it resolved v's, and the counts are only read. A
  crash after any slice leaves a consistent catalog (the copies stay, harmless), and
  nothing is listed anywhere.
* Deletion.finish(): one step: vertex removed, children re-parented and their counts
  written (a draft child's worked out here: O(v's vertex_chunks rows)), v listed for
  purging, all in the same transaction.
* purge_steps(): v's rows deleted in slices, then v unlisted. The collector resumes a
  purge a crash interrupted (vfs/fs.py); fsck ignores the rows of listed vertices.

Between the steps the caller guarantees (vfs/fs.py: one deletion at a time, and
graph.deleting refuses new children and pins of v): v gets no new child and no
vertex on v's chain goes away. A child may change its own rows meanwhile (a volume's
draft being written): a copy never replaces a row of the child's own (INSERT OR IGNORE),
and a draft's counts are read only in finish(). A snapshot child cannot change.
"""

from __future__ import annotations

from collections.abc import Iterator

from pyroaring import BitMap

from snapfs.graph.graph import Graph, Vertex
from snapfs.store.catalog import Catalog

ROW_TABLES = {
    "inodes": ("ino", "mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, target"),
    "dirents": ("parent, name", "ino"),
    "blocks": ("ino, idx", "chunk"),
    "xattrs": ("ino, name", "value"),
}
# Rows per slice: a slice of the merge took 6-9 ms here (about 1.8 us a row copied).
SLICE = 4000
COUNT_SLICE = 500  # chunks counted in the parent per slice (a query each)
REBASE_SLICE = 2000  # a child's new counts worked out per slice (about 7 ms here)
PURGE_KEY = "purge"


class Deletion:
    """One vertex being deleted; graph.deleting names it until finish() or abort()."""

    def __init__(self, graph: Graph, vid: int) -> None:
        self.graph = graph
        self.vid = vid
        self.vertex = graph.vertices[vid]
        # the draft over .snapshots/v goes with v (the caller drops it): no merge into it
        self.children = sorted(graph.children.get(vid, set()) - {graph.snapshot_drafts.get(vid)})
        self.own_refs: dict[int, int] = {}  # v's vertex_chunks: chunk -> refs
        self.base: dict[int, int] = {}  # chunk -> its count in v's parent
        self.rebased: dict[int, _Rebase] = {}  # snapshot children's, computed in steps()
        graph.deleting.add(vid)

    def abort(self) -> None:
        """Give up (the rows merged so far stay: they change nothing anyone sees)."""
        self.graph.deleting.discard(self.vid)

    def steps(self) -> Iterator[None]:
        """Merge and count in slices; yields between them. A child that is a snapshot
        has counts that cannot change meanwhile: its new ones are worked out here too,
        so that finish() only writes them (a draft's are worked out there)."""
        for child in self.children:
            yield from _merge_rows(self.graph.cat, self.vid, child)
        if not self.children:
            return
        yield from self._read_counts()
        items = sorted(self.own_refs.items())
        for child in self.children:
            if self.graph.vertices[child].kind != "snapshot":
                continue
            rebase = _Rebase(child)
            for start in range(0, len(items), REBASE_SLICE):
                rebase.add(self.graph.cat, items[start:start + REBASE_SLICE], self.base)
                yield
            self.rebased[child] = rebase

    def _read_counts(self) -> Iterator[None]:
        cat, parent = self.graph.cat, self.vertex.parent
        last = -1
        while True:
            rows = cat.execute(
                "SELECT chunk, refs FROM vertex_chunks WHERE vertex=? AND chunk>? "
                "ORDER BY chunk LIMIT ?", (self.vid, last, SLICE)).fetchall()
            if not rows:
                return
            self.own_refs.update(rows)
            last = rows[-1][0]
            yield
            for start in range(0, len(rows) if parent is not None else 0, COUNT_SLICE):
                for chunk, _ in rows[start:start + COUNT_SLICE]:
                    self.base[chunk] = self.graph.count_in(parent, chunk)
                yield

    def finish(self) -> None:
        """The one step that changes what anyone sees (no await may run inside it)."""
        graph, cat, v = self.graph, self.graph.cat, self.vertex
        children = sorted(graph.children.get(self.vid, ()))
        for child in children:
            if child not in self.children:  # the caller let one in: merge it now
                for _ in _merge_rows(cat, self.vid, child):
                    pass
        if children and not self.own_refs and not self.base:
            for _ in self._read_counts():
                pass
        cat.write("DELETE FROM vertices WHERE id=?", (self.vid,))
        for child in children:
            graph.vertices[child].parent = v.parent
            cat.write("UPDATE vertices SET parent=? WHERE id=?", (v.parent, child))
        graph.children.pop(self.vid, None)
        if v.parent is not None:
            graph.children[v.parent].discard(self.vid)
            graph.children[v.parent].update(children)
        del graph.vertices[self.vid]
        if v.name:
            graph.by_name.pop(v.name, None)
        # the graph changed shape: every cached chain and draft base count may be stale
        graph._chains.clear()
        graph._refs.clear()
        graph.version += 1
        for child in children:
            rebase = self.rebased.get(child)
            if rebase is None:
                rebase = _Rebase(child)
                rebase.add(cat, list(self.own_refs.items()), self.base)
            rebase.apply(graph, graph.vertices[child])
        list_for_purge(cat, self.vid)
        graph.deleting.discard(self.vid)


def pending_purges(cat: Catalog) -> list[int]:
    """Vertex ids whose rows are garbage: vertices deleted whose rows are not all gone
    yet, and the ids an import writes rows under before it adds its vertex (exchange.py:
    listed until then, so that a crash leaves rows the next mount deletes)."""
    value = cat.meta_get(PURGE_KEY, "")
    return [int(p) for p in str(value).split(",") if p]


def list_for_purge(cat: Catalog, vid: int) -> None:
    listed = pending_purges(cat)
    if vid not in listed:
        cat.meta_set(PURGE_KEY, ",".join(str(p) for p in [*listed, vid]))


def unlist(cat: Catalog, vid: int) -> None:
    rest = [p for p in pending_purges(cat) if p != vid]
    if rest:
        cat.meta_set(PURGE_KEY, ",".join(str(p) for p in rest))
    else:  # as if there had never been one: an import adds nothing to the catalog but itself
        cat.write("DELETE FROM meta WHERE key=?", (PURGE_KEY,))


def purge_steps(cat: Catalog, vid: int) -> Iterator[None]:
    """Delete the rows of a listed vertex id in slices; then unlist it."""
    for table, (key, _) in ROW_TABLES.items():
        yield from _delete_rows(cat, table, key, vid)
    yield from _delete_rows(cat, "vertex_chunks", "chunk", vid)
    unlist(cat, vid)


def _slice_end(cat: Catalog, table: str, key: str, vid: int, after: tuple | None):
    """The key of the SLICE-th row of vid in table after `after` (None: past the end)."""
    bound = f" AND ({key}) > ({','.join('?' * len(after))})" if after else ""
    return cat.execute(
        f"SELECT {key} FROM {table} WHERE vertex=?{bound} ORDER BY {key} "
        f"LIMIT 1 OFFSET {SLICE - 1}", (vid, *(after or ()))).fetchone()


def _merge_rows(cat: Catalog, vid: int, child: int) -> Iterator[None]:
    for table, (key, cols) in ROW_TABLES.items():
        # rows of inodes that are gone in the child (deleted, or unlinked while open and
        # released later) would be dead weight, and would name chunks the collector frees
        # (a lookup per row: a NOT IN list of them was built again in every slice)
        dead = ("" if table in ("inodes", "dirents") else
                f" AND NOT EXISTS (SELECT 1 FROM inodes i WHERE i.ino={table}.ino "
                "AND i.vertex=? AND i.nlink=0)")
        after = None
        while True:
            end = _slice_end(cat, table, key, vid, after)
            marks = ",".join("?" * len(end)) if end else ""
            bounds = ((f" AND ({key}) > ({','.join('?' * len(after))})" if after else "")
                      + (f" AND ({key}) <= ({marks})" if end else ""))
            args = (child, vid, *(after or ()), *(end or ()), *((child,) if dead else ()))
            cat.write(f"INSERT OR IGNORE INTO {table} ({key}, vertex, {cols}) "
                      f"SELECT {key}, ?, {cols} FROM {table} WHERE vertex=?{bounds}{dead}",
                      args)
            if end is None:
                break
            after = tuple(end)
            yield
        yield


def _delete_rows(cat: Catalog, table: str, key: str, vid: int) -> Iterator[None]:
    while True:
        end = _slice_end(cat, table, key, vid, None)
        if end is None:
            cat.write(f"DELETE FROM {table} WHERE vertex=?", (vid,))
            return
        cat.write(f"DELETE FROM {table} WHERE vertex=? AND ({key}) <= "
                  f"({','.join('?' * len(end))})", (vid, *end))
        yield


class _Rebase:
    """A child's counts relative to its new parent, for the chunks the deleted vertex v
    had rows for (for any other chunk nothing changes). Worked out while v's rows are
    still there (they are purged after finish)."""

    def __init__(self, child: int) -> None:
        self.child = child
        self.touched = BitMap()
        self.keep: list[tuple[int, int, int, int]] = []  # vertex_chunks rows to write
        self.drop: list[tuple[int, int]] = []  # and to delete
        self.added: list[int] = []
        self.removed: list[int] = []

    def add(self, cat: Catalog, deleted: list[tuple[int, int]], base: dict[int, int]) -> None:
        """deleted: (chunk, v's refs) pairs; base: chunk -> its count in v's parent."""
        chunks = [chunk for chunk, _ in deleted]
        mine: dict[int, int] = {}
        for start in range(0, len(chunks), 30_000):  # SQLite's bound on parameters
            part = chunks[start:start + 30_000]
            mine.update(cat.execute(
                "SELECT chunk, refs FROM vertex_chunks WHERE vertex=? AND chunk IN "
                f"({','.join('?' * len(part))})", (self.child, *part)))
        self.touched.update(chunks)
        w = self.child
        for chunk, refs_v in deleted:
            refs = mine.get(chunk, 0) + refs_v
            below = base.get(chunk, 0)
            presence = 0
            if below == 0 and refs > 0:  # counts never go negative
                presence = 1
                self.added.append(chunk)
            elif below > 0 and below + refs == 0:
                presence = -1
                self.removed.append(chunk)
            if refs == 0 and presence == 0:
                self.drop.append((w, chunk))
            else:
                self.keep.append((w, chunk, refs, presence))

    def apply(self, graph: Graph, w: Vertex) -> None:
        """Write the counts and set w's added/removed/delta (in bulk: per chunk,
        BitMap.add/discard were 40 % of this step)."""
        cat = graph.cat
        w.added.difference_update(self.touched)
        w.removed.difference_update(self.touched)
        w.added.update(self.added)
        w.removed.update(self.removed)
        if self.drop:
            cat.writemany("DELETE FROM vertex_chunks WHERE vertex=? AND chunk=?", self.drop)
        if self.keep:
            cat.writemany("INSERT OR REPLACE INTO vertex_chunks VALUES (?,?,?,?)", self.keep)
        w.delta = len(w.added)
        sets = ((w.added.serialize(), w.removed.serialize()) if w.kind == "snapshot"
                else (None, None))
        cat.write("UPDATE vertices SET delta=?, added=?, removed=? WHERE id=?",
                  (w.delta, *sets, w.id))
