"""The `snapfs` command line (SPEC section 4).

Commands find their repository like git: from -C PATH, or the current directory, where
PATH is a repository directory or any path inside a snapfs mount (found in
/proc/self/mountinfo: fstype fuse.snapfs, source = the repository path). Against a
mounted repository a command talks to the daemon; otherwise it opens the repository
itself under the single-writer lock. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time

import trio

from snapfs import __version__, control
from snapfs.errors import NotARepository, SnapfsError, UsageError, is_disk_full
from snapfs.store.repo import RepoPaths, init_repository, is_repository, parse_size


# -- finding the repository --------------------------------------------------------------------
def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace") \
        if "\\" in field else field


def snapfs_mounts() -> list[tuple[str, str]]:
    """(mountpoint, repository) of every snapfs mount of this process's namespace."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rfields = left.split(), right.split()
                if rfields and rfields[0] == "fuse.snapfs":
                    out.append((_unescape(fields[4]), _unescape(rfields[1])))
    except OSError:
        pass
    return out


class Target:
    """Where a command acts: a repository, and the path of DIR inside its mount (if any)."""

    def __init__(self, repo: str, mountpoint: str | None, inner: str | None) -> None:
        self.repo = repo
        self.mountpoint = mountpoint
        self.inner = inner  # path relative to the mount root, e.g. 'home/doc'
        self.paths = RepoPaths(repo)


def find_target(path: str) -> Target:
    real = os.path.realpath(path)
    if is_repository(real):
        for mnt, repo in snapfs_mounts():
            if os.path.realpath(repo) == real:
                return Target(real, mnt, None)
        return Target(real, None, None)
    best = None
    for mnt, repo in snapfs_mounts():
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and (best is None or len(mnt) > len(best[0])):
            best = (mnt, repo)
    if best:
        return Target(best[1], best[0], os.path.relpath(real, best[0]))
    raise NotARepository(
        f"{path} is neither a snapfs repository nor inside a snapfs mount "
        "(use -C REPO or -C MOUNTPOINT)")


KEY_FILE: str | None = None  # --key-file, for every command that opens a repository


def open_secret(repo: str) -> bytes | None:
    """What unlocks an encrypted repository: its key file's secret or the passphrase."""
    from snapfs.crypto.keys import get_passphrase, read_key_file, wrapped_kdf
    from snapfs.store.repo import load_config

    enc = load_config(repo).encryption
    if not enc:
        return None
    if wrapped_kdf(enc["wrapped"]) == "keyfile":
        path = KEY_FILE or os.environ.get("SNAPFS_KEY_FILE")
        if not path:
            raise UsageError(f"{repo} is encrypted with a key file: give it with --key-file "
                             "FILE or SNAPFS_KEY_FILE")
        return read_key_file(path)
    return get_passphrase(f"Passphrase for {repo}: ")


def open_repository(repo: str, holder: str):
    from snapfs.repository import Repository

    return Repository(repo, holder=holder, secret=open_secret(repo))


def run_op(target: Target, req: dict) -> dict:
    """Execute one operation through the daemon, or on the unmounted repository."""
    if control.daemon_alive(target.paths.sock):
        return control.call(target.paths.sock, req,
                            progress=control.print_progress if req.get("progress") else None)
    from snapfs.vfs.fs import Filesystem

    repo = open_repository(target.repo, "a snapfs command")
    try:
        fs = Filesystem(repo)
        trio.run(fs.recover)  # what the intent log holds first (the daemon died)
        result = trio.run(control.handle, fs, req)
        trio.run(fs.sync)
        return result
    finally:
        repo.close()


# -- commands ------------------------------------------------------------------------------------
def cmd_init(args) -> int:
    chunk_size = parse_size(args.chunk_size)
    encryption, secret = None, None
    if args.encrypt:
        encryption, secret = _new_encryption()
    elif KEY_FILE:
        raise UsageError("--key-file goes with --encrypt at init")
    key_file = KEY_FILE or os.environ.get("SNAPFS_KEY_FILE")
    config = init_repository(args.repo, chunk_size, encryption)
    from snapfs.repository import Repository

    Repository(args.repo, holder="snapfs init", secret=secret).close()
    how = ""
    if encryption:
        how = ", encrypted with " + ("key file " + key_file if key_file else "a passphrase")
    print(f"initialised snapfs repository {os.path.abspath(args.repo)} "
          f"(chunk size {config.chunk_size // 1024} KiB{how})")
    return 0


