"""SPEC section 5: every accounting figure against a brute-force oracle, after every step.

A hypothesis state machine drives snapfs's vfs layer directly (no kernel): writes,
overwrites, truncates, unlinks, renames (also over an existing file), hard links, files
copied back from old snapshots, writes under snapshot directories, commits of volumes and
of snapshot directories (branches), clones, new volumes, open handles (files unlinked while
open), snapshot deletes (leaf, middle, branch point, root, a volume's head; with and
without --force), volume deletes, garbage collection and remounts. After every step it
checks every figure of the stats dict, reclaim() for many sets of vertices and the SPEC
invariants 2-5 against tests/property/oracle.py, which recomputes everything with Python
sets from a plain model of every vertex's files, and reads back every file of every vertex
(committed snapshots never change; GC never frees a chunk that is still held).

The chunk size is the minimum (4 KiB) and file contents come from a small alphabet of
chunk-sized blocks (4 patterns, zeros, half blocks) and partial tails, so that identical
chunks are common: dedup within a file, across files, across branches, and chunks that
leave a tree and come back.

SNAPFS_HYPOTHESIS_EXAMPLES=N scales the number of examples (default 200) for longer runs;
SNAPFS_HYPOTHESIS_STEPS=N the number of steps per example (default 30).

The pinned regression tests at the end are the three over-count cases of SPEC section 5,
where sum_delta > unique, and the bugs the state machine found.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import stat
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from oracle import Model

from snapfs.errors import Refused
from snapfs.graph import accounting, delete
from snapfs.repository import Repository
from snapfs.store.repo import init_repository
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem
from snapfs.vfs.view import View

CS = 4096
EXAMPLES = int(os.environ.get("SNAPFS_HYPOTHESIS_EXAMPLES", "200"))
STEPS = int(os.environ.get("SNAPFS_HYPOTHESIS_STEPS", "30"))
MAX_VOLUMES = 4
MAX_SNAPSHOTS = 10
MAX_HANDLES = 3

PATHS = ["a", "b", "c", "d/x", "d/y"]
DIRS = ["d"]


def _pattern(i: int) -> bytes:
    return bytes((j * (2 * i + 3) + 17 * i) % 251 + 1 for j in range(CS))  # no NUL byte


PATTERNS = [_pattern(i) for i in range(4)]
HALF = [p[:CS // 2] + bytes(CS // 2) for p in PATTERNS[:2]]  # stripped: == a tail of 2048
BLOCKS = {**{f"P{i}": p for i, p in enumerate(PATTERNS)}, "Z": bytes(CS),
          **{f"H{i}": h for i, h in enumerate(HALF)}}
TAILS = [1, CS // 2, CS - 1]


class Blob(bytes):
    """File content built from the alphabet, shown by its recipe in hypothesis' reports."""

    recipe: str

    def __new__(cls, blocks: list[str], tail: tuple[int, int] | None = None) -> Blob:
        data = b"".join(BLOCKS[b] for b in blocks)
        recipe = " ".join(blocks)
        if tail is not None:
            data += PATTERNS[tail[0]][:tail[1]]
            recipe += f" +P{tail[0]}[:{tail[1]}]"
        obj = super().__new__(cls, data)
        obj.recipe = recipe.strip()
        return obj

    def __repr__(self) -> str:
        return f"Blob({self.recipe!r})"


def contents(max_blocks: int = 4):
    """A few blocks from the alphabet, and maybe a partial tail of a pattern."""
    return st.builds(
        Blob, st.lists(st.sampled_from(sorted(BLOCKS)), max_size=max_blocks),
        st.one_of(st.none(), st.tuples(st.integers(0, 3), st.sampled_from(TAILS))))


