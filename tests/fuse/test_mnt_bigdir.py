"""One directory with 100,000 entries on a mounted volume."""

import collections
import errno
import os
import random
import subprocess
import time

import pytest
from fusehelpers import expect_errno

N = 100_000

pytestmark = pytest.mark.slow


def _name(i: int) -> str:
    return f"entry-{i:06d}-{'x' * (i % 23)}"


@pytest.fixture(scope="module")
def bigdir(mount):
    d = mount.vol / "big"
    os.mkdir(d)
    t0 = time.monotonic()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    for i in range(N):
        os.close(os.open(d / _name(i), flags, 0o644))
    elapsed = time.monotonic() - t0
    print(f"\ncreated {N} files in {elapsed:.1f} s ({N / elapsed:.0f}/s)")
    return d


def test_listing_returns_every_name_exactly_once(bigdir):
    t0 = time.monotonic()
    names = os.listdir(bigdir)
    print(f"\nlisted {len(names)} entries in {time.monotonic() - t0:.1f} s")
    dup = [n for n, c in collections.Counter(names).items() if c > 1]
    assert not dup, f"{len(dup)} names listed more than once, e.g. {dup[:5]}"
    assert len(names) == N
    assert set(names) == {_name(i) for i in range(N)}


def test_scandir_types_and_inodes_are_unique(bigdir):
    inos = collections.Counter()
    count = 0
    for e in os.scandir(bigdir):
        assert e.is_file(follow_symlinks=False)
        inos[e.inode()] += 1
        count += 1
    assert count == N
    assert len(inos) == N, "inode numbers are not unique"


def test_stat_of_sampled_entries(bigdir):
    for i in random.Random(7).sample(range(N), 2000):
        st = os.stat(bigdir / _name(i))
        assert st.st_size == 0
        assert st.st_nlink == 1


def test_lookup_of_missing_names_gives_enoent(bigdir):
    expect_errno(errno.ENOENT, os.stat, bigdir / _name(N))
    expect_errno(errno.ENOENT, os.stat, bigdir / "entry-")


def test_ls_and_find_count_all_entries(bigdir):
    r = subprocess.run(["ls", "-1U", str(bigdir)], capture_output=True, check=True)
    assert r.stdout.count(b"\n") == N
    r = subprocess.run(["find", str(bigdir), "-type", "f"], capture_output=True, check=True)
    assert r.stdout.count(b"\n") == N


def test_unlink_some_and_relist(bigdir):
    gone = set(random.Random(11).sample(range(N), 1000))
    for i in gone:
        os.unlink(bigdir / _name(i))
    names = os.listdir(bigdir)
    assert len(names) == N - len(gone)
    assert set(names) == {_name(i) for i in range(N) if i not in gone}


def test_readdir_while_unlinking_never_repeats_or_skips_survivors(bigdir):
    names_before = set(os.listdir(bigdir))
    order = sorted(names_before)
    doomed = set(order[::97])
    seen = collections.Counter()
    with os.scandir(bigdir) as it:
        for k, e in enumerate(it):
            seen[e.name] += 1
            if k == 100:  # unlink while the listing is in progress
                for n in doomed:
                    os.unlink(bigdir / n)
    assert max(seen.values()) == 1, "an entry was returned twice"
    missing = (names_before - doomed) - set(seen)
    assert not missing, f"{len(missing)} surviving entries skipped, e.g. {sorted(missing)[:3]}"
