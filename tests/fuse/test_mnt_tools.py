"""Ordinary Unix tools on a mounted volume: cp -a, tar, rsync -aHAX and find copy a real
tree (with hard links, xattrs and POSIX ACLs) in and out identically (rsync's checksum
dry run prints nothing); git and SQLite work inside a volume."""

import os
import random
import shutil
import sqlite3
import stat
import subprocess

import pytest
from fusehelpers import MiB, data, rsync_diff, write_bytes

DOC = "/usr/share/doc"
MAX_FILES = 2500
MAX_FILE_SIZE = 256 * 1024


def run(cmd, **kw):
    kw.setdefault("capture_output", True)
    r = subprocess.run(cmd, shell=isinstance(cmd, str), timeout=600, **kw)
    assert r.returncode == 0, f"{cmd!r} exited {r.returncode}: {r.stderr!r}"
    return r


def _copy_doc_subset(dst):
    """Copy up to MAX_FILES small files of /usr/share/doc (and its symlinks)."""
    files = 0
    dirs = []
    for dirpath, dirnames, filenames in os.walk(DOC):
        dirnames.sort()
        rel = os.path.relpath(dirpath, DOC)
        target = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target, exist_ok=True)
        dirs.append((dirpath, target))
        for name in sorted(filenames):
            src = os.path.join(dirpath, name)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), os.path.join(target, name))
            elif stat.S_ISREG(st.st_mode) and st.st_size <= MAX_FILE_SIZE:
                shutil.copy2(src, os.path.join(target, name))
                files += 1
        if files >= MAX_FILES:
            break
    for src, target in reversed(dirs):
        shutil.copystat(src, target)
    return files