offsets = st.sampled_from([k * CS + sub for k in range(5) for sub in (0, CS // 2, 1)])
sizes = st.sampled_from([k * CS + sub for k in range(6) for sub in (0, CS // 2, 1)])


# ----------------------------------------------------------------------------- the snapfs side


class AtVertex(View):
    """A read-only View pinned to one vertex id (reads a committed snapshot itself, even
    when a draft is shown over it), with nothing cached: everything comes from the catalog."""

    def __init__(self, fs: Filesystem, vid: int) -> None:
        super().__init__(fs, "pinned", vid)

    @property
    def vertex_id(self) -> int:
        return self.key


class Snapfs:
    """One repository opened the way the daemon opens it, driven without the kernel."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "repo")
        init_repository(self.path, CS)
        self.open()

    def open(self) -> None:
        self.repo = Repository(self.path, holder="tests/property")
        self.fs = Filesystem(self.repo)
        self.graph = self.fs.graph

    def remount(self) -> None:
        trio.run(self.fs.sync)
        self.repo.close()
        self.open()

    def close(self) -> None:
        self.repo.close()

    def view(self, target: tuple[str, str]) -> View:
        kind, name = target
        return self.fs.volume_view(name) if kind == "vol" else self.fs.snapshot_view(name)

    @staticmethod
    def where(view: View, path: str) -> tuple[int, bytes]:
        """(parent inode, name) of a path relative to the view's root."""
        parts = path.encode().split(b"/")
        ino = ROOT_INO
        for part in parts[:-1]:
            ino = view.lookup(ino, part).ino
        return ino, parts[-1]

    def lookup(self, view: View, path: str):
        return view.lookup(*self.where(view, path))

    def create_volume(self, name: str, source: str | None = None, *, dirs: bool = True) -> None:
        self.graph.create_volume(name, source)
        if source is None and dirs:
            view = self.fs.volume_view(name)
            for d in DIRS:
                view.mkdir(ROOT_INO, d.encode(), 0o755, 0, 0)
        self.fs.cat.commit()

    def create(self, view: View, path: str, data: bytes) -> None:
        node = view.mknod(*self.where(view, path), stat.S_IFREG | 0o644, 0, 0, 0)
        if data:
            trio.run(view.write, node, 0, data)

    def write(self, view: View, path: str, offset: int, data: bytes) -> None:
        trio.run(view.write, self.lookup(view, path), offset, data)

    def truncate(self, view: View, path: str, size: int) -> None:
        trio.run(_setattr_size, view, self.lookup(view, path).ino, size)

    async def read_all(self, view: View, node) -> bytes:
        return await view.read(node, 0, node.size + CS)

    def vid(self, key: str) -> int:
        """The snapfs vertex id of a model vertex key."""
        if key.startswith("vol:"):
            return self.graph.volumes[key[4:]]
        if key.startswith("sd:"):
            return self.graph.snapshot_drafts[self.graph.by_name[key[3:]]]
        return self.graph.by_name[key]

    @staticmethod
    def open_handle(view: View, node):
        """What the FUSE adapter does on open() (snapfs/fuse/ops.py)."""
        node.opens += 1
        return node

    @staticmethod
    def release(view: View, node) -> None:
        """What the FUSE adapter does on release() of a handle (snapfs/fuse/ops.py)."""
        node.opens -= 1
        if node.nlink == 0 and node.opens == 0 and not node.deleted:
            node.buffers.clear()  # nobody can read it again: nothing to store
            view._maybe_delete(node)


async def _setattr_size(view: View, ino: int, size: int) -> None:
    await view.setattr(ino, size=size)


# ----------------------------------------------------------------------------- the checks


def check_figures(model: Model, snap: Snapfs, rng: random.Random) -> dict:
    """Every figure of fs.stats() and reclaim() against the oracle; SPEC invariants 1-4."""
    fs, g = snap.fs, snap.graph
    trio.run(fs.flush_dirty)  # what reading .snapfs/stats does first
    stats = fs.stats()
    exp = model.figures()
    per = exp["vertices"]

    # The graph's shape: one snapfs vertex per model vertex, with the same parents.
    assert set(g.volumes) == set(model.volumes)
    assert {g.vertices[s].name for s in g.snapshot_drafts} == set(model.snapshot_drafts)
    ids = {k: snap.vid(k) for k in model.vertices}
    assert sorted(ids.values()) == sorted(g.vertices), "vertices differ from the model"
    key_of = {i: k for k, i in ids.items()}
    shape = {k: key_of.get(g.vertices[i].parent) for k, i in ids.items()}
    assert shape == {k: f["parent"] for k, f in per.items()}, "parents differ from the model"

    # Per snapshot, per draft, per volume, totals.
    got = {s["name"]: (s["parent"], s["parent_id"], s["delta"], s["referenced"], s["exclusive"])
           for s in stats["snapshots"]}
    want = {k: (f["parent"], ids.get(f["parent"]), f["delta"], f["referenced"], f["exclusive"])
            for k, f in per.items() if model.vertices[k].kind == "snapshot"}
    assert got == want, "per-snapshot (parent, parent_id, delta, referenced, exclusive)"
    got = {key_of[d["id"]]: (key_of.get(d["parent_id"]), d["volume"], d["delta"],
                             d["referenced"], d["exclusive"]) for d in stats["drafts"]}
    want = {k: (f["parent"], model.vertices[k].volume, f["delta"], f["referenced"],
                f["exclusive"]) for k, f in per.items() if model.vertices[k].kind == "draft"}
    assert got == want, "per-draft (parent, volume, delta, referenced, exclusive)"
    fields = ("head", "unique_chunks", "sum_delta", "draft_delta", "draft_removed", "referenced")
    got = {name: {f: vol[f] for f in fields} | {"draft": key_of[vol["draft"]]}
           for name, vol in stats["volumes"].items()}
    want = {name: dict(vol) | {"draft": f"vol:{name}"} for name, vol in exp["volumes"].items()}
    assert got == want, "per-volume figures"
    totals = stats["totals"]
    assert {k: totals[k] for k in exp["totals"]} == exp["totals"], "totals"
    assert totals["unique_chunks"] <= totals["stored_chunks"]
    assert totals["garbage_chunks"] == totals["stored_chunks"] - totals["unique_chunks"]
    assert totals["garbage_bytes"] >= 0
    assert stats["chunk_size"] == CS

    # SPEC invariant 2.
    every = stats["snapshots"] + stats["drafts"]
    for f in every:
        assert 0 <= f["exclusive"] <= f["delta"] <= f["referenced"], f
    assert sum(f["exclusive"] for f in every) <= totals["unique_chunks"]

    # reclaim(S) for singletons (= exclusive), lines of snapshots, random sets; invariant 3.
    c = exp["chunks"]
    keys = sorted(model.vertices)

    def reclaim(ks) -> int:
        return len(accounting.reclaim(g, [ids[k] for k in ks]))

    for k in keys:
        assert reclaim([k]) == per[k]["exclusive"], f"reclaim({{{k}}})"
    assert reclaim(keys) == exp["totals"]["unique_chunks"], "reclaim(all) != unique(all)"
    for k in keys:  # ranges along a line (--reclaim A..B): k and its nearest ancestors
        line = [u for u in model.chain(k) if model.vertices[u].kind == "snapshot"]
        for i in range(1, len(line) + 1):
            assert reclaim(line[:i]) == model.reclaim(line[:i], c), f"reclaim({line[:i]})"
    for _ in range(4):
        s = rng.sample(keys, rng.randint(1, len(keys)))
        t = s + rng.sample(keys, 1)
        rs, rt = reclaim(s), reclaim(t)
        assert rs == model.reclaim(s, c), f"reclaim({sorted(s)})"
        assert rt == model.reclaim(t, c), f"reclaim({sorted(set(t))})"
        assert rs <= rt, f"reclaim not monotone: {sorted(s)} -> {sorted(set(t))}"
    return stats


def check_tree(snap: Snapfs, view: View, v, what: str) -> None:
    """The names and bytes a view shows are the model vertex's."""
    def names(ino: int) -> set[bytes]:
        return {name for name, _ in view.listdir(ino)}

    want_root = {p.split("/")[0].encode() for p in v.links} | {d.encode() for d in v.dirs}
    assert names(ROOT_INO) == want_root, f"{what}: names in /"
    for d in v.dirs:
        ino = view.lookup(ROOT_INO, d.encode()).ino
        want = {p.split("/", 1)[1].encode() for p in v.links if p.startswith(d + "/")}
        assert names(ino) == want, f"{what}: names in {d}/"
    inos: dict[int, int] = {}
    for path, fid in sorted(v.links.items()):
        node = snap.lookup(view, path)
        assert stat.S_ISREG(node.mode), f"{what}: {path} is not a regular file"
        assert inos.setdefault(fid, node.ino) == node.ino, f"{what}: hard link {path} broken"
        data = trio.run(snap.read_all, view, node)
        want = v.files[fid]
        assert node.size == len(want), f"{what}: size of {path}"
        assert data == want, f"{what}: bytes of {path}"
    assert len(set(inos.values())) == len(inos), f"{what}: two files share an inode"


def check_contents(model: Model, snap: Snapfs, handles: list) -> None:
    fs = snap.fs
    for key, v in sorted(model.vertices.items()):
        if v.kind == "snapshot":
            check_tree(snap, AtVertex(fs, snap.vid(key)), v, f"snapshot {key}")
            if key not in model.snapshot_drafts:
                check_tree(snap, fs.snapshot_view(key), v, f".snapshots/{key}")
        elif key.startswith("vol:"):
            check_tree(snap, fs.volume_view(v.volume), v, f"volume {v.volume}")
        else:
            check_tree(snap, fs.snapshot_view(key[3:]), v, f".snapshots/{key[3:]} (draft)")
    for (view, node), h in zip(handles, model.handles, strict=True):
        want = model.handle_content(h)
        assert node.size == len(want), f"size through a handle on {h}"
        assert trio.run(snap.read_all, view, node) == want, f"bytes through a handle on {h}"


# ----------------------------------------------------------------------------- the machine


class AccountingMachine(RuleBasedStateMachine):
    """Every rule takes exactly one argument (data) and draws the rest itself: hypothesis
    orders rules by their number of arguments and favours the first ones, so argument-less
    rules (gc, remount) would take a large share of the steps and rules with several
    arguments (overwrite) a small one."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="snapfs-prop-")
        self.snap: Snapfs | None = None
        self.model = Model(CS)
        self.handles: list = []  # (view, node), parallel to self.model.handles
        self.counter = 0
        self.steps = 0
        self.since_gc = 0
        self.remounts = 0

    def teardown(self) -> None:
        try:
            if self.snap is not None:
                self.snap.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    @initialize()
    def setup(self) -> None:
        self.snap = Snapfs(self.tmp)
        self.snap.create_volume("v0")
        self.model.create_volume("v0", dirs=DIRS)

    # -- helpers -------------------------------------------------------------------------------
    def targets(self) -> list[tuple[str, str]]:
        return ([("vol", n) for n in sorted(self.model.volumes)]
                + [("snap", s) for s in self.model.snapshots()])

    def files_in(self, target) -> list[str]:
        return sorted(self.model.shown(target).links)

    def _draw_target_with_file(self, data):
        targets = [t for t in self.targets() if self.files_in(t)]
        if not targets:
            return None, None
        target = data.draw(st.sampled_from(targets), label="target")
        path = data.draw(st.sampled_from(self.files_in(target)), label="path")
        return target, path

    def has_files(self) -> bool:
        return any(self.files_in(t) for t in self.targets())

    def has_snapshots(self) -> bool:
        return bool(self.model.snapshots())

    def may_commit(self) -> bool:
        return len(self.model.snapshots()) < MAX_SNAPSHOTS

    # -- file operations (in volumes and under .snapshots/S) --------------------------------------
    @rule(data=st.data())
    def create_file(self, data):
        target = data.draw(st.sampled_from(self.targets()), label="target")
        free = [p for p in PATHS if p not in self.model.shown(target).links]
        if not free:
            return
        path = data.draw(st.sampled_from(free), label="path")
        content = data.draw(contents(), label="content")
        self.snap.create(self.snap.view(target), path, content)
        self.model.create(self.model.mutate(target), path, content)

    @precondition(has_files)
    @rule(data=st.data())
    def overwrite(self, data):
        target, path = self._draw_target_with_file(data)
        offset = data.draw(offsets, label="offset")
        content = data.draw(contents(max_blocks=2), label="content")
        if not content:
            return
        self.snap.write(self.snap.view(target), path, offset, content)
        self.model.write(self.model.mutate(target), path, offset, content)

    @precondition(has_files)
    @rule(data=st.data())
    def truncate(self, data):
        target, path = self._draw_target_with_file(data)
        size = data.draw(sizes, label="size")
        self.snap.truncate(self.snap.view(target), path, size)
        self.model.truncate(self.model.mutate(target), path, size)

    @precondition(has_files)
    @rule(data=st.data())
    def unlink(self, data):
        target, path = self._draw_target_with_file(data)
        view = self.snap.view(target)
        view.unlink(*self.snap.where(view, path))
        self.model.unlink(target, path)

    @precondition(has_files)
    @rule(data=st.data())
    def rename(self, data):
        target, src = self._draw_target_with_file(data)
        dst = data.draw(st.sampled_from([p for p in PATHS if p != src]), label="dst")
        view = self.snap.view(target)
        view.rename(*self.snap.where(view, src), *self.snap.where(view, dst), 0)
        self.model.rename(target, src, dst)

    @precondition(has_files)
    @rule(data=st.data())
    def hard_link(self, data):
        target, src = self._draw_target_with_file(data)
        free = [p for p in PATHS if p not in self.model.shown(target).links]
        if not free:
            return
        dst = data.draw(st.sampled_from(free), label="dst")
        view = self.snap.view(target)
        view.link(self.snap.lookup(view, src).ino, *self.snap.where(view, dst))
        self.model.link(self.model.mutate(target), src, dst)

    @precondition(lambda self: any(self.files_in(("snap", s)) for s in self.model.snapshots()))
    @rule(data=st.data())
    def copy_from_snapshot(self, data):
        """cp .snapshots/S/path VOLUME/dst: the re-introduction case of SPEC section 5."""
        sources = [s for s in self.model.snapshots() if self.files_in(("snap", s))]
        source = data.draw(st.sampled_from(sources), label="source snapshot")
        path = data.draw(st.sampled_from(self.files_in(("snap", source))), label="path")
        target = ("vol", data.draw(st.sampled_from(sorted(self.model.volumes)), label="volume"))
        dst = data.draw(st.sampled_from(PATHS), label="dst")
        src_view = self.snap.view(("snap", source))
        node = self.snap.lookup(src_view, path)
        content = trio.run(self.snap.read_all, src_view, node)
        assert content == self.model.shown(("snap", source)).files[
            self.model.shown(("snap", source)).links[path]]
        view = self.snap.view(target)
        draft = self.model.mutate(target)
        if dst in draft.links:  # cp onto an existing file: O_TRUNC, then write
            self.snap.truncate(view, dst, 0)
            self.model.truncate(draft, dst, 0)
            if content:
                self.snap.write(view, dst, 0, content)
                self.model.write(draft, dst, 0, content)
        else:
            self.snap.create(view, dst, content)
            self.model.create(draft, dst, content)

    # -- open handles (files unlinked while open) -------------------------------------------------
    @precondition(lambda self: len(self.handles) < MAX_HANDLES and self.has_files())
    @rule(data=st.data())
    def open_file(self, data):
        target, path = self._draw_target_with_file(data)
        view = self.snap.view(target)
        self.handles.append((view, self.snap.open_handle(view, self.snap.lookup(view, path))))
        self.model.open(target, path)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def write_handle(self, data):
        i = data.draw(st.integers(0, len(self.handles) - 1), label="handle")
        offset = data.draw(offsets, label="offset")
        content = data.draw(contents(max_blocks=2), label="content")
        if not content:
            return
        view, node = self.handles[i]
        trio.run(view.write, node, offset, content)
        self.model.write_handle(i, offset, content)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close_file(self, data):
        i = data.draw(st.integers(0, len(self.handles) - 1), label="handle")
        view, node = self.handles.pop(i)
        self.snap.release(view, node)
        self.model.close(i)

    # -- graph operations --------------------------------------------------------------------------
    def _commit(self, target) -> None:
        fs = self.snap.fs
        trio.run(fs.flush_dirty)
        before = fs.stats()
        draft_vid = self.snap.vid(self.model.writable(target).key) if (
            target[0] == "vol" or target[1] in self.model.snapshot_drafts) else None
        draft_delta = self.snap.graph.vertices[draft_vid].delta if draft_vid else 0
        label = self._next("s")
        name = trio.run(fs.commit, self.snap.view(target), label)
        assert name == self.model.commit(target, label)
        after = fs.stats()
        # the sealed draft keeps its id and delta; every other vertex keeps its delta
        old = {f["id"]: f["delta"] for f in before["snapshots"] + before["drafts"]}
        new = {f["id"]: f["delta"] for f in after["snapshots"] + after["drafts"]}
        assert {k: new[k] for k in old} == old, "a commit changed an existing delta"
        assert new[self.snap.graph.by_name[name]] == draft_delta, "the new snapshot's delta"

    @precondition(may_commit)
    @rule(data=st.data())
    def commit_volume(self, data):
        self._commit(("vol", data.draw(st.sampled_from(sorted(self.model.volumes)))))

    @precondition(lambda self: self.has_snapshots() and self.may_commit())
    @rule(data=st.data())
    def commit_snapshot_dir(self, data):
        """snapfs commit .snapshots/S: a branch off S."""
        self._commit(("snap", data.draw(st.sampled_from(self.model.snapshots()))))

    @precondition(lambda self: self.has_snapshots() and len(self.model.volumes) < MAX_VOLUMES)
    @rule(data=st.data())
    def clone(self, data):
        source = data.draw(st.sampled_from(self.model.snapshots()), label="source")
        name = self._next("v")
        self.snap.create_volume(name, source)
        self.model.create_volume(name, source)
        draft = self.snap.graph.volume_draft(name)
        assert draft.delta == 0, "a fresh clone has delta 0"

    @precondition(lambda self: len(self.model.volumes) < MAX_VOLUMES and self.counter < 8)
    @rule(data=st.data())  # unused: see the class docstring
    def new_volume(self, data):
        name = self._next("v")
        self.snap.create_volume(name)
        self.model.create_volume(name, dirs=DIRS)

    def _delete(self, delete, keys) -> None:
        """Run a deletion; SPEC invariant 5: it frees exactly reclaim(deleted vertices),
        which is exclusive(v) for one vertex, and lowers no other vertex's exclusive."""
        fs = self.snap.fs
        trio.run(fs.flush_dirty)
        before = fs.stats()
        ids = {k: self.snap.vid(k) for k in self.model.vertices}
        freed = self.model.reclaim(keys)
        assert freed == len(accounting.reclaim(self.snap.graph, [ids[k] for k in keys]))
        exclusive = {f["id"]: f["exclusive"] for f in before["snapshots"] + before["drafts"]}
        if len(keys) == 1:
            assert freed == exclusive[ids[keys[0]]]
        trio.run(delete)
        after = fs.stats()
        assert before["totals"]["unique_chunks"] - after["totals"]["unique_chunks"] == freed
        for f in after["snapshots"] + after["drafts"]:
            assert f["exclusive"] >= exclusive[f["id"]], f"deleting {keys} lowered {f}"

    @precondition(lambda self: hasattr(Filesystem, "delete_snapshot") and self.has_snapshots())
    @rule(data=st.data())
    def delete_snapshot(self, data):
        """snapfs snapshot delete NAME [--force]: leaf, middle, branch point, root, head."""
        name = data.draw(st.sampled_from(self.model.snapshots()), label="snapshot")
        force = data.draw(st.booleans(), label="force")
        busy = any(h.target == ("snap", name) for h in self.model.handles)
        refused = busy or not force and name in self.model.snapshot_drafts  # draft changed
        if refused:
            with pytest.raises(Refused):
                trio.run(functools.partial(self.snap.fs.delete_snapshot, name, force=force))
            return
        keys = [name] + ([f"sd:{name}"] if name in self.model.snapshot_drafts else [])
        self._delete(functools.partial(self.snap.fs.delete_snapshot, name, force=force), keys)
        assert self.model.delete_snapshot(name) == keys

    @precondition(lambda self: self.has_snapshots() and any(
        self.files_in(t) for t in self.targets() if t[0] == "vol"))
    @rule(data=st.data())
    def delete_snapshot_while_writing(self, data):
        """A deletion runs in slices between other requests (graph/delete.py): a write to
        a volume's file lands between two of them (or after, when the snapshot is a
        leaf: no slice), and everything still agrees with the model."""
        name = data.draw(st.sampled_from(self.model.snapshots()), label="snapshot")
        if any(h.target == ("snap", name) for h in self.model.handles):
            return  # refused: delete_snapshot covers it
        target = data.draw(st.sampled_from(
            [t for t in self.targets() if t[0] == "vol" and self.files_in(t)]), label="volume")
        path = data.draw(st.sampled_from(self.files_in(target)), label="file")
        offset = data.draw(offsets, label="offset")
        content = data.draw(contents(max_blocks=2), label="content")
        if not content:
            return
        fs, view = self.snap.fs, self.snap.view(target)
        node = self.snap.lookup(view, path)
        vid = self.snap.vid(name)

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(fs.delete_snapshot, name, force=True))
                for _ in range(10_000):  # until a slice has run, or the deletion is done
                    if vid in fs.graph.deleting or vid not in fs.graph.vertices:
                        break
                    await trio.sleep(0)
                await view.write(node, offset, content)

        saved, delete.SLICE = delete.SLICE, 2
        try:
            trio.run(run)
        finally:
            delete.SLICE = saved
        self.model.write(self.model.mutate(target), path, offset, content)
        self.model.delete_snapshot(name)

    @precondition(lambda self: hasattr(Filesystem, "delete_volume")
                  and len(self.model.volumes) > 1)
    @rule(data=st.data())
    def delete_volume(self, data):
        """snapfs volume delete NAME [--force]: its snapshots stay."""
        name = data.draw(st.sampled_from(sorted(self.model.volumes)), label="volume")
        force = data.draw(st.booleans(), label="force")
        draft = self.model.vertices[self.model.volumes[name]]
        busy = any(h.target == ("vol", name) for h in self.model.handles)
        if busy or (not force and draft.changed):  # uncommitted changes, root or not
            with pytest.raises(Refused):
                trio.run(functools.partial(self.snap.fs.delete_volume, name, force=force))
            return
        self._delete(functools.partial(self.snap.fs.delete_volume, name, force=force),
                     [f"vol:{name}"])
        self.model.delete_volume(name)

    @precondition(lambda self: hasattr(Filesystem, "gc") and self.since_gc >= 4)
    @rule(data=st.data())  # unused: see the class docstring
    def gc(self, data):
        """Collect garbage: nothing held is freed (every file reads back after every step),
        everything else is."""
        self.since_gc = 0
        trio.run(self.snap.fs.gc)
        totals = self.snap.fs.stats()["totals"]
        held = self.model.figures()["everything"]
        assert totals["stored_chunks"] == len(held | self.model.pinned()), \
            "gc freed a chunk an open file needs, or left garbage"

    @precondition(lambda self: self.remounts < 3)
    @rule(data=st.data())  # unused: see the class docstring
    def remount(self, data):
        self.remounts += 1
        self.snap.remount()
        self.handles.clear()
        self.model.remount()

    # -- after every step -------------------------------------------------------------------------
    @invariant()
    def figures_and_contents(self):
        if self.snap is None:
            return
        self.steps += 1
        self.since_gc += 1
        check_figures(self.model, self.snap, random.Random(self.steps))
        check_contents(self.model, self.snap, self.handles)


TestAccounting = AccountingMachine.TestCase
TestAccounting.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    report_multiple_bugs=False,  # shrink one failure, quickly; the pinned tests name the rest
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ----------------------------------------------------------------------------- pinned tests


@pytest.fixture
def snap(tmp_path):
    s = Snapfs(str(tmp_path))
    s.create_volume("v", dirs=False)
    yield s
    s.close()


def figures(snap: Snapfs) -> dict:
    trio.run(snap.fs.flush_dirty)
    return snap.fs.stats()


def by_name(stats: dict) -> dict[str, dict]:
    return {s["name"]: s for s in stats["snapshots"]}


def test_overcount_identical_content_in_sibling_branches(snap):
    """SPEC 5, case 1: the same content written independently in two sibling branches is
    one (deduplicated) chunk, counted in both deltas: sum_delta > unique."""
    P, Q = PATTERNS[0], PATTERNS[1]
    vol = snap.fs.volume_view("v")
    snap.create(vol, "a", P)
    base = trio.run(snap.fs.commit, vol, "base")
    for label in ("left", "right"):
        view = snap.fs.snapshot_view(base)
        snap.create(view, "b", Q)  # the same bytes, written separately in each branch
        trio.run(snap.fs.commit, view, label)
    stats = figures(snap)
    snaps = by_name(stats)
    assert [snaps[n]["delta"] for n in ("v@base", "v@left", "v@right")] == [1, 1, 1]
    assert [snaps[n]["referenced"] for n in ("v@base", "v@left", "v@right")] == [1, 2, 2]
    # Q is in both branches, so deleting either one alone frees nothing.
    assert [snaps[n]["exclusive"] for n in ("v@base", "v@left", "v@right")] == [0, 0, 0]
    t = stats["totals"]
    assert (t["unique_chunks"], t["sum_delta"], t["sum_delta_snapshots"]) == (2, 3, 3)
    assert t["unique_bytes"] == 2 * CS
    assert stats["volumes"]["v"]["unique_chunks"] == 2
    assert stats["volumes"]["v"]["sum_delta"] == 3
    g = snap.graph
    ids = {n: g.by_name[n] for n in snaps}
    assert len(accounting.reclaim(g, [ids["v@left"], ids["v@right"]])) == 1
    # base's P is also held by v's draft (over base), so no set of snapshots frees it
    assert len(accounting.reclaim(g, list(ids.values()))) == 1
    assert len(accounting.reclaim(g, list(g.vertices))) == 2


def test_overcount_chunk_removed_in_child_comes_back_in_grandchild(snap):
    """SPEC 5, case 2: a chunk removed in a child comes back in a grandchild (a file copied
    back from an old snapshot): it is in the delta of both the root and the grandchild."""
    P, Q = PATTERNS[0], PATTERNS[1]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P + Q)
    trio.run(fs.commit, vol, "s1")
    vol.unlink(ROOT_INO, b"a")
    trio.run(fs.commit, vol, "s2")
    old = fs.snapshot_view("v@s1")  # cp .snapshots/v@s1/a v/a
    node = snap.lookup(old, "a")
    snap.create(vol, "a", trio.run(snap.read_all, old, node))
    trio.run(fs.commit, vol, "s3")
    stats = figures(snap)
    snaps = by_name(stats)
    assert [snaps[n]["delta"] for n in ("v@s1", "v@s2", "v@s3")] == [2, 0, 2]
    assert [snaps[n]["referenced"] for n in ("v@s1", "v@s2", "v@s3")] == [2, 0, 2]
    assert [snaps[n]["exclusive"] for n in ("v@s1", "v@s2", "v@s3")] == [0, 0, 0]
    t = stats["totals"]
    assert (t["unique_chunks"], t["sum_delta"]) == (2, 4)
    assert stats["volumes"]["v"]["unique_chunks"] == 2
    assert stats["volumes"]["v"]["sum_delta"] == 4
    g = snap.graph
    s1, s2, s3 = (g.by_name[f"v@s{i}"] for i in (1, 2, 3))
    assert len(accounting.reclaim(g, [s1])) == 0
    assert len(accounting.reclaim(g, [s1, s2])) == 0  # s3 and the draft still hold P, Q
    assert len(accounting.reclaim(g, [s1, s2, s3])) == 0  # the draft holds them
    vol.unlink(ROOT_INO, b"a")
    assert len(accounting.reclaim(g, [s1, s2, s3])) == 2
    assert len(accounting.reclaim(g, [s3])) == 0  # s1 still holds them
    stats = figures(snap)
    assert by_name(stats)["v@s3"]["exclusive"] == 0
    assert by_name(stats)["v@s1"]["exclusive"] == 0


def test_overcount_after_deleting_a_middle_snapshot_with_two_children(snap):
    """SPEC 5, case 3: deleting a middle snapshot with two children re-parents both onto its
    parent; a chunk the middle one added and both children kept is now in both their
    deltas: sum_delta > unique."""
    g = snap.graph
    P, Q, R, S = PATTERNS
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "root")
    snap.create(vol, "b", Q)  # the middle snapshot adds Q
    trio.run(fs.commit, vol, "mid")
    left = fs.snapshot_view("v@mid")
    snap.create(left, "c", R)
    trio.run(fs.commit, left, "left")
    snap.create(vol, "c", S)
    trio.run(fs.commit, vol, "right")
    before = by_name(figures(snap))
    assert before["v@mid"]["exclusive"] == 0  # Q lives on in both children
    assert before["v@left"]["delta"] == 1 and before["v@right"]["delta"] == 1
    trio.run(fs.delete_snapshot, "v@mid")
    stats = figures(snap)
    snaps = by_name(stats)
    assert "v@mid" not in snaps
    assert snaps["v@left"]["parent"] == "v@root"
    assert snaps["v@right"]["parent"] == "v@root"
    # recomputed from contents: each child now adds Q and its own chunk
    assert snaps["v@left"]["delta"] == 2 and snaps["v@right"]["delta"] == 2
    assert [snaps[n]["referenced"] for n in ("v@root", "v@left", "v@right")] == [1, 3, 3]
    t = stats["totals"]
    # P, Q, R, S; the snapshots' deltas: 1 + 2 + 2 = 5, the draft over right adds nothing
    assert t["unique_chunks"] == 4
    assert t["sum_delta_snapshots"] == 5
    assert t["sum_delta"] == 5
    assert stats["volumes"]["v"]["unique_chunks"] == 4
    assert snaps["v@left"]["exclusive"] == 1  # R
    assert snaps["v@right"]["exclusive"] == 0  # S is in v's draft too
    assert snaps["v@root"]["exclusive"] == 0  # P is everywhere
    # the contents of every remaining snapshot are unchanged
    for name, files in (("v@left", {"a": P, "b": Q, "c": R}),
                        ("v@right", {"a": P, "b": Q, "c": S}), ("v@root", {"a": P})):
        view = AtVertex(fs, g.by_name[name])
        assert {n.decode() for n, _ in view.listdir(ROOT_INO)} == set(files)
        for path, want in files.items():
            assert trio.run(snap.read_all, view, snap.lookup(view, path)) == want


# ----------------------------------------------------------------------------- bugs it found
#
# Each test is the minimal reproduction of a discrepancy the state machine found (against
# an earlier snapfs), named by the behaviour it expects.


def test_file_unlinked_while_open_is_released_at_next_mount_after_a_commit(snap):
    """A file unlinked while open is in no tree: no vertex holds its chunks, a commit does
    not seal it, the collector keeps its chunks while it is open, and after the daemon
    dies with it open the next mount releases it (its inode row is in the committed
    snapshot by then, not in the draft)."""
    P, Q = PATTERNS[0], PATTERNS[1]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P + Q)
    snap.open_handle(vol, snap.lookup(vol, "a"))
    vol.unlink(ROOT_INO, b"a")
    trio.run(fs.commit, vol, "s1")
    stats = figures(snap)
    assert stats["volumes"]["v"]["referenced"] == 0
    assert by_name(stats)["v@s1"]["referenced"] == 0
    trio.run(fs.gc)
    assert fs.stats()["totals"]["stored_chunks"] == 2, "gc freed the chunks of an open file"
    snap.remount()  # the daemon dies with the file still open
    assert snap.fs.volume_view("v").listdir(ROOT_INO) == []
    stats = figures(snap)
    assert stats["volumes"]["v"]["referenced"] == 0
    trio.run(snap.fs.gc)
    assert snap.fs.stats()["totals"]["stored_chunks"] == 0, "the orphan was never released"


def test_clone_does_not_hold_a_file_unlinked_while_open_in_its_source(snap):
    """A clone of a snapshot taken while a file was unlinked but open can never reach that
    file (no name, no handle), so its draft holds none of its chunks. (When commits sealed
    such files into the snapshot, the clone's draft held them: referenced 2, never freed
    while the clone lived.)"""
    P, Q = PATTERNS[0], PATTERNS[1]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P + Q)
    node = snap.open_handle(vol, snap.lookup(vol, "a"))
    vol.unlink(ROOT_INO, b"a")
    trio.run(fs.commit, vol, "s1")
    snap.release(vol, node)
    snap.create_volume("c", "v@s1")
    stats = figures(snap)
    assert fs.volume_view("c").listdir(ROOT_INO) == []
    assert stats["volumes"]["c"]["referenced"] == 0, "the clone holds an unreachable file"
    assert stats["volumes"]["v"]["referenced"] == 0


def test_snapshot_dir_draft_does_not_hold_a_file_unlinked_while_open_in_the_snapshot(snap):
    """The same through .snapshots/S: the draft made by a write under S holds only what
    S's tree and the write hold. (It used to hold the chunks of a file S had sealed while
    it was unlinked and open.)"""
    P, Q, R = PATTERNS[:3]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P + Q)
    node = snap.open_handle(vol, snap.lookup(vol, "a"))
    vol.unlink(ROOT_INO, b"a")
    trio.run(fs.commit, vol, "s1")
    snap.release(vol, node)
    snap.create(fs.snapshot_view("v@s1"), "b", R)
    stats = figures(snap)
    (draft,) = [d for d in stats["drafts"] if d["parent_id"] == snap.graph.by_name["v@s1"]
                and d["volume"] == "v" and d["id"] != snap.graph.volumes["v"]]
    assert draft["referenced"] == 1, "the draft under .snapshots/v@s1 holds an unreachable file"


