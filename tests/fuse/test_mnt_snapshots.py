"""Snapshot semantics on a real snapfs mount (skipped with the passthrough target):
committed snapshots never change, writes under .snapshots/S/ go to a draft that commits as
a branch, drafts survive remounts, `mkdir .snapshots/VOL@LABEL` commits, and the stats
file is complete JSON. Ends with a seeded random workload checked byte for byte."""

import json
import os
import random
import subprocess

import pytest
from fusehelpers import KiB, data, drop_caches, read_bytes, tree_contents, write_bytes

pytestmark = pytest.mark.snapfs_only

CHUNK_SIZE = "64K"
CH = 64 * KiB


def _populate(d):
    os.makedirs(d / "sub" / "deeper")
    write_bytes(d / "small", b"small file\n")
    write_bytes(d / "multi", data(5 * CH + 17, seed="multi"))
    write_bytes(d / "sub" / "mid", data(CH + 1, seed="mid"))
    write_bytes(d / "sub" / "deeper" / "leaf", b"leaf")
    write_bytes(d / "sparse", b"end", 40 * CH)
    os.symlink("small", d / "link")
    os.link(d / "multi", d / "sub" / "multi-hard")
    os.setxattr(d / "small", "user.tag", b"v1")
    os.chmod(d / "sub" / "mid", 0o600)


def _mutate(d):
    write_bytes(d / "small", b"SMALL")
    write_bytes(d / "multi", b"X" * 100, 2 * CH - 50)
    with open(d / "sub" / "mid", "ab") as f:
        f.write(b"appended")
    os.truncate(d / "sparse", 7)
    os.unlink(d / "sub" / "deeper" / "leaf")
    os.rename(d / "link", d / "link-renamed")
    write_bytes(d / "new", b"created after commit")
    os.mkdir(d / "newdir")
    os.setxattr(d / "small", "user.tag", b"v2")
    os.chmod(d / "sub" / "mid", 0o644)


def _xattrs_of(d):
    return {p: os.getxattr(d / p, "user.tag") for p in ("small",) if (d / p).exists()}


def _snapshot_record(stats, name):
    """The stats entry describing snapshot NAME (a dict that names it)."""
    found = []

    def walk(node, key=None):
        if isinstance(node, dict):
            if name in node.values() or key == name:
                found.append(node)
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(stats)
    assert found, f"{name} not found in .snapfs/stats"
    return found[0]


# --------------------------------------------------------------------------- immutability


def test_committed_snapshot_keeps_bytes_at_commit(mount, vd):
    _populate(vd)
    before = tree_contents(vd)
    snap = mount.commit(mount.vol, "keep1") / vd.name
    _mutate(vd)
    assert tree_contents(snap) == before  # without dropping caches: no stale pages either
    drop_caches()
    assert tree_contents(snap) == before
    assert os.getxattr(snap / "small", "user.tag") == b"v1"
    assert tree_contents(vd) != before
    assert (vd / "new").read_bytes() == b"created after commit"


def test_commit_does_not_change_what_the_volume_shows(mount, vd):
    _populate(vd)
    before = tree_contents(vd)
    mount.commit(mount.vol, "same")
    assert tree_contents(vd) == before
    drop_caches()
    assert tree_contents(vd) == before


def test_open_file_keeps_working_across_commit(mount, vd):
    fd = os.open(vd / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"before-commit;")
        snap = mount.commit(mount.vol, "openfile") / vd.name
        os.write(fd, b"after-commit")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"before-commit;after-commit"
    finally:
        os.close(fd)
    assert (snap / "f").read_bytes() == b"before-commit;"
    assert (vd / "f").read_bytes() == b"before-commit;after-commit"