def _new_secret(key_file: str | None, new: bool = False) -> tuple[str, bytes]:
    """A new wrapping secret: a key file (created 0600 if missing) or a passphrase."""
    from snapfs.crypto import keys

    if key_file:
        if os.path.exists(key_file):
            return "keyfile", keys.read_key_file(key_file)
        return "keyfile", keys.create_key_file(key_file)
    env = ("SNAPFS_NEW_PASSPHRASE", "SNAPFS_NEW_PASSPHRASE_FD") if new else \
        ("SNAPFS_PASSPHRASE", "SNAPFS_PASSPHRASE_FD")
    prompt = "New passphrase: " if new else "Passphrase: "
    return "scrypt", keys.get_passphrase(prompt, confirm=True, env=env[0], fd_env=env[1])


def _new_encryption() -> tuple[dict, bytes]:
    from snapfs.crypto import keys

    kdf, secret = _new_secret(KEY_FILE or os.environ.get("SNAPFS_KEY_FILE"))
    master = keys.new_master()
    if kdf == "keyfile":
        wrapped = keys.wrap_with_key_file(master, secret)
    else:
        wrapped = keys.wrap_with_passphrase(master, secret, keys.tune_scrypt())
    return {"scheme": "aes-256-gcm", "wrapped": wrapped}, secret


def cmd_key(args) -> int:
    """key change: rewrap the master secret (ZFS change-key): no data is rewritten."""
    from snapfs.crypto import keys
    from snapfs.store.repo import load_config, write_json_atomic

    target = find_target(args.C)
    config = load_config(target.repo)
    if not config.encryption:
        raise UsageError(f"{target.repo} is not encrypted: there is no key to change")
    old = open_secret(target.repo)
    kdf, new = _new_secret(args.new_key_file, new=True)
    wrapped = keys.rewrap(config.encryption["wrapped"], old, new, kdf=kdf)
    config.encryption = {**config.encryption, "wrapped": wrapped}
    write_json_atomic(RepoPaths(target.repo).config, config.to_json(), mode=0o600)
    kind = "key file" if kdf == "keyfile" else "passphrase"
    print(f"changed the key of {target.repo} (now a {kind}); no data was rewritten")
    return 0


def cmd_mount(args) -> int:
    from snapfs.fuse.daemon import mount
    from snapfs.vfs.fs import MIN_DIRTY_LIMIT

    if not is_repository(args.repo):
        raise NotARepository(f"{args.repo} is not a snapfs repository; create one with "
                             f"`snapfs init {args.repo}`")
    cache_bytes = parse_size(args.cache_size) if args.cache_size else None
    dirty_limit = parse_size(args.dirty_limit) if args.dirty_limit else None
    if dirty_limit is not None and dirty_limit < MIN_DIRTY_LIMIT:
        raise UsageError(f"--dirty-limit must be at least {MIN_DIRTY_LIMIT >> 20}M")
    _detach_dead_mount(os.path.realpath(args.mountpoint))
    return mount(args.repo, args.mountpoint, foreground=args.foreground,
                 allow_other=args.allow_other, commit_every=args.commit_every, debug=args.debug,
                 secret=_checked_secret(args.repo), cache_bytes=cache_bytes,
                 dirty_limit=dirty_limit)


