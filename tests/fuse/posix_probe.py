"""A differential POSIX probe: run permission, ownership, timestamp and namespace scenarios
in a directory as several users and print what happened, as JSON.

Run as root: `python posix_probe.py DIR [SCENARIO...]`. Each scenario works in its own new
subdirectory of DIR and switches the effective uid, gid and groups between root and two
unprivileged users, the way a conformance suite run through `allow_other` does. The probe
records outcomes (an errno name or "ok"), normalised stat fields (type and mode, nlink,
uid, gid, size of non-directories) and which timestamps an operation changed. The same
run on ext4 is the oracle: tests/fuse/test_mnt_posix_users.py compares the two.

Paths are relative to the scenario's directory (the process changes into it as root),
so the directories above it need not be searchable by the test users.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

A = (10001, 20001, (20001, 20003))  # uid, gid, supplementary groups
B = (10002, 20002, (20002,))
ROOT = (0, 0, ())
OTHER_GROUP = 20003  # A is a member, B is not

_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Probe:
    """The record of one scenario: labelled observations in order."""

    def __init__(self) -> None:
        self.out: list[tuple[str, object]] = []

    @contextlib.contextmanager
    def user(self, who: tuple[int, int, tuple[int, ...]]) -> Iterator[None]:
        uid, gid, groups = who
        os.setgroups(list(groups))
        os.setegid(gid)
        os.seteuid(uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups([])

    def do(self, label: str, fn: Callable, *args, **kw) -> object:
        """Record "ok" or the errno name of fn(*args); return fn's result (None on error)."""
        try:
            result = fn(*args, **kw)
        except OSError as e:
            self.out.append((label, errno.errorcode.get(e.errno, str(e.errno))))
            return None
        self.out.append((label, "ok"))
        return result

    def st(self, label: str, path: str) -> None:
        """Record the stat fields that every POSIX filesystem must agree on."""
        try:
            s = os.lstat(path)
        except OSError as e:
            self.out.append((label, errno.errorcode.get(e.errno, str(e.errno))))
            return
        fields = {"mode": oct(s.st_mode), "nlink": s.st_nlink, "uid": s.st_uid,
                  "gid": s.st_gid}
        if not stat.S_ISDIR(s.st_mode):
            fields["size"] = s.st_size
        if stat.S_ISCHR(s.st_mode) or stat.S_ISBLK(s.st_mode):
            fields["rdev"] = s.st_rdev
        self.out.append((label, fields))

    @contextlib.contextmanager
    def times(self, label: str, *paths: str, moved: dict[str, str] | None = None
              ) -> Iterator[None]:
        """Record which of mtime and ctime the block changed on each path (a path the
        block renames is looked up under its new name, given in moved)."""
        time.sleep(0.02)  # the coarsest clock involved ticks every 4 ms
        before = {p: os.lstat(p) for p in paths}
        yield
        for p in paths:
            a, b = before[p], os.lstat((moved or {}).get(p, p))
            changed = [n for n in ("mtime", "ctime")
                       if getattr(a, f"st_{n}_ns") != getattr(b, f"st_{n}_ns")]
            self.out.append((f"{label}: {p} changed", changed))


def make_file(path: str, owner=ROOT, mode: int = 0o644, data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, owner[0], owner[1])
    os.chmod(path, mode)


def make_dir(path: str, owner=ROOT, mode: int = 0o755) -> None:
    os.mkdir(path)
    os.chown(path, owner[0], owner[1])
    os.chmod(path, mode)


# --------------------------------------------------------------------------- scenarios