def test_unlinked_open_file_across_commit_and_gc(fresh_mount):
    """An open, unlinked file at commit time: absent from the snapshot, still working
    for its holder, and after its close and gc the repository passes fsck (the
    teardown's). The snapshot used to keep its block rows with uncounted chunks, which
    gc then freed."""
    m = fresh_mount
    content = data(3 * CH + 5, seed="tmp")
    fd = os.open(m.vol / "tmp", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, content)
        os.fsync(fd)  # stored: its block rows are in the draft
        os.unlink(m.vol / "tmp")
        snap = m.commit(m.vol, "unlinked-open")
        assert not (snap / "tmp").exists()
        os.pwrite(fd, b"later", 0)
        assert os.pread(fd, len(content), 0) == b"later" + content[5:]
    finally:
        os.close(fd)
    m.run_cli("-C", m.mnt, "gc")


def test_hard_links_are_preserved_in_snapshot(mount, vd):
    write_bytes(vd / "a", b"linked")
    os.link(vd / "a", vd / "b")
    snap = mount.commit(mount.vol, "hardlinks") / vd.name
    sa, sb = os.stat(snap / "a"), os.stat(snap / "b")
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == 2
    write_bytes(vd / "b", b"L")
    assert (snap / "a").read_bytes() == b"linked"
    assert (vd / "a").read_bytes() == b"Linked"


def test_snapshot_directory_lists_committed_snapshots(mount, vd):
    write_bytes(vd / "f", b"x")
    mount.commit(mount.vol, "listed-1")
    mount.commit(mount.vol, "listed-2")
    names = os.listdir(mount.mnt / ".snapshots")
    assert {"vol@listed-1", "vol@listed-2"} <= set(names)
    assert len(names) == len(set(names))
    assert os.path.isdir(mount.mnt / ".snapshots" / "vol@listed-2")


# --------------------------------------------------------------------------- branches


def test_writes_under_snapshot_go_to_its_draft(mount, vd):
    _populate(vd)
    base = tree_contents(vd)
    s = mount.commit(mount.vol, "drafted")
    sd = s / vd.name
    assert tree_contents(sd) == base  # read it: the kernel caches it now
    _mutate(sd)
    drafted = tree_contents(sd)
    assert drafted != base
    assert tree_contents(vd) == base, "writes under .snapshots/S leaked into the volume"
    assert (sd / "new").read_bytes() == b"created after commit"


def test_commit_under_snapshot_creates_branch_and_restores_snapshot(mount, vd):
    _populate(vd)
    base = tree_contents(vd)
    s = mount.commit(mount.vol, "trunk")
    sd = s / vd.name
    assert tree_contents(sd) == base
    _mutate(sd)
    drafted = tree_contents(sd)
    branch = mount.commit(s, "branch")
    assert branch == mount.mnt / ".snapshots" / "vol@branch"
    assert tree_contents(branch / vd.name) == drafted
    assert tree_contents(sd) == base, ".snapshots/S does not show S again after the commit"
    drop_caches()
    assert tree_contents(sd) == base
    assert tree_contents(branch / vd.name) == drafted
    assert tree_contents(vd) == base
    stats = mount.stats()
    rec_s, rec_b = _snapshot_record(stats, "vol@trunk"), _snapshot_record(stats, "vol@branch")
    assert rec_b.get("parent") in (rec_s.get("id"), "vol@trunk"), (rec_s, rec_b)


def test_missing_names_the_kernel_remembers_come_back_after_a_reset(mount, vd):
    """A lookup miss in a view is a negative dentry the kernel keeps (fuse/ops.py,
    _negative_entry). Names that reappear from the daemon's side must not stay hidden
    behind one: a snapshot directory reset by its commit, a volume created after a miss."""
    write_bytes(vd / "kept", b"kept")
    s = mount.commit(mount.vol, "negative")
    sd = s / vd.name
    os.unlink(sd / "kept")  # in the draft only
    for _ in range(2):  # missing, twice: the second answer may come from the kernel
        assert not (sd / "kept").exists()
        assert not (sd / "never").exists()
        with pytest.raises(FileNotFoundError):
            os.stat(sd / "kept")
    mount.commit(s, "negative-branch")
    assert (sd / "kept").read_bytes() == b"kept", ".snapshots/S still hides a name of S"
    assert not (mount.mnt / ".snapshots" / "vol@negative-branch" / vd.name / "kept").exists()
    assert not (mount.mnt / "vol-negative").exists()
    assert not (mount.mnt / ".snapshots" / "vol@negative-later").exists()
    mount.volume_create("vol-negative")
    assert (mount.mnt / "vol-negative").is_dir()
    mount.commit(mount.vol, "negative-later")
    assert (mount.mnt / ".snapshots" / "vol@negative-later" / vd.name / "kept").exists()
    write_bytes(vd / "late", b"made after a miss")  # through the kernel: it knows
    assert (vd / "late").read_bytes() == b"made after a miss"


