"""Encryption at rest on real mounts (SPEC section 7, issue 4): no plaintext name, symlink
target, xattr or content and no key material anywhere in the repository directory (its
log included); a wrong passphrase or key file stops before anything is mounted; key files
are 0600; `key change` rewraps without rewriting data; damaged or forged chunk records
give EIO and a log line naming the chunk, never wrong data, and fsck reports them.

Every repository here is made by the test (RepoSet) with its own passphrase or key file,
so the SNAPFS_TEST_ENCRYPT=1 rerun of the mounted suite has nothing to add: skipped there."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
import xxhash
from fusehelpers import (
    ENCRYPT,
    MiB,
    RepoSet,
    assert_one_line_error,
    is_mounted,
    read_bytes,
    snapfs_bin,
    tree_contents,
    write_bytes,
)

pytestmark = [
    pytest.mark.snapfs_only,
    pytest.mark.skipif(ENCRYPT, reason="makes its own encrypted repositories"),
]

PASSPHRASE = "correct horse battery staple Meerkat-4711"


@pytest.fixture
def repos(tmp_path):
    rs = RepoSet(tmp_path)
    try:
        yield rs
    finally:
        rs.close()


def _files_under(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out += [Path(dirpath) / f for f in files if os.path.isfile(Path(dirpath) / f)]
    return out  # regular files (not the control socket)


def _leaks(root: Path, needles: dict[str, bytes]) -> list[str]:
    """Every (file, needle) where the needle's bytes, or their hex, occur in a file."""
    found = []
    files = _files_under(root)
    assert any(f.name == "meta.db" for f in files), files
    for path in files:
        blob = path.read_bytes()
        low = blob.lower()
        for what, needle in needles.items():
            if needle in blob or needle.hex().encode() in low:
                found.append(f"{what} ({needle[:40]!r}) in {path.relative_to(root)}")
    return found


def _populate_secrets(vol: Path) -> dict[str, bytes]:
    """Write content whose plaintext must never reach the repository; return the needles."""
    needles = {}
    top = vol / "Quarterly-Merger-Plans-Wolverine"
    top.mkdir()
    needles["directory name"] = b"Merger-Plans-Wolverine"
    small = top / "acquisition-target-Zephyrine.txt"
    write_bytes(small, b"The vault combination is 31-41-59 Marmalade-Protocol\n")
    needles["file name"] = b"acquisition-target-Zephyrine"
    needles["small content"] = b"Marmalade-Protocol"
    big = b"".join(b"Plaintext-Pattern-Ocelot %08d\n" % i for i in range(80_000))  # 2.6 MB
    write_bytes(top / "big-Hippogriff.log", big)
    needles["big file name"] = b"big-Hippogriff"
    needles["big content"] = b"Plaintext-Pattern-Ocelot"
    long_name = "longname-Wombatsson-" + "x" * 200
    write_bytes(top / long_name, b"long name file\n")
    needles["long name"] = b"longname-Wombatsson"
    os.symlink("/srv/secret-archive-Narwhalian/backup.tar", top / "shortcut-Pangolini")
    needles["symlink target"] = b"secret-archive-Narwhalian"
    needles["symlink name"] = b"shortcut-Pangolini"
    os.setxattr(small, "user.classification-Quokkadile", b"eyes-only-Axolotlish")
    needles["xattr name"] = b"classification-Quokkadile"
    needles["xattr value"] = b"eyes-only-Axolotlish"
    os.link(small, top / "alias-Tamarindus")
    needles["hard link name"] = b"alias-Tamarindus"
    write_bytes(top / "draft-Capybarella", b"soon renamed\n")
    os.rename(top / "draft-Capybarella", top / "final-Capybarella-v2")
    needles["old name"] = b"draft-Capybarella"
    needles["new name"] = b"final-Capybarella"
    return needles


def _provoke_refusals(m, top: Path) -> None:
    """Failing operations on distinctive names: a daemon that logs refusals with their
    path would leak the names into snapfs.log."""
    m.volume_create("other")
    for fn, args in [
        (os.link, (top / "acquisition-target-Zephyrine.txt",
                   m.mnt / "other" / "crossing-Basilisko")),  # EXDEV
        (os.mkdir, (top / "final-Capybarella-v2",)),  # EEXIST
        (os.rmdir, (top,)),  # ENOTEMPTY
        (os.stat, (top / "missing-Chinchillada",)),  # ENOENT
        (os.getxattr, (top / "acquisition-target-Zephyrine.txt", "user.absent-Okapino")),
    ]:
        with pytest.raises(OSError):
            fn(*args)