def _detach_dead_mount(mnt: str) -> None:
    """A snapfs mount whose daemon died (SIGKILL, the OOM killer) stays in the mount
    table, and every access to it fails with ENOTCONN ("Transport endpoint is not
    connected") or ECONNABORTED. Mounting there again is the obvious next step after such
    a crash, so the dead mount is detached (lazily: a shell may still have its cwd in it)
    and the user is told. A mount whose daemon runs, or another file system's, is left for
    check_mountpoint to refuse."""
    repo = next((r for m, r in snapfs_mounts() if m == mnt), None)
    if repo is None:
        return
    pid = _read_pid(RepoPaths(repo).pid)
    if pid is not None and _alive(pid):
        return  # live, or hung: probing a hung mount would hang this command too
    try:
        os.statvfs(mnt)  # not os.stat: the kernel may answer that from its attribute cache
        return
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return
    proc = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapfsError(f"{mnt} is a dead snapfs mount (its daemon is gone) and could not "
                          f"be detached: {proc.stderr.strip()}")
    print(f"snapfs: detached the dead mount at {mnt} (its daemon had stopped)",
          file=sys.stderr)


def _checked_secret(repo: str) -> bytes | None:
    """The secret, verified against the wrapped key now (before any fork or mount)."""
    from snapfs.crypto.keys import unwrap
    from snapfs.store.repo import load_config

    secret = open_secret(repo)
    if secret is not None:
        unwrap(load_config(repo).encryption["wrapped"], secret)
    return secret


def cmd_umount(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    repo = next((r for m, r in snapfs_mounts() if m == mnt), None)
    if repo is None:
        raise UsageError(f"{mnt} is not a snapfs mount point")
    pid = _read_pid(RepoPaths(repo).pid)
    proc = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapfsError(f"cannot unmount {mnt}: {proc.stderr.strip()} "
                          "(is a process still using it? see `fuser -vm MOUNTPOINT`)")
    deadline = time.monotonic() + 120
    while pid and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return 0


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def cmd_volume(args) -> int:
    target = find_target(args.C)
    if args.action == "create":
        run_op(target, {"op": "volume-create", "name": args.name, "from": args.source})
        print(f"created volume {args.name}" + (f" from {args.source}" if args.source else ""))
    elif args.action == "list":
        res = run_op(target, {"op": "volume-list"})
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            for v in res["volumes"]:
                print(f"{v['name']:<24} head={v['head'] or '-'}")
    else:
        run_op(target, {"op": "volume-delete", "name": args.name, "force": args.force})
        print(f"deleted volume {args.name}")
    return 0


def cmd_commit(args) -> int:
    target = find_target(args.dir or args.C)
    if args.dir and target.inner is None and not is_repository(os.path.realpath(args.dir)):
        raise UsageError(f"{args.dir} is not inside a snapfs mount")
    where = target.inner
    if where is None or where in ("", "."):
        if args.dir is None and args.volume:
            where = args.volume
        else:
            raise UsageError("give the volume or snapshot directory to commit "
                             "(snapfs commit MNT/VOLUME, or -C REPO commit --volume NAME)")
    res = run_op(target, {"op": "commit", "where": where, "label": args.label})
    print(res["snapshot"])
    return 0



def cmd_snapshot(args) -> int:
    target = find_target(args.C)
    if args.action == "list":
        res = run_op(target, {"op": "snapshot-list"})
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"{'NAME':<32} {'PARENT':<32} {'DELTA':>8} {'REFERENCED':>10}  CREATED")
        for s in res["snapshots"]:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
            print(f"{s['name']:<32} {s['parent'] or '-':<32} {s['delta']:>8} "
                  f"{s['referenced']:>10}  {created}")
    elif args.action == "diff":
        res = run_op(target, {"op": "diff", "a": args.a, "b": args.b, "chunks": args.chunks})
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            marks = {"added": "+", "removed": "-", "modified": "M", "renamed": "R"}
            for c in res["changes"]:
                extra = f" (from {c['from']})" if "from" in c else ""
                print(f"{marks[c['change']]} {c['path']}{extra}")
            if "chunks" in res:
                ch = res["chunks"]
                print(f"changed blocks: {ch['changed_blocks']}; chunks only in {args.a}: "
                      f"{ch['only_in_a']}, only in {args.b}: {ch['only_in_b']}")
    else:
        run_op(target, {"op": "snapshot-delete", "name": args.name, "force": args.force})
        print(f"deleted snapshot {args.name}")
    return 0