def test_mkdir_in_snapshots_commits_the_volume(mount, vd):
    write_bytes(vd / "f", b"at mkdir time")
    os.mkdir(mount.mnt / ".snapshots" / "vol@via-mkdir")
    snap = mount.mnt / ".snapshots" / "vol@via-mkdir" / vd.name
    assert (snap / "f").read_bytes() == b"at mkdir time"
    write_bytes(vd / "f", b"later")
    assert (snap / "f").read_bytes() == b"at mkdir time"
    assert "vol@via-mkdir" in json.dumps(mount.stats())


# --------------------------------------------------------------------------- durability


def test_volume_draft_survives_remount(mount, vd):
    _populate(vd)
    before = tree_contents(vd)
    mount.remount()
    assert tree_contents(vd) == before
    assert os.getxattr(vd / "small", "user.tag") == b"v1"


def test_snapshot_draft_survives_remount(mount, vd):
    write_bytes(vd / "f", b"committed")
    s = mount.commit(mount.vol, "draft-remount")
    write_bytes(s / vd.name / "f", b"drafted on the snapshot")
    write_bytes(s / vd.name / "g", b"new in the draft")
    mount.remount()
    assert (s / vd.name / "f").read_bytes() == b"drafted on the snapshot"
    assert (s / vd.name / "g").read_bytes() == b"new in the draft"
    branch = mount.commit(s, "draft-remount-branch")
    assert (branch / vd.name / "f").read_bytes() == b"drafted on the snapshot"
    assert (s / vd.name / "f").read_bytes() == b"committed"


def test_snapshots_survive_remount(mount, vd):
    _populate(vd)
    before = tree_contents(vd)
    snap = mount.commit(mount.vol, "remount-snap") / vd.name
    _mutate(vd)
    mount.remount()
    assert tree_contents(snap) == before


# --------------------------------------------------------------------------- stats


def test_stats_read_with_cat_is_complete_json(mount, vd):
    write_bytes(vd / "f", data(3 * CH))
    mount.commit(mount.vol, "stats-cat")
    r = subprocess.run(["cat", str(mount.mnt / ".snapfs" / "stats")], capture_output=True,
                       check=True)
    stats = json.loads(r.stdout)
    assert "vol@stats-cat" in json.dumps(stats)
    with open(mount.mnt / ".snapfs" / "stats") as f:
        assert json.load(f) is not None


def test_stats_read_in_tiny_pieces_is_complete_json(mount):
    fd = os.open(mount.mnt / ".snapfs" / "stats", os.O_RDONLY)
    try:
        pieces = []
        while piece := os.read(fd, 7):
            pieces.append(piece)
    finally:
        os.close(fd)
    json.loads(b"".join(pieces))


def test_stats_reflect_a_new_commit_immediately(mount, vd):
    path = mount.mnt / ".snapfs" / "stats"
    first = path.read_bytes()
    assert b"vol@stats-fresh" not in first
    write_bytes(vd / "f", b"x")
    mount.commit(mount.vol, "stats-fresh")
    second = path.read_bytes()
    assert "vol@stats-fresh" in json.dumps(json.loads(second))


def test_stats_report_chunk_size(mount):
    text = json.dumps(mount.stats())
    assert str(CH) in text, "the 64 KiB chunk size does not appear in the stats"


