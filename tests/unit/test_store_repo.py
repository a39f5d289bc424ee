"""The repository directory: init, configuration, sizes and the lock (snapfs/store/repo.py)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from snapfs import FORMAT_VERSION
from snapfs.errors import (
    AlreadyExists,
    FormatError,
    NotARepository,
    RepositoryLocked,
    UsageError,
)
from snapfs.repository import Repository
from snapfs.store.repo import (
    CONFIG,
    DEFAULT_CHUNK_SIZE,
    RepoLock,
    RepoPaths,
    init_repository,
    is_repository,
    load_config,
    parse_size,
    write_json_atomic,
)

# -- init --------------------------------------------------------------------------------------


def test_init_writes_config_0600(tmp_path):
    root = str(tmp_path / "r")
    config = init_repository(root)
    path = os.path.join(root, CONFIG)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with open(path) as f:
        raw = json.load(f)
    assert raw["format"] == FORMAT_VERSION
    assert raw["chunk_size"] == DEFAULT_CHUNK_SIZE == config.chunk_size
    assert bytes.fromhex(raw["id_key"]) == config.id_key and len(config.id_key) == 32
    assert raw["repo_id"] == config.repo_id
    assert raw["encryption"] is None
    assert os.path.isdir(os.path.join(root, "packs"))
    assert sorted(os.listdir(root)) == sorted([CONFIG, "packs"])  # no temporary file left behind
    assert is_repository(root)


def test_repository_is_private_to_its_owner(tmp_path):
    """The catalog holds every name and xattr, unencrypted packs the contents: no other
    local user may read them, whatever the modes inside the filesystem say."""
    root = str(tmp_path / "r")
    os.umask(old := os.umask(0o022))
    try:
        init_repository(root)
        assert os.stat(root).st_mode & 0o777 == 0o700
        with Repository(root, holder="unit test"):
            for name in ("meta.db", "meta.db-wal", "meta.db-shm"):
                assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o600, name
    finally:
        os.umask(old)


def test_init_makes_fresh_keys(tmp_path):
    a = init_repository(str(tmp_path / "a"))
    b = init_repository(str(tmp_path / "b"))
    assert a.id_key != b.id_key and a.repo_id != b.repo_id


@pytest.mark.parametrize("size", [4096, 8192, 128 * 1024, 16 * 1024 * 1024])
def test_init_accepts_power_of_two_chunk_sizes(tmp_path, size):
    assert init_repository(str(tmp_path / "r"), size).chunk_size == size
    assert load_config(str(tmp_path / "r")).chunk_size == size


@pytest.mark.parametrize("size", [0, -4096, 1, 2048, 4095, 4097, 3 * 4096, 100_000,
                                  32 * 1024 * 1024])
def test_init_rejects_bad_chunk_sizes(tmp_path, size):
    root = tmp_path / "r"
    with pytest.raises(UsageError, match="power of two"):
        init_repository(str(root), size)
    assert not root.exists()  # nothing created


def test_init_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        init_repository(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"]


def test_init_into_an_existing_empty_directory(tmp_path):
    init_repository(str(tmp_path))
    assert is_repository(str(tmp_path))


def test_init_refuses_an_existing_repository(tmp_path):
    root = str(tmp_path / "r")
    first = init_repository(root)
    with pytest.raises(AlreadyExists, match="already a snapfs repository"):
        init_repository(root)
    assert load_config(root).id_key == first.id_key  # untouched


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "c.json")
    write_json_atomic(path, {"v": 1}, mode=0o600)

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        write_json_atomic(path, {"v": 2}, mode=0o600)
    monkeypatch.undo()
    with open(path) as f:
        assert json.load(f) == {"v": 1}  # never a half-written file


def test_failed_init_can_be_retried(tmp_path, monkeypatch):
    """A disk-full error during init must not leave debris that makes the retry fail with
    'exists and is not empty'."""
    root = str(tmp_path / "r")

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        init_repository(root)
    monkeypatch.undo()
    assert not is_repository(root)
    init_repository(root)  # the retry after freeing space
    assert is_repository(root)


# -- load_config -------------------------------------------------------------------------------


def test_load_config_round_trip(tmp_path):
    root = str(tmp_path / "r")
    made = init_repository(root, 8192)
    loaded = load_config(root)
    assert loaded == made


def test_load_config_missing_says_how_to_create(tmp_path):
    with pytest.raises(NotARepository) as exc:
        load_config(str(tmp_path))
    msg = str(exc.value)
    assert "not a snapfs repository" in msg and "snapfs init" in msg and str(tmp_path) in msg


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"format": 1,', b"\xff\xfe\x00garbage"])
def test_load_config_damaged_json(tmp_path, content):
    root = str(tmp_path / "r")
    init_repository(root)
    with open(os.path.join(root, CONFIG), "wb") as f:
        f.write(content)
    with pytest.raises(FormatError, match="damaged"):
        load_config(root)


@pytest.mark.parametrize("content", ["[]", "null", "1", '"snapfs"'])
def test_load_config_valid_json_but_not_an_object(tmp_path, content):
    """A config that parses as JSON but is not an object is damaged too: FormatError,
    not an AttributeError traceback."""
    root = str(tmp_path / "r")
    init_repository(root)
    with open(os.path.join(root, CONFIG), "w") as f:
        f.write(content)
    with pytest.raises(FormatError):
        load_config(root)


def _rewrite(root: str, **changes) -> None:
    path = os.path.join(root, CONFIG)
    with open(path) as f:
        raw = json.load(f)
    for k, v in changes.items():
        if v is ...:
            raw.pop(k)
        else:
            raw[k] = v
    with open(path, "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("fmt", [0, 3, 99, None, "1"])
def test_load_config_wrong_format_version(tmp_path, fmt):
    root = str(tmp_path / "r")
    init_repository(root)
    _rewrite(root, format=fmt)
    with pytest.raises(FormatError, match="format"):
        load_config(root)


def test_format_1_repositories_keep_hmac_sha256_identities(tmp_path):
    """A repository made before format 2 still opens, and its chunks are still found by
    their HMAC-SHA256 identities (a new hash would make every chunk look new); a new one
    uses keyed BLAKE3."""
    import hmac

    from blake3 import blake3

    from snapfs.repository import Repository

    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    init_repository(old, 4096)
    init_repository(new, 4096)
    _rewrite(old, format=1)
    for root, expect in ((old, lambda key, p: hmac.digest(key, p, "sha256")),
                         (new, lambda key, p: blake3(p, key=key).digest())):
        repo = Repository(root, holder="unit test")
        try:
            payload = b"chunk" * 100
            cid = repo.chunks.put_sync(payload)
            digest = repo.cat.execute("SELECT hash FROM chunks WHERE id=?", (cid,)).fetchone()[0]
            assert digest == expect(repo.config.id_key, payload)
            assert repo.chunks.put_sync(payload) == cid  # deduplicated by that identity
        finally:
            repo.close()


@pytest.mark.parametrize("changes", [
    {"chunk_size": ...}, {"id_key": ...}, {"repo_id": ...},
    {"id_key": "zz-not-hex"}, {"chunk_size": "big"},
])
def test_load_config_missing_or_bad_fields(tmp_path, changes):
    root = str(tmp_path / "r")
    init_repository(root)
    _rewrite(root, **changes)
    with pytest.raises(FormatError, match="damaged"):
        load_config(root)


@pytest.mark.parametrize("size", [0, -1, 1000, 131073, 2**40])
def test_load_config_rejects_an_impossible_chunk_size(tmp_path, size):
    """A damaged chunk_size would make every block offset wrong (silently wrong data, or a
    ZeroDivisionError on the first write): it must be refused like at init."""
    root = str(tmp_path / "r")
    init_repository(root)
    _rewrite(root, chunk_size=size)
    with pytest.raises(FormatError):
        load_config(root)


def test_repository_open_checks_config_before_anything(tmp_path):
    root = str(tmp_path / "r")
    init_repository(root)
    _rewrite(root, format=FORMAT_VERSION + 1)
    with pytest.raises(FormatError):
        Repository(root)
    assert not os.path.exists(os.path.join(root, "meta.db"))  # nothing was touched


# -- parse_size --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("128K", 131072), ("128k", 131072), ("128KB", 131072),
    ("128KiB", 131072), ("1M", 1 << 20), ("1m", 1 << 20), ("16MiB", 16 << 20),
    ("2G", 2 << 30), (" 64K ", 65536), ("0", 0),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "abc", "1.5M", "12T", "K12", "1 2K", "--"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="size"):
        parse_size(text)


# -- the lock ----------------------------------------------------------------------------------


def test_lock_is_exclusive_between_open_files(repo_path):
    paths = RepoPaths(repo_path)
    first = RepoLock(paths)
    first.acquire("the first holder")
    try:
        second = RepoLock(paths)
        with pytest.raises(RepositoryLocked) as exc:
            second.acquire("the second")
        msg = str(exc.value)
        assert "the first holder" in msg and f"pid {os.getpid()}" in msg
        assert "snapfs umount" in msg and "-C MOUNTPOINT" in msg
        assert second.fd == -1
    finally:
        first.release()
    second.acquire("the second")  # free again once released
    second.release()
    second.release()  # idempotent


def test_second_repository_open_is_refused(repo_path):
    with Repository(repo_path, holder="holder one"), pytest.raises(RepositoryLocked,
                                                                   match="holder one"):
        Repository(repo_path, holder="holder two")
    Repository(repo_path).close()


_HOLDER = textwrap.dedent("""
    import sys, time
    from snapfs.store.repo import RepoLock, RepoPaths
    lock = RepoLock(RepoPaths(sys.argv[1]))
    lock.acquire("a test daemon")
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_held_by_another_process_and_released_when_it_dies(repo_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, repo_path],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        lock = RepoLock(RepoPaths(repo_path))
        with pytest.raises(RepositoryLocked) as exc:
            lock.acquire("me")
        assert f"a test daemon (pid {proc.pid})" in str(exc.value)
        with pytest.raises(RepositoryLocked):
            Repository(repo_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        lock.acquire("me")  # the kernel dropped the dead holder's lock: no stale lock
        lock.release()
        Repository(repo_path).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_init_after_a_killed_init_goes_ahead(tmp_path):
    """A kill between making packs/ and renaming the configuration into place leaves an
    empty packs/ and maybe a temporary configuration, and no cleanup ran: the retry (say
    `make run` again) must not answer 'not empty'. Anything else still refuses."""
    root = tmp_path / "r"
    (root / "packs").mkdir(parents=True)
    (root / "snapfs.json.tmp4242").write_text('{"half": ')
    init_repository(str(root))
    assert is_repository(str(root))
    assert sorted(os.listdir(root)) == ["packs", "snapfs.json"]
    other = tmp_path / "o"
    (other / "packs").mkdir(parents=True)
    (other / "packs" / "00000001.pack").write_bytes(b"data")
    with pytest.raises(UsageError, match="not empty"):
        init_repository(str(other))