def test_release_of_a_file_unlinked_while_open_under_a_committed_snapshot_dir(snap):
    """A file created and unlinked (still open) under .snapshots/S, then S's draft is
    committed (a branch): the last close must neither touch S nor make a draft over it.
    (It used to create a draft over S and subtract the orphan's blocks there, where S
    never had them: AssertionError "negative reference count".)"""
    P, Q = PATTERNS[0], PATTERNS[1]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    sv = fs.snapshot_view("v@s1")
    snap.create(sv, "b", Q)
    node = snap.open_handle(sv, snap.lookup(sv, "b"))
    sv.unlink(ROOT_INO, b"b")
    trio.run(fs.commit, sv, "br")
    snap.release(sv, node)
    stats = figures(snap)
    snaps = by_name(stats)
    assert (snaps["v@s1"]["referenced"], snaps["v@br"]["referenced"]) == (1, 1)
    assert [d["id"] for d in stats["drafts"]] == [snap.graph.volumes["v"]], "a stray draft"
    trio.run(fs.gc)
    assert fs.stats()["totals"]["stored_chunks"] == 1


def test_write_through_a_handle_after_its_snapshot_dir_was_committed_is_stored(snap):
    """A file open under .snapshots/S keeps being written after `snapfs commit
    .snapshots/S`: fsync stores the writes, and the file reads the same through its path
    and through the handle. (Commit used to reset the view so that the handle's inode was
    no longer the one the view knew: later writes stayed in memory through fsync, an
    unmount lost them, and earlier the draft's reference counts went wrong.)"""
    P, Q, R = PATTERNS[:3]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    sv = fs.snapshot_view("v@s1")
    node = snap.open_handle(sv, snap.lookup(sv, "a"))
    trio.run(sv.write, node, 0, Q)
    trio.run(fs.commit, sv, "br")
    trio.run(sv.write, node, CS, R)
    trio.run(fs.sync)  # fsync
    assert not sorted(node.buffers), "fsync left written data in memory only"
    by_handle = trio.run(snap.read_all, sv, node)
    by_path = trio.run(snap.read_all, sv, snap.lookup(sv, "a"))
    assert by_handle == by_path
    assert by_path.endswith(R)


