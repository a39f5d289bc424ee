"""The repository key hierarchy: master secret, derived keys, wrapping, key files.

Why a hierarchy: the data never depends on how the user unlocks the repository. A random
32-byte master secret is generated once at ``init --encrypt``; every working key is
derived from it with HKDF-SHA256 under a distinct label, so that each key has one job:

    data_key  AES-256-GCM of chunks                       (Aead(keys.data_key).seal)
    meta_key  AES-256-GCM of symlink targets, xattrs,
              site keys held by the repository             (random nonces)
    name_key  deterministic AES-256-GCM of file names      (Aead(keys.name_key).seal_det)
    id_key    key of chunk identities (keyed BLAKE3): dedup works, but equality of
              plaintext is invisible without the key

The master is stored only wrapped (AES-256-GCM) under a key derived from the user's
passphrase with scrypt (parameters stored beside it, tuned to about 0.5 s) or from a key
file with HKDF. Changing the passphrase or key file (``snapfs key change``) rewraps the
same master: nothing else is rewritten, as with ZFS ``change-key``.

The wrapped form is a JSON-able dict (for snapfs.json)::

    {"format": "snapfs-wrapped-key", "version": 1, "kdf": "scrypt",
     "n": 131072, "r": 8, "p": 1, "salt": HEX, "nonce": HEX, "ciphertext": HEX}

    {"format": "snapfs-wrapped-key", "version": 1, "kdf": "keyfile",
     "salt": HEX, "nonce": HEX, "ciphertext": HEX}

Everything except nonce and ciphertext is bound into the GCM associated data, so edited
parameters fail like a wrong passphrase. Parameters read back are range-checked before
scrypt runs (a forged n = 2**40 must not allocate a terabyte).

Environment:

    SNAPFS_PASSPHRASE     the passphrase (for scripts and tests; visible in /proc to the
                          same user, so prefer the fd on shared machines)
    SNAPFS_PASSPHRASE_FD  a file descriptor number to read the passphrase from (one line)
    SNAPFS_SCRYPT_N       makes tune_scrypt return this n (power of two >= 2, written
                          4096, 0x1000 or 2**12) without measuring. For tests and CI
                          only: 4096 unwraps in ~16 ms and is correspondingly weak.
                          Stored parameters are always used as stored when unwrapping.

Nothing here logs, and no exception message contains key material or passphrases.
"""

from __future__ import annotations

import errno as _errno
import getpass
import hmac
import json
import os
import re
import secrets
import stat
import sys
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from snapfs.crypto.aead import KEY_SIZE, NONCE_SIZE, hkdf
from snapfs.errors import (
    AlreadyExists,
    FormatError,
    NotFound,
    Refused,
    SnapfsError,
    UsageError,
)

MASTER_SIZE = 32
SALT_SIZE = 16
WRAPPED_FORMAT = "snapfs-wrapped-key"
WRAPPED_VERSION = 1
KDF_SCRYPT = "scrypt"
KDF_KEYFILE = "keyfile"

MAX_SCRYPT_MEMORY = 1 << 30  # 128 * n * r * p bytes; the clamp of tune_scrypt and unwrap
MIN_TUNED_N = 1 << 14  # the floor of a measured tuning (scrypt paper's interactive value)
KEY_FILE_MAX_SIZE = 4096

ENV_PASSPHRASE = "SNAPFS_PASSPHRASE"
ENV_PASSPHRASE_FD = "SNAPFS_PASSPHRASE_FD"
ENV_SCRYPT_N = "SNAPFS_SCRYPT_N"

_INFO_DATA = b"snapfs/v1/key/data"
_INFO_META = b"snapfs/v1/key/metadata"
_INFO_NAME = b"snapfs/v1/key/names"
_INFO_ID = b"snapfs/v1/key/chunk-identity"
_INFO_KEYFILE_WRAP = b"snapfs/v1/wrap/keyfile"
_AAD_WRAP = b"snapfs/v1/wrapped-master\x00"

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class WrongKey(SnapfsError):
    """The passphrase, key file or site key does not open what it was given for."""

    exit_code = 13
    errno = _errno.EACCES


# -- derived keys ------------------------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    """The working keys of an encrypted repository (repr never shows them)."""

    data_key: bytes = field(repr=False)
    meta_key: bytes = field(repr=False)
    name_key: bytes = field(repr=False)
    id_key: bytes = field(repr=False)


def new_master() -> bytes:
    """A fresh random master secret (once per repository, at init)."""
    return secrets.token_bytes(MASTER_SIZE)