def cmd_gc(args) -> int:
    target = find_target(args.C)
    res = run_op(target, {"op": "gc", "min_dead_ratio": args.min_dead_ratio})
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"freed {res['freed_chunks']} chunks, removed {res['removed_packs']} packs; "
              f"{_fmt_bytes(res['pack_bytes'])} in {res['packs']} packs, "
              f"{_fmt_bytes(res['dead_bytes'])} dead")
    return 0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_stats(args) -> int:
    target = find_target(args.C)
    if args.reclaim:
        # the question asked is what the deletion would free: the answer alone (computing
        # and printing every snapshot's row would cost O(graph) at 10,000 snapshots)
        res = run_op(target, {"op": "stats", "reclaim": args.reclaim, "reclaim_only": True})
        r = res["reclaim"]
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"deleting {len(r['snapshots'])} snapshots would free {r['chunks']} chunks "
                  f"({_fmt_bytes(r['bytes'])})")
        return 0
    res = run_op(target, {"op": "stats", "reclaim": args.reclaim})
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    t = res["totals"]
    print(f"chunk size {res['chunk_size'] // 1024} KiB; {t['snapshots']} snapshots, "
          f"{t['drafts']} drafts, {t['volumes']} volumes")
    print(f"unique     {t['unique_chunks']:>10} chunks  {_fmt_bytes(t['unique_bytes'])}")
    print(f"sum_delta  {t['sum_delta']:>10} chunks  (traversal total; not storage)")
    print(f"stored     {t['stored_chunks']:>10} chunks  {_fmt_bytes(t['stored_bytes'])} on disk")
    print(f"garbage    {t['garbage_chunks']:>10} chunks  {_fmt_bytes(t['garbage_bytes'])}")
    print()
    print(f"{'VOLUME':<20} {'HEAD':<32} {'UNIQUE':>8} {'SUM_DELTA':>9} {'DRAFT':>6}")
    for name, v in res["volumes"].items():
        print(f"{name:<20} {v['head'] or '-':<32} {v['unique_chunks']:>8} {v['sum_delta']:>9} "
              f"{v['draft_delta']:>6}")
    print()
    print(f"{'SNAPSHOT':<32} {'PARENT':<32} {'DELTA':>7} {'REFER':>7} {'EXCL':>7}")
    for s in res["snapshots"]:
        print(f"{s['name']:<32} {s['parent'] or '-':<32} {s['delta']:>7} {s['referenced']:>7} "
              f"{s['exclusive']:>7}")
    if "reclaim" in res:
        r = res["reclaim"]
        print(f"\ndeleting {len(r['snapshots'])} snapshots would free {r['chunks']} chunks "
              f"({_fmt_bytes(r['bytes'])})")
    return 0


def cmd_site_key(args) -> int:
    target = find_target(args.C)
    if args.action == "create":
        path = os.path.abspath(args.output)
        run_op(target, {"op": "site-key-create", "site": args.site, "path": path})
        print(f"created the key of site {args.site} in {path} (mode 0600); give that file to "
              f"the site, which adds it with `snapfs site-key import {args.site} FILE`")
    elif args.action == "import":
        run_op(target, {"op": "site-key-import", "site": args.site,
                        "path": os.path.abspath(args.file)})
        print(f"added the key of site {args.site}")
    else:
        for site in run_op(target, {"op": "site-key-list"})["sites"]:
            print(site)
    return 0