def s_chmod(p: Probe) -> None:
    make_file("f", A)
    with p.user(A), p.times("chmod by owner", "f"):
        p.do("owner chmod 0640", os.chmod, "f", 0o640)
    p.st("after", "f")
    with p.user(B):
        p.do("other chmod", os.chmod, "f", 0o777)
    os.chown("f", A[0], B[1])  # a group A is not in
    with p.user(A):
        p.do("owner sets setgid outside its groups", os.chmod, "f", 0o2755)
    p.st("setgid dropped", "f")
    os.chown("f", A[0], OTHER_GROUP)
    with p.user(A):
        p.do("owner sets setgid in its group", os.chmod, "f", 0o2755)
    p.st("setgid kept", "f")
    make_dir("d", A)
    with p.user(A):
        p.do("owner sets sticky on dir", os.chmod, "d", 0o1777)
    p.st("sticky dir", "d")


def s_chown(p: Probe) -> None:
    make_file("f", A)
    with p.user(A):
        p.do("owner gives file away", os.chown, "f", B[0], -1)
        with p.times("chgrp to own group", "f"):
            p.do("owner chgrp to member group", os.chown, "f", -1, OTHER_GROUP)
        p.do("owner chgrp to foreign group", os.chown, "f", -1, B[1])
        p.do("owner chown -1 -1", os.chown, "f", -1, -1)
    p.st("after", "f")
    with p.user(B):
        p.do("other chgrp", os.chown, "f", -1, B[1])
    os.chmod("f", 0o6755)
    with p.user(A):
        p.do("owner chgrp of setuid file", os.chown, "f", -1, A[1])
    p.st("setuid/setgid after chgrp by owner", "f")
    os.chmod("f", 0o6755)
    with p.times("root chown", "f"):
        p.do("root chown of setuid file", os.chown, "f", B[0], B[1])
    p.st("after root chown", "f")
    os.symlink("f", "l")
    p.do("root lchown symlink", os.lchown, "l", A[0], A[1])
    p.st("symlink", "l")
    p.st("target untouched", "f")


def s_write_clears_setid(p: Probe) -> None:
    make_file("f", A, 0o6777)
    with p.user(B), p.times("write by other", "f"):
        fd = p.do("open", os.open, "f", os.O_WRONLY)
        if fd is not None:
            p.do("write", os.write, fd, b"hello")
            os.close(fd)
    p.st("after other's write", "f")
    make_file("g", A, 0o6777)
    with p.user(B):
        p.do("truncate by other", os.truncate, "g", 1)
    p.st("after other's truncate", "g")
    make_file("h", A, 0o4755)
    with p.user(A):
        fd = os.open("h", os.O_WRONLY)
        p.do("write by owner", os.write, fd, b"abc")
        os.close(fd)
    p.st("owner's own write", "h")


def s_permissions(p: Probe) -> None:
    make_dir("private", A, 0o700)
    make_file("private/f", A, 0o644)
    make_dir("ro", A, 0o555)
    make_dir("search", A, 0o311)
    make_file("search/f", A, 0o644)
    make_file("secret", A, 0o600)
    make_file("shared", A, 0o666)
    with p.user(B):
        p.do("lookup in 0700 dir", os.stat, "private/f")
        p.do("list 0700 dir", os.listdir, "private")
        p.do("create in 0555 dir", os.mknod, "ro/x")
        p.do("stat through search-only dir", os.stat, "search/f")
        p.do("list search-only dir", os.listdir, "search")
        p.do("create in search-only dir", os.mkdir, "search/x")
        p.do("read 0600 file", os.open, "secret", os.O_RDONLY)
        p.do("write 0600 file", os.open, "secret", os.O_WRONLY)
        p.do("truncate-open 0600 file", os.open, "secret", os.O_WRONLY | os.O_TRUNC)
        p.do("access R_OK 0600", lambda: os.access("secret", os.R_OK, effective_ids=True)
             or (_ for _ in ()).throw(OSError(errno.EACCES, "no")))
        fd = p.do("write 0666 file", os.open, "shared", os.O_RDWR)
        if fd is not None:
            os.close(fd)
        p.do("exec bit needed for dir search", os.stat, "ro/.")
    with p.user(A):
        p.do("owner create in own 0555 dir", os.mknod, "ro/x")
        p.do("owner unlink in own 0555 dir", os.unlink, "search/f")


