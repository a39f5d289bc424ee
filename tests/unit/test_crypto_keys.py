"""The key hierarchy: derivation, passphrase and key-file wrapping, rewrapping, key files,
scrypt tuning and passphrase input (snapfs/crypto/keys.py)."""

from __future__ import annotations

import io
import os
import stat
import sys
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from snapfs.crypto import keys
from snapfs.crypto.keys import (
    ScryptParams,
    WrongKey,
    create_key_file,
    derive,
    get_passphrase,
    new_master,
    read_key_file,
    rewrap,
    tune_scrypt,
    unwrap,
    wrap_with_key_file,
    wrap_with_passphrase,
)
from snapfs.errors import AlreadyExists, FormatError, NotFound, Refused, SnapfsError, UsageError

FAST = ScryptParams(2 ** 10)  # tests only: ~4 ms
MASTER = bytes(range(100, 132))
PASSPHRASE = b"correct horse"
KEYFILE_SECRET = bytes(range(200, 232))

# Checked-in wrapped keys: unwrap must keep reading these forever (format vectors).
WRAPPED_SCRYPT = {
    "format": "snapfs-wrapped-key", "version": 1, "kdf": "scrypt", "n": 16, "r": 8, "p": 1,
    "salt": "a18412ea845569e48a4227ff7381d10a", "nonce": "ab16525fb360b76deb72d766",
    "ciphertext": "99054c548fbde6cb561b2c91fd50f903a5cfd358b22add66e0b30be10576ca832ae79956"
                  "8335b369666382a6d3128b45",
}
WRAPPED_KEYFILE = {
    "format": "snapfs-wrapped-key", "version": 1, "kdf": "keyfile",
    "salt": "573f5bf63af9d4de1dd9aa5607b6dedf", "nonce": "c19f86ca1fcd55f79539488e",
    "ciphertext": "e1972d16d60f31a89d671879608ae40dadc4efa7c2c8297d02d66d28f7e75fa13c11ba05"
                  "fa315bc80bcbd17ae2a3bed8",
}
DERIVED = {  # derive(bytes(range(32)))
    "data_key": "ba6a9150b12d147bef27833e19bc0a3b9c3c3b9505ef8ea6e5ba0da1bd62cabe",
    "meta_key": "cd4acf477059ad67e68659292b52d5eebc46b2d7e77b60c05bda2a9baba77989",
    "name_key": "58536f0c42e2b41b76a14078413c889b9bb0920d8ff39a1b5fe0a9f692ddec56",
    "id_key": "0d2fbceedec3c845f524ab5a030cdd30affa55f3e96c3506b585aaba7fb5cb97",
}


def assert_no_secret(exc: BaseException, *secrets: bytes) -> None:
    text = str(exc) + repr(exc)
    for secret in secrets:
        assert secret.hex() not in text.lower()
        assert repr(secret) not in text
        try:
            assert secret.decode() not in text
        except UnicodeDecodeError:
            pass


# -- derivation --------------------------------------------------------------------------
def test_derive_known_answers():
    master = bytes(range(32))
    derived = derive(master)
    labels = {"data_key": b"snapfs/v1/key/data", "meta_key": b"snapfs/v1/key/metadata",
              "name_key": b"snapfs/v1/key/names", "id_key": b"snapfs/v1/key/chunk-identity"}
    for name, hexkey in DERIVED.items():
        assert getattr(derived, name).hex() == hexkey
        reference = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                         info=labels[name]).derive(master)
        assert getattr(derived, name) == reference
    assert len(set(DERIVED.values())) == 4


def test_keys_are_never_shown():
    derived = derive(new_master())
    text = repr(derived) + str(derived)
    for value in (derived.data_key, derived.meta_key, derived.name_key, derived.id_key):
        assert value.hex() not in text and repr(value) not in text


def test_new_master_is_random():
    masters = {new_master() for _ in range(100)}
    assert len(masters) == 100 and all(len(m) == 32 for m in masters)


# -- passphrase wrapping -----------------------------------------------------------------
def test_wrap_unwrap_passphrase():
    wrapped = wrap_with_passphrase(MASTER, PASSPHRASE, FAST)
    assert wrapped["kdf"] == "scrypt" and wrapped["n"] == FAST.n
    assert unwrap(wrapped, PASSPHRASE) == MASTER
    # JSON-able, fresh salt and nonce each time.
    import json
    assert unwrap(json.loads(json.dumps(wrapped)), PASSPHRASE) == MASTER
    again = wrap_with_passphrase(MASTER, PASSPHRASE, FAST)
    assert again["salt"] != wrapped["salt"] and again["ciphertext"] != wrapped["ciphertext"]
    assert MASTER.hex() not in json.dumps(wrapped)


