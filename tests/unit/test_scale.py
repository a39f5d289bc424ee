"""Scaling to many snapshots (issue 3): memory that does not grow with the depth of the
graph, and a WAL that stays bounded under a continuous stream of commits."""

from __future__ import annotations

import gc
import random
import tracemalloc

from unithelpers import trio_test, write_file

from snapfs.graph import accounting
from snapfs.graph.graph import CHAIN_CACHE


async def grow(fs, view, nodes, rng, first: int, last: int) -> None:
    """Commit snapshots first..last, each a small change (one or two files rewritten)."""
    for i in range(first, last + 1):
        for node in rng.sample(nodes, 1 + i % 2):
            await view.write(node, 0, rng.randbytes(100))
        await fs.commit(view, f"s{i}")


@trio_test
async def test_memory_per_committed_snapshot_is_a_small_constant(fs, view):
    """The graph used to cache every vertex's ancestor chain: O(depth) per snapshot, so
    O(N^2) for a line of N snapshots (3.4 GB of daemon RSS at 10,000)."""
    rng = random.Random(7)
    nodes = [await write_file(view, b"f%d" % i, rng.randbytes(100)) for i in range(50)]
    await fs.commit(view, "s1")
    await grow(fs, view, nodes, rng, 2, 60)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await grow(fs, view, nodes, rng, 61, 260)
        gc.collect()
        per_commit = (tracemalloc.get_traced_memory()[0] - before) / 200
    finally:
        tracemalloc.stop()
    assert len(fs.graph._chains) <= CHAIN_CACHE
    # a vertex, its name and a few small objects: about 2.5 KB; the chains cost 10+ KB
    assert per_commit < 6000, f"{per_commit:.0f} bytes retained per committed snapshot"


@trio_test
async def test_chain_cache_is_bounded_and_chains_stay_right(fs, view):
    rng = random.Random(3)
    nodes = [await write_file(view, b"f%d" % i, rng.randbytes(100)) for i in range(5)]
    await fs.commit(view, "s1")
    await grow(fs, view, nodes, rng, 2, 3 * CHAIN_CACHE)
    g = fs.graph
    depth = g.depths()
    for snap in g.snapshots():
        chain = g.chain(snap.id)
        assert len(g._chains) <= CHAIN_CACHE
        assert chain[snap.id] == depth[snap.id] == len(chain) - 1
        cur, d = snap.id, depth[snap.id]
        while cur is not None:  # exactly the ancestors-or-self, with their depths
            assert chain[cur] == d
            cur, d = g.vertices[cur].parent, d - 1
    # reclaim of a range builds no chain (it is O(the range), not O(depth x range))
    g._chains.clear()
    ids = [g.snapshot(f"v@s{i}").id for i in range(10, 30)]
    accounting.reclaim(g, ids)
    assert not g._chains
