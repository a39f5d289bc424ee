"""The snapshot graph: volumes, clones, commit and reference bookkeeping
(snapfs/graph/graph.py)."""

from __future__ import annotations

import re
import sqlite3

import pytest
from pyroaring import BitMap

from snapfs.errors import AlreadyExists, NotFound, Refused, UsageError
from snapfs.graph.graph import INO_BATCH, Graph
from snapfs.store.catalog import Catalog
from snapfs.types import ROOT_INO


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "meta.db")


@pytest.fixture
def cat(db_path):
    c = Catalog(db_path)
    yield c
    c.close()


@pytest.fixture
def g(cat) -> Graph:
    return Graph(cat)


def count(cat, table: str) -> int:
    return cat.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def vc_rows(cat, vid: int) -> dict[int, tuple[int, int]]:
    return {c: (r, p) for c, r, p in cat.execute(
        "SELECT chunk, refs, presence FROM vertex_chunks WHERE vertex=?", (vid,))}


# -- volumes and names -------------------------------------------------------------------------


def test_create_volume_makes_an_empty_root_draft(g, cat):
    v0 = g.version
    d = g.create_volume("home")
    assert d.is_draft and d.parent is None and d.volume == "home" and d.name is None
    assert (d.delta, d.referenced, len(d.added), len(d.removed)) == (0, 0, 0, 0)
    assert g.volumes == {"home": d.id}
    assert g.volume_draft("home") is d and g.volume_head("home") is None
    assert g.version > v0
    mode, nlink = cat.execute("SELECT mode, nlink FROM inodes WHERE ino=? AND vertex=?",
                              (ROOT_INO, d.id)).fetchone()
    assert mode == 0o40755 and nlink == 2
    with pytest.raises(AlreadyExists):
        g.create_volume("home")
    with pytest.raises(NotFound, match="volume list"):
        g.volume_draft("nope")


@pytest.mark.parametrize("name", [
    "", ".x", ".", "..", "-x", "a/b", "a@b", "a b", "a\0b", "a\nb", "é", "x" * 201, "a\\b",
])
def test_bad_volume_names_are_refused(g, name):
    with pytest.raises(UsageError, match="invalid volume name"):
        g.create_volume(name)
    assert g.volumes == {}


@pytest.mark.parametrize("name", ["home\n", "a\n"])
def test_a_trailing_newline_is_not_a_valid_name(g, name):
    """NAME_RE ends with '$', which also matches before a final newline."""
    with pytest.raises(UsageError):
        g.create_volume(name)


@pytest.mark.parametrize("name", ["a", "A_b.c+d:e-f", "_x", "9", "x" * 200, "2024-01-01T00:00:00"])
def test_good_volume_names(g, name):
    assert g.create_volume(name).volume == name


def test_unknown_snapshot(g):
    g.create_volume("v")
    with pytest.raises(NotFound, match="snapshot list"):
        g.snapshot("v@nothing")
    with pytest.raises(NotFound):
        g.create_volume("w", source="v@nothing")
    assert "w" not in g.volumes


# -- commit ------------------------------------------------------------------------------------


def test_commit_of_a_volume_draft(g, cat):
    d = g.create_volume("v")
    g.adjust_refs(d.id, {11: 1, 12: 2})
    snap = g.commit(d.id, "one")
    assert snap is d and snap.kind == "snapshot" and snap.name == "v@one"
    assert g.snapshot("v@one") is snap
    nxt = g.volume_draft("v")
    assert nxt.id != snap.id and nxt.is_draft and nxt.parent == snap.id
    assert (nxt.delta, nxt.referenced) == (0, 2)  # a fresh draft holds what its parent holds
    assert g.volume_head("v") is snap
    assert g.children[snap.id] == {nxt.id}
    row = cat.execute("SELECT kind, label, name, sealed IS NOT NULL, delta, referenced, added, "
                      "removed FROM vertices WHERE id=?", (snap.id,)).fetchone()
    assert row[:6] == ("snapshot", "one", "v@one", 1, 2, 2)
    assert BitMap.deserialize(row[6]) == BitMap([11, 12])
    assert BitMap.deserialize(row[7]) == BitMap()
    assert cat.execute("SELECT draft FROM volumes WHERE name='v'").fetchone() == (nxt.id,)


def test_commit_refusals_change_nothing(g):
    d = g.create_volume("v")
    g.commit(d.id, "one")
    d2 = g.volume_draft("v")
    g.adjust_refs(d2.id, {5: 1})
    version = g.version
    with pytest.raises(AlreadyExists, match="--label"):
        g.commit(d2.id, "one")
    with pytest.raises(UsageError, match="invalid label"):
        g.commit(d2.id, "bad/label")
    with pytest.raises(UsageError):
        g.commit(d2.id, "")
    with pytest.raises(Refused):
        g.commit(d.id, "again")  # already a snapshot
    assert d2.is_draft and g.volume_draft("v") is d2 and d2.label is None
    assert g.version == version
    assert [s.name for s in g.snapshots()] == ["v@one"]