def test_checked_in_vectors_still_unwrap():
    assert unwrap(WRAPPED_SCRYPT, PASSPHRASE) == MASTER
    assert unwrap(WRAPPED_KEYFILE, KEYFILE_SECRET) == MASTER


def test_wrong_passphrase():
    wrapped = wrap_with_passphrase(MASTER, PASSPHRASE, FAST)
    with pytest.raises(WrongKey, match="wrong passphrase or key file") as info:
        unwrap(wrapped, b"correct horse battery")
    assert info.value.exit_code == 13 and isinstance(info.value, SnapfsError)
    assert_no_secret(info.value, MASTER, PASSPHRASE, b"correct horse battery")
    with pytest.raises(WrongKey):
        unwrap(wrapped, KEYFILE_SECRET)


@pytest.mark.parametrize("field, value", [
    ("n", 32), ("r", 4), ("p", 2), ("salt", "00" * 16), ("nonce", "00" * 12),
    ("ciphertext", "00" * 48),
])
def test_edited_wrapped_key_fails_like_a_wrong_passphrase(field, value):
    wrapped = dict(WRAPPED_SCRYPT)
    wrapped[field] = value
    with pytest.raises(WrongKey) as info:
        unwrap(wrapped, PASSPHRASE)
    assert_no_secret(info.value, MASTER, PASSPHRASE)


def test_every_bit_of_the_wrapped_ciphertext_is_authenticated():
    raw = bytes.fromhex(WRAPPED_KEYFILE["ciphertext"])
    for bit in range(len(raw) * 8):
        b = bytearray(raw)
        b[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WrongKey):
            unwrap({**WRAPPED_KEYFILE, "ciphertext": b.hex()}, KEYFILE_SECRET)


@pytest.mark.parametrize("edit", [
    {"n": 2 ** 40},            # would need 128 TiB: refused before scrypt runs
    {"n": 1000},               # not a power of two
    {"n": "16"}, {"r": None}, {"n": True},
    {"salt": "zz"}, {"salt": "00"}, {"nonce": None}, {"ciphertext": "00" * 10},
    {"format": "something"}, {"version": 2}, {"kdf": "argon2"},
])
def test_malformed_wrapped_key(edit):
    started = time.perf_counter()
    with pytest.raises(FormatError) as info:
        unwrap({**WRAPPED_SCRYPT, **edit}, PASSPHRASE)
    assert time.perf_counter() - started < 1
    assert_no_secret(info.value, MASTER, PASSPHRASE)


def test_empty_passphrase_refused():
    with pytest.raises(UsageError):
        wrap_with_passphrase(MASTER, b"", FAST)


# -- key file wrapping and rewrapping ----------------------------------------------------
def test_wrap_unwrap_key_file():
    secret = os.urandom(32)
    wrapped = wrap_with_key_file(MASTER, secret)
    assert wrapped["kdf"] == "keyfile" and "n" not in wrapped
    assert unwrap(wrapped, secret) == MASTER
    with pytest.raises(WrongKey) as info:
        unwrap(wrapped, os.urandom(32))
    assert_no_secret(info.value, MASTER, secret)
    with pytest.raises(WrongKey):
        unwrap(wrapped, PASSPHRASE)  # a passphrase given where a key file is needed


def test_rewrap_keeps_the_master():
    first = wrap_with_passphrase(MASTER, PASSPHRASE, FAST)
    second = rewrap(first, PASSPHRASE, b"new passphrase")
    assert (second["n"], second["r"], second["p"]) == (first["n"], first["r"], first["p"])
    assert second["salt"] != first["salt"]
    assert unwrap(second, b"new passphrase") == MASTER
    with pytest.raises(WrongKey):
        unwrap(second, PASSPHRASE)
    # passphrase -> key file -> passphrase
    secret = os.urandom(32)
    third = rewrap(second, b"new passphrase", secret, kdf="keyfile")
    assert third["kdf"] == "keyfile" and unwrap(third, secret) == MASTER
    fourth = rewrap(third, secret, b"back to a passphrase", kdf="scrypt",
                    params=ScryptParams(2 ** 8))
    assert fourth["n"] == 2 ** 8 and unwrap(fourth, b"back to a passphrase") == MASTER
    # The working keys, hence all the data, are unchanged.
    assert derive(unwrap(fourth, b"back to a passphrase")) == derive(MASTER)