def test_stats_count_the_draft_of_a_snapshot_dir_made_by_a_write_of_zeros(snap):
    """Writing only zeros under .snapshots/S (a size change, no chunk) makes S's draft at
    once. (It used to appear only at the next inode flush, ~2 s later: the stats file read
    right after the write, which flushes data but not inodes, showed no draft over S, and
    S's exclusive counted chunks the draft also holds.)"""
    P = PATTERNS[0]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    vol.unlink(ROOT_INO, b"a")  # now only v@s1 holds P: exclusive 1
    assert by_name(figures(snap))["v@s1"]["exclusive"] == 1
    sv = fs.snapshot_view("v@s1")
    snap.write(sv, "a", CS, bytes(CS))  # .snapshots/v@s1/a is now 8 KiB: a draft
    stats = figures(snap)
    assert len(stats["drafts"]) == 2, "the draft under .snapshots/v@s1 is missing"
    assert by_name(stats)["v@s1"]["exclusive"] == 0


def test_volume_delete_refuses_a_draft_whose_only_change_is_not_flushed_yet(snap):
    """`snapfs volume delete` without --force refuses a volume with uncommitted changes,
    also when they are still in memory. (A write of zeros past the end of a file changes
    only its size, kept in view.dirty_inodes until the next inode flush; the check looked
    at the draft's rows and dirty data buffers only and deleted the volume.)"""
    P = PATTERNS[0]
    fs = snap.fs
    snap.create_volume("w", dirs=False)
    vol = fs.volume_view("w")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    snap.write(vol, "a", CS, bytes(CS))  # w/a is now 8 KiB: an uncommitted change
    trio.run(fs.flush_dirty)
    with pytest.raises(Refused):
        trio.run(fs.delete_volume, "w")