# --------------------------------------------------------------------------- 6. no plaintext


def test_no_plaintext_or_key_material_in_repository(repos):
    m = repos.make("enc", passphrase=PASSPHRASE, volume="vol")
    needles = _populate_secrets(m.vol)
    needles["passphrase"] = PASSPHRASE.encode()
    needles["passphrase word"] = b"Meerkat-4711"
    top = m.vol / "Quarterly-Merger-Plans-Wolverine"
    _provoke_refusals(m, top)
    m.commit(m.vol, "first")
    key = m.base / "site.key"
    m.run_cli("-C", m.mnt, "site-key", "create", "remote-office", "-o", key)
    site_key = bytes.fromhex(json.loads(key.read_text())["key"])
    needles["site key"] = site_key
    # a draft under a snapshot directory, and changes after the commit
    write_bytes(m.mnt / ".snapshots" / "vol@first" / "branch-note-Kinkajouan", b"x")
    needles["branch file name"] = b"branch-note-Kinkajouan"
    os.setxattr(top / "big-Hippogriff.log", "user.reviewer-Manateeish", b"signed-Dugongish")
    needles["later xattr name"] = b"reviewer-Manateeish"
    needles["later xattr value"] = b"signed-Dugongish"
    m.run_cli("-C", m.mnt, "snapshot", "list")  # a round trip through the daemon
    # while mounted: the catalog's WAL is there too
    leaks = _leaks(m.repo, needles)
    assert not leaks, "plaintext in the repository while mounted:\n" + "\n".join(leaks)
    assert (m.repo / "snapfs.log").exists()
    m.umount()
    leaks = _leaks(m.repo, needles)
    assert not leaks, "plaintext in the repository:\n" + "\n".join(leaks)
    # and the content is all there (so the needles were written at all)
    m.mount()
    assert read_bytes(top / "acquisition-target-Zephyrine.txt").endswith(b"Protocol\n")
    assert os.readlink(top / "shortcut-Pangolini").endswith("Narwhalian/backup.tar")
    assert os.getxattr(top / "alias-Tamarindus", "user.classification-Quokkadile") == \
        b"eyes-only-Axolotlish"

    # the control: in a plain repository the scan finds every one of them
    plain = repos.make("plain", volume="vol")
    control = _populate_secrets(plain.vol)
    plain.umount()
    found = "\n".join(_leaks(plain.repo, control))
    for what in control.keys() - {"old name"}:  # a name gone before it was committed
        assert f"{what} (" in found, f"the scan cannot see the {what} even in clear"


# --------------------------------------------------------------------------- 7. keys


def _env(m, changes: dict) -> dict:
    """M's environment changed by CHANGES (None removes a variable)."""
    return {k: v for k, v in {**m.environ(), **changes}.items() if v is not None}