def derive(master: bytes) -> Keys:
    """The working keys for a master secret (HKDF-SHA256, one label per key)."""
    if len(master) != MASTER_SIZE:
        raise ValueError(f"master secret must be {MASTER_SIZE} bytes")
    return Keys(
        data_key=hkdf(master, _INFO_DATA),
        meta_key=hkdf(master, _INFO_META),
        name_key=hkdf(master, _INFO_NAME),
        id_key=hkdf(master, _INFO_ID),
    )


# -- scrypt parameters -------------------------------------------------------------------
@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost parameters; memory used is 128 * n * r * p bytes."""

    n: int
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        for name in ("n", "r", "p"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"scrypt {name} must be an integer")
        if self.n < 2 or self.n & (self.n - 1):
            raise ValueError(f"scrypt n must be a power of two >= 2, got {self.n}")
        if not 1 <= self.r <= 64 or not 1 <= self.p <= 16:
            raise ValueError(f"scrypt r={self.r}, p={self.p} out of range")
        if self.memory > MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"scrypt n={self.n}, r={self.r}, p={self.p} needs {self.memory >> 20} MiB, "
                f"more than the {MAX_SCRYPT_MEMORY >> 20} MiB limit")

    @property
    def memory(self) -> int:
        return 128 * self.n * self.r * self.p

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        return Scrypt(salt=salt, length=KEY_SIZE, n=self.n, r=self.r, p=self.p).derive(
            passphrase)


def tune_scrypt(target_seconds: float = 0.5, *, r: int = 8, p: int = 1,
                max_memory: int = MAX_SCRYPT_MEMORY) -> ScryptParams:
    """scrypt parameters that take about target_seconds on this machine.

    n is doubled from 2**14 while the next doubling would land closer (in ratio) to the
    target than the current one, measuring each step (cost is linear in n, so this
    spends about twice the target in total), and clamped so 128*n*r*p <= max_memory.
    SNAPFS_SCRYPT_N short-cuts the measurement (tests, CI).
    """
    forced = os.environ.get(ENV_SCRYPT_N)
    if forced:
        try:
            power = re.fullmatch(r"\s*2\s*\*\*\s*(\d{1,2})\s*", forced)
            return ScryptParams(2 ** int(power[1]) if power else int(forced, 0), r, p)
        except ValueError as exc:
            raise UsageError(f"{ENV_SCRYPT_N}={forced!r}: {exc}") from None
    max_memory = min(max_memory, MAX_SCRYPT_MEMORY)
    salt = secrets.token_bytes(SALT_SIZE)
    n = MIN_TUNED_N
    while True:
        started = time.perf_counter()
        ScryptParams(n, r, p).derive(b"snapfs scrypt tuning", salt)
        elapsed = time.perf_counter() - started
        if 128 * 2 * n * r * p > max_memory or 2 * elapsed > target_seconds * 2 ** 0.5:
            return ScryptParams(n, r, p)
        n *= 2


# -- wrapping ----------------------------------------------------------------------------
def _wrap_aad(header: Mapping[str, Any]) -> bytes:
    return _AAD_WRAP + json.dumps(dict(header), sort_keys=True, separators=(",", ":")).encode()


def _seal_master(master: bytes, wrapping_key: bytes, header: dict[str, Any]) -> dict[str, Any]:
    if len(master) != MASTER_SIZE:
        raise ValueError(f"master secret must be {MASTER_SIZE} bytes")
    nonce = secrets.token_bytes(NONCE_SIZE)
    ciphertext = AESGCM(wrapping_key).encrypt(nonce, master, _wrap_aad(header))
    return {**header, "nonce": nonce.hex(), "ciphertext": ciphertext.hex()}


def wrap_with_passphrase(master: bytes, passphrase: bytes, params: ScryptParams) -> dict:
    """The master sealed under scrypt(passphrase) with a fresh salt."""
    if not passphrase:
        raise UsageError("the passphrase must not be empty")
    salt = secrets.token_bytes(SALT_SIZE)
    header = {"format": WRAPPED_FORMAT, "version": WRAPPED_VERSION, "kdf": KDF_SCRYPT,
              "n": params.n, "r": params.r, "p": params.p, "salt": salt.hex()}
    return _seal_master(master, params.derive(passphrase, salt), header)


def wrap_with_key_file(master: bytes, key_file_secret: bytes) -> dict:
    """The master sealed under HKDF(key file secret): no scrypt, the secret is random."""
    if len(key_file_secret) != KEY_SIZE:
        raise ValueError(f"a key file secret is {KEY_SIZE} bytes")
    salt = secrets.token_bytes(SALT_SIZE)
    header = {"format": WRAPPED_FORMAT, "version": WRAPPED_VERSION, "kdf": KDF_KEYFILE,
              "salt": salt.hex()}
    return _seal_master(master, _keyfile_wrapping_key(key_file_secret, salt), header)


def _keyfile_wrapping_key(secret: bytes, salt: bytes) -> bytes:
    return hkdf(secret, _INFO_KEYFILE_WRAP, salt=salt)


def wrapped_kdf(wrapped: Mapping[str, Any]) -> str:
    """"scrypt" or "keyfile": tells the CLI whether to ask for a passphrase or a key file."""
    kdf = wrapped.get("kdf") if isinstance(wrapped, Mapping) else None
    if kdf not in (KDF_SCRYPT, KDF_KEYFILE):
        raise FormatError("wrapped repository key: unknown key derivation")
    return kdf


def _hex_field(wrapped: Mapping[str, Any], name: str) -> bytes:
    value = wrapped.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        return bytes.fromhex(value)
    except ValueError:
        raise FormatError(f"wrapped repository key: field {name!r} is missing or not hex")


def unwrap(wrapped: Mapping[str, Any], secret: bytes) -> bytes:
    """The master secret, given the passphrase (kdf "scrypt") or the key file's secret
    (kdf "keyfile"). WrongKey when authentication fails: a wrong passphrase or key file
    cannot be told apart from an edited wrapped key, and both must stop before mount."""
    if not isinstance(wrapped, Mapping) or wrapped.get("format") != WRAPPED_FORMAT:
        raise FormatError("wrapped repository key: not a snapfs wrapped key")
    if wrapped.get("version") != WRAPPED_VERSION:
        raise FormatError(
            f"wrapped repository key: version {wrapped.get('version')!r} is not supported")
    kdf = wrapped_kdf(wrapped)
    salt = _hex_field(wrapped, "salt")
    nonce = _hex_field(wrapped, "nonce")
    ciphertext = _hex_field(wrapped, "ciphertext")
    if len(salt) != SALT_SIZE or len(nonce) != NONCE_SIZE or len(ciphertext) != MASTER_SIZE + 16:
        raise FormatError("wrapped repository key: field sizes are wrong")
    header: dict[str, Any] = {"format": WRAPPED_FORMAT, "version": WRAPPED_VERSION,
                              "kdf": kdf, "salt": wrapped["salt"]}
    if kdf == KDF_SCRYPT:
        try:
            params = ScryptParams(wrapped.get("n"), wrapped.get("r"), wrapped.get("p"))
        except ValueError as exc:
            raise FormatError(f"wrapped repository key: {exc}") from None
        header.update(n=params.n, r=params.r, p=params.p)
        wrapping_key = params.derive(secret, salt)
    else:
        if len(secret) != KEY_SIZE:
            raise WrongKey("wrong passphrase or key file (this repository needs a key file)")
        wrapping_key = _keyfile_wrapping_key(secret, salt)
    try:
        return AESGCM(wrapping_key).decrypt(nonce, ciphertext, _wrap_aad(header))
    except InvalidTag:
        raise WrongKey("wrong passphrase or key file") from None


def rewrap(wrapped: Mapping[str, Any], old_secret: bytes, new_secret: bytes, *,
           kdf: str | None = None, params: ScryptParams | None = None) -> dict:
    """``snapfs key change``: the same master under a new passphrase or key file.

    kdf is the new kind ("scrypt" or "keyfile"; default: the old kind). For scrypt, params
    default to the old parameters when the old kind was scrypt, else tune_scrypt(). Salt
    and nonce are always fresh. The master never changes, so no data is rewritten.
    """
    master = unwrap(wrapped, old_secret)
    kdf = kdf or wrapped_kdf(wrapped)
    if kdf == KDF_KEYFILE:
        return wrap_with_key_file(master, new_secret)
    if kdf != KDF_SCRYPT:
        raise ValueError(f"unknown kdf {kdf!r}")
    if params is None:
        if wrapped_kdf(wrapped) == KDF_SCRYPT:
            params = ScryptParams(wrapped["n"], wrapped["r"], wrapped["p"])
        else:
            params = tune_scrypt()
    return wrap_with_passphrase(master, new_secret, params)


# -- key files ---------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _os_error(path: str, exc: OSError) -> SnapfsError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{path}: no such directory")
    if isinstance(exc, PermissionError):
        return Refused(f"{path}: permission denied")
    return SnapfsError(f"{path}: cannot write: {exc.strerror or exc}")


def write_private_file(path: str, data: bytes, what: str = "key file") -> None:
    """Create path with mode 0600 holding data, atomically, never replacing a file.

    The data is written to a 0600 temporary file in the same directory, fsynced, then
    hard-linked to path (link fails if path exists, so nothing is ever overwritten and
    path appears complete or not at all). Filesystems without hard links fall back to
    O_CREAT|O_EXCL on path itself.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.lexists(path):
        raise AlreadyExists(f"{path} already exists: refusing to overwrite a {what}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits; be exact anyway
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise AlreadyExists(f"{path} already exists: refusing to overwrite a {what}") from None
        except OSError as exc:
            if exc.errno not in (_errno.EPERM, _errno.ENOTSUP, _errno.EOPNOTSUPP,
                                 _errno.EMLINK, _errno.ENOSYS):
                raise _os_error(path, exc) from None
            _write_exclusive(path, data, what)
    except OSError as exc:
        raise _os_error(path, exc) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _fsync_dir(directory)


def _write_exclusive(path: str, data: bytes, what: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists: refusing to overwrite a {what}") from None
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def read_private_file(path: str, what: str = "key file", *, check_mode: bool = True,
                      max_size: int = KEY_FILE_MAX_SIZE) -> bytes:
    """The bytes of a small secret file, refusing one that others may read (as ssh does)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except PermissionError:
        raise Refused(f"{what} {path}: permission denied") from None
    except OSError as exc:
        raise SnapfsError(f"{what} {path}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if check_mode and st.st_mode & 0o077:
            raise Refused(
                f"{what} {path} is accessible by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        if st.st_size > max_size:
            raise UsageError(f"{path} is not a snapfs {what} (too large)")
        data = os.read(fd, max_size + 1)
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise UsageError(f"{path} is not a snapfs {what} (too large)")
    return data


def create_key_file(path: str) -> bytes:
    """Write a new key file (32 random bytes as 64 hex digits and a newline, mode 0600,
    refusing to overwrite anything) and return its secret."""
    secret = secrets.token_bytes(KEY_SIZE)
    write_private_file(path, secret.hex().encode() + b"\n", "key file")
    return secret


def read_key_file(path: str, *, check_mode: bool = True) -> bytes:
    """The 32-byte secret of a key file written by :func:`create_key_file`."""
    data = read_private_file(path, "key file", check_mode=check_mode)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not _HEX64.fullmatch(text):
        hint = " (it looks like a site key file)" if b"snapfs-site-key" in data else ""
        # Never quote the content: it may be key material of another kind.
        raise UsageError(
            f"{path} is not a snapfs key file: expected 64 hexadecimal digits{hint}")
    return bytes.fromhex(text)


# -- passphrase input --------------------------------------------------------------------
def _normalize(passphrase: str, source: str) -> bytes:
    # NFC so that the same passphrase typed through different input methods matches.
    if not passphrase:
        raise UsageError(f"empty passphrase from {source}")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _read_fd_line(fd: int, limit: int = 65536) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        block = os.read(fd, 4096)
        if not block:
            break
        chunks.append(block)
        size += len(block)
        if b"\n" in block:
            break
    data = b"".join(chunks)
    line, _, _ = data.partition(b"\n")
    return line[:-1] if line.endswith(b"\r") else line


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False


def get_passphrase(prompt: str = "Passphrase: ", confirm: bool = False, *,
                   env: str = ENV_PASSPHRASE, fd_env: str = ENV_PASSPHRASE_FD) -> bytes:
    """The passphrase as UTF-8 bytes (NFC), from, in order: the environment variable env,
    a file descriptor named by fd_env (first line), or the terminal (getpass, asked twice
    when confirm). Never from a command-line argument: those are visible to every user in
    ps. UsageError when no source is available (no variable, stdin not a terminal).

    ``snapfs key change`` reads the new passphrase with env="SNAPFS_NEW_PASSPHRASE",
    fd_env="SNAPFS_NEW_PASSPHRASE_FD".
    """
    value = os.environ.get(env)
    if value is not None:
        return _normalize(value, env)
    fd_text = os.environ.get(fd_env)
    if fd_text is not None:
        try:
            fd = int(fd_text)
            if fd < 0:
                raise ValueError
        except ValueError:
            raise UsageError(f"{fd_env}={fd_text!r} is not a file descriptor number") from None
        try:
            raw = _read_fd_line(fd)
        except OSError as exc:
            raise UsageError(f"cannot read the passphrase from fd {fd} ({fd_env}): "
                             f"{exc.strerror or exc}") from None
        try:
            return _normalize(raw.decode("utf-8"), f"fd {fd}")
        except UnicodeDecodeError:
            raise UsageError(f"the passphrase read from fd {fd} is not UTF-8") from None
    if not _stdin_is_tty():
        raise UsageError(
            f"a passphrase is needed: set {env} or {fd_env}, or run on a terminal")
    first = getpass.getpass(prompt)
    if confirm:
        again = getpass.getpass("Repeat " + prompt[:1].lower() + prompt[1:])
        if not hmac.compare_digest(first.encode("utf-8"), again.encode("utf-8")):
            raise UsageError("the passphrases do not match")
    return _normalize(first, "the terminal")