def test_rewrap_refuses_a_wrong_old_secret():
    wrapped = wrap_with_passphrase(MASTER, PASSPHRASE, FAST)
    with pytest.raises(WrongKey):
        rewrap(wrapped, b"guess", b"new")


def test_rewrap_from_key_file_to_passphrase_tunes(monkeypatch):
    monkeypatch.setenv("SNAPFS_SCRYPT_N", "512")
    secret = os.urandom(32)
    wrapped = rewrap(wrap_with_key_file(MASTER, secret), secret, b"pw", kdf="scrypt")
    assert wrapped["n"] == 512 and unwrap(wrapped, b"pw") == MASTER


# -- scrypt parameters -------------------------------------------------------------------
def test_scrypt_params_validation():
    assert ScryptParams(2 ** 20).memory == 1 << 30  # the largest allowed with r=8
    for bad in (dict(n=2 ** 21), dict(n=3), dict(n=1), dict(n=2 ** 14, r=0),
                dict(n=2 ** 14, p=0), dict(n=2 ** 19, r=8, p=4)):
        with pytest.raises(ValueError):
            ScryptParams(**bad)


def test_tune_scrypt_env_fast_path(monkeypatch):
    monkeypatch.setenv("SNAPFS_SCRYPT_N", "4096")
    assert tune_scrypt() == ScryptParams(4096, 8, 1)
    monkeypatch.setenv("SNAPFS_SCRYPT_N", "0x1000")
    assert tune_scrypt().n == 4096
    monkeypatch.setenv("SNAPFS_SCRYPT_N", "2**12")
    assert tune_scrypt().n == 4096
    for bad in ("4000", "lots", "0", str(2 ** 30), "2**30", "3**4"):
        monkeypatch.setenv("SNAPFS_SCRYPT_N", bad)
        with pytest.raises(UsageError, match="SNAPFS_SCRYPT_N"):
            tune_scrypt()


def test_tune_scrypt_measures(monkeypatch):
    monkeypatch.delenv("SNAPFS_SCRYPT_N", raising=False)
    started = time.perf_counter()
    params = tune_scrypt(target_seconds=0.001)  # below the floor: one measurement
    assert params == ScryptParams(2 ** 14, 8, 1)
    assert time.perf_counter() - started < 2
    # The memory clamp wins over the time target.
    assert tune_scrypt(target_seconds=1000, max_memory=32 << 20).n == 2 ** 15


def test_tune_scrypt_doubles_towards_the_target(monkeypatch):
    monkeypatch.delenv("SNAPFS_SCRYPT_N", raising=False)
    seconds_per_n = 0.5 / 2 ** 17  # pretend 2**17 takes exactly the target
    clock = [0.0]

    def fake_derive(self, passphrase, salt):
        clock[0] += self.n * seconds_per_n
        return bytes(32)

    monkeypatch.setattr(ScryptParams, "derive", fake_derive)
    monkeypatch.setattr(keys.time, "perf_counter", lambda: clock[0])
    assert tune_scrypt(0.5).n == 2 ** 17
    assert tune_scrypt(0.7).n == 2 ** 17   # 2**18 = 1.0 s is further in ratio
    assert tune_scrypt(0.75).n == 2 ** 18
    assert tune_scrypt(100).n == 2 ** 20   # clamped to 1 GiB