def _add_special_entries(root):
    """Hard links, symlinks, odd names, modes, owners, xattrs, ns mtimes, sparse data."""
    rng = random.Random(99)
    x = os.path.join(root, "extra")
    os.makedirs(os.path.join(x, "sub", "deeper"))
    os.mkdir(os.path.join(x, "empty dir"))
    write_bytes(os.path.join(x, "hl-a"), b"hard linked content\n")
    os.link(os.path.join(x, "hl-a"), os.path.join(x, "hl-b"))
    os.link(os.path.join(x, "hl-a"), os.path.join(x, "sub", "hl-c"))
    write_bytes(os.path.join(x, "pair-1"), data(70000, seed="pair"))
    os.link(os.path.join(x, "pair-1"), os.path.join(x, "sub", "deeper", "pair-2"))
    os.symlink("hl-a", os.path.join(x, "rel-link"))
    os.symlink("/usr/share/doc", os.path.join(x, "abs-link"))
    os.symlink("does/not/exist", os.path.join(x, "dangling"))
    os.symlink("sub", os.path.join(x, "dir-link"))
    os.symlink("../hl-a", os.path.join(x, "sub", "up-link"))
    write_bytes(os.path.join(x, "empty file"), b"")
    write_bytes(os.path.join(x, "big.bin"), data(3 * MiB, seed="big"))
    write_bytes(os.path.join(x, "sparse.bin"), b"end", 4 * MiB)
    for name in ("sp ace", "ünïcödé-名前", "new\nline", "x" * 255, "-starts-with-dash"):
        write_bytes(os.path.join(x, name), name.encode())
    for name, mode in (("m600", 0o600), ("m755", 0o755), ("m4755", 0o4755), ("m000", 0o000)):
        write_bytes(os.path.join(x, name), b"#!/bin/sh\n")
        os.chmod(os.path.join(x, name), mode)
    write_bytes(os.path.join(x, "owned"), b"owned")
    os.chown(os.path.join(x, "owned"), 1234, 5678)
    os.lchown(os.path.join(x, "rel-link"), 4321, 8765)
    write_bytes(os.path.join(x, "xattrs"), b"with xattrs")
    os.setxattr(os.path.join(x, "xattrs"), "user.mime", b"text/plain")
    os.setxattr(os.path.join(x, "xattrs"), "user.bin", bytes(range(50)))
    os.setxattr(os.path.join(x, "sub"), "user.dir", b"on a directory")
    write_bytes(os.path.join(x, "acl-file"), b"with an access ACL")
    run(["setfacl", "-m", "u:1234:rw,g:5678:r", os.path.join(x, "acl-file")])
    os.mkdir(os.path.join(x, "acl-dir"))
    run(["setfacl", "-m", "u:1234:rwx,d:u:1234:rx,d:g::rx", os.path.join(x, "acl-dir")])
    write_bytes(os.path.join(x, "acl-dir", "inherited"), b"its ACL comes from acl-dir")
    for dirpath, dirnames, filenames in os.walk(x, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            t = rng.randrange(10**17, 17 * 10**17)
            os.utime(p, ns=(t, t), follow_symlinks=False)
    os.utime(x, ns=(10**18 + 1, 10**18 + 1))


@pytest.fixture(scope="module")
def src_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "tree"
    root.mkdir()
    n = _copy_doc_subset(root / "doc")
    assert n >= 1000, f"only {n} files under {DOC}"
    _add_special_entries(root)
    os.utime(root, ns=(10**18, 10**18))
    return root


@pytest.fixture(scope="module")
def tree_in_volume(mount, src_tree):
    """SRC copied into the volume once with cp -a (for the copy-out tests)."""
    dst = mount.vol / "tree-in"
    run(["cp", "-a", str(src_tree), str(dst)])
    return dst


@pytest.fixture
def local_out(tmp_path):
    return tmp_path / "out"


TAR_X = ["--xattrs", "--xattrs-include=user.*", "--acls"]


# --------------------------------------------------------------------------- copy in


def test_cp_a_into_volume_is_identical(vd, src_tree):
    run(["cp", "-a", f"{src_tree}/.", str(vd)])
    assert rsync_diff(src_tree, vd) == ""


def test_tar_into_volume_is_identical(vd, src_tree):
    run(f"tar --format=posix {' '.join(TAR_X)} -C '{src_tree}' -cf - . | "
        f"tar {' '.join(TAR_X)} -C '{vd}' -xpf -")
    assert rsync_diff(src_tree, vd) == ""


def test_rsync_into_volume_is_identical(vd, src_tree):
    run(["rsync", "-aHAX", f"{src_tree}/", f"{vd}/"])
    assert rsync_diff(src_tree, vd) == ""


def test_rsync_update_into_volume_transfers_only_changes(vd, src_tree):
    run(["rsync", "-aHAX", f"{src_tree}/", f"{vd}/"])
    write_bytes(vd / "extra" / "hl-a", b"changed on the volume\n")
    os.unlink(vd / "extra" / "big.bin")
    r = run(["rsync", "-aHAXi", f"{src_tree}/", f"{vd}/"], text=True)
    changed = {line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.strip()}
    assert "extra/big.bin" in changed
    assert any(c.startswith("extra/hl-") or c.startswith("extra/sub/hl-") for c in changed)
    assert not any(c.startswith("doc/") for c in changed), sorted(changed)[:10]
    assert rsync_diff(src_tree, vd) == ""


# --------------------------------------------------------------------------- copy out


def test_cp_a_out_of_volume_is_identical(tree_in_volume, src_tree, local_out):
    run(["cp", "-a", str(tree_in_volume), str(local_out)])
    assert rsync_diff(src_tree, local_out) == ""


def test_tar_out_of_volume_is_identical(tree_in_volume, src_tree, local_out):
    local_out.mkdir()
    run(f"tar --format=posix {' '.join(TAR_X)} -C '{tree_in_volume}' -cf - . | "
        f"tar {' '.join(TAR_X)} -C '{local_out}' -xpf -")
    assert rsync_diff(src_tree, local_out) == ""


def test_rsync_out_of_volume_is_identical(tree_in_volume, src_tree, local_out):
    run(["rsync", "-aHAX", f"{tree_in_volume}/", f"{local_out}/"])
    assert rsync_diff(src_tree, local_out) == ""


def test_find_sees_the_same_tree(tree_in_volume, src_tree):
    def listing(root):
        dirs = run(["find", str(root), "-type", "d", "-printf", r"%P %m\n"]).stdout
        other = run(["find", str(root), "!", "-type", "d", "-printf",
                     r"%P %y %m %U %G %s %n %l %T@\n"]).stdout
        return sorted(dirs.splitlines()), sorted(other.splitlines())

    assert listing(tree_in_volume) == listing(src_tree)


def test_hard_links_in_copied_tree_share_inode(tree_in_volume):
    x = tree_in_volume / "extra"
    inos = {os.stat(p).st_ino for p in (x / "hl-a", x / "hl-b", x / "sub" / "hl-c")}
    assert len(inos) == 1
    assert os.stat(x / "hl-a").st_nlink == 3


@pytest.mark.snapfs_only
def test_committed_copy_stays_identical_after_volume_changes(mount, src_tree):
    dst = mount.vol / "tree-snap"
    run(["cp", "-a", str(src_tree), str(dst)])
    snap = mount.commit(mount.vol, "tree")
    assert rsync_diff(src_tree, snap / "tree-snap") == ""
    shutil.rmtree(dst / "doc")
    write_bytes(dst / "extra" / "hl-b", b"changed after commit")
    os.chmod(dst / "extra" / "m600", 0o644)
    os.setxattr(dst / "extra" / "xattrs", "user.mime", b"changed")
    assert rsync_diff(src_tree, snap / "tree-snap") == ""


# --------------------------------------------------------------------------- git


@pytest.fixture
def git_env(tmp_path):
    env = dict(os.environ)
    env.update(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="T",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="T",
               GIT_COMMITTER_EMAIL="t@example.org")
    return env


def git(env, cwd, *args):
    return run(["git", "-c", "core.fsync=all", "-c", "init.defaultBranch=main", *args],
               cwd=cwd, env=env, text=True).stdout


def _git_history(env, repo):
    os.mkdir(repo)
    git(env, repo, "init", "-q")
    rng = random.Random(5)
    for i in range(200):
        p = repo / f"d{i % 10}" / f"f{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"file {i}\n" * rng.randrange(1, 200))
    git(env, repo, "add", "-A")
    git(env, repo, "commit", "-q", "-m", "initial")
    for c in range(5):
        for i in rng.sample(range(200), 20):
            p = repo / f"d{i % 10}" / f"f{i}.txt"
            if p.exists():
                with open(p, "a") as f:
                    f.write(f"change {c}\n")
        git(env, repo, "mv", f"d{c}/f{c}.txt", f"d{c}/moved{c}.txt")
        git(env, repo, "rm", "-q", f"d{c + 5}/f{c + 5}.txt")
        git(env, repo, "commit", "-q", "-am", f"change {c}")


def test_git_init_add_commit_fsck(wd, git_env):
    repo = wd / "repo"
    _git_history(git_env, repo)
    assert git(git_env, repo, "status", "--porcelain") == ""
    assert len(git(git_env, repo, "log", "--oneline").splitlines()) == 6
    r = subprocess.run(["git", "fsck", "--full", "--strict"], cwd=repo, env=git_env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in r.stderr.lower() and "missing" not in r.stdout


def test_git_gc_and_local_clone(wd, git_env):
    repo = wd / "repo"
    _git_history(git_env, repo)
    git(git_env, repo, "gc", "-q", "--prune=now")
    git(git_env, repo, "fsck", "--full", "--strict")
    git(git_env, wd, "clone", "-q", str(repo), str(wd / "clone"))  # hard-links objects
    git(git_env, wd / "clone", "fsck", "--full", "--strict")
    assert git(git_env, wd / "clone", "rev-parse", "HEAD") == \
        git(git_env, repo, "rev-parse", "HEAD")
    assert rsync_diff_excluding_git(repo, wd / "clone") == ""


def rsync_diff_excluding_git(a, b):
    r = subprocess.run(["rsync", "-rlnci", "--delete", "--exclude=.git", f"{a}/", f"{b}/"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


# --------------------------------------------------------------------------- sqlite


def _fill(db, rows=5000, batch=500):
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, val INTEGER, blob BLOB)")
    rng = random.Random(3)
    for start in range(0, rows, batch):
        db.execute("BEGIN")  # one transaction per batch
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                       [(i, f"name{i}", rng.randrange(1000), rng.randbytes(rng.randrange(300)))
                        for i in range(start, start + batch)])
        db.execute("COMMIT")
    db.execute("CREATE INDEX t_val ON t(val)")


def _check(db, rows=5000):
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == rows
    mid = rows // 2
    assert db.execute("SELECT name FROM t WHERE id = ?", (mid,)).fetchone()[0] == f"name{mid}"
    n = db.execute("SELECT count(*) FROM t WHERE val < 100").fetchone()[0]
    assert 0 < n < rows


def test_sqlite_rollback_journal(wd):
    path = wd / "db.sqlite"
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
        _fill(db)
        with db:
            db.execute("UPDATE t SET val = val + 1 WHERE id % 7 = 0")
            db.execute("DELETE FROM t WHERE id >= 4000")
        db.execute("VACUUM")
        _check(db, 4000)
    finally:
        db.close()
    r = run(["sqlite3", str(path), "SELECT count(*), max(id) FROM t"], text=True)
    assert r.stdout.strip() == "4000|3999"
    assert not os.path.exists(str(path) + "-journal")


def test_sqlite_rollback_discards_changes(wd):
    db = sqlite3.connect(wd / "db.sqlite", isolation_level=None)
    try:
        _fill(db, rows=1000, batch=1000)
        db.execute("BEGIN")
        db.execute("DELETE FROM t")
        db.execute("INSERT INTO t VALUES (-1, 'x', 0, NULL)")
        db.execute("ROLLBACK")
        _check(db, 1000)
    finally:
        db.close()


def test_sqlite_wal_mode_with_concurrent_reader(wd):
    path = wd / "wal.sqlite"
    db = sqlite3.connect(path)
    reader = None
    try:
        assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        _fill(db)
        reader = sqlite3.connect(path)
        _check(reader)
        with db:
            db.execute("INSERT INTO t VALUES (99999, 'late', 1, NULL)")
        assert reader.execute("SELECT name FROM t WHERE id = 99999").fetchone()[0] == "late"
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _check(db, 5001)
    finally:
        if reader is not None:
            reader.close()
        db.close()
    db = sqlite3.connect(path)
    try:
        _check(db, 5001)
    finally:
        db.close()