def s_sticky(p: Probe) -> None:
    make_dir("t", ROOT, 0o1777)
    with p.user(A):
        make_file("t/a", A)
        os.mkdir("t/ad")
    make_file("t/b", B)
    with p.user(B):
        p.do("other unlinks in sticky dir", os.unlink, "t/a")
        p.do("other renames away in sticky dir", os.rename, "t/a", "t/z")
        p.do("other renames over in sticky dir", os.rename, "t/b", "t/a")
        p.do("other rmdir in sticky dir", os.rmdir, "t/ad")
        p.do("other unlinks own", os.unlink, "t/b")
    with p.user(A):
        p.do("owner renames own", os.rename, "t/a", "t/a2")
        p.do("owner unlinks own", os.unlink, "t/a2")
    p.do("root rmdir in sticky dir", os.rmdir, "t/ad")


def s_utime(p: Probe) -> None:
    make_file("f", A, 0o666)
    make_file("g", A, 0o644)
    with p.user(B):
        p.do("other with write perm sets now", os.utime, "f", None)
        p.do("other sets explicit times", os.utime, "f", (1000, 2000))
        p.do("other without write perm sets now", os.utime, "g", None)
    with p.user(A), p.times("owner sets explicit times", "f"):
        p.do("owner sets explicit times", os.utime, "f", ns=(1_000_000_123, 2_000_000_456))
    s = os.stat("f")
    p.out.append(("explicit mtime", s.st_mtime_ns))
    os.utime("f", ns=(-1_000_000_000, 3_000_000_000))
    p.out.append(("times before 1970", (os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns)))


def s_links(p: Probe) -> None:
    make_dir("d")
    make_file("d/f")
    with p.times("link", "d/f", "d"):
        p.do("link", os.link, "d/f", "d/g")
    p.st("after link", "d/f")
    p.do("link onto existing", os.link, "d/f", "d/g")
    p.do("link a directory", os.link, "d", "d2")
    p.do("link missing", os.link, "d/nope", "d/h")
    with p.times("unlink one name", "d/f", "d"):
        p.do("unlink", os.unlink, "d/g")
    p.st("after unlink", "d/f")
    p.do("unlink a directory", os.unlink, "d")
    p.do("unlink missing", os.unlink, "d/nope")
    fd = os.open("d/f", os.O_RDWR)
    os.unlink("d/f")
    p.out.append(("unlinked open file nlink", os.fstat(fd).st_nlink))
    os.write(fd, b"more")
    os.lseek(fd, 0, 0)
    p.out.append(("unlinked open file reads", os.read(fd, 100).decode()))
    os.close(fd)
    os.symlink("target-that-is-not-there", "s")
    p.do("link to a symlink", os.link, "s", "s2")
    p.st("symlink link count", "s")


def s_mkdir_rmdir(p: Probe) -> None:
    make_dir("d")
    with p.times("mkdir", "d"):
        p.do("mkdir", os.mkdir, "d/a", 0o777)
    p.st("parent after mkdir", "d")
    p.st("new dir (umask 022)", "d/a")
    p.do("mkdir existing", os.mkdir, "d/a")
    make_file("d/f")
    p.do("mkdir under a file", os.mkdir, "d/f/x")
    p.do("rmdir a file", os.rmdir, "d/f")
    os.mkdir("d/a/b")
    p.do("rmdir non-empty", os.rmdir, "d/a")
    p.do("rmdir dot", os.rmdir, "d/a/.")
    p.do("rmdir missing", os.rmdir, "d/zz")
    with p.times("rmdir", "d"):
        p.do("rmdir b", os.rmdir, "d/a/b")
        p.do("rmdir a", os.rmdir, "d/a")
    p.st("parent after rmdir", "d")
    make_dir("sg", A, 0o2775)
    os.chown("sg", A[0], OTHER_GROUP)
    with p.user(A):
        p.do("mkdir in setgid dir", os.mkdir, "sg/sub", 0o755)
        make_file("sg/file", A)
    p.st("setgid inherited by subdir", "sg/sub")
    p.st("group inherited by file", "sg/file")
    os.chmod("sg", 0o2777)
    with p.user(B):
        p.do("other creates in setgid dir", os.mknod, "sg/bfile", 0o644 | stat.S_IFREG)
    p.st("group inherited by other's file", "sg/bfile")


