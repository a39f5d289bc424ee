"""The figures of .snapfs/stats and `snapfs stats`, computed from the graph in memory.

One call runs synchronously from start to end (no await), so it sees one consistent
version of the graph (SPEC section 5, invariant 6).
"""

from __future__ import annotations

import os
import time

from pyroaring import BitMap

from snapfs.graph import accounting
from snapfs.graph.graph import Graph


def chunk_bytes(graph: Graph, chunks: BitMap) -> int:
    """Plaintext bytes of a set of chunks (one indexed query per 500 ids)."""
    total = 0
    ids = list(chunks)
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        marks = ",".join("?" * len(part))
        total += graph.cat.execute(
            f"SELECT COALESCE(SUM(raw_len), 0) FROM chunks WHERE id IN ({marks})", part
        ).fetchone()[0]
    return total


def compute(graph: Graph, chunk_size: int, packs_dir: str | None = None) -> dict:
    vertices = list(graph.vertices.values())
    held, shared = accounting.shared_chunks(vertices)
    snapshots = [v for v in vertices if v.kind == "snapshot"]
    drafts = [v for v in vertices if v.kind == "draft"]
    total_chunks, total_bytes = graph.cat.execute(
        "SELECT COUNT(*), COALESCE(SUM(raw_len), 0) FROM chunks WHERE pack >= 0").fetchone()
    unique_bytes = chunk_bytes(graph, held)
    stored = 0
    if packs_dir is not None:
        for name in os.listdir(packs_dir):
            if name.endswith(".pack"):
                stored += os.stat(os.path.join(packs_dir, name)).st_size
    volumes = {}
    for name, draft_id in sorted(graph.volumes.items()):
        draft = graph.vertices[draft_id]
        line = [v.id for v in vertices if v.volume == name]
        uniq = accounting.unique(graph, line)
        volumes[name] = {
            "head": graph.vertices[draft.parent].name if draft.parent else None,
            "draft": draft.id,
            "unique_chunks": len(uniq),
            "sum_delta": sum(graph.vertices[v].delta for v in
                             accounting.ancestor_closure(graph, line)),
            "draft_delta": draft.delta,
            "draft_removed": len(draft.removed),
            "referenced": draft.referenced,
        }
    per_snapshot = []
    for v in sorted(snapshots, key=lambda v: v.id):
        per_snapshot.append({
            "name": v.name, "id": v.id,
            "parent": graph.vertices[v.parent].name if v.parent else None,
            "parent_id": v.parent,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created)),
            "delta": v.delta, "referenced": v.referenced,
            "exclusive": accounting.exclusive(graph, v, shared),
        })
    per_draft = [{
        "id": v.id, "parent_id": v.parent, "volume": v.volume,
        "delta": v.delta, "referenced": v.referenced,
        "exclusive": accounting.exclusive(graph, v, shared),
    } for v in sorted(drafts, key=lambda v: v.id)]
    return {
        "chunk_size": chunk_size,
        "graph_version": graph.version,
        "totals": {
            "snapshots": len(snapshots),
            "drafts": len(drafts),
            "volumes": len(graph.volumes),
            "unique_chunks": len(held),
            "unique_bytes": unique_bytes,
            "sum_delta": sum(v.delta for v in vertices),
            "sum_delta_snapshots": sum(v.delta for v in snapshots),
            "stored_chunks": total_chunks,
            "stored_bytes": stored,
            "garbage_chunks": total_chunks - len(held),
            "garbage_bytes": total_bytes - unique_bytes,
        },
        "volumes": volumes,
        "snapshots": per_snapshot,
        "drafts": per_draft,
    }
