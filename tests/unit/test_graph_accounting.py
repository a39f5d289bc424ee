"""Exact accounting over hand-built graphs: exclusive, unique, reclaim, sum_delta
(snapfs/graph/accounting.py), checked against hand-computed numbers and a set oracle."""

from __future__ import annotations

from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from snapfs.graph import accounting
from snapfs.graph.graph import Graph, Vertex
from snapfs.store.catalog import Catalog


@pytest.fixture(autouse=True, params=["index", "union"])
def outside_path(request, monkeypatch):
    """reclaim finds the chunks added outside S by the catalog's index or by a union of
    the other vertices' sets, whichever is cheaper: every test runs both ways."""
    monkeypatch.setattr(accounting, "INDEX_CHUNKS_PER_VERTEX",
                        10**9 if request.param == "index" else -1)
    return request.param


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    c = Catalog(str(tmp_path_factory.mktemp("acct") / "meta.db"))
    yield c
    c.close()


def build(cat: Catalog, contents: dict[int, tuple[int | None, set[int]]],
          drafts: frozenset[int] = frozenset()) -> Graph:
    """A graph whose vertex v has parent contents[v][0] and chunk set C(v) = contents[v][1].
    added/removed/delta/referenced are derived from the sets, as a commit would store them.
    Vertices must be listed parents first."""
    g = Graph(cat)  # the catalog holds no vertices: the graph is built in memory
    for vid, (parent, c) in contents.items():
        pc = contents[parent][1] if parent is not None else set()
        kind = "draft" if vid in drafts else "snapshot"
        v = Vertex(vid, parent, kind, "v", None if vid in drafts else f"s{vid}", 0.0,
                   len(c - pc), len(c), BitMap(c - pc), BitMap(pc - c))
        g._add_vertex(v)
    return mirror_presence(g)


def mirror_presence(g: Graph) -> Graph:
    """vertex_chunks presence rows mirroring the added/removed sets, as the graph keeps
    them (reclaim asks the catalog's chunk index which chunks other vertices add)."""
    g.cat.write("DELETE FROM vertex_chunks")
    g.cat.writemany("INSERT INTO vertex_chunks VALUES (?,?,?,?)",
                    [(v.id, c, 1, 1) for v in g.vertices.values() for c in v.added]
                    + [(v.id, c, -1, -1) for v in g.vertices.values() for c in v.removed])
    return g


def build_sets(cat: Catalog, spec: dict[int, tuple[int | None, set[int], set[int]]]) -> Graph:
    """A graph given directly by (parent, added, removed) per vertex."""
    g = Graph(cat)
    for vid, (parent, added, removed) in spec.items():
        g._add_vertex(Vertex(vid, parent, "snapshot", "v", f"s{vid}", 0.0, len(added), 0,
                             BitMap(added), BitMap(removed)))
    for vid in spec:  # referenced = #C(v), as the graph keeps it
        g.vertices[vid].referenced = len(accounting.contents(g, vid))
    return mirror_presence(g)


class Oracle:
    """Brute force from the chunk sets C(v) (SPEC section 5)."""

    def __init__(self, contents: dict[int, set[int]]) -> None:
        self.c = contents

    def union(self, ids) -> set[int]:
        return set().union(*(self.c[v] for v in ids))

    def exclusive(self, v: int) -> int:
        return len(self.c[v] - self.union(u for u in self.c if u != v))

    def unique(self, ids) -> int:
        return len(self.union(ids))

    def reclaim(self, ids) -> int:
        ids = set(ids)
        return len(self.union(ids) - self.union(u for u in self.c if u not in ids))


def figures(g: Graph) -> dict:
    vs = list(g.vertices.values())
    held, shared = accounting.shared_chunks(vs)
    return {
        "exclusive": {v.id: accounting.exclusive(g, v, shared) for v in vs},
        "unique": len(held),
        "sum_delta": sum(v.delta for v in vs),
    }


def check_against_oracle(g: Graph, contents: dict[int, set[int]]) -> None:
    oracle = Oracle(contents)
    f = figures(g)
    ids = list(contents)
    for vid in ids:
        assert set(accounting.contents(g, vid)) == contents[vid]
        assert g.vertices[vid].referenced == len(contents[vid])
        assert f["exclusive"][vid] == oracle.exclusive(vid), f"exclusive({vid})"
        v = g.vertices[vid]
        assert 0 <= f["exclusive"][vid] <= v.delta <= v.referenced
    assert f["unique"] == oracle.unique(ids)
    assert len(accounting.unique(g, ids)) == oracle.unique(ids)
    assert sum(f["exclusive"].values()) <= f["unique"]
    assert f["sum_delta"] >= f["unique"]
    for r in range(1, len(ids) + 1):
        for subset in combinations(ids, r):
            got = len(accounting.reclaim(g, subset))
            assert got == oracle.reclaim(subset), f"reclaim{subset}"
            assert set(accounting.held_by(g, subset)) == oracle.union(subset)
    assert len(accounting.reclaim(g, ids)) == f["unique"]  # reclaim(all) = unique(all)