def s_names(p: Probe) -> None:
    make_dir("d")
    longest, too_long = "n" * 255, "n" * 256
    p.do("create 255-byte name", os.mknod, f"d/{longest}")
    p.do("create 256-byte name", os.mknod, f"d/{too_long}")
    p.do("mkdir 256-byte name", os.mkdir, f"d/{too_long}")
    p.do("symlink 256-byte name", os.symlink, "x", f"d/{too_long}")
    p.do("rename to 256-byte name", os.rename, f"d/{longest}", f"d/{too_long}")
    p.do("link to 256-byte name", os.link, f"d/{longest}", f"d/{too_long}")
    p.do("stat 256-byte name", os.stat, f"d/{too_long}")
    p.do("symlink target of 4095 bytes", os.symlink, "t" * 4095, "d/long")
    p.st("long symlink", "d/long")
    p.do("symlink target of 4096 bytes", os.symlink, "t" * 4096, "d/longer")
    p.do("name with bytes", os.mknod, "d/\u00e9\u4e2d\x01 x")
    p.out.append(("listing", sorted(os.listdir("d"), key=len)))
    p.out.append(("statvfs namemax", os.statvfs("d").f_namemax))


def s_open(p: Probe) -> None:
    make_file("f", ROOT, 0o644, b"content")
    os.mkdir("d")
    os.symlink("f", "l")
    os.symlink("loop1", "loop2")
    os.symlink("loop2", "loop1")
    p.do("O_CREAT|O_EXCL on existing", os.open, "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    p.do("O_CREAT|O_EXCL on symlink", os.open, "l", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    p.do("O_WRONLY on dir", os.open, "d", os.O_WRONLY)
    p.do("O_RDONLY|O_DIRECTORY on file", os.open, "f", os.O_RDONLY | os.O_DIRECTORY)
    p.do("O_NOFOLLOW on symlink", os.open, "l", os.O_RDONLY | os.O_NOFOLLOW)
    p.do("symlink loop", os.open, "loop1", os.O_RDONLY)
    p.do("path through a file", os.open, "f/x", os.O_RDONLY)
    p.do("O_CREAT under a file", os.open, "f/x", os.O_CREAT | os.O_WRONLY)
    p.do("missing", os.open, "nope", os.O_RDONLY)
    with p.times("O_TRUNC", "f"):
        fd = p.do("O_TRUNC", os.open, "f", os.O_WRONLY | os.O_TRUNC)
        if fd is not None:
            os.close(fd)
    p.st("truncated", "f")
    with p.times("open O_CREAT existing, no trunc", "f"):
        fd = os.open("f", os.O_CREAT | os.O_WRONLY)
        os.close(fd)
    fd = os.open("new", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o666)
    os.write(fd, b"a")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"b")
    os.close(fd)
    with open("new", "rb") as f:
        p.out.append(("O_APPEND ignores the offset", f.read().decode()))
    p.st("created with umask", "new")
    fd = os.open("ro", os.O_CREAT | os.O_RDWR, 0o444)
    p.do("write through fd of new 0444 file", os.write, fd, b"ok")
    os.close(fd)
    p.do("reopen 0444 file for writing as root", os.open, "ro", os.O_WRONLY)
    make_file("ownerro", A, 0o444)
    with p.user(A):
        p.do("reopen 0444 file for writing as owner", os.open, "ownerro", os.O_WRONLY)