def _snapfs(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([snapfs_bin(), *map(str, args)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env=env)


def _mount_cmd(m, env_changes: dict, *options: str) -> subprocess.CompletedProcess:
    return _snapfs(_env(m, env_changes), *options, "mount", m.repo, m.mnt)


def _assert_mount_refused(m, env_changes: dict, *options: str, needles=()) -> str:
    log_before = (m.repo / "snapfs.log").read_bytes() if (m.repo / "snapfs.log").exists() \
        else b""
    r = _mount_cmd(m, env_changes, *options)
    try:
        line = assert_one_line_error(r, *needles)
        assert not is_mounted(m.mnt), "mounted despite the wrong key"
        assert os.listdir(m.mnt) == []
        pid = m.repo / "snapfs.pid"
        if pid.exists():
            text = pid.read_text().split()
            assert not text or not Path(f"/proc/{text[0]}").exists(), "a daemon is running"
    finally:
        if is_mounted(m.mnt):
            m.umount()
    log_after = (m.repo / "snapfs.log").read_bytes() if (m.repo / "snapfs.log").exists() \
        else b""
    assert PASSPHRASE.encode() not in log_after
    assert log_after[:len(log_before)] == log_before
    return line


def _pack_state(m) -> list:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (m.repo / "packs").iterdir())


def test_wrong_passphrase_and_key_files_and_key_change(repos, tmp_path):
    m = repos.make("pass", passphrase=PASSPHRASE, volume="vol")
    write_bytes(m.vol / "data", os.urandom(3 * MiB + 17))
    (m.vol / "dir").mkdir()
    os.symlink("../data", m.vol / "dir" / "link")
    m.commit(m.vol, "one")
    expected = tree_contents(m.vol)
    m.umount()

    # a wrong passphrase, or none at all: refused before anything is mounted
    _assert_mount_refused(m, {"SNAPFS_PASSPHRASE": "not the passphrase"},
                          needles=("passphrase",))
    _assert_mount_refused(m, {"SNAPFS_PASSPHRASE": None}, needles=("passphrase",))
    r = m.run_cli("-C", m.repo, "snapshot", "list", check=False)
    assert r.returncode == 0
    bad = _env(m, {"SNAPFS_PASSPHRASE": "not the passphrase"})
    for args in (["-C", m.repo, "snapshot", "list"], ["fsck", m.repo]):
        assert_one_line_error(_snapfs(bad, *args), "passphrase")

    # key change: the old passphrase stops working, the new one works, data not rewritten
    packs = _pack_state(m)
    new_pass = "a brand new passphrase Lemurian"
    config = (m.repo / "snapfs.json").read_bytes()
    r = _snapfs({**bad, "SNAPFS_NEW_PASSPHRASE": new_pass}, "-C", m.repo, "key", "change")
    assert_one_line_error(r, "passphrase")  # the old passphrase was wrong: refused
    assert (m.repo / "snapfs.json").read_bytes() == config
    r = _snapfs(_env(m, {"SNAPFS_NEW_PASSPHRASE": new_pass}), "-C", m.repo, "key", "change")
    assert r.returncode == 0, r.stderr
    _assert_mount_refused(m, {}, needles=("passphrase",))  # the old one
    m.env["SNAPFS_PASSPHRASE"] = new_pass
    m.mount()
    assert tree_contents(m.vol) == expected
    assert tree_contents(m.mnt / ".snapshots" / "vol@one") == expected
    m.umount()
    assert _pack_state(m) == packs, "key change rewrote pack files"

    # to a key file: created 0600, then the passphrase no longer opens the repository
    kf = tmp_path / "new.key"
    r = _snapfs(m.environ(), "-C", m.repo, "key", "change", "--new-key-file", kf)
    assert r.returncode == 0, r.stderr
    assert kf.stat().st_mode & 0o777 == 0o600
    _assert_mount_refused(m, {})
    m.env.update(SNAPFS_PASSPHRASE=None, SNAPFS_KEY_FILE=str(kf))
    m.mount()
    assert tree_contents(m.vol) == expected
    m.umount()
    assert _pack_state(m) == packs


def test_key_file_repository(repos, tmp_path):
    kf = tmp_path / "keys" / "repo.key"
    kf.parent.mkdir()
    assert not kf.exists()
    m = repos.make("kf", key_file=kf)  # snapfs --key-file KF init --encrypt: creates KF
    assert kf.stat().st_mode & 0o777 == 0o600, oct(kf.stat().st_mode)
    assert re.fullmatch(rb"[0-9a-f]{64}\n?", kf.read_bytes())
    # another repository with its own new key file: a wrong key for the first one
    kf2 = tmp_path / "keys" / "option.key"
    other = m.base.parent / "other-repo"
    r = subprocess.run([snapfs_bin(), "--key-file", str(kf2), "init", "--encrypt",
                        str(other)], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL,
                       env={**os.environ, "SNAPFS_PASSPHRASE": "unused, must not matter"})
    assert r.returncode == 0, r.stderr
    assert kf2.stat().st_mode & 0o777 == 0o600
    assert kf2.read_bytes() != kf.read_bytes()
    config = json.loads((other / "snapfs.json").read_text())
    assert config["encryption"]["wrapped"]["kdf"] == "keyfile"
    assert kf2.read_text().strip() not in (other / "snapfs.json").read_text()

    m.mount()
    m.volume_create("vol")
    write_bytes(m.mnt / "vol" / "f", b"key file protected\n")
    m.commit(m.mnt / "vol", "s")
    m.umount()
    _assert_mount_refused(m, {"SNAPFS_KEY_FILE": str(kf2)})  # another repository's key
    _assert_mount_refused(m, {"SNAPFS_KEY_FILE": None}, needles=("key file",))
    _assert_mount_refused(m, {"SNAPFS_KEY_FILE": str(tmp_path / "missing.key")},
                          needles=("missing.key",))
    loose = tmp_path / "keys" / "loose.key"
    loose.write_bytes(kf.read_bytes())
    loose.chmod(0o644)  # readable by others: refused like ssh does
    _assert_mount_refused(m, {"SNAPFS_KEY_FILE": str(loose)}, needles=("chmod",))
    r = _mount_cmd(m, {"SNAPFS_KEY_FILE": None}, "--key-file", str(kf))  # the option
    assert r.returncode == 0, r.stderr
    assert read_bytes(m.mnt / "vol" / "f") == b"key file protected\n"
    m.umount()
    assert kf.read_text().strip().encode() not in (m.repo / "snapfs.json").read_bytes()


# --------------------------------------------------------------------------- 8. damage


RECORD_HEADER = struct.Struct("<4sHHIIQ")  # snapfs.store.packs: magic flags resv len raw id
CHECK = struct.Struct("<Q")


def _sql(m, query: str) -> list[list[str]]:
    r = subprocess.run(["sqlite3", "-readonly", "-separator", "|", str(m.repo / "meta.db"),
                        query], capture_output=True, text=True, timeout=60, check=True)
    return [line.split("|") for line in r.stdout.splitlines()]


def _record_of(m, size: int, idx: int) -> tuple[int, Path, int, int]:
    """(chunk id, pack path, record offset, record length) of block IDX of the file whose
    size is SIZE (sizes are stored in clear; names are not)."""
    rows = _sql(m, f"SELECT c.id, c.pack, c.offset, c.length FROM inodes i "
                   f"JOIN blocks b ON b.ino = i.ino JOIN chunks c ON c.id = b.chunk "
                   f"WHERE i.size = {size} AND b.idx = {idx}")
    assert len(rows) == 1, rows
    cid, pack, offset, length = map(int, rows[0])
    return cid, m.repo / "packs" / f"{pack:08d}.pack", offset, length


def _rewrite_record(path: Path, offset: int, length: int, change) -> None:
    """Apply CHANGE(bytearray record) -> bool to a record; if it returns True, recompute
    the record's (unkeyed) xxh3 check so that only the encryption can notice."""
    with open(path, "r+b") as f:
        f.seek(offset)
        rec = bytearray(f.read(length))
        fix = change(rec)
        if fix:
            check = xxhash.xxh3_64(bytes(rec[:RECORD_HEADER.size]))
            check.update(bytes(rec[RECORD_HEADER.size + CHECK.size:]))
            CHECK.pack_into(rec, RECORD_HEADER.size, check.intdigest())
        f.seek(offset)
        f.write(rec)


def _log_lines(m) -> list[str]:
    return (m.repo / "snapfs.log").read_text(errors="replace").splitlines()


def test_damaged_chunk_records_give_eio_and_fsck_reports_them(repos):
    m = repos.make("dmg", passphrase=PASSPHRASE, volume="vol")
    chunk = m.stats()["chunk_size"]
    sizes = {f"victim{i}": 8 * chunk + 1000 + i for i in range(4)}  # unique sizes
    sizes.update(healthy=5 * chunk + 77, small=3000)
    contents = {name: os.urandom(size) for name, size in sizes.items()}
    for name, content in contents.items():
        write_bytes(m.vol / name, content)
    m.commit(m.vol, "s")
    m.umount()

    damaged = {}  # file -> (chunk id, block index, kind of damage)
    hdr = RECORD_HEADER.size + CHECK.size

    def flip_payload(rec):  # a bit in the ciphertext: the checksum notices
        rec[hdr + len(rec[hdr:]) // 2] ^= 0x04
        return False

    def forge_payload(rec):  # the same, checksum recomputed: only GCM can notice
        rec[hdr + 40] ^= 0x01
        return True

    def flip_header(rec):  # a bit of the record's chunk id
        rec[RECORD_HEADER.size - 8] ^= 0x02
        return False

    _cid, pack_b, off_b, len_b = _record_of(m, sizes["victim3"], 6)
    with open(pack_b, "rb") as f:
        f.seek(off_b + hdr)
        other_payload = f.read(len_b - hdr)

    def swap_payload(rec):  # another chunk's valid ciphertext, checksum recomputed
        assert len(rec) == len_b, "records of full chunks have equal length"
        rec[hdr:] = other_payload
        return True

    for name, idx, change in [("victim0", 5, flip_payload), ("victim1", 5, forge_payload),
                              ("victim2", 5, flip_header), ("victim3", 2, swap_payload)]:
        cid, pack, offset, length = _record_of(m, sizes[name], idx)
        _rewrite_record(pack, offset, length, change)
        damaged[name] = (cid, idx, change.__name__)

    m.mount()
    m.expect_log(r" ERROR .*chunk \d+")
    too_many = []  # reads that logged more than one ERROR line (checked at the end)
    for name, (cid, idx, kind) in damaged.items():
        before = len(_log_lines(m))
        fd = os.open(m.vol / name, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as e:
                os.pread(fd, chunk, idx * chunk)
            assert e.value.errno == errno.EIO, f"{kind}: {e.value}"
        finally:
            os.close(fd)
        new = _log_lines(m)[before:]
        errors = [ln for ln in new if " ERROR " in ln]
        assert errors, f"{kind}: no ERROR line for the damaged chunk {cid}: {new}"
        for line in errors:
            assert re.search(rf"\bchunk {cid}\b", line), f"{kind}: {line}"
        if len(errors) != 1:
            too_many.append(f"{kind}: {len(errors)} ERROR lines for one read:\n  "
                            + "\n  ".join(errors))
        assert "Traceback" not in "\n".join(new)
        if kind in ("forge_payload", "swap_payload"):
            assert "authentic" in errors[0], f"{kind} must be caught by GCM: {errors[0]}"
        # the whole file: EIO, never wrong data; the other blocks read fine
        with pytest.raises(OSError) as e:
            read_bytes(m.vol / name)
        assert e.value.errno == errno.EIO
        far = 0 if idx > 2 else 7
        assert read_bytes(m.vol / name, far * chunk, chunk) == \
            contents[name][far * chunk:(far + 1) * chunk]
    for name in ("healthy", "small"):
        assert read_bytes(m.vol / name) == contents[name]
    assert read_bytes(m.mnt / ".snapshots" / "vol@s" / "healthy") == contents["healthy"]
    m.umount()

    m.fsck_at_close = False
    r = m.run_cli("fsck", m.repo, check=False, timeout=600)
    assert r.returncode != 0, f"fsck passed a damaged repository: {r.stdout}"
    assert "Traceback" not in r.stderr
    for cid, _idx, kind in damaged.values():
        assert re.search(rf"\bchunk {cid}\b", r.stderr), f"fsck does not name {kind} " \
                                                         f"chunk {cid}: {r.stderr}"
    assert not too_many, "one damaged chunk read once must log one ERROR line:\n" + \
        "\n".join(too_many)


def test_init_encrypt_takes_the_key_file_from_the_environment(tmp_path):
    """`--key-file FILE ... (or SNAPFS_KEY_FILE); with init --encrypt, created if
    missing` (snapfs --help): the variable must work at init as the option does."""
    kf = tmp_path / "env.key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_PASSPHRASE")}
    r = subprocess.run([snapfs_bin(), "init", "--encrypt", str(tmp_path / "repo")],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**env, "SNAPFS_KEY_FILE": str(kf), "SNAPFS_SCRYPT_N": "4096"})
    assert r.returncode == 0, r.stderr
    assert kf.stat().st_mode & 0o777 == 0o600
    config = json.loads((tmp_path / "repo" / "snapfs.json").read_text())
    assert config["encryption"]["wrapped"]["kdf"] == "keyfile"


