"""Aead: the sealed-blob format, nonce uniqueness, tamper and truncation detection
(snapfs/crypto/aead.py)."""

from __future__ import annotations

import hmac
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.crypto.aead import OVERHEAD, Aead
from snapfs.errors import IntegrityError

KEY = bytes(range(32))
NONCE = bytes(range(0xA0, 0xAC))

# Known answers for the format (header | nonce | ciphertext | tag). If one of these
# changes, existing repositories can no longer be read: bump the format instead.
KAT_RANDOM = ("01a0a1a2a3a4a5a6a7a8a9aaab95761d5d23b822dc0a10e9b8efb65eb75e636db86bf5bace30"
              "426189")
KAT_RANDOM_PADDED = ("11000000000000000000000000763cb5deb52c83bd08a8a935182c91998f4ede4730d1"
                     "efee909eeb2e4c7274d9")
KAT_DET = "02f226ed0d68effd4904a6dfb2c0606fee17fff42fb2d3f30e46379cb8fd1bda9d9980cadcb4"
KAT_DET_PADDED = ("12b9e096747bfdd4e998f447179a76c512b4330477c2e333d97a1f40f7fce13f6a25c2974a"
                  "f24388fbe765c1afb60be42726a338a5705d71105e79a628")


def assert_no_secret(exc: BaseException, *secrets: bytes) -> None:
    text = str(exc) + repr(exc)
    for secret in secrets:
        assert secret.hex() not in text.lower()
        assert repr(secret) not in text


def flip(blob: bytes, bit: int) -> bytes:
    b = bytearray(blob)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# -- known answers -----------------------------------------------------------------------
def test_known_answer_random_mode():
    a = Aead(KEY)
    blob = a._seal_with_nonce(b"snapfs chunk", b"chunk 7", NONCE)
    assert blob.hex() == KAT_RANDOM
    # The layout, recomputed with AESGCM directly: header byte is in the GCM AAD.
    assert blob == b"\x01" + NONCE + AESGCM(KEY).encrypt(NONCE, b"snapfs chunk",
                                                         b"\x01chunk 7")
    assert a.open(bytes.fromhex(KAT_RANDOM), b"chunk 7", "chunk 7") == b"snapfs chunk"


def test_known_answer_random_mode_padded():
    blob = Aead(KEY)._seal_with_nonce(b"x", b"", bytes(12), pad_to=16)
    assert blob.hex() == KAT_RANDOM_PADDED
    padded = b"x\x80" + bytes(14)
    assert blob == b"\x11" + bytes(12) + AESGCM(KEY).encrypt(bytes(12), padded, b"\x11")
    assert Aead(KEY).open(blob, b"", "x") == b"x"


def _det_reference(key: bytes, plaintext: bytes, aad: bytes, header: int) -> bytes:
    """The deterministic mode re-derived from its description, independently of aead.py."""
    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)
    enc = hkdf(b"snapfs/v1/aead/siv-encryption")
    mac = hkdf(b"snapfs/v1/aead/siv-nonce-mac")
    hdr = bytes((header,))
    nonce = hmac.digest(mac, hdr + struct.pack(">Q", len(aad)) + aad + plaintext,
                        "sha256")[:12]
    return hdr + nonce + AESGCM(enc).encrypt(nonce, plaintext, hdr + aad)


def test_known_answer_deterministic_mode():
    a = Aead(KEY)
    blob = a.seal_det(b"hello.txt", b"dir 1")
    assert blob.hex() == KAT_DET
    assert blob == _det_reference(KEY, b"hello.txt", b"dir 1", 0x02)
    assert a.open_det(blob, b"dir 1", "name") == b"hello.txt"
    padded = a.seal_det(b"hello.txt", b"dir 1", pad_to=32)
    assert padded.hex() == KAT_DET_PADDED
    assert padded == _det_reference(KEY, b"hello.txt" + b"\x80" + bytes(22), b"dir 1", 0x12)
    assert a.open_det(padded, b"dir 1", "name") == b"hello.txt"


