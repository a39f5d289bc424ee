"""Fixtures for the mounted (real FUSE) tests.

SNAPFS_TEST_TARGET=snapfs (default) runs everything against a real `snapfs mount`.
SNAPFS_TEST_TARGET=passthrough mounts a plain directory through a passthrough filesystem
(tools/passthrough.py, or SNAPFS_TEST_PASSTHROUGH=PATH) to validate the POSIX tests
against a known-good filesystem; snapfs-only tests are skipped there.

A test module may set CHUNK_SIZE = "64K" to get repositories with that chunk size.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fusehelpers import IS_SNAPFS, TARGET, Mount, lazy_unmount  # noqa: E402

_ACTIVE: list[Mount] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "snapfs_only: needs the snapfs target (commit, "
                            "snapshots, stats, fsck); skipped with SNAPFS_TEST_TARGET="
                            "passthrough")


def pytest_unconfigure(config):
    # last resort (e.g. after an internal error): never leave a mount behind
    for m in list(_ACTIVE):
        lazy_unmount(m.mnt)


def pytest_report_header(config):
    return f"snapfs mounted tests: target={TARGET}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("snapfs_only") and not IS_SNAPFS:
        pytest.skip(f"snapfs only (target is {TARGET})")


def _open_mount(base: Path, chunk_size: str | None) -> Mount:
    m = Mount(base, chunk_size)
    _ACTIVE.append(m)
    try:
        m.setup()
    except BaseException:
        _ACTIVE.remove(m)
        try:
            m.close()
        except BaseException as e:  # report the setup failure, mention teardown's
            sys.stderr.write(f"teardown after failed setup: {e}\n")
        raise
    return m


def _close_mount(m: Mount) -> None:
    _ACTIVE.remove(m)
    m.close()


@pytest.fixture(scope="module")
def mount(request, tmp_path_factory):
    """A repository mounted for the whole test module, with volume 'vol'."""
    chunk = getattr(request.module, "CHUNK_SIZE", None)
    m = _open_mount(tmp_path_factory.mktemp("snapfs"), chunk)
    yield m
    _close_mount(m)


@pytest.fixture
def fresh_mount(request, tmp_path):
    """A repository mounted for one test only, with volume 'vol'."""
    chunk = getattr(request.module, "CHUNK_SIZE", None)
    m = _open_mount(tmp_path, chunk)
    yield m
    _close_mount(m)


@pytest.fixture(autouse=True)
def _daemon_log_guard():
    """After every test, fail it if a mounted daemon logged an unexpected WARNING, ERROR
    or traceback while it ran (tests declare expected ones with mount.expect_log)."""
    yield
    problems = []
    for m in list(_ACTIVE):
        problems += m.new_log_problems()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _test_dir_name(request) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return name[:200]


@pytest.fixture(params=["volume", pytest.param("snapshot", marks=pytest.mark.snapfs_only)])
def wd(request, mount):
    """An empty per-test directory inside the volume, and (snapfs only) inside the draft
    of a committed snapshot's directory under .snapshots/: POSIX must hold in both."""
    parent = mount.vol if request.param == "volume" else mount.snapshot_base()
    d = parent / _test_dir_name(request)
    d.mkdir()
    return d


@pytest.fixture
def vd(request, mount):
    """An empty per-test directory inside the volume only."""
    d = mount.vol / _test_dir_name(request)
    d.mkdir()
    return d
