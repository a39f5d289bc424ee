"""Deleting a vertex anywhere in the graph, re-parenting its children (SPEC section 5, inv. 5).

Deleting v (leaf, middle, branch point or root):

1. v's rows (inodes, dirents, blocks, xattrs) are merged into each child w wherever w has
   no row of its own for the same key, so every child shows exactly what it showed before.
   Cost: O(rows of v x children).
2. Each child's reference-count changes become relative to its new parent p(v):
   refs'(w, c) = refs(v, c) + refs(w, c) for the chunks in rows of v or w, and presence,
   added(w), removed(w) and delta(w) are recomputed from the counts for those chunks only
   (for every other chunk w's count equals p(v)'s, before and after). A child of a deleted
   root becomes a root: its count is its own refs.
3. v's rows and its vertex are removed. Chunks that no added set holds any more are
   garbage; the collector (store/gc.py) frees them.

All of it runs synchronously in one catalog transaction (the caller commits).
"""

from __future__ import annotations

from snapfs.graph.graph import Graph, Vertex

ROW_TABLES = {
    "inodes": ("ino", "mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, target"),
    "dirents": ("parent, name", "ino"),
    "blocks": ("ino, idx", "chunk"),
    "xattrs": ("ino, name", "value"),
}


def delete_vertex(graph: Graph, vid: int) -> None:
    v = graph.vertices[vid]
    cat = graph.cat
    children = sorted(graph.children.get(vid, ()))
    own_refs = {c: r for c, r in cat.execute(
        "SELECT chunk, refs FROM vertex_chunks WHERE vertex=?", (vid,))}
    for child in children:
        _merge_rows(graph, vid, child)
    for table in (*ROW_TABLES, "vertex_chunks"):
        cat.write(f"DELETE FROM {table} WHERE vertex=?", (vid,))
    cat.write("DELETE FROM vertices WHERE id=?", (vid,))
    for child in children:
        w = graph.vertices[child]
        w.parent = v.parent
        cat.write("UPDATE vertices SET parent=? WHERE id=?", (v.parent, child))
    # the graph changed shape: every cached chain and draft base count may be stale
    graph.children.pop(vid, None)
    if v.parent is not None:
        graph.children[v.parent].discard(vid)
        graph.children[v.parent].update(children)
    del graph.vertices[vid]
    if v.name:
        graph.by_name.pop(v.name, None)
    graph._chains.clear()
    graph._refs.clear()
    graph.version += 1
    for child in children:
        _rebase_refs(graph, graph.vertices[child], own_refs)


def _merge_rows(graph: Graph, vid: int, child: int) -> None:
    for table, (key, cols) in ROW_TABLES.items():
        # rows of inodes that are gone in the child (deleted, or unlinked while open and
        # released later) would be dead weight, and would name chunks the collector frees
        dead = ("" if table in ("inodes", "dirents") else
                " AND ino NOT IN (SELECT ino FROM inodes WHERE vertex=? AND nlink=0)")
        args = (child, vid, child) if dead else (child, vid)
        graph.cat.write(
            f"INSERT OR IGNORE INTO {table} ({key}, vertex, {cols}) "
            f"SELECT {key}, ?, {cols} FROM {table} WHERE vertex=?{dead}", args)


def _rebase_refs(graph: Graph, w: Vertex, deleted_refs: dict[int, int]) -> None:
    cat = graph.cat
    mine = {c: r for c, r in cat.execute(
        "SELECT chunk, refs FROM vertex_chunks WHERE vertex=?", (w.id,))}
    for chunk in set(mine) | set(deleted_refs):
        refs = mine.get(chunk, 0) + deleted_refs.get(chunk, 0)
        base = 0 if w.parent is None else graph.count_in(w.parent, chunk)
        count = base + refs
        presence = 1 if base == 0 and count > 0 else -1 if base > 0 and count == 0 else 0
        w.added.discard(chunk)
        w.removed.discard(chunk)
        if presence == 1:
            w.added.add(chunk)
        elif presence == -1:
            w.removed.add(chunk)
        if refs == 0 and presence == 0:
            cat.write("DELETE FROM vertex_chunks WHERE vertex=? AND chunk=?", (w.id, chunk))
        else:
            cat.write("INSERT OR REPLACE INTO vertex_chunks VALUES (?,?,?,?)",
                      (w.id, chunk, refs, presence))
    w.delta = len(w.added)
    sets = (w.added.serialize(), w.removed.serialize()) if w.kind == "snapshot" else (None, None)
    cat.write("UPDATE vertices SET delta=?, added=?, removed=? WHERE id=?",
              (w.delta, *sets, w.id))
