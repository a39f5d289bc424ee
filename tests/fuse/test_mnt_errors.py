"""Refused operations fail with the errno a local filesystem would give, never EIO and
never a crash of the daemon."""

import errno
import os
import subprocess

import pytest
from fusehelpers import expect_errno, write_bytes

REFUSED = (errno.EROFS, errno.EPERM)


@pytest.fixture(scope="module")
def vol2(mount):
    return mount.volume_create("vol2")


def test_missing_paths_give_enoent(mount, vd):
    expect_errno(errno.ENOENT, os.stat, vd / "missing")
    expect_errno(errno.ENOENT, os.open, vd / "missing" / "x", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.listdir, vd / "missing")
    expect_errno(errno.ENOENT, os.readlink, vd / "missing")
    expect_errno(errno.ENOENT, os.truncate, vd / "missing", 0)
    expect_errno(errno.ENOENT, os.chmod, vd / "missing", 0o644)
    expect_errno(errno.ENOENT, os.getxattr, vd / "missing", "user.x")


def test_readlink_of_non_symlink_gives_einval(vd):
    write_bytes(vd / "f", b"")
    expect_errno(errno.EINVAL, os.readlink, vd / "f")


def test_path_through_a_file_gives_enotdir(vd):
    write_bytes(vd / "f", b"")
    expect_errno(errno.ENOTDIR, os.open, vd / "f" / "x", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(errno.ENOTDIR, os.listdir, vd / "f")


def test_write_on_read_only_descriptor_gives_ebadf(vd):
    write_bytes(vd / "f", b"x")
    fd = os.open(vd / "f", os.O_RDONLY)
    try:
        expect_errno(errno.EBADF, os.write, fd, b"y")
    finally:
        os.close(fd)


def test_truncate_directory_gives_eisdir(vd):
    expect_errno(errno.EISDIR, os.truncate, vd, 0)


def test_daemon_still_answers_after_errors(mount, vd):
    for _ in range(50):
        expect_errno(errno.ENOENT, os.stat, vd / "nothing")
    write_bytes(vd / "alive", b"yes")
    assert (vd / "alive").read_bytes() == b"yes"


@pytest.mark.snapfs_only
def test_missing_snapshot_gives_enoent(mount):
    expect_errno(errno.ENOENT, os.stat, mount.mnt / ".snapshots" / "vol@no-such-label")
    expect_errno(errno.ENOENT, os.stat, mount.mnt / ".snapshots" / "nosuchvolume@x")


# --------------------------------------------------------------------------- across volumes


@pytest.mark.snapfs_only
def test_hard_link_between_volumes_gives_exdev(mount, vd, vol2):
    write_bytes(vd / "f", b"x")
    expect_errno(errno.EXDEV, os.link, vd / "f", vol2 / "f")
    assert not os.path.lexists(vol2 / "f")


@pytest.mark.snapfs_only
def test_rename_between_volumes_gives_exdev(mount, vd, vol2):
    write_bytes(vd / "f", b"x")
    os.mkdir(vd / "d")
    expect_errno(errno.EXDEV, os.rename, vd / "f", vol2 / "f")
    expect_errno(errno.EXDEV, os.rename, vd / "d", vol2 / "d")
    assert (vd / "f").read_bytes() == b"x"


@pytest.mark.snapfs_only
def test_mv_between_volumes_falls_back_to_copy(mount, vd, vol2):
    write_bytes(vd / "f", b"moved by copy")
    subprocess.run(["mv", str(vd / "f"), str(vol2 / "moved")], check=True)
    assert (vol2 / "moved").read_bytes() == b"moved by copy"
    assert not os.path.lexists(vd / "f")


@pytest.mark.snapfs_only
def test_link_and_rename_between_volume_and_snapshot_give_exdev(mount, vd):
    write_bytes(vd / "f", b"x")
    snap = mount.commit(mount.vol, "xdev")
    expect_errno(errno.EXDEV, os.link, vd / "f", snap / "linked")
    expect_errno(errno.EXDEV, os.rename, vd / "f", snap / "renamed")
    expect_errno(errno.EXDEV, os.rename, snap / vd.name / "f", vd / "from-snap")


# --------------------------------------------------------------------------- virtual files


@pytest.mark.snapfs_only
def test_writing_stats_file_is_refused(mount):
    stats = mount.mnt / ".snapfs" / "stats"
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        expect_errno(REFUSED, os.open, stats, flags)
    expect_errno(REFUSED, os.truncate, stats, 0)


@pytest.mark.snapfs_only
def test_changing_snapfs_directory_is_refused(mount):
    d = mount.mnt / ".snapfs"
    expect_errno(REFUSED, os.unlink, d / "stats")
    expect_errno(REFUSED, os.open, d / "new", os.O_CREAT | os.O_WRONLY, 0o644)
    expect_errno(REFUSED, os.mkdir, d / "dir")
    expect_errno(REFUSED + (errno.EXDEV,), os.rename, d / "stats", d / "renamed")
    expect_errno(REFUSED, os.setxattr, d / "stats", "user.x", b"1")
    expect_errno(REFUSED, os.chmod, d / "stats", 0o666)
    assert os.path.exists(d / "stats")


@pytest.mark.snapfs_only
def test_regular_file_in_snapshots_directory_is_refused(mount):
    expect_errno(REFUSED + (errno.EACCES, errno.EINVAL), os.open,
                 mount.mnt / ".snapshots" / "plainfile", os.O_CREAT | os.O_WRONLY, 0o644)


@pytest.mark.snapfs_only
def test_mkdir_of_existing_snapshot_name_gives_eexist(mount, vd):
    write_bytes(vd / "f", b"x")
    mount.commit(mount.vol, "dup")
    expect_errno(errno.EEXIST, os.mkdir, mount.mnt / ".snapshots" / "vol@dup")


@pytest.mark.snapfs_only
def test_commit_to_existing_label_fails_cleanly(mount, vd):
    write_bytes(vd / "f", b"x")
    mount.commit(mount.vol, "taken")
    r = mount.run_cli("commit", mount.vol, "--label", "taken", check=False)
    assert r.returncode != 0
    assert r.stderr.strip() and "Traceback" not in r.stderr


@pytest.mark.snapfs_only
def test_sigusr1_writes_thread_stacks_to_the_log(mount, vd):
    """The operator's view into a hung mount: SIGUSR1 logs every thread's stack, and the
    daemon carries on serving."""
    text = mount.dump_stacks()
    assert "most recent call first" in text and "daemon.py" in text, text
    write_bytes(vd / "after", b"still serving")
    assert (vd / "after").read_bytes() == b"still serving"


@pytest.mark.snapfs_only
def test_a_command_killed_before_its_answer_leaves_the_daemon_serving(mount, vd):
    """A client that closes the control socket before the answer (Ctrl-C on `snapfs
    stats`) used to end the daemon: sending the answer raised in its nursery."""
    import json
    import socket
    import time

    write_bytes(vd / "before", b"x" * 300_000)
    for op in ({"op": "stats"}, {"op": "snapshot-list"}, {"op": "gc"}):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.fspath(mount.repo / "snapfs.sock"))
        s.sendall(json.dumps(op).encode() + b"\n")
        s.close()
    time.sleep(1)  # the daemon answers into closed sockets meanwhile
    write_bytes(vd / "after", b"still serving")
    assert (vd / "after").read_bytes() == b"still serving"
    assert "snapshots" in mount.run_cli("-C", mount.mnt, "stats", "--json").stdout