def test_snapshot_delete_refuses_a_draft_whose_only_change_is_not_flushed_yet(snap):
    """The same under .snapshots/S: `snapfs snapshot delete S` without --force refuses
    when .snapshots/S/a was made longer and the size change is not flushed yet."""
    P = PATTERNS[0]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    trio.run(fs.commit, vol, "s2")  # v stands on s2: s1 is free to go
    snap.write(fs.snapshot_view("v@s1"), "a", CS, bytes(CS))
    trio.run(fs.flush_dirty)
    with pytest.raises(Refused):
        trio.run(fs.delete_snapshot, "v@s1")


def test_volume_delete_refuses_a_never_committed_volume_with_files(snap):
    """`snapfs volume delete` without --force ("--force: discard uncommitted changes")
    must refuse a volume that was never committed but holds files, whether or not its
    changes reached the catalog yet. (It refused while they were only in memory and
    deleted without asking once the group commit had flushed them: root drafts were
    exempt from the check of the draft's rows, so the answer depended on timing.)"""
    P = PATTERNS[0]
    fs = snap.fs
    snap.create_volume("w", dirs=False)
    snap.create(fs.volume_view("w"), "a", P)
    with pytest.raises(Refused):  # the changes are still in memory
        trio.run(fs.delete_volume, "w")
    trio.run(fs.group_commit)  # what the daemon does every 2 s
    with pytest.raises(Refused):
        trio.run(fs.delete_volume, "w")
    snap.create_volume("empty", dirs=False)
    trio.run(fs.delete_volume, "empty")  # nothing to lose: no --force needed


