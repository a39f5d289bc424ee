"""Repository operations shared by the CLI and the daemon's control socket.

A command run against a mounted repository is sent as one JSON line to REPO/snapfs.sock
and executed by the daemon on its trio thread (so it is atomic with respect to FUSE
requests); against an unmounted repository the CLI opens the repository itself and runs
the same function. Either way the answer is a JSON-able dict.
"""

from __future__ import annotations

import json
import logging
import os

import trio

from snapfs.errors import DaemonError, NotFound, SnapfsError, UsageError
from snapfs.graph import accounting
from snapfs.graph import stats as graph_stats
from snapfs.vfs.diff import diff as snapshot_diff
from snapfs.vfs.fs import Filesystem

log = logging.getLogger(__name__)


def view_of(fs: Filesystem, where: str):
    """'VOLUME', 'VOLUME/sub/dir' or '.snapshots/NAME[/...]' -> the View it is in."""
    parts = [p for p in where.split("/") if p and p != "."]
    if not parts:
        raise UsageError("name a volume or snapshot directory (DIR is the mount's root)")
    if parts[0] == ".snapshots":
        if len(parts) < 2:
            raise UsageError("name a snapshot directory under .snapshots/")
        return fs.snapshot_view(parts[1])
    if parts[0] == ".snapfs":
        raise UsageError(".snapfs holds no volume")
    return fs.volume_view(parts[0])


async def handle(fs: Filesystem, req: dict) -> dict:
    op = req.get("op")
    g = fs.graph
    if op == "commit":
        view = view_of(fs, req["where"])
        return {"snapshot": await fs.commit(view, req.get("label"))}
    if op == "volume-create":
        draft = g.create_volume(req["name"], req.get("from"))
        await fs.commit_catalog(durable=True)
        return {"volume": req["name"], "draft": draft.id}
    if op == "volume-list":
        out = []
        for name, draft_id in sorted(g.volumes.items()):
            head = g.volume_head(name)
            out.append({"name": name, "head": head.name if head else None,
                        "draft_delta": g.vertices[draft_id].delta})
        return {"volumes": out}
    if op == "snapshot-list":
        snaps = sorted(g.snapshots(), key=lambda v: v.id)
        return {"snapshots": [{
            "name": v.name, "id": v.id, "parent": g.vertices[v.parent].name if v.parent else None,
            "created": v.created, "delta": v.delta, "referenced": v.referenced} for v in snaps]}
    if op == "stats":
        await fs.flush_dirty()
        if req.get("reclaim") and req.get("reclaim_only"):
            # O(the range), not O(the graph): the whole stats document is not built
            return {"reclaim": reclaim(fs, req["reclaim"])}
        result = fs.stats()
        if req.get("reclaim"):
            result["reclaim"] = reclaim(fs, req["reclaim"])
        return result
    if op == "diff":
        await fs.flush_dirty()
        return snapshot_diff(fs, req["a"], req["b"], chunks=bool(req.get("chunks")))
    if op == "snapshot-delete":
        await fs.delete_snapshot(req["name"], force=bool(req.get("force")))
        return {"deleted": req["name"]}
    if op == "volume-delete":
        await fs.delete_volume(req["name"], force=bool(req.get("force")))
        return {"deleted": req["name"]}
    if op == "gc":
        result = await fs.gc(min_dead_ratio=float(req.get("min_dead_ratio", 0.25)))
        result.update(fs.collector.report())
        return result
    if op in ("site-key-create", "site-key-import", "site-key-list", "export", "import"):
        return await _exchange(fs, op, req)
    if op == "sync":
        await fs.sync()
        return {}
    raise UsageError(f"unknown operation {op!r}")


async def _exchange(fs: Filesystem, op: str, req: dict) -> dict:
    from snapfs import exchange
    from snapfs.crypto.sitekeys import read_site_key_file

    if op == "site-key-create":
        exchange.create_site(fs, req["site"], req["path"])
        await fs.commit_catalog(durable=True)
        return {"site": req["site"], "path": req["path"]}
    if op == "site-key-import":
        key = read_site_key_file(req["path"])
        if key.site != req["site"]:
            raise UsageError(f"{req['path']} holds the key of site {key.site!r}, "
                             f"not {req['site']!r}")
        exchange.store_site_key(fs, key)
        await fs.commit_catalog(durable=True)
        return {"site": key.site}
    if op == "site-key-list":
        return {"sites": [s for (s,) in fs.cat.execute("SELECT site FROM site_keys ORDER BY 1")]}
    if op == "export":
        await fs.flush_dirty()
        with open(req["path"], "wb") as out:
            summary = exchange.export(fs, req["snapshot"], req.get("since"), req["site"], out,
                                      progress=req.get("progress") and _progress)
            out.flush()
            os.fsync(out.fileno())
        return summary
    await fs.commit_catalog(durable=False)  # import runs in its own transaction
    return exchange.import_bundle(fs, req["path"])


def _progress(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def reclaim(fs: Filesystem, spec: str) -> dict:
    """'A..B' (a range along one line, both ends included) or 'A,B,C' (any set)."""
    g = fs.graph
    if ".." in spec:
        first, last = (g.snapshot(n.strip()) for n in spec.split("..", 1))
        ids, cur = [], last.id
        while cur is not None and cur != first.id:
            ids.append(cur)
            cur = g.vertices[cur].parent
        if cur is None:
            raise UsageError(f"{first.name} is not an ancestor of {last.name}: "
                             "a range A..B follows one line of snapshots")
        ids.append(first.id)
    else:
        ids = [g.snapshot(n.strip()).id for n in spec.split(",") if n.strip()]
    freed = accounting.reclaim(g, ids)
    return {"snapshots": [g.vertices[i].name for i in ids], "chunks": len(freed),
            "bytes": graph_stats.chunk_bytes(g, freed)}


# -- the socket --------------------------------------------------------------------------------
async def serve(fs: Filesystem, sock_path: str) -> None:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(sock_path)
    os.chmod(sock_path, 0o600)
    listener.listen(16)
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_serve_one, fs, trio.SocketStream(conn))


async def _serve_one(fs: Filesystem, stream: trio.SocketStream) -> None:
    async with stream:
        buf = b""
        while not buf.endswith(b"\n"):
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        try:
            req = json.loads(buf)
            reply = {"ok": True, "result": await handle(fs, req)}
        except SnapfsError as e:
            reply = {"ok": False, "error": str(e), "type": type(e).__name__,
                     "exit_code": e.exit_code}
        except (KeyError, ValueError) as e:
            reply = {"ok": False, "error": f"bad request: {e}", "exit_code": 2}
        except Exception as e:
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {e}", "exit_code": 1}
        await stream.send_all(json.dumps(reply).encode() + b"\n")


def call(sock_path: str, req: dict, timeout: float = 600.0) -> dict:
    """Send one request to a running daemon (blocking; for the CLI)."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(1 << 20)
            if not data:
                raise DaemonError("the snapfs daemon closed the connection without answering; "
                                  "see its log (REPO/snapfs.log)")
            buf += data
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply["ok"]:
        err = SnapfsError(reply["error"])
        err.exit_code = reply.get("exit_code", 1)
        raise err
    return reply["result"]


def daemon_alive(sock_path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


__all__ = ["handle", "serve", "call", "daemon_alive", "NotFound"]