# -- hand-computed cases -----------------------------------------------------------------------


def test_linear_history(cat):
    # r {1,2,3} -> a (+4, -1) -> b (+5, -2, -4)
    contents = {1: (None, {1, 2, 3}), 2: (1, {2, 3, 4}), 3: (2, {3, 5})}
    g = build(cat, contents)
    f = figures(g)
    assert [g.vertices[i].delta for i in (1, 2, 3)] == [3, 1, 1]
    assert f["exclusive"] == {1: 1, 2: 1, 3: 1}  # chunk 1, chunk 4, chunk 5
    assert f["unique"] == f["sum_delta"] == 5  # connected holders: no over-count
    assert len(accounting.reclaim(g, [1])) == 1
    assert len(accounting.reclaim(g, [2, 3])) == 2  # {4, 5}
    assert len(accounting.reclaim(g, [1, 2])) == 3  # {1, 2, 4}
    assert len(accounting.reclaim(g, [2])) == 1  # 2 and 3 live on in r
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_branches(cat):
    # r {1,2}; a = r + {3}; b = r - {1} + {4}; c = a - {2}
    contents = {1: (None, {1, 2}), 2: (1, {1, 2, 3}), 3: (1, {2, 4}), 4: (2, {1, 3})}
    g = build(cat, contents)
    f = figures(g)
    assert f["exclusive"] == {1: 0, 2: 0, 3: 1, 4: 0}
    assert f["unique"] == 4 == f["sum_delta"]
    assert len(accounting.reclaim(g, [2, 4])) == 1  # chunk 3
    assert len(accounting.reclaim(g, [1, 2, 4])) == 2  # chunks 1 and 3 (2 lives in b)
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_overcount_same_content_in_sibling_branches(cat):
    """Two branches independently write the same content: dedup makes it one chunk."""
    contents = {1: (None, {1}), 2: (1, {1, 9}), 3: (1, {1, 9})}
    g = build(cat, contents)
    f = figures(g)
    assert (g.vertices[2].delta, g.vertices[3].delta) == (1, 1)
    assert f["sum_delta"] == 3 and f["unique"] == 2
    assert f["exclusive"] == {1: 0, 2: 0, 3: 0}  # 9 lives in both siblings
    assert len(accounting.reclaim(g, [2])) == 0
    assert len(accounting.reclaim(g, [3])) == 0
    assert set(accounting.reclaim(g, [2, 3])) == {9}
    held, shared = accounting.shared_chunks(g.vertices.values())
    assert held == BitMap([1, 9]) and shared == BitMap([9])
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_overcount_chunk_comes_back_in_a_grandchild(cat):
    """Removed in a child, restored in the grandchild (a file copied back from an old
    snapshot)."""
    contents = {1: (None, {1, 2}), 2: (1, {2}), 3: (2, {1, 2})}
    g = build(cat, contents)
    f = figures(g)
    assert [g.vertices[i].delta for i in (1, 2, 3)] == [2, 0, 1]
    assert f["sum_delta"] == 3 and f["unique"] == 2
    assert f["exclusive"] == {1: 0, 2: 0, 3: 0}
    assert set(accounting.reclaim(g, [1, 3])) == {1}
    assert len(accounting.reclaim(g, [1, 2])) == 0  # both chunks live on in the grandchild
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_overcount_after_a_middle_snapshot_with_two_children_is_deleted(cat):
    """r {1} -> m (+2) -> x (+3), y (+4); deleting m re-parents x and y onto r with their
    deltas recomputed from their contents: both now count chunk 2."""
    before = build(cat, {1: (None, {1}), 2: (1, {1, 2}), 3: (2, {1, 2, 3}), 4: (2, {1, 2, 4})})
    assert figures(before)["sum_delta"] == figures(before)["unique"] == 4
    assert figures(before)["exclusive"][2] == 0  # 2 lives on in x and y
    contents = {1: (None, {1}), 3: (1, {1, 2, 3}), 4: (1, {1, 2, 4})}
    g = build_sets(cat, {1: (None, {1}, set()), 3: (1, {2, 3}, set()), 4: (1, {2, 4}, set())})
    f = figures(g)
    assert (g.vertices[3].delta, g.vertices[4].delta) == (2, 2)
    assert f["sum_delta"] == 5 and f["unique"] == 4
    assert f["exclusive"] == {1: 0, 3: 1, 4: 1}
    assert set(accounting.reclaim(g, [3, 4])) == {2, 3, 4}
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_a_draft_child_keeps_its_parents_chunks(cat):
    """Drafts are vertices too: a chunk still held by a draft is not exclusive to the
    snapshot below it."""
    contents = {1: (None, {1, 2}), 2: (1, {2, 3})}
    g = build(cat, contents, drafts=frozenset({2}))
    f = figures(g)
    assert f["exclusive"] == {1: 1, 2: 1}
    assert len(accounting.reclaim(g, [1])) == 1
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_exclusive_of_a_vertex_whose_children_all_drop_a_chunk(cat):
    contents = {1: (None, {1, 2, 3}), 2: (1, {2}), 3: (1, {3}), 4: (1, {2, 3})}
    g = build(cat, contents)
    assert figures(g)["exclusive"] == {1: 1, 2: 0, 3: 0, 4: 0}  # only chunk 1
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