def test_writing_an_orphan_under_a_committed_snapshot_dir_makes_no_draft(snap):
    """A file created under .snapshots/S and still open when that directory is committed
    is an orphan afterwards (S does not have it). Writing to it changes no tree, so it
    makes no draft over S. (It used to make a stray draft holding the orphan's inode row,
    so that `snapshot delete S` refused for "uncommitted changes" nobody could see.)"""
    P, Q, R = PATTERNS[:3]
    fs = snap.fs
    vol = fs.volume_view("v")
    snap.create(vol, "a", P)
    trio.run(fs.commit, vol, "s1")
    trio.run(fs.commit, vol, "s2")
    sv = fs.snapshot_view("v@s1")
    snap.create(sv, "b", Q)
    node = snap.open_handle(sv, snap.lookup(sv, "b"))
    trio.run(fs.commit, sv, "br")
    trio.run(sv.write, node, 0, R)  # the handle still works...
    assert trio.run(snap.read_all, sv, node) == R
    trio.run(fs.sync)
    stats = figures(snap)
    assert [d["id"] for d in stats["drafts"]] == [snap.graph.volumes["v"]], "a stray draft"
    assert [n for n, _ in sv.listdir(ROOT_INO)] == [b"a"]
    snap.release(sv, node)
    trio.run(fs.delete_snapshot, "v@s1")  # nothing uncommitted under .snapshots/v@s1
