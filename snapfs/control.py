"""Repository operations shared by the CLI and the daemon's control socket.

A command run against a mounted repository is sent as one JSON line to REPO/snapfs.sock
and executed by the daemon on its trio thread (so it is atomic with respect to FUSE
requests); against an unmounted repository the CLI opens the repository itself and runs
the same function. Either way the answer is a JSON-able dict.

The daemon answers with one JSON line {"ok": ...}, which may be preceded by progress
lines {"progress": "text"} (an export sends one every 512 chunks; the client prints them
if it asked for progress) and keep-alive lines {"progress": null} every 30 s, so that a
client waits for a long request as long as the daemon lives.

An export is the one long operation that is not atomic: it reads an immutable, pinned
snapshot in slices of at most SLICE_SECONDS of work, and FUSE requests are served between
them; a mounted filesystem stays usable while it runs. An import authenticates the bundle
in a worker thread, stores its chunks between requests, then adds the snapshot atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Generator
from typing import BinaryIO

import trio

from snapfs.errors import DaemonError, NotFound, SnapfsError, UsageError, is_disk_full
from snapfs.graph import accounting
from snapfs.graph import stats as graph_stats
from snapfs.vfs.diff import diff as snapshot_diff
from snapfs.vfs.fs import Filesystem

log = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 30.0  # an empty progress line while a request runs (call's timeout: 600 s)
SLICE_SECONDS = 0.002  # work done by a long operation between two turns of the FUSE loop
Progress = Callable[[str], None]


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


async def run_in_slices(steps: Generator[None, None, dict]) -> dict:
    """Drive a generator that yields between small steps, giving the trio loop (FUSE
    requests) a turn after every SLICE_SECONDS of work; its return value is the result."""
    deadline = time.monotonic() + SLICE_SECONDS
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        if time.monotonic() >= deadline:
            await trio.sleep(0)
            deadline = time.monotonic() + SLICE_SECONDS


async def handle(fs: Filesystem, req: dict, progress: Progress | None = None) -> dict:
    """Execute one request. progress receives progress lines of long operations (the
    daemon forwards them to the client); without it they go to stderr if req asks."""
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
        await fs.flush_for_figures()
        if req.get("reclaim") and req.get("reclaim_only"):
            # O(the range), not O(the graph): the whole stats document is not built
            return {"reclaim": reclaim(fs, req["reclaim"])}
        result = fs.stats()
        if req.get("reclaim"):
            result["reclaim"] = reclaim(fs, req["reclaim"])
        return result
    if op == "diff":
        await fs.flush_for_figures()
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
        return await _exchange(fs, op, req, progress)
    if op == "sync":
        await fs.sync()
        return {}
    raise UsageError(f"unknown operation {op!r}")


async def _exchange(fs: Filesystem, op: str, req: dict, progress: Progress | None) -> dict:
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
    if op == "export":  # a snapshot is immutable: no dirty data of a draft to store first
        if progress is None and req.get("progress"):
            progress = print_progress
        async with _replacing(req["path"]) as out:
            return await run_in_slices(exchange.export_steps(
                fs, req["snapshot"], req.get("since"), req["site"], out, progress))
    # The bundle is authenticated in a worker thread (reading and decrypting all of it
    # takes seconds per GiB); its chunks are stored between FUSE requests, and the
    # snapshot is added in one transaction (exchange.apply_verified).
    with tempfile.TemporaryFile(dir=fs.repo.paths.root) as spool:
        def lookup(site: str):
            return trio.from_thread.run_sync(exchange.site_key, fs, site)
        bundle_id = await trio.to_thread.run_sync(exchange.verify_into, req["path"], spool,
                                                  lookup)
        return await exchange.apply_verified(fs, spool, bundle_id)


@contextlib.asynccontextmanager
async def _replacing(path: str) -> AsyncIterator[BinaryIO]:
    """A file that replaces path only once it is complete and synced: a failed export
    (a wrong site name, a full disk) leaves a bundle that was already there untouched.
    A path that is not a regular file (a pipe, /dev/null) is written in place; a symbolic
    link is followed (the file it names is replaced, the link stays)."""
    path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as out:
            yield out
        return
    # named after the bundle, like rsync's temporaries: one left by a killed daemon
    # says whose it was (and a new export of the same name starts afresh beside it)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".snapfs-partial",
                               dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            await trio.to_thread.run_sync(os.fsync, out.fileno())  # a GiB takes a while
        os.chmod(tmp, 0o644 & ~_umask())
        # replacing a big bundle frees its pages inside rename(): 200 ms for 1 GiB here
        await trio.to_thread.run_sync(os.replace, tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without setting it (os.umask would change it for a moment
    under the worker threads that create pack files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def print_progress(line: str) -> None:
    """Progress on stderr: the CLI's, whether it or the daemon does the work."""
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
    """One connection. A client that goes away (Ctrl-C on a command) must cost nothing
    but its answer: an error escaping here would end the daemon's nursery, and the mount."""
    try:
        await _converse(fs, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.info("a control client went away before its answer")
    except Exception:
        log.exception("control connection failed")


async def _converse(fs: Filesystem, stream: trio.SocketStream) -> None:
    async with stream:
        buf = b""
        while not buf.endswith(b"\n"):
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[str | None](math.inf)
            nursery.start_soon(_forward_progress, stream, receive)
            with send:
                async with trio.open_nursery() as beating:
                    beating.start_soon(_keepalive, send.send_nowait)
                    reply = await _reply(fs, buf, send.send_nowait)
                    beating.cancel_scope.cancel()
        await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _keepalive(emit: Callable[[str | None], None]) -> None:
    """An empty progress line every KEEPALIVE_SECONDS: a client waits as long as the
    daemon works on its request (a gc of a big repository), and gives up only on a
    daemon that stopped answering (call's timeout per line)."""
    while True:
        await trio.sleep(KEEPALIVE_SECONDS)
        emit(None)


async def _forward_progress(stream: trio.SocketStream,
                            receive: trio.MemoryReceiveChannel[str | None]) -> None:
    """Progress lines go out as they come; a client that went away only loses them."""
    async with receive:
        async for line in receive:
            try:
                await stream.send_all(json.dumps({"progress": line}).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


async def _reply(fs: Filesystem, buf: bytes, progress: Progress) -> dict:
    try:
        req = json.loads(buf)
        return {"ok": True, "result": await handle(fs, req, progress)}
    except SnapfsError as e:
        return {"ok": False, "error": str(e), "type": type(e).__name__,
                "exit_code": e.exit_code}
    except (KeyError, ValueError) as e:
        return {"ok": False, "error": f"bad request: {e}", "exit_code": 2}
    except Exception as e:
        if is_disk_full(e):  # expected, and the message says what to do
            log.warning("%s: disk full: %s", _op_name(buf), e)
            return {"ok": False, "error": f"the disk holding the repository is full ({e}); "
                    "delete data, then `snapfs gc`", "exit_code": 1}
        log.exception("control request failed")
        return {"ok": False, "error": f"internal error: {e}", "exit_code": 1}


def _op_name(buf: bytes) -> str:
    try:
        return str(json.loads(buf).get("op", "request"))
    except (ValueError, AttributeError):
        return "request"


def call(sock_path: str, req: dict, timeout: float = 600.0,
         progress: Progress | None = None) -> dict:
    """Send one request to a running daemon (blocking; for the CLI). timeout bounds the
    wait for each line of the answer; progress lines go to progress."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(json.dumps(req).encode() + b"\n")
        reply = _receive_reply(s, progress)
    finally:
        s.close()
    if not reply["ok"]:
        err = SnapfsError(reply["error"])
        err.exit_code = reply.get("exit_code", 1)
        raise err
    return reply["result"]


def _receive_reply(s, progress: Progress | None) -> dict:
    buf = b""
    while True:
        while b"\n" not in buf:
            data = s.recv(1 << 20)
            if not data:
                raise DaemonError("the snapfs daemon closed the connection without answering; "
                                  "see its log (REPO/snapfs.log)")
            buf += data
        line, buf = buf.split(b"\n", 1)
        msg = json.loads(line)
        if "progress" not in msg:
            return msg
        if progress is not None and msg["progress"] is not None:  # None: keep-alive
            progress(msg["progress"])


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