def _damage_catalog(db: Path, kinds: set[str]) -> None:
    """Flip a bit in the encrypted name of the file of size 12345 ("name"), in the symlink
    target ("target") and in the xattr value ("xattr") of the catalog DB."""
    con = sqlite3.connect(db)
    try:
        with con:
            if "name" in kinds:
                (ino,) = con.execute("SELECT ino FROM inodes WHERE size = 12345").fetchone()
                parent, name, vertex = con.execute(
                    "SELECT parent, name, vertex FROM dirents WHERE ino = ?", (ino,)).fetchone()
                con.execute("UPDATE dirents SET name = ? WHERE parent = ? AND name = ? AND "
                            "vertex = ?", (_flipped(name), parent, name, vertex))
            if "target" in kinds:
                rows = con.execute("SELECT ino, vertex, target FROM inodes "
                                   "WHERE target IS NOT NULL").fetchall()
                assert len({r[0] for r in rows}) == 1, rows
                for ino, vertex, target in rows:
                    con.execute("UPDATE inodes SET target = ? WHERE ino = ? AND vertex = ?",
                                (_flipped(target), ino, vertex))
            if "xattr" in kinds:
                rows = con.execute("SELECT ino, name, vertex, value FROM xattrs").fetchall()
                assert len(rows) == 1, rows
                for ino, xname, vertex, value in rows:
                    con.execute("UPDATE xattrs SET value = ? WHERE ino = ? AND name = ? AND "
                                "vertex = ?", (_flipped(value), ino, xname, vertex))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def _flipped(blob: bytes) -> bytes:
    b = bytearray(blob)
    b[-1] ^= 0x01
    return bytes(b)


