"""The mount's kernel dirty limit (snapfs/fuse/kernelcache.py) against a made-up
mountinfo and sysfs; tests/fuse/test_mnt_kernelcache.py checks the real kernel."""

from __future__ import annotations

import logging
import os

import pytest

from snapfs.fuse import kernelcache


def _mountinfo(tmp_path, *lines: str):
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _line(dev: str, point: str) -> str:
    return f"40 25 {dev} / {point} rw,nosuid,nodev,relatime shared:1 - fuse.snapfs /r rw"


def test_unescape_mountinfo_fields():
    assert kernelcache.unescape_mountinfo(r"/a\040b\011c\134d") == "/a b\tc\\d"
    assert kernelcache.unescape_mountinfo("/plain") == "/plain"
    assert kernelcache.unescape_mountinfo("/end\\04") == "/end\\04"  # not a whole escape


def test_mount_device_takes_the_last_mount_on_the_path(tmp_path):
    mnt = tmp_path / "my mount"
    mnt.mkdir()
    escaped = str(mnt).replace(" ", "\\040")
    info = _mountinfo(tmp_path, _line("0:30", escaped), _line("0:31", "/elsewhere"),
                      _line("0:39", escaped))
    assert kernelcache.mount_device(str(mnt), info) == "0:39", "stacked: the top one"
    assert kernelcache.mount_device(str(tmp_path / "none"), info) is None
    assert kernelcache.mount_device(str(mnt), str(tmp_path / "missing")) is None


def test_raise_dirty_limit_writes_max_bytes_only_upwards(tmp_path, caplog):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    info = _mountinfo(tmp_path, _line("0:39", str(mnt)))
    bdi = tmp_path / "bdi" / "0:39"
    bdi.mkdir(parents=True)
    (bdi / "max_bytes").write_text("47323750\n")
    with caplog.at_level(logging.INFO, logger="snapfs.daemon"):
        got = kernelcache.raise_dirty_limit(str(mnt), 2 << 30, sysfs=str(tmp_path / "bdi"),
                                            mountinfo=info)
    assert got == 2 << 30
    assert (bdi / "max_bytes").read_text() == f"{2 << 30}\n"
    assert "may hold 2048 MiB" in caplog.text
    # already higher (set by the administrator): left alone
    (bdi / "max_bytes").write_text(f"{8 << 30}\n")
    assert kernelcache.raise_dirty_limit(str(mnt), 2 << 30, sysfs=str(tmp_path / "bdi"),
                                         mountinfo=info) == 8 << 30
    assert (bdi / "max_bytes").read_text() == f"{8 << 30}\n"


def test_raise_dirty_limit_gives_up_quietly(tmp_path, caplog):
    """No such device file (an older kernel), or not in mountinfo: None, one INFO line,
    no exception: the mount works as before."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    info = _mountinfo(tmp_path, _line("0:39", str(mnt)))
    with caplog.at_level(logging.INFO, logger="snapfs.daemon"):
        assert kernelcache.raise_dirty_limit(str(mnt), 1 << 30, sysfs=str(tmp_path / "no"),
                                             mountinfo=info) is None
        assert kernelcache.raise_dirty_limit(str(tmp_path), 1 << 30, sysfs=str(tmp_path),
                                             mountinfo=info) is None
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]


def test_requests_queued_is_whether_the_descriptor_has_something_to_read():
    r, w = os.pipe()
    try:
        assert not kernelcache.requests_queued(r)
        os.write(w, b"x")
        assert kernelcache.requests_queued(r)
    finally:
        os.close(r)
        os.close(w)


def test_fuse_device_fd_finds_this_process_s_dev_fuse():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse here")
    assert kernelcache.fuse_device_fd() is None
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        assert kernelcache.fuse_device_fd() == fd
    finally:
        os.close(fd)
