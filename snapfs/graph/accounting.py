"""Exact accounting from the per-vertex added/removed sets (SPEC section 5).

With added(v) = C(v) - C(p(v)) and removed(v) = C(p(v)) - C(v) kept on every vertex:

* delta(v) = #added(v); referenced(v) = #C(v), maintained incrementally on the vertex.
* A chunk is held by some vertex iff it is in some added set (holding starts where it
  was added), so unique over an ancestor-closed set of vertices is #(union of added).
* exclusive(v): c must be added only at v (in no other added set) and every child of v
  must have removed it (or no vertex below v would hold it):
  #((added(v) - added elsewhere) & intersection of removed(w) over children w).
* reclaim(S): candidates are the chunks added inside S; drop those added outside S, and
  those that leak to a child outside S of a vertex in S that holds them. What an S-vertex
  holds of the candidates is propagated top-down inside S.

Everything here is Roaring-bitmap arithmetic over the vertices' sets: the cost is
proportional to the number of vertices and the size of their deltas, never to the number
of chunk references in the trees.
"""

from __future__ import annotations

from collections.abc import Iterable

from pyroaring import BitMap

from snapfs.graph.graph import Graph, Vertex


def shared_chunks(vertices: Iterable[Vertex]) -> tuple[BitMap, BitMap]:
    """(chunks added by at least one vertex, chunks added by two or more)."""
    seen, shared = BitMap(), BitMap()
    for v in vertices:
        if v.added.intersect(seen):  # rare (dedup, re-introduced chunks): no copy otherwise
            shared |= seen & v.added
        seen |= v.added
    return seen, shared


def exclusive(graph: Graph, v: Vertex, shared: BitMap) -> int:
    if not v.added:
        return 0
    own = v.added - shared if v.added.intersect(shared) else v.added
    for child in graph.children.get(v.id, ()):
        if not own:
            break
        own = own & graph.vertices[child].removed
    return len(own)


def ancestor_closure(graph: Graph, ids: Iterable[int]) -> set[int]:
    closure: set[int] = set()
    for vid in ids:
        cur: int | None = vid
        while cur is not None and cur not in closure:
            closure.add(cur)
            cur = graph.vertices[cur].parent
    return closure


def unique(graph: Graph, ids: Iterable[int]) -> BitMap:
    """The chunks held by the ancestor closure of ids."""
    return BitMap.union(BitMap(), *(graph.vertices[v].added for v in ancestor_closure(graph, ids)))


def held_by(graph: Graph, ids: Iterable[int]) -> BitMap:
    """The union of C(v) over exactly the vertices ids (not their ancestors)."""
    ids = set(ids)
    result = BitMap()
    for vid in ids:
        result |= contents(graph, vid)
    return result


def contents(graph: Graph, vid: int) -> BitMap:
    """C(v) rebuilt from the chain's sets (O(depth); for reclaim and checks, not stats)."""
    chain = sorted(graph.chain(vid).items(), key=lambda kv: kv[1])
    held = BitMap()
    for vertex, _ in chain:
        v = graph.vertices[vertex]
        held -= v.removed
        held |= v.added
    return held


def reclaim(graph: Graph, ids: Iterable[int]) -> BitMap:
    """The chunks that deleting every vertex in ids would free.

    O(the vertices of ids, their children and the chunks they add), whatever the size of
    the rest of the graph: which candidates some vertex outside ids also adds is asked of
    the catalog's chunk index (vertex_chunks presence +1 rows mirror the added sets).
    """
    s = set(ids)
    candidates = BitMap.union(BitMap(), *(graph.vertices[v].added for v in s))
    candidates -= added_outside(graph, candidates, s)
    if not candidates:
        return candidates
    held: dict[int, BitMap] = {}
    leak = BitMap()
    for vid in _topological(graph, s):
        v = graph.vertices[vid]
        mine = (held[v.parent] - v.removed) if v.parent in s else BitMap()
        mine |= v.added & candidates
        held[vid] = mine
        for child in graph.children.get(vid, ()):
            if child not in s:
                leak |= mine - graph.vertices[child].removed
    return candidates - leak


# Above this many candidate chunks per vertex outside S, one union of the other vertices'
# added sets (~2.5 us a vertex) is cheaper than the index (~1 us a chunk): a range that
# holds a root adds the whole tree.
INDEX_CHUNKS_PER_VERTEX = 2


def added_outside(graph: Graph, chunks: BitMap, s: set[int], batch: int = 500) -> BitMap:
    """The chunks of chunks that some vertex not in s adds (one indexed query per batch)."""
    others = len(graph.vertices) - len(s)
    if len(chunks) > INDEX_CHUNKS_PER_VERTEX * others:
        return chunks & BitMap.union(BitMap(), *(v.added for vid, v in graph.vertices.items()
                                                 if vid not in s))
    out = BitMap()
    ids = list(chunks)
    for i in range(0, len(ids), batch):
        part = ids[i:i + batch]
        marks = ",".join("?" * len(part))
        for chunk, vertex in graph.cat.execute(
                f"SELECT chunk, vertex FROM vertex_chunks WHERE chunk IN ({marks}) "
                "AND presence > 0", part):
            if vertex not in s:
                out.add(chunk)
    return out


def _topological(graph: Graph, s: set[int]) -> list[int]:
    """Vertices of s, parents before children (O(len(s)), no ancestor chains)."""
    order = [vid for vid in s if graph.vertices[vid].parent not in s]
    for vid in order:  # grows while it is walked: breadth-first inside s
        order.extend(c for c in graph.children.get(vid, ()) if c in s)
    return order
