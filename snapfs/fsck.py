"""fsck: verify every chunk record, every reference and every stored accounting figure.

Checks, each reported as one line naming what is damaged:

1. every indexed chunk's record: framing, chunk id and xxHash checksum (reads all data);
2. every block row points at an indexed chunk (but a deleted vertex's, not purged yet);
3. for every vertex, the chunk reference counts recomputed by walking its whole tree (the
   brute-force oracle) agree with the stored refs, added/removed sets, delta and
   referenced figures.

It runs on an unmounted repository, under the repository lock.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable, Iterator

from pyroaring import BitMap

from snapfs.errors import IntegrityError
from snapfs.graph.delete import pending_purges
from snapfs.graph.graph import Graph
from snapfs.repository import Repository
from snapfs.types import ROOT_INO, ChunkLocation
from snapfs.vfs.fs import Filesystem
from snapfs.vfs.view import PinnedView, View


def fsck(path: str, *, repair: bool = False, out: Callable[[str], None] | None = None,
         secret: bytes | None = None) -> list[str]:
    problems: list[str] = []
    say = out or (lambda s: None)
    with Repository(path, holder="snapfs fsck", secret=secret) as repo:
        say("checking chunk records")
        problems += check_chunks(repo)
        say("checking references")
        problems += check_references(repo)
        say("checking accounting of every vertex")
        fs = Filesystem(repo, clean_orphans=False)
        problems += check_intent_log(fs, say)
        problems += check_metadata(fs)
        problems += check_accounting(fs)
        if repair and problems:
            problems.append("repair: nothing was changed (automatic repair is not implemented; "
                            "restore the damaged snapshots from another site)")
    return problems


def check_chunks(repo: Repository) -> list[str]:
    """Read every indexed record: framing, checksum, and (encrypted) its authentication."""
    problems = []
    for cid, pack, offset, length, raw_len, digest in repo.cat.execute(
            "SELECT id, pack, offset, length, raw_len, hash FROM chunks").fetchall():
        if pack < 0:
            continue  # an interrupted write never referenced by a block
        try:
            payload = repo.chunks._read_verified(cid, (ChunkLocation(pack, offset, length), digest))
            if len(payload) != raw_len:
                problems.append(f"chunk {cid}: length {len(payload)} but index says {raw_len}")
        except (IntegrityError, OSError) as e:
            problems.append(f"chunk {cid}: {e}")
    return problems


def check_intent_log(fs: Filesystem, say: Callable[[str], None]) -> list[str]:
    """Records of fsynced writes that the catalog does not hold yet (the last writer
    died) are not a problem: the next mount or snapfs command applies them first. A
    record that fails its authentication is."""
    try:
        pending = fs.pending_intents()
    except IntegrityError as e:
        return [f"intent log: {e}"]
    if pending:
        say(f"intent log: {len(pending)} fsynced write(s) not yet in the catalog; the next "
            "mount or snapfs command applies them")
    return []


def check_metadata(fs: Filesystem) -> list[str]:
    """Every name, symlink target and xattr opens (authenticated, when encrypted)."""
    if not fs.meta.encrypted:
        return []
    meta, problems = fs.meta, []
    checks = [
        ("SELECT parent, name, vertex FROM dirents",
         lambda r: meta.name_dec(r[0], r[1]), "name in directory inode {0} of vertex {2}"),
        ("SELECT ino, target, vertex FROM inodes WHERE target IS NOT NULL",
         lambda r: meta.target_dec(r[0], r[1]), "symlink target of inode {0} in vertex {2}"),
        ("SELECT ino, name, vertex, value FROM xattrs",
         lambda r: meta.xvalue_dec(r[0], meta.xname_dec(r[0], r[1]), r[3]),
         "xattr of inode {0} in vertex {2}"),
    ]
    for sql, check, what in checks:
        for row in fs.cat.execute(sql).fetchall():
            try:
                check(row)
            except IntegrityError:
                problems.append(what.format(*row) + ": damaged (authentication failed)")
    return problems


def check_references(repo: Repository) -> list[str]:
    """Block rows naming a chunk that is not stored. Rows of a deleted vertex whose purge
    a crash interrupted are not looked at: nothing reads them, and the collector may have
    freed their chunks (graph/delete.py; the daemon finishes the purge)."""
    purging = set(pending_purges(repo.cat))
    rows = repo.cat.execute(
        "SELECT b.ino, b.idx, b.vertex, b.chunk FROM blocks b LEFT JOIN chunks c "
        "ON c.id = b.chunk WHERE b.chunk != 0 AND (c.id IS NULL OR c.pack < 0)").fetchall()
    return [f"block {idx} of inode {ino} in vertex {v} points at missing chunk {c}"
            for ino, idx, v, c in rows if v not in purging]


def tree_counts(view: View) -> Counter:
    """Brute force: references to each chunk from every file reachable in the view's tree.

    Files unlinked while open are in no tree and hold no references (their chunks are
    pinned in memory while open), so they are not counted.
    """
    counts: Counter = Counter()
    for _ in tree_count_steps(view, counts):
        pass
    return counts


def tree_count_steps(view: View, counts: Counter, step: int = 1 << 62) -> Iterator[None]:
    """tree_counts into counts, yielding after every step inodes: the daemon awaits
    between steps (an import accounts a large snapshot without holding the event loop)."""
    seen: set[int] = set()
    stack = [ROOT_INO]
    inos: list[int] = []
    while stack:
        ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        inos.append(ino)
        node = view.get(ino)
        if node.is_dir:
            stack.extend(child for _, child in view.listdir(ino))
        if not len(inos) % step:
            yield
    for n, ino in enumerate(inos, 1):
        node = view.get(ino)
        if stat.S_ISREG(node.mode):
            for _, c in view.stored_blocks(node):
                counts[c] += 1
        if not n % step:
            yield


def check_accounting(fs: Filesystem) -> list[str]:
    g: Graph = fs.graph
    problems = []
    counts: dict[int, Counter] = {}
    depth = g.depths()
    for vid in sorted(g.vertices, key=depth.__getitem__):
        try:
            counts[vid] = tree_counts(PinnedView(fs, vid))
        except IntegrityError as e:
            problems.append(f"vertex {vid}: its tree cannot be read: {e}")
            return problems
    stored_refs: dict[int, dict[int, tuple[int, int]]] = {}
    for vid, chunk, refs, presence in fs.cat.execute(
            "SELECT vertex, chunk, refs, presence FROM vertex_chunks"):
        stored_refs.setdefault(vid, {})[chunk] = (refs, presence)
    for vid, v in g.vertices.items():
        mine = counts[vid]
        parent = counts[v.parent] if v.parent is not None else Counter()
        name = v.name or f"draft {vid} of {v.volume}"
        added = BitMap(c for c in mine if parent[c] == 0)
        removed = BitMap(c for c in parent if mine[c] == 0)
        if added != v.added or removed != v.removed:
            problems.append(f"{name}: stored added/removed sets differ from its contents "
                            f"(added {len(v.added)} vs {len(added)}, "
                            f"removed {len(v.removed)} vs {len(removed)})")
        if v.delta != len(added) or v.referenced != len(mine):
            problems.append(f"{name}: delta/referenced {v.delta}/{v.referenced}, "
                            f"contents say {len(added)}/{len(mine)}")
        expect = {c: mine[c] - parent[c] for c in set(mine) | set(parent) if mine[c] != parent[c]}
        got = {c: r for c, (r, _p) in stored_refs.get(vid, {}).items() if r}
        if expect != got:
            problems.append(f"{name}: stored reference counts differ for "
                            f"{len(set(expect.items()) ^ set(got.items()))} chunks")
    return problems
