"""snapfs snapshot diff: what changed between two vertices, in O(what differs).

Only rows written by the vertices between A and B (on the two paths down from their
nearest common ancestor) can make the trees differ; every other row is shared. So the
diff reads those rows, resolves each touched item in both trees, and names the paths of
the items that really differ. Renames are recognised when one inode lost a name and
gained another. With chunks=True it also counts the changed block positions (what EBS
ListChangedBlocks lists) and the chunks in one tree and not the other.
"""

from __future__ import annotations

import stat

from snapfs.errors import FsError
from snapfs.graph import accounting
from snapfs.types import ROOT_INO
from snapfs.vfs.fs import Filesystem
from snapfs.vfs.view import PinnedView, View


def _paths_between(graph, a: int, b: int) -> list[int]:
    """Vertices on the paths from the nearest common ancestor down to a and to b."""
    chain_a, chain_b = graph.chain(a), graph.chain(b)
    common = [v for v in chain_a if v in chain_b]
    lca_depth = max((chain_a[v] for v in common), default=-1)
    return ([v for v, d in chain_a.items() if d > lca_depth]
            + [v for v, d in chain_b.items() if d > lca_depth])


def path_of(view: View, ino: int, limit: int = 4096) -> str | None:
    """One path of ino in view (walking up through the entries that name it)."""
    parts: list[bytes] = []
    for _ in range(limit):
        if ino == ROOT_INO:
            return "/" + "/".join(p.decode(errors="surrogateescape") for p in reversed(parts))
        found = None
        for (parent,) in view.cat.execute(
                "SELECT DISTINCT parent FROM dirents WHERE ino=?", (ino,)):
            try:
                entries = view.entries(view.get(parent))
            except FsError:
                continue
            for name, child in entries.items():
                if child == ino:
                    found = (parent, name)
                    break
            if found:
                break
        if not found:
            return None
        parts.append(found[1])
        ino = found[0]
    return None


def diff(fs: Filesystem, a_name: str, b_name: str, *, chunks: bool = False) -> dict:
    g = fs.graph
    a, b = g.snapshot(a_name), g.snapshot(b_name)
    va, vb = PinnedView(fs, a.id), PinnedView(fs, b.id)
    between = _paths_between(g, a.id, b.id)
    marks = ",".join(str(v) for v in between) or "NULL"
    touched_inos: set[int] = set()
    for table in ("inodes", "xattrs"):
        touched_inos.update(ino for (ino,) in fs.cat.execute(
            f"SELECT DISTINCT ino FROM {table} WHERE vertex IN ({marks})"))
    touched_blocks: dict[int, set[int]] = {}
    for ino, idx in fs.cat.execute(
            f"SELECT DISTINCT ino, idx FROM blocks WHERE vertex IN ({marks})"):
        touched_blocks.setdefault(ino, set()).add(idx)
    touched_inos.update(touched_blocks)
    touched_entries = {(parent, fs.meta.name_dec(parent, name)) for parent, name in fs.cat.execute(
        f"SELECT DISTINCT parent, name FROM dirents WHERE vertex IN ({marks})")}

    def entry(view: View, parent: int, name: bytes) -> int | None:
        try:
            return view.entries(view.get(parent)).get(name)
        except FsError:
            return None

    removed: dict[int, str] = {}
    added: dict[int, str] = {}
    for parent, name in touched_entries:
        ia, ib = entry(va, parent, name), entry(vb, parent, name)
        if ia == ib:
            continue
        if ia is not None:
            removed[ia] = _join(path_of(va, parent), name)
        if ib is not None:
            added[ib] = _join(path_of(vb, parent), name)
    changes = []
    for ino in sorted(set(removed) & set(added)):
        changes.append({"change": "renamed", "path": added.pop(ino), "from": removed.pop(ino)})
    changes += [{"change": "removed", "path": p} for p in removed.values()]
    changes += [{"change": "added", "path": p} for p in added.values()]
    named = {c["path"] for c in changes}
    changed_blocks = 0
    for ino in sorted(touched_inos):
        try:
            na, nb = va.get(ino), vb.get(ino)
        except FsError:
            continue  # exists on one side only: reported as added or removed
        differ = na.row() != nb.row() or va._xattrs(na) != vb._xattrs(nb)
        if stat.S_ISREG(na.mode) and stat.S_ISREG(nb.mode):
            limit_a, limit_b = va._nblocks(na.size), vb._nblocks(nb.size)
            blocks = sum(1 for i in touched_blocks.get(ino, ())
                         if (va.block(na, i) if i < limit_a else 0)
                         != (vb.block(nb, i) if i < limit_b else 0))
            changed_blocks += blocks
            differ = differ or blocks > 0
        if differ and ino != ROOT_INO:
            path = path_of(vb, ino)
            if path and path not in named:
                changes.append({"change": "modified", "path": path})
    changes.sort(key=lambda c: c["path"])
    result: dict = {"a": a_name, "b": b_name, "changes": changes}
    if chunks:
        ca, cb = accounting.contents(g, a.id), accounting.contents(g, b.id)
        result["chunks"] = {"changed_blocks": changed_blocks, "only_in_a": len(ca - cb),
                            "only_in_b": len(cb - ca)}
    return result


def _join(parent_path: str | None, name: bytes) -> str:
    base = parent_path or "/?"
    return base.rstrip("/") + "/" + name.decode(errors="surrogateescape")