def s_rename(p: Probe) -> None:
    os.mkdir("a")
    os.mkdir("b")
    make_file("a/f", data=b"1")
    make_file("a/g", data=b"22")
    with p.times("rename file over file", "a", "a/f", moved={"a/f": "a/g"}):
        p.do("rename file over file", os.rename, "a/f", "a/g")
    p.st("survivor", "a/g")
    p.do("old name gone", os.stat, "a/f")
    os.mkdir("a/d1")
    os.mkdir("a/d2")
    os.mkdir("a/d3")
    make_file("a/d3/x")
    p.do("dir over empty dir", os.rename, "a/d1", "a/d2")
    p.do("dir over non-empty dir", os.rename, "a/d2", "a/d3")
    p.do("dir over file", os.rename, "a/d2", "a/g")
    p.do("file over dir", os.rename, "a/g", "a/d2")
    p.do("dir into its own subdir", os.rename, "a/d3", "a/d3/sub")
    p.do("rename to itself", os.rename, "a/g", "a/g")
    os.link("a/g", "a/h")
    p.do("rename onto another link of the same file", os.rename, "a/g", "a/h")
    p.st("both links stay", "a/g")
    p.st("both links stay (h)", "a/h")
    with p.times("dir moved across parents", "a", "b", "a/d3", moved={"a/d3": "b/d3"}):
        p.do("move dir to other parent", os.rename, "a/d3", "b/d3")
    p.st("old parent nlink", "a")
    p.st("new parent nlink", "b")
    p.do("dotdot of moved dir", os.stat, "b/d3/../d3/x")
    p.do("rename missing", os.rename, "a/nope", "a/x")
    p.do("rename into missing dir", os.rename, "a/g", "nowhere/x")
    p.do("noreplace onto existing", _renameat2, "a/g", "a/h", 1)
    make_file("a/e1", data=b"e1")
    os.mkdir("a/e2")
    p.do("exchange file and dir", _renameat2, "a/e1", "a/e2", 2)
    p.st("e1 is now the dir", "a/e1")
    p.st("e2 is now the file", "a/e2")
    p.do("exchange with missing", _renameat2, "a/e1", "a/missing", 2)
    os.symlink("dangling", "a/s")
    p.do("rename a symlink", os.rename, "a/s", "b/s")
    p.out.append(("moved symlink target", os.readlink("b/s")))


def s_truncate(p: Probe) -> None:
    make_file("f", ROOT, 0o644, b"0123456789")
    with p.times("truncate shorter", "f"):
        p.do("truncate shorter", os.truncate, "f", 4)
    with p.times("truncate to same size", "f"):
        p.do("truncate same", os.truncate, "f", 4)
    p.do("truncate longer", os.truncate, "f", 1 << 20)
    with open("f", "rb") as f:
        body = f.read()
    p.out.append(("extension is zeros", (len(body), body[:4].decode(), body[4:].count(0))))
    os.mkdir("d")
    p.do("truncate dir", os.truncate, "d", 0)
    p.do("truncate negative", os.truncate, "f", -1)
    fd = os.open("f", os.O_RDONLY)
    p.do("ftruncate read-only fd", os.ftruncate, fd, 0)
    os.close(fd)
    make_file("g", A, 0o644)
    with p.user(B):
        p.do("truncate without write perm", os.truncate, "g", 0)
    os.symlink("f", "l")
    p.do("truncate through symlink", os.truncate, "l", 2)
    p.st("target truncated", "f")