# --------------------------------------------------------------------------- random workload


class Model:
    """Expected contents of the workload directory in the volume and in every snapshot."""

    def __init__(self):
        self.live: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytes]] = {}

    def freeze(self):
        return {k: bytes(v) for k, v in self.live.items()}


def _apply_random_op(rng, files: dict, d, i):
    names = [f"f{k:02d}" for k in range(12)]
    op = rng.choices(["write", "append", "truncate", "unlink", "rename", "create"],
                     weights=[40, 10, 12, 8, 10, 10])[0]
    name = rng.choice(names)
    p = d / name
    if op == "create" or (op in ("write", "append", "truncate") and name not in files):
        buf = data(rng.randrange(0, 4 * CH), seed=f"c{i}")
        write_bytes(p, buf, flags=os.O_TRUNC)
        files[name] = bytearray(buf)
    elif op == "write":
        cur = files[name]
        off = rng.choice([rng.randrange(0, len(cur) + CH), rng.randrange(1, 6) * CH - 3])
        buf = data(rng.choice([1, 100, CH, rng.randrange(1, 3 * CH)]), seed=f"w{i}")
        write_bytes(p, buf, off)
        if off > len(cur):
            cur += bytes(off - len(cur))
        cur[off:off + len(buf)] = buf
    elif op == "append":
        buf = data(rng.randrange(1, CH), seed=f"a{i}")
        with open(p, "ab") as f:
            f.write(buf)
        files[name] += buf
    elif op == "truncate":
        size = rng.randrange(0, 6 * CH)
        os.truncate(p, size)
        cur = files[name]
        if size < len(cur):
            del cur[size:]
        else:
            cur += bytes(size - len(cur))
    elif op == "unlink" and name in files:
        os.unlink(p)
        del files[name]
    elif op == "rename" and name in files:
        other = rng.choice(names)
        os.rename(p, d / other)
        files[other] = files.pop(name)


def _verify(mount, model: Model, rel: str):
    for label, expected in model.snaps.items():
        d = mount.mnt / ".snapshots" / f"vol@{label}" / rel
        assert sorted(os.listdir(d)) == sorted(expected), label
        for name, content in expected.items():
            got = read_bytes(d / name)
            assert got == content, f"vol@{label}/{rel}/{name}: {len(got)} vs {len(content)} bytes"
    live = mount.vol / rel
    assert sorted(os.listdir(live)) == sorted(model.live)
    for name, content in model.live.items():
        assert read_bytes(live / name) == bytes(content), f"volume {name}"


def test_random_workload_every_snapshot_byte_for_byte(fresh_mount):
    mount = fresh_mount
    rng = random.Random(20240601)
    rel = "work"
    d = mount.vol / rel
    d.mkdir()
    model = Model()
    n_commit = n_branch = 0
    for i in range(250):
        r = rng.random()
        if r < 0.07:
            n_commit += 1
            label = f"c{n_commit}"
            mount.commit(mount.vol, label)
            model.snaps[label] = model.freeze()
        elif r < 0.10 and model.snaps:
            # a branch: write into a snapshot's directory, then commit its draft
            parent = rng.choice(sorted(model.snaps))
            sdir = mount.mnt / ".snapshots" / f"vol@{parent}" / rel
            files = {k: bytearray(v) for k, v in model.snaps[parent].items()}
            for j in range(rng.randrange(1, 5)):
                _apply_random_op(rng, files, sdir, f"{i}-{j}")
            n_branch += 1
            label = f"b{n_branch}"
            mount.commit(sdir.parent, label)
            model.snaps[label] = {k: bytes(v) for k, v in files.items()}
        else:
            _apply_random_op(rng, model.live, d, i)
        if i % 50 == 49:
            _verify(mount, model, rel)
    assert n_commit >= 5 and n_branch >= 2
    _verify(mount, model, rel)
    mount.remount()
    _verify(mount, model, rel)
