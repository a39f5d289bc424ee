"""A brute-force model of snapfs's trees and the SPEC section 5 figures, in plain Python.

Nothing here imports snapfs: the model keeps every vertex's files as plain bytes and
recomputes every figure from them with Python sets, so it is independent of snapfs's
incremental bookkeeping (and of snapfs.fsck, which reuses snapfs's own views).

Chunk identity follows snapfs's rule: a file is cut into chunk_size pieces, trailing NUL
bytes are stripped from each piece, an empty piece is a hole (no chunk), and equal pieces
are the same chunk. The model identifies a chunk by its stripped bytes, so C(v) is a set
of byte strings: the pieces of every file in v's tree (hard links count once).

Vertices are keyed by strings:

* a snapshot by its name ``VOLUME@LABEL``;
* a volume's draft by ``vol:VOLUME``;
* the draft written under ``.snapshots/S`` by ``sd:S``.

A view is a target: ``("vol", VOLUME)`` or ``("snap", SNAPSHOT)``. Files are identified by
a file id shared by every vertex that has the file (like an inode number). Open handles
belong to a view. A file unlinked while open (an orphan) is in no tree, so no vertex holds
its chunks (they are pinned: the collector must not free them) until its last handle in
that view closes; a remount closes every handle. When the draft under .snapshots/S is
committed, S is shown again: a handle on a file that S also has now shows S's file, a
handle on a file S lacks keeps its file as an orphan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Target = tuple[str, str]


def pieces(content: bytes, chunk_size: int) -> set[bytes]:
    """The chunks of one file: its non-empty stripped chunk-sized pieces."""
    out = set()
    for i in range(0, len(content), chunk_size):
        piece = content[i:i + chunk_size].rstrip(b"\0")
        if piece:
            out.add(piece)
    return out


@dataclass
class MVertex:
    key: str
    kind: str  # 'snapshot' | 'draft'
    volume: str
    parent: str | None
    links: dict[str, int] = field(default_factory=dict)  # path -> file id
    files: dict[int, bytes] = field(default_factory=dict)  # file id -> content (linked files)
    dirs: set[str] = field(default_factory=set)  # directories other than the root
    # Has the vertex changes of its own, i.e. is its tree not simply its parent's? A draft
    # is changed by a write, a snapshot keeps its draft's flag, and deleting a changed
    # vertex passes its changes on to its children. `volume delete` without --force
    # refuses a changed draft (uncommitted changes).
    changed: bool = False

    def derive(self, key: str, kind: str, volume: str, parent: str | None) -> MVertex:
        """A copy of this tree as another vertex."""
        return MVertex(key, kind, volume, parent, dict(self.links), dict(self.files),
                       set(self.dirs))


@dataclass
class Handle:
    target: Target
    fid: int


class Model:
    """Every vertex's tree, the volumes, the snapshot-directory drafts and open handles."""

    def __init__(self, chunk_size: int) -> None:
        self.cs = chunk_size
        self.vertices: dict[str, MVertex] = {}
        self.volumes: dict[str, str] = {}  # volume -> its draft's key
        self.snapshot_drafts: dict[str, str] = {}  # snapshot name -> draft key
        self.handles: list[Handle] = []
        self.orphans: dict[tuple[Target, int], bytes] = {}  # (view, file id) -> content
        self.next_fid = 1

    # -- structure -------------------------------------------------------------------------
    def snapshots(self) -> list[str]:
        return sorted(k for k, v in self.vertices.items() if v.kind == "snapshot")

    def create_volume(self, name: str, source: str | None = None, dirs=()) -> MVertex:
        key = f"vol:{name}"
        if source is None:  # making the directories is a change; an empty volume has none
            v = MVertex(key, "draft", name, None, dirs=set(dirs), changed=bool(dirs))
        else:
            v = self.vertices[source].derive(key, "draft", name, source)
        self.vertices[key] = v
        self.volumes[name] = key
        return v

    def shown(self, target: Target) -> MVertex:
        """The vertex a view shows: ('vol', VOLUME) or ('snap', SNAPSHOT)."""
        kind, name = target
        if kind == "vol":
            return self.vertices[self.volumes[name]]
        return self.vertices[self.snapshot_drafts.get(name, name)]

    def writable(self, target: Target) -> MVertex:
        """The draft that takes a write under the view (created on first write)."""
        kind, name = target
        if kind == "vol":
            return self.vertices[self.volumes[name]]
        key = self.snapshot_drafts.get(name)
        if key is None:
            snap = self.vertices[name]
            key = f"sd:{name}"
            self.vertices[key] = snap.derive(key, "draft", snap.volume, name)
            self.snapshot_drafts[name] = key
        return self.vertices[key]

    def mutate(self, target: Target) -> MVertex:
        """writable(), for an operation that changes the tree."""
        v = self.writable(target)
        v.changed = True
        return v

    def commit(self, target: Target, label: str) -> str:
        kind, name = target
        draft = self.writable(target)
        snap_name = f"{draft.volume}@{label}"
        snap = draft.derive(snap_name, "snapshot", draft.volume, draft.parent)
        snap.changed = draft.changed
        del self.vertices[draft.key]  # a draft has no children
        self.vertices[snap_name] = snap
        if kind == "vol":
            self.vertices[draft.key] = snap.derive(draft.key, "draft", draft.volume, snap_name)
            return snap_name
        del self.snapshot_drafts[name]
        # The view shows S again: open files S has show S's file, the others are orphans.
        shown = set(self.vertices[name].links.values())
        for h in self.handles:
            if h.target != target:
                continue
            if h.fid in shown:
                self.orphans.pop((target, h.fid), None)
            elif (target, h.fid) not in self.orphans:
                self.orphans[(target, h.fid)] = draft.files[h.fid]
        return snap_name

    def delete_snapshot(self, name: str) -> list[str]:
        """Delete a snapshot and the draft under .snapshots/NAME; children are re-parented.
        Returns the keys of the deleted vertices."""
        assert not any(h.target == ("snap", name) for h in self.handles)
        gone = [name]
        draft = self.snapshot_drafts.pop(name, None)
        if draft is not None:
            del self.vertices[draft]
            gone.append(draft)
        v = self.vertices.pop(name)
        for child in self.vertices.values():
            if child.parent == name:
                child.parent = v.parent
                child.changed = child.changed or v.changed
        return gone

    def delete_volume(self, name: str) -> list[str]:
        assert not any(h.target == ("vol", name) for h in self.handles)
        key = self.volumes.pop(name)
        del self.vertices[key]
        return [key]

    def remount(self) -> None:
        """Every handle is gone, and with them every orphan."""
        self.handles.clear()
        self.orphans.clear()

    # -- files --------------------------------------------------------------------------------
    def _opens(self, target: Target, fid: int) -> int:
        return sum(1 for h in self.handles if h.fid == fid and h.target == target)

    def _drop_link(self, target: Target, v: MVertex, path: str) -> None:
        fid = v.links.pop(path)
        if fid not in v.links.values():
            content = v.files.pop(fid)
            if self._opens(target, fid):
                self.orphans[(target, fid)] = content

    def create(self, v: MVertex, path: str, content: bytes) -> None:
        assert path not in v.links
        fid = self.next_fid
        self.next_fid += 1
        v.links[path] = fid
        v.files[fid] = bytes(content)

    @staticmethod
    def overwritten(old: bytes, offset: int, data: bytes) -> bytes:
        new = bytearray(old)
        if offset > len(new):
            new.extend(bytes(offset - len(new)))
        new[offset:offset + len(data)] = data
        return bytes(new)

    def write(self, v: MVertex, path: str, offset: int, data: bytes) -> None:
        fid = v.links[path]
        v.files[fid] = self.overwritten(v.files[fid], offset, data)

    def truncate(self, v: MVertex, path: str, size: int) -> None:
        fid = v.links[path]
        old = v.files[fid]
        v.files[fid] = old[:size] + bytes(max(0, size - len(old)))

    def unlink(self, target: Target, path: str) -> None:
        self._drop_link(target, self.mutate(target), path)

    def rename(self, target: Target, src: str, dst: str) -> None:
        shown = self.shown(target)
        fid = shown.links[src]
        if shown.links.get(dst) == fid:
            return  # POSIX: both names are links to one file, nothing happens
        v = self.mutate(target)
        if dst in v.links:
            self._drop_link(target, v, dst)
        del v.links[src]
        v.links[dst] = fid

    def link(self, v: MVertex, src: str, dst: str) -> None:
        assert dst not in v.links
        v.links[dst] = v.links[src]

    # -- handles --------------------------------------------------------------------------------
    def open(self, target: Target, path: str) -> Handle:
        h = Handle(target, self.shown(target).links[path])
        self.handles.append(h)
        return h

    def handle_content(self, h: Handle) -> bytes:
        orphan = self.orphans.get((h.target, h.fid))
        return orphan if orphan is not None else self.shown(h.target).files[h.fid]

    def write_handle(self, index: int, offset: int, data: bytes) -> None:
        h = self.handles[index]
        key = (h.target, h.fid)
        if key in self.orphans:  # in no tree: changes no vertex
            self.orphans[key] = self.overwritten(self.orphans[key], offset, data)
        else:
            v = self.mutate(h.target)
            v.files[h.fid] = self.overwritten(v.files[h.fid], offset, data)

    def close(self, index: int) -> None:
        h = self.handles.pop(index)
        key = (h.target, h.fid)
        if key in self.orphans and not self._opens(h.target, h.fid):
            del self.orphans[key]
            if h.target[0] == "vol":  # the release is recorded in the draft
                self.vertices[self.volumes[h.target[1]]].changed = True

    def pinned(self) -> set[bytes]:
        """The chunks of orphans: held by no vertex, but not to be freed."""
        out: set[bytes] = set()
        for content in self.orphans.values():
            out |= pieces(content, self.cs)
        return out

    # -- figures, by brute force ------------------------------------------------------------------
    def chunks(self, key: str) -> frozenset[bytes]:
        out: set[bytes] = set()
        for content in self.vertices[key].files.values():
            out |= pieces(content, self.cs)
        return frozenset(out)

    def all_chunks(self) -> dict[str, frozenset[bytes]]:
        return {k: self.chunks(k) for k in self.vertices}

    def chain(self, key: str) -> list[str]:
        """key, its parent, its grandparent... up to a root."""
        out = []
        while key is not None:
            out.append(key)
            key = self.vertices[key].parent
        return out

    def closure(self, keys) -> set[str]:
        out: set[str] = set()
        for k in keys:
            while k is not None and k not in out:
                out.add(k)
                k = self.vertices[k].parent
        return out

    @staticmethod
    def union(c: dict[str, frozenset[bytes]], keys) -> set[bytes]:
        out: set[bytes] = set()
        for k in keys:
            out |= c[k]
        return out

    def reclaim(self, keys, c: dict[str, frozenset[bytes]] | None = None) -> int:
        """#(union of C over keys minus the union of C over every other vertex)."""
        c = c if c is not None else self.all_chunks()
        keys = set(keys)
        inside = self.union(c, keys)
        outside = self.union(c, (k for k in c if k not in keys))
        return len(inside - outside)

    def figures(self) -> dict:
        """Every figure of SPEC section 5, per vertex, per volume and in total."""
        c = self.all_chunks()
        per: dict[str, dict] = {}
        for k, v in self.vertices.items():
            mine = c[k]
            parent = c[v.parent] if v.parent is not None else frozenset()
            others = self.union(c, (u for u in c if u != k))
            per[k] = {
                "parent": v.parent,
                "delta": len(mine - parent),
                "removed": len(parent - mine),
                "referenced": len(mine),
                "exclusive": len(mine - others),
            }
        everything = self.union(c, c)
        volumes = {}
        for name, draft in self.volumes.items():
            closure = self.closure(k for k, v in self.vertices.items() if v.volume == name)
            volumes[name] = {
                "head": self.vertices[draft].parent,
                "unique_chunks": len(self.union(c, closure)),
                "sum_delta": sum(per[k]["delta"] for k in closure),
                "draft_delta": per[draft]["delta"],
                "draft_removed": per[draft]["removed"],
                "referenced": per[draft]["referenced"],
            }
        snaps = [k for k, v in self.vertices.items() if v.kind == "snapshot"]
        totals = {
            "snapshots": len(snaps),
            "drafts": len(self.vertices) - len(snaps),
            "volumes": len(self.volumes),
            "unique_chunks": len(everything),
            "unique_bytes": sum(len(p) for p in everything),
            "sum_delta": sum(f["delta"] for f in per.values()),
            "sum_delta_snapshots": sum(per[k]["delta"] for k in snaps),
        }
        return {"vertices": per, "volumes": volumes, "totals": totals, "chunks": c,
                "everything": everything}