# -- key files ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o000, 0o077])
def test_key_file_is_0600(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "repo.key"
        secret = create_key_file(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == secret.hex() + "\n"
    assert read_key_file(str(path)) == secret
    assert os.listdir(tmp_path) == ["repo.key"]  # no temporary file left behind


def test_key_file_refuses_to_overwrite(tmp_path):
    path = tmp_path / "repo.key"
    secret = create_key_file(str(path))
    with pytest.raises(AlreadyExists, match="refusing to overwrite") as info:
        create_key_file(str(path))
    assert_no_secret(info.value, secret)
    assert read_key_file(str(path)) == secret
    other = tmp_path / "other"
    other.write_text("precious")
    with pytest.raises(AlreadyExists):
        create_key_file(str(other))
    assert other.read_text() == "precious"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(AlreadyExists):
        create_key_file(str(dangling))
    assert not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["link", "other", "repo.key"]


def test_key_file_in_missing_directory(tmp_path):
    with pytest.raises(NotFound):
        create_key_file(str(tmp_path / "no" / "such.key"))


def test_read_key_file_errors(tmp_path):
    with pytest.raises(NotFound):
        read_key_file(str(tmp_path / "missing"))
    path = tmp_path / "k"
    secretish = "ab" * 31  # 62 hex digits: almost a key; must not be quoted
    path.write_text(secretish + "\n")
    path.chmod(0o600)
    with pytest.raises(UsageError, match="not a snapfs key file") as info:
        read_key_file(str(path))
    assert secretish not in str(info.value)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError):
        read_key_file(str(path))
    path.write_bytes(b"0" * 10000)
    with pytest.raises(UsageError, match="too large"):
        read_key_file(str(path))
    path.write_text("AB" * 32 + "\r\n")  # upper case and CRLF are fine
    assert read_key_file(str(path)) == b"\xab" * 32
    path.chmod(0o644)
    with pytest.raises(Refused, match="chmod 600"):
        read_key_file(str(path))
    assert read_key_file(str(path), check_mode=False) == b"\xab" * 32
    with pytest.raises(UsageError, match="not a regular file"):
        read_key_file(str(tmp_path))


def test_a_site_key_file_is_not_a_key_file(tmp_path):
    from snapfs.crypto.sitekeys import SiteKey, write_site_key_file
    key = os.urandom(32)
    path = str(tmp_path / "paris.sitekey")
    write_site_key_file(path, SiteKey("paris", key))
    with pytest.raises(UsageError, match="site key file") as info:
        read_key_file(path)
    assert_no_secret(info.value, key)


# -- passphrase input --------------------------------------------------------------------
@pytest.fixture
def no_passphrase_env(monkeypatch):
    for name in ("SNAPFS_PASSPHRASE", "SNAPFS_PASSPHRASE_FD", "SNAPFS_NEW_PASSPHRASE",
                 "SNAPFS_NEW_PASSPHRASE_FD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_passphrase_from_env(no_passphrase_env):
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE", "caf\u0065\u0301")  # NFD "café"
    assert get_passphrase() == "caf\u00e9".encode()  # NFC
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE", "")
    with pytest.raises(UsageError, match="empty passphrase"):
        get_passphrase()


def test_passphrase_from_fd(no_passphrase_env):
    r, w = os.pipe()
    os.write(w, "s3cret ünïcode\nsecond line\n".encode())
    os.close(w)
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE_FD", str(r))
    try:
        assert get_passphrase() == "s3cret ünïcode".encode()
    finally:
        os.close(r)
    r, w = os.pipe()
    os.write(w, b"no newline\r")
    os.close(w)
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE_FD", str(r))
    try:
        assert get_passphrase() == b"no newline"
    finally:
        os.close(r)
    # The variable wins over the fd.
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE", "from env")
    assert get_passphrase() == b"from env"


def test_passphrase_fd_errors(no_passphrase_env):
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE_FD", "three")
    with pytest.raises(UsageError, match="not a file descriptor"):
        get_passphrase()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE_FD", str(r))
    with pytest.raises(UsageError, match="cannot read"):
        get_passphrase()


def test_new_passphrase_uses_other_variables(no_passphrase_env):
    no_passphrase_env.setenv("SNAPFS_PASSPHRASE", "old")
    no_passphrase_env.setenv("SNAPFS_NEW_PASSPHRASE", "new")
    assert get_passphrase() == b"old"
    assert get_passphrase("New passphrase: ", confirm=True, env="SNAPFS_NEW_PASSPHRASE",
                          fd_env="SNAPFS_NEW_PASSPHRASE_FD") == b"new"


def test_no_passphrase_source(no_passphrase_env):
    no_passphrase_env.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(UsageError, match="SNAPFS_PASSPHRASE") as info:
        get_passphrase()
    assert info.value.exit_code == 2


def test_passphrase_from_terminal(no_passphrase_env):
    answers: list[str] = []
    no_passphrase_env.setattr(keys, "_stdin_is_tty", lambda: True)
    no_passphrase_env.setattr(keys.getpass, "getpass", lambda prompt: answers.pop(0))
    answers[:] = ["typed"]
    assert get_passphrase() == b"typed"
    answers[:] = ["typed", "typed"]
    assert get_passphrase(confirm=True) == b"typed"
    answers[:] = ["typed", "typo"]
    with pytest.raises(UsageError, match="do not match") as info:
        get_passphrase(confirm=True)
    assert "typed" not in str(info.value) and "typo" not in str(info.value)
    answers[:] = ["", ""]
    with pytest.raises(UsageError, match="empty"):
        get_passphrase(confirm=True)