def test_empty_graph_and_empty_sets(cat):
    g = build(cat, {1: (None, set()), 2: (1, set())})
    f = figures(g)
    assert f == {"exclusive": {1: 0, 2: 0}, "unique": 0, "sum_delta": 0}
    assert len(accounting.reclaim(g, [1, 2])) == 0
    assert len(accounting.reclaim(g, [])) == 0


# -- random graphs against the oracle ----------------------------------------------------------


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 7))
    contents: dict[int, tuple[int | None, set[int]]] = {}
    for vid in range(1, n + 1):
        parent = draw(st.sampled_from([None, *range(1, vid)])) if vid > 1 else None
        chunks = draw(st.sets(st.integers(1, 6), max_size=5))  # a small alphabet: collisions
        contents[vid] = (parent, chunks)
    drafts = draw(st.frozensets(st.sampled_from(range(1, n + 1))))
    leaves = {v for v in contents if not any(p == v for p, _ in contents.values())}
    return contents, drafts & leaves  # only leaves can be drafts


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_random_graphs_match_the_oracle(cat, built):
    contents, drafts = built
    g = build(cat, contents, drafts)
    check_against_oracle(g, {k: v[1] for k, v in contents.items()})


# -- the three over-count cases driven through real views --------------------------------------


def test_overcount_cases_driven_through_views(fs, repo_path):
    import trio
    from unithelpers import CHUNK as CS
    from unithelpers import assert_stats_match_oracle, pattern, write_file

    from snapfs.types import ROOT_INO

    A, B, D, E, F = (pattern(CS, seed=s) for s in range(5))

    async def main():
        fs.graph.create_volume("v")
        view = fs.volume_view("v")
        await write_file(view, b"base", A)
        await fs.commit(view, "s0")
        # 1. the same content written independently in two sibling branches
        await write_file(fs.snapshot_view("v@s0"), b"x", B)
        await fs.commit(fs.snapshot_view("v@s0"), "branch")
        await write_file(view, b"x", B)
        await fs.commit(view, "s1")
        o = assert_stats_match_oracle(fs)
        assert o["sum_delta"] > o["unique"]
        # 2. removed in a child, back in the grandchild
        view.unlink(ROOT_INO, b"x")
        await fs.commit(view, "s2")
        await write_file(view, b"copied-back", B)
        await fs.commit(view, "s3")
        before = assert_stats_match_oracle(fs)
        assert before["sum_delta"] - before["unique"] == 2  # B counted three times
        # 3. a middle snapshot with two children is deleted
        fs.graph.create_volume("w")
        w = fs.volume_view("w")
        await write_file(w, b"a", A)
        await fs.commit(w, "m0")
        await write_file(w, b"d", D)
        await fs.commit(w, "m1")
        await write_file(fs.snapshot_view("w@m1"), b"e", E)
        await fs.commit(fs.snapshot_view("w@m1"), "left")
        await write_file(w, b"f", F)
        await fs.commit(w, "m2")
        o = assert_stats_match_oracle(fs)
        assert o["sum_delta"] == before["sum_delta"] + 1 + 1 + 1 + 1  # w: A, D, E, F
        await fs.delete_snapshot("w@m1")
        o = assert_stats_match_oracle(fs)
        g = fs.graph
        m0 = g.snapshot("w@m0").id
        assert g.snapshot("w@left").parent == m0 and g.snapshot("w@m2").parent == m0
        assert (g.snapshot("w@left").delta, g.snapshot("w@m2").delta) == (2, 2)  # both hold D
        # over-count: B twice (three deltas), A once (the roots v@s0 and w@m0), D once
        assert o["sum_delta"] - o["unique"] == 2 + 1 + 1
        await fs.sync()

    trio.run(main)
    fs.repo.close()
    # the same figures after a reopen (stored sets, rebuilt drafts)
    from snapfs.repository import Repository
    from snapfs.vfs.fs import Filesystem

    fs2 = Filesystem(Repository(repo_path))
    try:
        assert_stats_match_oracle(fs2)
    finally:
        fs2.repo.close()