def cmd_export(args) -> int:
    import shutil
    import tempfile

    target = find_target(args.C)
    to_stdout = args.output == "-"
    path = tempfile.mkstemp(prefix="snapfs-export-")[1] if to_stdout else \
        os.path.abspath(args.output)
    try:
        res = run_op(target, {"op": "export", "snapshot": args.snapshot, "since": args.since,
                              "site": args.site, "path": path,
                              "progress": sys.stderr.isatty()})
        if to_stdout:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.flush()
    finally:
        if to_stdout:
            os.unlink(path)
    print(f"exported {res['snapshot']}" + (f" since {res['base']}" if res["base"] else "")
          + f": {res['chunks']} chunks ({_fmt_bytes(res['chunk_bytes'])}), "
          f"bundle {_fmt_bytes(res['bundle_bytes'])}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from snapfs.exchange import spool_stdin

    target = find_target(args.repo)
    path = spool_stdin() if args.bundle == "-" else os.path.abspath(args.bundle)
    try:
        res = run_op(target, {"op": "import", "path": path})
    finally:
        if args.bundle == "-":
            os.unlink(path)
    if res.get("already_imported"):
        print(f"already imported: {res['snapshot']} (nothing changed)")
    else:
        print(f"imported {res['snapshot']} (parent {res['parent'] or '-'}, delta "
              f"{res['delta']} chunks, {res['chunks_received']} chunks received)")
    return 0


def cmd_fsck(args) -> int:
    from snapfs.fsck import fsck

    target = find_target(args.repo)
    if target.mountpoint and control.daemon_alive(target.paths.sock):
        raise UsageError(f"{target.repo} is mounted at {target.mountpoint}: "
                         "unmount it before running fsck")
    problems = fsck(target.repo, repair=args.repair, out=print if args.verbose else None,
                    secret=open_secret(target.repo))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"fsck: {len(problems)} problem(s) found in {target.repo}", file=sys.stderr)
        return 12
    print(f"fsck: {target.repo} is consistent")
    return 0


