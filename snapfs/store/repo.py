"""The repository directory: layout, configuration and the single-writer lock.

Layout::

    REPO/snapfs.json    configuration: format version, chunk size, id key, crypto params
    REPO/meta.db        the catalog (SQLite, WAL) -- see graph/catalog.py for the schema
    REPO/packs/         append-only pack files (store/packs.py)
    REPO/lock           flock()ed by the one process that may write (a mount or a CLI)
    REPO/snapfs.pid     pid of the mounted daemon
    REPO/snapfs.sock    the daemon's control socket (CLI commands against a mount)
    REPO/snapfs.log     the daemon's log

The configuration is written once at init (atomically: temp file, fsync, rename) and
read at every open; its format number is checked before anything else is touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
from dataclasses import dataclass

from snapfs import FORMAT_VERSION, READABLE_FORMATS
from snapfs.errors import AlreadyExists, FormatError, NotARepository, RepositoryLocked, UsageError

CONFIG = "snapfs.json"
DEFAULT_CHUNK_SIZE = 128 * 1024
MIN_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 16 * 1024 * 1024


@dataclass
class RepoConfig:
    format: int
    chunk_size: int
    repo_id: str
    id_key: bytes  # keys the chunk identities (keyed hash of the plaintext)
    encryption: dict | None = None

    @property
    def id_hash(self) -> str:
        """The keyed hash of chunk identities, fixed by the format at init: changing it
        would make every stored chunk look new to deduplication."""
        return "hmac-sha256" if self.format == 1 else "blake3"

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "chunk_size": self.chunk_size,
            "repo_id": self.repo_id,
            "id_key": self.id_key.hex(),
            "encryption": self.encryption,
        }


class RepoPaths:
    """Names of everything inside a repository directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.config = os.path.join(self.root, CONFIG)
        self.db = os.path.join(self.root, "meta.db")
        self.packs = os.path.join(self.root, "packs")
        self.lock = os.path.join(self.root, "lock")
        self.pid = os.path.join(self.root, "snapfs.pid")
        self.sock = os.path.join(self.root, "snapfs.sock")
        self.log = os.path.join(self.root, "snapfs.log")
        self.intent = os.path.join(self.root, "intent.log")


def parse_size(text: str) -> int:
    """'128K', '1M', '4096' -> bytes."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in "KMG" else (t, "")
    try:
        return int(num) * units[unit]
    except ValueError:
        raise UsageError(f"cannot read size {text!r}: use a number with an optional K, M or G")


def is_repository(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def valid_chunk_size(chunk_size: int) -> bool:
    return (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
            and not chunk_size & (chunk_size - 1))


def init_repository(root: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    encryption: dict | None = None) -> RepoConfig:
    """Create the directory skeleton and configuration (the catalog is created on open).

    encryption, for an encrypted repository, is {"scheme": "aes-256-gcm", "wrapped": ...}:
    the master secret wrapped by a passphrase or key file. Its keys (the chunk identity
    key among them) are derived from the master, so no key is stored in clear.
    """
    if not valid_chunk_size(chunk_size):
        raise UsageError(
            f"chunk size {chunk_size} must be a power of two between "
            f"{MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        )
    paths = RepoPaths(root)
    if os.path.exists(paths.config):
        raise AlreadyExists(f"{paths.root} is already a snapfs repository")
    if os.path.isdir(paths.root) and not _init_leftovers_only(paths):
        raise UsageError(f"{paths.root} exists and is not empty: choose an empty or new directory")
    created_root = not os.path.isdir(paths.root)
    id_key = b"" if encryption else secrets.token_bytes(32)
    config = RepoConfig(FORMAT_VERSION, chunk_size, secrets.token_hex(16), id_key, encryption)
    try:
        os.makedirs(paths.packs, exist_ok=True)
        # the catalog holds every name, xattr and symlink target, and an unencrypted
        # pack holds file contents: only the owner may open anything in here, whatever
        # the permissions inside the filesystem say (as borg's and restic's repositories)
        os.chmod(paths.root, 0o700)
        for name in os.listdir(paths.root):  # a killed init's temporary configuration
            if _is_config_temp(paths, name):
                os.unlink(os.path.join(paths.root, name))
        write_json_atomic(paths.config, config.to_json(), mode=0o600)
    except BaseException:
        # leave nothing behind that would make a retry fail ("not empty")
        for name in os.listdir(paths.root) if os.path.isdir(paths.root) else ():
            full = os.path.join(paths.root, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.unlink(full)
        if created_root:
            os.rmdir(paths.root)
        raise
    return config


def _init_leftovers_only(paths: RepoPaths) -> bool:
    """Whether the directory holds nothing, or only what an init killed before it wrote
    the configuration leaves (an empty packs/, a temporary configuration; a killed init
    cannot clean up after itself as a failed one does): then init may go ahead."""
    for name in os.listdir(paths.root):
        full = os.path.join(paths.root, name)
        if full == paths.packs and os.path.isdir(full) and not os.listdir(full):
            continue
        if _is_config_temp(paths, name) and os.path.isfile(full):
            continue
        return False
    return True


def _is_config_temp(paths: RepoPaths, name: str) -> bool:
    """A temporary file of write_json_atomic writing the configuration."""
    return name.startswith(os.path.basename(paths.config) + ".tmp")


def load_config(root: str) -> RepoConfig:
    paths = RepoPaths(root)
    try:
        with open(paths.config) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise NotARepository(f"{paths.root} is not a snapfs repository (no {CONFIG}); "
                             f"create one with `snapfs init {root}`")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{paths.config} is damaged ({e}); the repository cannot be opened")
    if not isinstance(raw, dict):
        raise FormatError(f"{paths.config} is damaged (not a JSON object)")
    fmt = raw.get("format")
    if fmt not in READABLE_FORMATS:
        raise FormatError(f"{paths.root} has format {fmt}; this snapfs reads formats "
                          f"{', '.join(map(str, READABLE_FORMATS))}")
    try:
        config = RepoConfig(fmt, int(raw["chunk_size"]), raw["repo_id"],
                            bytes.fromhex(raw["id_key"]), raw.get("encryption"))
    except (KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{paths.config} is damaged (field {e})")
    if not valid_chunk_size(config.chunk_size):
        raise FormatError(f"{paths.config} is damaged (chunk size {config.chunk_size})")
    return config


def write_json_atomic(path: str, value: dict, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, json.dumps(value, indent=2).encode() + b"\n")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RepoLock:
    """flock on REPO/lock: one writer (a mount or a CLI command) at a time.

    The kernel drops the lock when the holder dies, so a SIGKILLed daemon never leaves a
    stale lock behind. The file records who holds it, for the error message.
    """

    def __init__(self, paths: RepoPaths) -> None:
        self.paths = paths
        self.fd = -1

    def acquire(self, holder: str) -> None:
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RepositoryLocked(
                f"repository {self.paths.root} is in use by {who}; unmount it first "
                f"(`snapfs umount MOUNTPOINT`) or run the command against the mount (-C MOUNTPOINT)"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
