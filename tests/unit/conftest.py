"""Fixtures for the unit tests: small repositories in temporary directories, no kernel.

Everything runs in-process (trio.run for the async vfs calls) except the CLI tests,
which run .venv/bin/snapfs as a subprocess.
"""

from __future__ import annotations

import os
import sys

import pytest

from snapfs.repository import Repository
from snapfs.store.repo import init_repository
from snapfs.vfs.fs import Filesystem

sys.path.insert(0, os.path.dirname(__file__))  # for unithelpers

from unithelpers import CHUNK  # noqa: E402


@pytest.fixture
def repo_path(tmp_path) -> str:
    path = os.path.join(tmp_path, "repo")
    init_repository(path, CHUNK)
    return path


@pytest.fixture
def repo(repo_path):
    r = Repository(repo_path, holder="unit test")
    yield r
    if r.lock.fd >= 0:
        r.close()


@pytest.fixture
def fs(repo) -> Filesystem:
    return Filesystem(repo)


@pytest.fixture
def view(fs):
    """The view of a fresh, empty volume "v"."""
    fs.graph.create_volume("v")
    fs.cat.commit()
    return fs.volume_view("v")