def test_default_label_is_the_utc_time_and_unique(g):
    d = g.create_volume("v")
    a = g.commit(d.id, None)
    b = g.commit(g.volume_draft("v").id, None)
    c = g.commit(g.volume_draft("v").id, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", a.label)
    assert len({a.name, b.name, c.name}) == 3


def test_clone_is_o1_with_delta_zero(g, cat):
    d = g.create_volume("v")
    g.adjust_refs(d.id, {1: 1, 2: 1, 3: 1})
    snap = g.commit(d.id, "s")
    before = {t: count(cat, t) for t in ("inodes", "dirents", "blocks", "xattrs",
                                         "vertex_chunks", "chunks")}
    clone = g.create_volume("w", source="v@s")
    assert clone.parent == snap.id and clone.volume == "w" and clone.is_draft
    assert (clone.delta, clone.referenced) == (0, 3)
    assert g.volume_head("w") is snap
    assert {t: count(cat, t) for t in before} == before  # nothing copied
    assert g.children[snap.id] == {g.volume_draft("v").id, clone.id}


def test_commit_of_a_snapshot_draft_makes_a_branch_and_drops_the_draft(g, cat):
    d = g.create_volume("v")
    g.adjust_refs(d.id, {1: 1})
    s1 = g.commit(d.id, "s1")
    vol_draft = g.volume_draft("v")
    assert g.snapshot_draft(s1.id, create=False) is None
    sd = g.snapshot_draft(s1.id, create=True)
    assert sd.parent == s1.id and sd.is_draft and sd.volume == "v"
    assert g.snapshot_draft(s1.id, create=True) is sd  # one draft per snapshot
    assert g.snapshot_drafts == {s1.id: sd.id}
    g.adjust_refs(sd.id, {2: 1})
    branch = g.commit(sd.id, "fix")
    assert branch.name == "v@fix" and branch.parent == s1.id and branch.delta == 1
    assert g.snapshot_drafts == {}
    assert cat.execute("SELECT COUNT(*) FROM snapshot_drafts").fetchone() == (0,)
    assert g.volume_draft("v") is vol_draft  # the volume is not affected
    assert g.children[s1.id] == {vol_draft.id, branch.id}
    sd2 = g.snapshot_draft(s1.id, create=True)  # a later write makes a new draft
    assert sd2.id not in (sd.id, branch.id)


def test_snapshot_names_are_per_volume(g):
    g.commit(g.create_volume("a").id, "x")
    g.commit(g.create_volume("b").id, "x")
    assert {s.name for s in g.snapshots()} == {"a@x", "b@x"}


# -- reference bookkeeping ---------------------------------------------------------------------


def test_adjust_refs_hand_computed(g, cat):
    d0 = g.create_volume("v")
    g.adjust_refs(d0.id, {1: 2, 2: 1, 3: 1, 0: 5, 9: 0})  # chunk 0 (hole) and 0 changes ignored
    assert (d0.delta, d0.referenced) == (3, 3)
    assert d0.added == BitMap([1, 2, 3]) and d0.removed == BitMap()
    assert vc_rows(cat, d0.id) == {1: (2, 1), 2: (1, 1), 3: (1, 1)}
    g.adjust_refs(d0.id, {3: -1})  # written and removed in the same draft: never there
    assert (d0.delta, d0.referenced) == (2, 2) and d0.added == BitMap([1, 2])
    assert 3 not in vc_rows(cat, d0.id)
    s1 = g.commit(d0.id, "s1")  # C(s1) = {1: 2 refs, 2: 1 ref}

    d1 = g.volume_draft("v")
    g.adjust_refs(d1.id, {1: -1})  # one of two references: still held
    assert (d1.delta, d1.referenced) == (0, 2) and d1.removed == BitMap()
    assert vc_rows(cat, d1.id) == {1: (-1, 0)}
    g.adjust_refs(d1.id, {1: -1})  # the last one: removed
    assert (d1.delta, d1.referenced) == (0, 1) and d1.removed == BitMap([1])
    assert vc_rows(cat, d1.id) == {1: (-2, -1)}
    g.adjust_refs(d1.id, {4: 1, 2: -1})
    assert (d1.delta, d1.referenced) == (1, 1)
    assert d1.added == BitMap([4]) and d1.removed == BitMap([1, 2])
    g.adjust_refs(d1.id, {1: 2})  # back to the parent's count: no row at all
    assert (d1.delta, d1.referenced) == (1, 2) and d1.removed == BitMap([2])
    assert vc_rows(cat, d1.id) == {2: (-1, -1), 4: (1, 1)}
    s2 = g.commit(d1.id, "s2")  # C(s2) = {1: 2, 4: 1}
    assert (s2.delta, s2.referenced) == (1, 2) and s1.delta == 2  # earlier deltas unchanged

    d2 = g.volume_draft("v")
    assert g.count_in(s2.id, 1) == 2 and g.count_in(s2.id, 2) == 0 and g.count_in(s1.id, 2) == 1
    g.adjust_refs(d2.id, {2: 1})  # chunk 2 comes back in the grandchild of its adder
    assert (d2.delta, d2.referenced) == (1, 3) and d2.added == BitMap([2])
    with pytest.raises(AssertionError):
        g.adjust_refs(d2.id, {77: -1})  # a reference that does not exist


def test_a_refused_adjust_refs_changes_nothing(g, cat):
    """A change that would make a count negative is refused before any of the batch
    is applied, in memory or in the catalog: the bug it reveals is reported (EIO for
    that request), not compounded by counts that drift from their rows."""
    d0 = g.create_volume("v")
    g.adjust_refs(d0.id, {1: 1, 2: 1})
    before = (vc_rows(cat, d0.id), d0.delta, d0.referenced, BitMap(d0.added))
    with pytest.raises(AssertionError, match="chunk 3"):
        g.adjust_refs(d0.id, {1: -1, 2: 1, 3: -1})
    assert (vc_rows(cat, d0.id), d0.delta, d0.referenced, BitMap(d0.added)) == before
    g.adjust_refs(d0.id, {1: -1})  # the cache was not touched either: 1 -> 0
    assert vc_rows(cat, d0.id) == {2: (1, 1)} and (d0.delta, d0.referenced) == (1, 1)


def test_adjust_refs_in_a_clone_uses_the_origin_counts(g):
    d = g.create_volume("v")
    g.adjust_refs(d.id, {1: 1, 2: 1})
    g.commit(d.id, "s")
    clone = g.create_volume("w", source="v@s")
    g.adjust_refs(clone.id, {1: -1, 3: 1, 2: 1})  # C(w) = {2 (two refs), 3}
    assert (clone.delta, clone.referenced) == (1, 2)
    assert clone.added == BitMap([3]) and clone.removed == BitMap([1])


def _state(g: Graph) -> dict:
    return {
        "vertices": {vid: (v.parent, v.kind, v.volume, v.label, v.name, v.delta, v.referenced,
                           BitMap(v.added), BitMap(v.removed), round(v.created, 3))
                     for vid, v in g.vertices.items()},
        "children": {k: set(v) for k, v in g.children.items() if v},
        "volumes": dict(g.volumes),
        "snapshot_drafts": dict(g.snapshot_drafts),
        "by_name": dict(g.by_name),
    }


def _build(g: Graph) -> None:
    d = g.create_volume("v")
    g.adjust_refs(d.id, {1: 1, 2: 1, 3: 3})
    s1 = g.commit(d.id, "s1")
    g.adjust_refs(g.volume_draft("v").id, {1: -1, 4: 1})
    g.commit(g.volume_draft("v").id, "s2")
    g.adjust_refs(g.volume_draft("v").id, {2: -1, 5: 2, 6: 1})  # an uncommitted draft
    sd = g.snapshot_draft(s1.id, create=True)
    g.adjust_refs(sd.id, {3: -3, 7: 1})  # an uncommitted snapshot draft
    g.create_volume("w", source="v@s2")
    g.create_volume("e")


def test_graph_persists_across_reopen(db_path):
    cat = Catalog(db_path)
    g = Graph(cat)
    _build(g)
    expected = _state(g)
    cat.close()
    cat = Catalog(db_path)
    try:
        g2 = Graph(cat)
        assert _state(g2) == expected
        # the drafts' sets were rebuilt from vertex_chunks, and continue exactly
        draft = g2.volume_draft("v")
        assert draft.added == BitMap([5, 6]) and draft.removed == BitMap([2])
        g2.adjust_refs(draft.id, {5: -2, 2: 1, 4: -1})
        assert draft.added == BitMap([6]) and draft.removed == BitMap([4])
        assert (draft.delta, draft.referenced) == (1, 3)  # C = {2, 3, 6}
        sd = g2.vertices[g2.snapshot_drafts[g2.snapshot("v@s1").id]]
        assert sd.added == BitMap([7]) and sd.removed == BitMap([3])
    finally:
        cat.close()


def test_uncommitted_catalog_changes_are_lost_together(db_path):
    """Graph changes are catalog writes in the open group: a rollback (or a crash before the
    group commit) loses all of them, and the reopened graph is still consistent."""
    cat = Catalog(db_path)
    g = Graph(cat)
    d = g.create_volume("v")
    g.adjust_refs(d.id, {1: 1})
    cat.commit()
    g.commit(d.id, "s1")
    g.adjust_refs(g.volume_draft("v").id, {2: 1})
    cat.rollback()
    cat.close()
    cat = Catalog(db_path)
    try:
        g2 = Graph(cat)
        assert g2.snapshots() == []
        d2 = g2.volume_draft("v")
        assert d2.id == d.id and d2.added == BitMap([1]) and (d2.delta, d2.referenced) == (1, 1)
    finally:
        cat.close()


def test_inode_numbers_are_reserved_in_batches_and_never_given_twice(db_path):
    """alloc_ino writes the catalog's counter once per INO_BATCH numbers, past the whole
    batch, before handing out the first: a graph reopened after a commit starts above
    every number given, and an import's raise_next_ino is kept."""
    cat = Catalog(db_path)
    g = Graph(cat)
    writes: list[str] = []
    cat.db.set_trace_callback(lambda sql: writes.append(sql) if "meta" in sql else None)
    first = [g.alloc_ino() for _ in range(INO_BATCH + 5)]
    cat.db.set_trace_callback(None)
    assert first == list(range(first[0], first[0] + INO_BATCH + 5))
    assert len([w for w in writes if w.startswith("INSERT")]) == 2, "one write per batch"
    assert g.inos_used() == first[-1]  # the root (1) and 2 to first[-1]
    cat.commit()
    cat.close()
    cat = Catalog(db_path)
    try:
        g2 = Graph(cat)
        again = g2.alloc_ino()
        assert again > first[-1]
        # an import brings inodes numbered up to 10**6: none of those is handed out
        g2.raise_next_ino(10**6 + 1)
        assert g2.alloc_ino() == 10**6 + 1
        g2.raise_next_ino(5)  # below: changes nothing
        assert g2.alloc_ino() == 10**6 + 2 and g2.inos_used() == 10**6 + 2
        cat.commit()
    finally:
        cat.close()
    cat = Catalog(db_path)
    try:
        assert Graph(cat).alloc_ino() > 10**6 + 2
    finally:
        cat.close()


def test_draft_counters_are_written_once_per_commit_and_kept_by_a_reload(db_path):
    """adjust_refs keeps a draft's delta and referenced in memory; Catalog.commit writes
    its row once (not once per changed chunk), and a reload in the middle of a
    transaction (an abandoned import) still sees what memory has."""
    cat = Catalog(db_path)
    g = Graph(cat)
    d = g.create_volume("v")
    updates: list[str] = []
    cat.db.set_trace_callback(
        lambda sql: updates.append(sql) if sql.startswith("UPDATE vertices") else None)
    for chunk in range(1, 101):
        g.adjust_refs(d.id, {chunk: 1})
    g.adjust_refs(d.id, {1: -1})
    assert updates == [], "nothing per chunk"
    cat.commit()
    assert len(updates) == 1
    cat.db.set_trace_callback(None)
    g.adjust_refs(d.id, {2: -1})
    g.reload()
    d = g.volume_draft("v")
    assert (d.delta, d.referenced) == (98, 98) and 2 not in d.added
    cat.close()
    cat = Catalog(db_path)
    try:
        d = Graph(cat).volume_draft("v")
        assert (d.delta, d.referenced) == (98, 98), "close commits, and so writes them"
    finally:
        cat.close()


def test_draft_counters_refused_at_a_commit_are_written_by_the_next(g, cat, monkeypatch):
    """A commit whose counter write fails (a full disk) raises and keeps them changed:
    the next commit writes them. Forgotten, the row would lag the vertex_chunks rows."""
    d = g.create_volume("v")
    cat.commit()
    g.adjust_refs(d.id, {1: 1, 2: 1})
    real = cat.write

    def refuse(sql, args=()):
        if sql.startswith("UPDATE vertices"):
            raise sqlite3.OperationalError("database or disk is full")
        return real(sql, args)

    monkeypatch.setattr(cat, "write", refuse)
    with pytest.raises(sqlite3.OperationalError):
        cat.commit()
    monkeypatch.setattr(cat, "write", real)
    cat.commit()
    assert cat.execute("SELECT delta, referenced FROM vertices WHERE id=?",
                       (d.id,)).fetchone() == (2, 2)


def test_chain_depths(g):
    d = g.create_volume("v")
    s1 = g.commit(d.id, "a")
    s2 = g.commit(g.volume_draft("v").id, "b")
    top = g.volume_draft("v")
    assert g.chain(top.id) == {s1.id: 0, s2.id: 1, top.id: 2}
    assert g.chain(s1.id) == {s1.id: 0}
