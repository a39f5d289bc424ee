"""POSIX semantics for other users, checked against ext4 as the oracle.

The mount allows other users (`--allow-other`), as the conformance and torture suites
that run as unprivileged users need. tests/fuse/posix_probe.py runs the same scenarios
(permissions, ownership and set-id bits, sticky directories, timestamps, links, rename,
names at NAME_MAX, special files, xattrs) once in a directory on the local disk and once
in the mount, switching between root and two unprivileged users, and every observation
must match: errno for errno, mode bit for mode bit, changed timestamp for changed
timestamp.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fusehelpers import IS_SNAPFS, Mount

PROBE = Path(__file__).with_name("posix_probe.py")
sys.path.insert(0, str(PROBE.parent))
from posix_probe import SCENARIOS  # noqa: E402

# Where the kernel, not the filesystem, decides, and decides differently for every FUSE
# filesystem with the writeback cache: the kernel keeps its own mtime and ctime of a
# regular file and changes them on truncate only when the size changes (fs/fuse/dir.c,
# fuse_do_setattr). tools/passthrough.py over ext4 shows the same.
FUSE_WRITEBACK_DIFFERENCES = {
    ("truncate", "truncate to same size: f changed"): (["mtime", "ctime"], []),
}


def _probe(directory: Path) -> dict[str, list]:
    r = subprocess.run([sys.executable, str(PROBE), str(directory)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"posix_probe.py {directory} failed:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def observations(tmp_path_factory):
    """The probe's observations on ext4, on a volume and (snapfs) in a snapshot's draft."""
    base = tmp_path_factory.mktemp("posix-users")
    reference = base / "ext4"
    reference.mkdir()
    m = Mount(base / "fs", allow_other=True)
    m.setup()
    try:
        places = {"volume": m.vol / "probe"}
        if IS_SNAPFS:
            places["snapshot"] = m.snapshot_base() / "probe"
        results = {"ext4": _probe(reference)}
        for place, directory in places.items():
            directory.mkdir()
            results[place] = _probe(directory)
        yield results
    finally:
        m.close()  # unmount, fsck, and the daemon log check


def _differences(expected: list, got: list, scenario: str) -> list[str]:
    out = []
    for i in range(max(len(expected), len(got))):
        want = expected[i] if i < len(expected) else None
        have = got[i] if i < len(got) else None
        if want == have:
            continue
        label = (want or have)[0]
        allowed = FUSE_WRITEBACK_DIFFERENCES.get((scenario, label))
        if allowed and want and have and (want[1], have[1]) == allowed:
            continue
        out.append(f"{label}: ext4 {want[1] if want else '-'!r}, "
                   f"mounted {have[1] if have else '-'!r}")
    return out


@pytest.mark.parametrize(
    "place", ["volume", pytest.param("snapshot", marks=pytest.mark.snapfs_only)])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_same_as_ext4(observations, scenario, place):
    expected = observations["ext4"][scenario]
    assert not any(label == "scenario failed" for label, _ in expected), expected
    assert len(expected) > 3, "the scenario observed too little to compare"
    diffs = _differences(expected, observations[place][scenario], scenario)
    assert not diffs, f"{scenario} in a {place} differs from ext4:\n" + "\n".join(diffs)