# -- argument parsing ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapfs", description="Every snapshot of a tree as a read-write directory.")
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    p.add_argument("-C", metavar="PATH", default=".",
                   help="the repository, or any path inside a mount of it (default: .)")
    p.add_argument("--key-file", metavar="FILE",
                   help="the key file of an encrypted repository (or SNAPFS_KEY_FILE); with "
                        "init --encrypt, created if missing")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a repository")
    s.add_argument("repo")
    s.add_argument("--chunk-size", default="128K", help="chunk size, e.g. 64K, 128K (default)")
    s.add_argument("--encrypt", action="store_true",
                   help="AES-256-GCM for data and names; the key is wrapped by a passphrase "
                        "(prompt, SNAPFS_PASSPHRASE, SNAPFS_PASSPHRASE_FD) or --key-file")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("mount", help="mount a repository (returns when the mount is ready)")
    s.add_argument("repo")
    s.add_argument("mountpoint")
    s.add_argument("--foreground", "-f", action="store_true", help="stay attached, log to stderr")
    s.add_argument("--allow-other", action="store_true", help="let other users into the mount")
    s.add_argument("--commit-every", type=float, metavar="SECONDS",
                   help="commit every changed volume on this timer")
    s.add_argument("--cache-size", metavar="SIZE", default=os.environ.get("SNAPFS_CACHE_SIZE"),
                   help="plaintext chunk cache, e.g. 256M, 2G (default: $SNAPFS_CACHE_SIZE, "
                        "else 1/16 of the memory, 64M to 1G)")
    s.add_argument("--dirty-limit", metavar="SIZE", default=os.environ.get("SNAPFS_DIRTY_LIMIT"),
                   help="written data held in memory before it is stored, e.g. 512M "
                        "(default: $SNAPFS_DIRTY_LIMIT, else 1/10 of the memory, 16M to 4G)")
    s.add_argument("--debug", action="store_true", help="verbose log")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount (waits until the daemon has synced and exited)")
    s.add_argument("mountpoint")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("volume", help="create, list or delete volumes")
    vs = s.add_subparsers(dest="action", required=True)
    c = vs.add_parser("create", help="create a volume (empty, or a clone of a snapshot)")
    c.add_argument("name")
    c.add_argument("--from", dest="source", metavar="SNAPSHOT", help="clone this snapshot")
    c = vs.add_parser("list", help="list volumes")
    c.add_argument("--json", action="store_true")
    c = vs.add_parser("delete", help="delete a volume (its snapshots stay)")
    c.add_argument("name")
    c.add_argument("--force", action="store_true", help="discard uncommitted changes")
    s.set_defaults(func=cmd_volume, source=None, json=False, force=False)

    s = sub.add_parser("commit", help="commit the draft under DIR into a snapshot")
    s.add_argument("dir", nargs="?", help="a volume or .snapshots/NAME directory (default: .)")
    s.add_argument("--label", help="snapshot label (default: the UTC time)")
    s.add_argument("--volume", help="with -C REPO on an unmounted repository: the volume")
    s.set_defaults(func=cmd_commit)

    s = sub.add_parser("snapshot", help="list, delete or compare snapshots")
    ss = s.add_subparsers(dest="action", required=True)
    c = ss.add_parser("list", help="list snapshots")
    c.add_argument("--json", action="store_true")
    c = ss.add_parser("delete", help="delete a snapshot; its children are re-parented")
    c.add_argument("name")
    c.add_argument("--force", action="store_true",
                   help="also discard uncommitted changes under .snapshots/NAME")
    c = ss.add_parser("diff", help="paths that differ between snapshots A and B")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", action="store_true")
    c.add_argument("--chunks", action="store_true", help="also count changed blocks and chunks")
    s.set_defaults(func=cmd_snapshot, json=False, force=False, chunks=False)

    s = sub.add_parser("stats", help="accounting figures (the same as .snapfs/stats)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--reclaim", metavar="A..B|A,B,...",
                   help="what deleting these snapshots would free (deletes nothing)")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("site-key", help="keys for exchanging snapshots with another site")
    ks = s.add_subparsers(dest="action", required=True)
    c = ks.add_parser("create", help="create a site's key; the repository keeps it wrapped")
    c.add_argument("site")
    c.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="write the key here (mode 0600) for the remote site")
    c = ks.add_parser("import", help="add the key file a site was given")
    c.add_argument("site")
    c.add_argument("file")
    ks.add_parser("list", help="list the sites this repository has keys for")
    s.set_defaults(func=cmd_site_key)

    s = sub.add_parser("export", help="write a snapshot (or its changes since an ancestor) "
                                      "as a bundle encrypted for a site")
    s.add_argument("snapshot")
    s.add_argument("--since", metavar="PARENT", help="only what SNAPSHOT adds over PARENT")
    s.add_argument("--site", required=True, help="the site whose key encrypts the bundle")
    s.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="file, or - for stdout")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="verify a bundle completely, then add its snapshot")
    s.add_argument("bundle", help="file, or - for stdin")
    s.add_argument("repo", help="the repository (or a path in its mount)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("key", help="manage the key of an encrypted repository")
    ks = s.add_subparsers(dest="action", required=True)
    c = ks.add_parser("change", help="rewrap the data key under a new passphrase or key file")
    c.add_argument("--new-key-file", metavar="FILE",
                   help="use this key file (created if missing) instead of a new passphrase "
                        "(SNAPFS_NEW_PASSPHRASE, SNAPFS_NEW_PASSPHRASE_FD or a prompt)")
    s.set_defaults(func=cmd_key)

    s = sub.add_parser("gc", help="free unreferenced chunks and compact pack files now")
    s.add_argument("--json", action="store_true")
    s.add_argument("--min-dead-ratio", type=float, default=0.25,
                   help="compact packs with at least this share of dead bytes (default 0.25)")
    s.set_defaults(func=cmd_gc)

    s = sub.add_parser("fsck", help="verify checksums, references and stored deltas")
    s.add_argument("repo")
    s.add_argument("--repair", action="store_true", help="repair what can be repaired")
    s.add_argument("--verbose", "-v", action="store_true")
    s.set_defaults(func=cmd_fsck)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    global KEY_FILE
    KEY_FILE = args.key_file
    try:
        return args.func(args) or 0
    except SnapfsError as e:
        print(f"snapfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("snapfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `snapfs stats | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"snapfs: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception as e:
        if not is_disk_full(e):  # the catalog's SQLITE_FULL; anything else is a bug
            raise
        print(f"snapfs: the disk holding the repository is full ({e})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