def test_damaged_metadata_gives_eio_never_wrong_metadata(repos, tmp_path):
    """A flipped bit in an encrypted name, symlink target or xattr value in the catalog:
    EIO with a log line naming the damaged object, never a wrong name, target or value;
    the rest of the tree works; fsck reports each kind of damage (no traceback)."""
    m = repos.make("meta", passphrase=PASSPHRASE, volume="vol")
    for d in ("names", "links", "xattrs"):
        (m.vol / d).mkdir()
    write_bytes(m.vol / "names" / "renamed-by-damage", b"n" * 12345)  # size: its handle
    write_bytes(m.vol / "names" / "neighbour", b"fine")
    os.symlink("the-true-target", m.vol / "links" / "link")
    write_bytes(m.vol / "xattrs" / "f", b"x")
    os.setxattr(m.vol / "xattrs" / "f", "user.k", b"the true value")
    write_bytes(m.vol / "untouched", b"still fine")
    m.commit(m.vol, "s")
    m.umount()

    late = []  # failures reported at the end, after every check has run
    # fsck, one kind of damage at a time (each on a copy of the repository)
    for kind, words in [("name", "name"), ("target", "target"), ("xattr", "xattr")]:
        copy = tmp_path / f"copy-{kind}"
        shutil.copytree(m.repo, copy)
        _damage_catalog(copy / "meta.db", {kind})
        r = m.run_cli("fsck", copy, check=False, timeout=600)
        if "Traceback" in r.stderr + r.stdout:
            late.append(f"fsck of a damaged {kind} crashed: {r.stderr}")
        elif r.returncode == 0:
            late.append(f"fsck finds nothing wrong with a damaged {kind}: {r.stdout.strip()}")
        elif words not in r.stderr:
            late.append(f"fsck does not say the {kind} is damaged: {r.stderr.strip()}")

    _damage_catalog(m.repo / "meta.db", {"name", "target", "xattr"})
    m.fsck_at_close = False
    m.mount()
    m.expect_log(r" ERROR ")
    for what, fn, arg in [("name", os.listdir, m.vol / "names"),
                          ("symlink target", os.readlink, m.vol / "links" / "link"),
                          ("xattr value", lambda p: os.getxattr(p, "user.k"),
                           m.vol / "xattrs" / "f")]:
        before = len(_log_lines(m))
        with pytest.raises(OSError) as e:
            got = fn(arg)
            pytest.fail(f"damaged {what} read back as {got!r}")
        assert e.value.errno == errno.EIO, f"{what}: {e.value}"
        new = [ln for ln in _log_lines(m)[before:] if " ERROR " in ln]
        assert new and all(what.split()[-1] in ln for ln in new), f"{what}: {new}"
    with pytest.raises(OSError) as e:  # looked up by its true name: gone or damaged
        os.stat(m.vol / "names" / "renamed-by-damage")
    assert e.value.errno in (errno.EIO, errno.ENOENT)
    assert read_bytes(m.vol / "untouched") == b"still fine"
    # asked again, the damage must still be reported, not turned into "no such xattr"
    damaged_xattr = m.vol / "xattrs" / "f"
    for what, fn in [("getxattr again", lambda: os.getxattr(damaged_xattr, "user.k")),
                     ("listxattr", lambda: os.listxattr(damaged_xattr))]:
        try:
            got = fn()
        except OSError as e:
            got = e
        if not (isinstance(got, OSError) and got.errno == errno.EIO
                or what == "listxattr" and got == ["user.k"]):
            late.append(f"{what} after a damaged xattr value answered {got!r}")
    try:  # an undamaged entry beside the damaged name, by its path
        neighbour = read_bytes(m.vol / "names" / "neighbour")
    except OSError as e:
        neighbour = e
    if neighbour != b"fine":
        late.append(f"one damaged name makes its whole directory unreachable: reading an "
                    f"intact sibling by its path gives {neighbour!r}")
    m.umount()
    assert not late, "\n".join(late)