# -- round trips and properties ----------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=64), st.sampled_from([0, 1, 16, 32]))
def test_round_trip(plaintext, aad, pad_to):
    a = Aead(KEY)
    blob = a.seal(plaintext, aad, pad_to=pad_to)
    assert a.open(blob, aad, "x") == plaintext
    det = a.seal_det(plaintext, aad, pad_to=pad_to)
    assert a.open_det(det, aad, "x") == plaintext
    if not pad_to:
        assert len(blob) == len(det) == len(plaintext) + OVERHEAD


def test_accepts_buffers():
    a = Aead(KEY)
    blob = a.seal(b"data", b"aad")
    assert a.open(bytearray(blob), b"aad", "x") == b"data"
    assert a.open(memoryview(blob), b"aad", "x") == b"data"
    assert a.open(memoryview(b"xx" + blob)[2:], b"aad", "x") == b"data"


def test_nonces_are_unique_and_random():
    a = Aead(KEY)
    blobs = [a.seal(b"same plaintext", b"same aad") for _ in range(20000)]
    nonces = {b[1:13] for b in blobs}
    assert len(nonces) == len(blobs)
    assert len(set(blobs)) == len(blobs)  # equal plaintexts never give equal blobs


def test_deterministic_mode_is_deterministic_and_bound_to_aad():
    a = Aead(KEY)
    assert a.seal_det(b"name", b"dir 1") == a.seal_det(b"name", b"dir 1")
    assert Aead(KEY).seal_det(b"name", b"dir 1") == a.seal_det(b"name", b"dir 1")
    assert a.seal_det(b"name", b"dir 1") != a.seal_det(b"name", b"dir 2")
    assert a.seal_det(b"name", b"dir 1") != a.seal_det(b"Name", b"dir 1")
    # The AAD is length-prefixed in the synthetic nonce: shifting bytes between the AAD
    # and the plaintext must not give the same nonce (nonce reuse under one key).
    assert a.seal_det(b"c", b"ab")[1:13] != a.seal_det(b"bc", b"a")[1:13]
    assert Aead(bytes(32)).seal_det(b"name", b"dir 1") != a.seal_det(b"name", b"dir 1")


def test_padding_hides_lengths():
    a = Aead(KEY)
    sizes = {len(a.seal_det(b"n" * k, b"d", pad_to=32)) for k in range(32)}
    assert sizes == {32 + OVERHEAD}
    assert len(a.seal_det(b"n" * 32, b"d", pad_to=32)) == 64 + OVERHEAD
    # Trailing zeros and 0x80 in the plaintext survive the padding.
    for pt in (b"a\x00\x00", b"\x80", b"\x80\x00", b""):
        assert a.open(a.seal(pt, b"", pad_to=8), b"", "x") == pt
        assert a.open_det(a.seal_det(pt, b"", pad_to=8), b"", "x") == pt


def test_modes_do_not_mix():
    a = Aead(KEY)
    with pytest.raises(IntegrityError, match="name 5: authentication failed"):
        a.open_det(a.seal(b"x", b""), b"", "name 5")
    with pytest.raises(IntegrityError, match="chunk 5: authentication failed"):
        a.open(a.seal_det(b"x", b""), b"", "chunk 5")


# -- tamper detection --------------------------------------------------------------------
def test_every_bit_flip_is_detected_exhaustively():
    a = Aead(KEY)
    for blob, opener in ((a.seal(b"twenty bytes of data", b"ctx"), a.open),
                         (a.seal_det(b"twenty bytes of data", b"ctx"), a.open_det),
                         (a.seal(b"padded", b"ctx", pad_to=16), a.open),
                         (a.seal_det(b"padded", b"ctx", pad_to=16), a.open_det)):
        for bit in range(len(blob) * 8):
            with pytest.raises(IntegrityError, match="^chunk 9: authentication failed"):
                opener(flip(blob, bit), b"ctx", "chunk 9")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=16), st.data())
def test_any_bit_flip_is_detected(plaintext, aad, data):
    a = Aead(KEY)
    det = data.draw(st.booleans())
    blob = a.seal_det(plaintext, aad) if det else a.seal(plaintext, aad)
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    with pytest.raises(IntegrityError) as info:
        (a.open_det if det else a.open)(flip(blob, bit), aad, "xattr user.x of inode 3")
    assert str(info.value).startswith("xattr user.x of inode 3: authentication failed")
    assert_no_secret(info.value, KEY)
    if len(plaintext) >= 8:  # short byte strings occur in any text by chance
        assert plaintext.hex() not in str(info.value)