def s_special(p: Probe) -> None:
    p.do("mkfifo", os.mkfifo, "fifo", 0o640)
    p.st("fifo", "fifo")
    p.do("char device", os.mknod, "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    p.st("char device", "chr")
    p.do("block device", os.mknod, "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 9))
    p.st("block device", "blk")
    p.do("socket node", os.mknod, "sock", 0o600 | stat.S_IFSOCK)
    p.st("socket", "sock")
    os.mkdir("d", 0o777)
    os.chmod("d", 0o777)
    with p.user(A):
        p.do("user char device", os.mknod, "d/chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        p.do("user fifo", os.mkfifo, "d/fifo")
    p.st("user's fifo", "d/fifo")


def s_xattrs(p: Probe) -> None:
    make_file("f", A, 0o644)
    make_file("g", A, 0o666)
    with p.user(A):
        with p.times("setxattr", "f"):
            p.do("owner sets user xattr", os.setxattr, "f", "user.k", b"v")
        p.out.append(("owner reads it", os.getxattr("f", "user.k").decode()))
        p.do("owner sets trusted xattr", os.setxattr, "f", "trusted.k", b"v")
        p.do("create existing", os.setxattr, "f", "user.k", b"w", os.XATTR_CREATE)
        p.do("replace missing", os.setxattr, "f", "user.m", b"w", os.XATTR_REPLACE)
        p.do("get missing", os.getxattr, "f", "user.m")
    with p.user(B):
        p.do("other reads user xattr", os.getxattr, "f", "user.k")
        p.do("other sets user xattr without write perm", os.setxattr, "f", "user.x", b"1")
        p.do("other sets user xattr with write perm", os.setxattr, "g", "user.x", b"1")
        p.do("other removes", os.removexattr, "f", "user.k")
    p.do("root sets trusted xattr", os.setxattr, "f", "trusted.k", b"t")
    p.out.append(("root lists", sorted(os.listxattr("f"))))
    with p.user(A):
        p.out.append(("owner lists", sorted(os.listxattr("f"))))
        p.do("remove", os.removexattr, "f", "user.k")
        p.do("remove again", os.removexattr, "f", "user.k")
    os.symlink("f", "l")
    p.do("user xattr on a symlink", os.setxattr, "l", "user.s", b"1", 0, follow_symlinks=False)


def _setfacl(p: Probe, label: str, *args: str) -> None:
    """Record what setfacl did: "ok", or its error message (the text after the last
    colon, the same on every file system)."""
    r = subprocess.run(["setfacl", *args], capture_output=True, text=True, timeout=60)
    p.out.append((label, "ok" if r.returncode == 0 else r.stderr.strip().rsplit(": ", 1)[-1]))


def _getfacl(p: Probe, label: str, path: str) -> None:
    """Record the ACL as getfacl prints it (numeric ids, no header)."""
    r = subprocess.run(["getfacl", "-cn", path], capture_output=True, text=True, timeout=60)
    p.out.append((label, r.stdout.split() if r.returncode == 0 else r.stderr.strip()))


def _append(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"+")


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read()


def s_acls(p: Probe) -> None:
    """POSIX ACLs set with setfacl: the mode follows the ACL and chmod the ACL, access is
    decided by the entries, and new nodes inherit a directory's default ACL instead of
    the umask."""
    make_file("f", A, 0o640)
    with p.user(A):
        _setfacl(p, "owner grants B rw", "-m", f"u:{B[0]}:rw", "f")
    p.st("mode after a named entry", "f")
    _getfacl(p, "acl", "f")
    with p.user(B):
        p.do("B appends through the ACL", _append, "f")
        p.do("B reads through the ACL", _read, "f")
        _setfacl(p, "non-owner sets an ACL", "-m", f"u:{B[0]}:rwx", "f")
    with p.user(A):
        p.do("owner chmod 0600", os.chmod, "f", 0o600)
    _getfacl(p, "acl after chmod", "f")
    with p.user(B):
        p.do("B appends with the mask empty", _append, "f")
    with p.user(A):
        _setfacl(p, "named group and mask", "-m", f"g:{OTHER_GROUP}:r,m::rw", "f")
    p.st("mode after the mask", "f")
    _getfacl(p, "acl with a group", "f")
    with p.user(A):
        _setfacl(p, "remove every entry", "-b", "f")
        _setfacl(p, "remove again", "-b", "f")
    p.st("mode after -b", "f")
    p.out.append(("xattrs after -b", sorted(os.listxattr("f"))))
    with p.user(A):
        _setfacl(p, "an ACL the mode says", "--set", "u::rwx,g::r,o::-", "f")
    p.st("mode from it", "f")
    p.out.append(("xattrs after it", sorted(os.listxattr("f"))))
    with p.user(A):
        _setfacl(p, "default ACL on a file", "-d", "-m", "u::rw", "f")

    make_dir("d", A, 0o755)
    with p.user(A):
        _setfacl(p, "default ACL", "-d", "-m", f"u:{B[0]}:rwx,g::rx,o::-", "d")
        _setfacl(p, "B may write in d", "-m", f"u:{B[0]}:rwx", "d")
    _getfacl(p, "dir acl", "d")
    # Under a default ACL ext4 leaves the umask out; the kernel applies it before a FUSE
    # file system sees the mode (pyfuse3 cannot ask for FUSE_DONT_MASK), so the probe
    # creates with none: test_mnt_attrs.py checks what snapfs does with one.
    old = os.umask(0)
    try:
        with p.user(B):
            p.do("B creates a file", lambda: os.close(os.open("d/x", os.O_CREAT | os.O_WRONLY,
                                                               0o666)))
            p.do("B makes a directory", os.mkdir, "d/sub", 0o777)
            p.do("B makes a fifo", os.mkfifo, "d/fifo", 0o640)
            p.do("B makes a symlink", os.symlink, "x", "d/ln")
            p.do("B makes a directory below", os.mkdir, "d/sub/deeper", 0o750)
    finally:
        os.umask(old)
    for name in ("d/x", "d/sub", "d/fifo", "d/ln", "d/sub/deeper"):
        p.st(name, name)
        if name != "d/ln":
            _getfacl(p, f"{name} acl", name)
    with p.user(A):
        _setfacl(p, "remove the default ACL", "-k", "d")
        p.do("create without it", os.mkdir, "d/plain", 0o777)
    _getfacl(p, "dir after -k", "d")
    p.st("d/plain", "d/plain")

    make_file("g", A, 0o644)
    os.chown("g", A[0], B[1])
    os.chmod("g", 0o2775)
    with p.user(A):
        _setfacl(p, "owner outside the group sets an ACL", "-m", f"u:{B[0]}:r", "g")
    p.st("set-group-id cleared", "g")
    make_file("h", B, 0o600)
    with p.user(B):
        _setfacl(p, "B grants a group read", "-m", f"g:{OTHER_GROUP}:r", "h")
    with p.user(A):
        p.do("A reads through its group", _read, "h")


def s_times(p: Probe) -> None:
    make_dir("d")
    with p.times("create", "d"):
        fd = os.open("d/f", os.O_CREAT | os.O_WRONLY, 0o644)
    with p.times("write", "d/f", "d"):
        os.write(fd, b"data")
        os.fsync(fd)
    os.close(fd)
    with p.times("read", "d/f"), open("d/f", "rb") as f:
        f.read()
    with p.times("chmod", "d/f", "d"):
        os.chmod("d/f", 0o600)
    with p.times("rename within dir", "d/f", "d", moved={"d/f": "d/g"}):
        os.rename("d/f", "d/g")
    with p.times("symlink", "d"):
        os.symlink("g", "d/s")
    with p.times("setattr size via ftruncate", "d/g"):
        fd = os.open("d/g", os.O_WRONLY)
        os.ftruncate(fd, 100)
        os.close(fd)
    with p.times("unlink", "d"):
        os.unlink("d/s")


SCENARIOS = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("s_")}


def run(base: str, names: list[str]) -> dict[str, list]:
    os.umask(0o022)
    results: dict[str, list] = {}
    for name in names or list(SCENARIOS):
        d = os.path.join(base, name)
        os.mkdir(d)
        os.chmod(d, 0o755)
        os.chdir(d)
        probe = Probe()
        try:
            SCENARIOS[name](probe)
        except Exception as e:  # noqa: BLE001 - an unexpected failure is an observation
            probe.out.append(("scenario failed", f"{type(e).__name__}: {e}"))
        finally:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups([])
            os.chdir("/")
        results[name] = probe.out
    return results


if __name__ == "__main__":
    json.dump(run(sys.argv[1], sys.argv[2:]), sys.stdout, indent=1)
