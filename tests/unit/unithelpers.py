"""Helpers shared by the unit tests of the vfs layer (imported by the test modules)."""

from __future__ import annotations

import functools
import stat

import trio

from snapfs.types import ROOT_INO
from snapfs.vfs.view import Inode, PinnedView, View

FILE = stat.S_IFREG | 0o644
CHUNK = 4096  # the smallest chunk size: many chunk boundaries in little data


def trio_test(fn):
    """Run an async test function with trio.run (fixtures are resolved by pytest)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


def mkfile(view: View, name: bytes, parent: int = ROOT_INO, mode: int = FILE) -> Inode:
    return view.mknod(parent, name, mode, 0, 1000, 1000)


async def write_file(view: View, name: bytes, data: bytes, parent: int = ROOT_INO) -> Inode:
    node = mkfile(view, name, parent)
    if data:
        await view.write(node, 0, data)
    return node


async def read_all(view: View, node: Inode) -> bytes:
    return await view.read(node, 0, node.size + 1)


async def read_path(view: View, *names: bytes) -> bytes:
    ino = ROOT_INO
    for name in names:
        ino = view.lookup(ino, name).ino
    node = view.get(ino)
    return await read_all(view, node)


def names(view: View, ino: int = ROOT_INO) -> list[bytes]:
    return [n for n, _ in view.listdir(ino)]


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes of reproducible, incompressible data (no long zero runs)."""
    import random

    return bytes(b | 1 for b in random.Random(seed).randbytes(n))


async def close_and_fsck(fs, path: str) -> list[str]:
    """Sync and close the repository of fs, then fsck it; returns fsck's problems."""
    from snapfs.fsck import fsck

    await fs.sync()
    fs.repo.close()
    return fsck(path)


def oracle_figures(fs) -> dict:
    """Every vertex's C(v) recomputed by walking its whole tree (fsck's brute force), and
    the SPEC section 5 figures computed from those sets."""
    from snapfs.fsck import tree_counts
    from snapfs.vfs.view import PinnedView as _Pinned

    g = fs.graph
    fs.flush_inodes()  # file sizes kept in memory are what the walk needs
    c = {vid: set(tree_counts(_Pinned(fs, vid))) for vid in g.vertices}
    everything = set().union(*c.values())
    delta = {vid: len(c[vid] - (c[v.parent] if v.parent is not None else set()))
             for vid, v in g.vertices.items()}
    exclusive = {}
    for vid in c:
        others = set().union(*(c[u] for u in c if u != vid))
        exclusive[vid] = len(c[vid] - others)
    return {"C": c, "delta": delta, "sum_delta": sum(delta.values()),
            "unique": len(everything), "exclusive": exclusive}


def assert_stats_match_oracle(fs) -> dict:
    """The stats document (stored deltas, referenced, exclusive, totals) against the oracle."""
    o = oracle_figures(fs)
    stats = fs.stats()
    assert stats["totals"]["unique_chunks"] == o["unique"]
    assert stats["totals"]["sum_delta"] == o["sum_delta"]
    seen = set()
    for s in stats["snapshots"] + stats["drafts"]:
        vid = s["id"]
        seen.add(vid)
        assert (s["delta"], s["referenced"], s["exclusive"]) == (
            o["delta"][vid], len(o["C"][vid]), o["exclusive"][vid]), s
    assert seen == set(o["C"])
    return o


def assert_gone(view: View, ino: int) -> None:
    """ino is deleted in view: at most a 'deleted' node kept in memory until the kernel
    forgets it, and nothing in the catalog (ENOENT once forgotten, and for a fresh view)."""
    import errno

    from snapfs.errors import FsError

    node = view.inodes.get(ino)
    if node is not None:
        assert getattr(node, "deleted", False) or node.nlink == 0, node
        view.forget(ino)
    fresh = View(view.fs, view.kind, view.key)
    for v in (view, fresh):
        try:
            v.get(ino)
        except FsError as e:
            assert e.errno == errno.ENOENT
        else:
            raise AssertionError(f"inode {ino} is still there")


async def tree(view) -> dict:
    """path -> content (files), target (symlinks) or None (directories) of a whole view."""
    out = {}
    stack = [(b"", ROOT_INO)]
    while stack:
        prefix, ino = stack.pop()
        for name, child in view.listdir(ino):
            node = view.get(child)
            path = prefix + b"/" + name
            if stat.S_ISDIR(node.mode):
                out[path] = None
                stack.append((path, child))
            elif stat.S_ISLNK(node.mode):
                out[path] = view.readlink(child)
            else:
                out[path] = await read_all(view, node)
    return out


async def all_trees(fs) -> dict:
    """tree() of every snapshot and every volume."""
    trees = {s.name: await tree(PinnedView(fs, s.id)) for s in fs.graph.snapshots()}
    for name in fs.graph.volumes:
        trees[f"volume {name}"] = await tree(fs.volume_view(name))
    return trees