def test_truncation_and_extension_are_detected():
    a = Aead(KEY)
    blob = a.seal(b"some chunk data", b"c")
    for size in range(len(blob)):
        with pytest.raises(IntegrityError, match="chunk 1: authentication failed"):
            a.open(blob[:size], b"c", "chunk 1")
    with pytest.raises(IntegrityError):
        a.open(blob + b"\x00", b"c", "chunk 1")
    det = a.seal_det(b"name", b"c")
    for size in range(len(det)):
        with pytest.raises(IntegrityError):
            a.open_det(det[:size], b"c", "name")


def test_wrong_aad_or_key_is_detected():
    a = Aead(KEY)
    blob = a.seal(b"data", b"chunk 1")
    with pytest.raises(IntegrityError, match="chunk 2: authentication failed"):
        a.open(blob, b"chunk 2", "chunk 2")  # a chunk moved to another identity
    other = bytes(range(1, 33))
    with pytest.raises(IntegrityError) as info:
        Aead(other).open(blob, b"chunk 1", "chunk 1")
    assert_no_secret(info.value, KEY, other)
    with pytest.raises(IntegrityError):
        Aead(other).open_det(a.seal_det(b"n", b"d"), b"d", "name")


def test_unknown_format_byte():
    a = Aead(KEY)
    blob = bytearray(a.seal(b"data", b""))
    blob[0] = 0x07
    with pytest.raises(IntegrityError, match="unknown format byte 0x07"):
        a.open(bytes(blob), b"", "pack 3 record 4")


def test_key_never_shown():
    a = Aead(KEY)
    assert KEY.hex() not in repr(a)
    with pytest.raises(ValueError) as info:
        Aead(KEY[:31])
    assert_no_secret(info.value, KEY[:31])


def test_shared_between_threads():
    a = Aead(KEY)
    buffers = [os.urandom(128 * 1024) for _ in range(8)]

    def work(i: int) -> bool:
        for _ in range(20):
            pt = buffers[i % len(buffers)]
            if a.open(a.seal(pt, b"%d" % i), b"%d" % i, "x") != pt:
                return False
            if a.open_det(a.seal_det(pt[:64], b"n"), b"n", "x") != pt[:64]:
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))


@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 128 * 1024])
def test_open_into_writes_the_plaintext_in_place(size):
    """open_into decrypts straight into a slice of a larger buffer (a read reply), with
    or without the library's decrypt_into."""
    aead = Aead(bytes(range(32)))
    plaintext = os.urandom(size)
    blob = aead.seal(plaintext, b"ctx")
    reply = bytearray(b"#" * (size + 8))
    aead.open_into(blob, b"ctx", "thing", memoryview(reply)[4:4 + size])
    assert reply == b"####" + plaintext + b"####"
    with pytest.raises(ValueError):
        aead.open_into(blob, b"ctx", "thing", memoryview(bytearray(size + 1)))
    with pytest.raises(ValueError):  # padded blobs are not for open_into
        aead.open_into(aead.seal(b"x", b"ctx", pad_to=16), b"ctx", "thing",
                       memoryview(bytearray(16)))
    out = memoryview(bytearray(size))
    with pytest.raises(IntegrityError, match="not a random-nonce blob"):
        aead.open_into(aead.seal_det(plaintext, b"ctx"), b"ctx", "thing", out)
    for bad_blob, aad in [(flip(blob, 8 * len(blob) - 1), b"ctx"), (blob, b"other")]:
        with pytest.raises(IntegrityError, match="thing"):
            aead.open_into(bad_blob, aad, "thing", out)


def test_open_into_without_decrypt_into(monkeypatch):
    """cryptography before 45 has no decrypt_into: decrypt, then copy."""
    aead = Aead(bytes(range(32)))
    blob = aead.seal(b"plaintext", b"ctx")

    class OldGcm:
        def __init__(self, gcm):
            self.decrypt = gcm.decrypt

    monkeypatch.setattr(aead, "_gcm", OldGcm(aead._gcm))
    out = bytearray(9)
    aead.open_into(blob, b"ctx", "thing", memoryview(out))
    assert out == b"plaintext"
    with pytest.raises(IntegrityError):
        aead.open_into(blob, b"other", "thing", memoryview(out))
