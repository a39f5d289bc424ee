"""Authenticated encryption of blobs: AES-256-GCM with a one-byte format header.

Why this wrapper exists rather than calling AESGCM directly everywhere: every encrypted
thing in a repository (chunks, names, symlink targets, xattrs, wrapped keys) must carry
its nonce, must be authenticated together with a caller-chosen context (the AAD, e.g. the
chunk identity or the parent directory of a name, so that a valid ciphertext cannot be
moved to another place), and must fail in one way only: an IntegrityError that names what
is damaged and never returns data. Keeping that in one place keeps the format in one place.

Format of a sealed blob (all modes)::

    header (1 byte) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

    header = mode (low nibble: 1 random nonce, 2 deterministic) | 0x10 if padded

The header byte is part of the GCM associated data (before the caller's AAD), so it cannot
be changed without detection. OVERHEAD = 29 bytes per blob.

Random mode (:meth:`Aead.seal`): the nonce is 96 random bits from os.urandom. NIST SP
800-38D bounds random 96-bit nonces to 2**32 messages per key; at 128 KiB per chunk that
is 512 TiB of chunks under one data key, far beyond a repository's life.

Deterministic mode (:meth:`Aead.seal_det`, for names): SIV-style. The nonce is
HMAC-SHA256(mac key, header | len(aad) | aad | plaintext)[:12] and the GCM key is a
separate key; both are derived from the Aead key with HKDF, so a key is never used with
both random and synthetic nonces. Equal (aad, plaintext) give equal blobs, which is what
makes "look a name up by its encrypted form" work; the price is that equality of names
under the same AAD is visible (use the parent directory as AAD so only equal names in one
directory -- which cannot exist -- would be equal). The length prefix on the AAD matters:
without it (aad="ab", pt="c") and (aad="a", pt="bc") would share a nonce under one key,
and GCM nonce reuse with different plaintexts leaks their XOR and the GHASH key. A
collision of the 96-bit synthetic nonce for two different inputs needs about 2**48 names.
:meth:`Aead.open_det` recomputes the synthetic nonce after decryption and rejects a
mismatch, as SIV does.

Padding (``pad_to``): optional ISO/IEC 7816-4 padding (0x80 then zeros) up to a multiple
of pad_to bytes, flagged in the header, to hide exact lengths of short things such as
names (``sizes where practical``, SPEC section 7).

GIL and throughput, measured with the installed cryptography 50.0.2 on this machine
(2 vCPU AMD EPYC with AES-NI, CPython 3.11, glibc 2.36, idle; 2 GiB per run, best of
two; rerun with ``python -m snapfs.crypto.aead [SIZE]``):

    AESGCM.encrypt 128 KiB:  1 thread 7900-8400 MiB/s; 2 threads 12900-13700 MiB/s
                             (1.63x, 1.78-1.81 cores busy)
    Aead.seal 128 KiB:       1 thread 6630 MiB/s;  2 threads 10530 MiB/s (1.59x)
    1 MiB: 1.8-1.9x;  8 MiB: 1.6-1.95x;  4 KiB: 0.69-0.75x;  1 KiB: 0.78-1.08x (1.00 core)

So this release DOES release the GIL around the OpenSSL AEAD work for inputs of at least
2048 bytes (pyca/cryptography PR 15359, "Release the GIL in hash, HMAC, cipher, and AEAD
operations"); below that, threads only add contention. Sealing chunks from worker threads
(trio.to_thread) therefore overlaps with other work; name sealing should stay on the
calling thread. Per 128 KiB chunk, one thread, hot cache: seal 20.6 us (including the
header+nonce concatenation copy), open 14.5 us (zero-copy via memoryview), against 74 us
for the HMAC-SHA256 chunk identity of format 1 (1.7 GiB/s; keyed BLAKE3, used since
format 2, takes about 22 us): the keyed hash, not the cipher, was the expensive part of
the write path. With a 256 MiB working set (no cache reuse): open 4.5
GiB/s, seal 4.7 GiB/s. The output buffer is allocated with the GIL held, so for a single
huge input (256 MiB) the GIL is held for most of the call; irrelevant at chunk sizes.

Measured trap, outside this module: glibc's dynamic mmap threshold makes 128 KiB buffers
that are alive at the same time (a decrypted chunk and its re-sealed form, a read and its
plaintext) come from fresh mmap()s, so every call page-faults 128 KiB: open-then-seal of
256 MiB ran at 939 MiB/s, and at 2524-3051 MiB/s after ``mallopt(M_MMAP_THRESHOLD, 4 MiB)``
and ``mallopt(M_TRIM_THRESHOLD, 256 MiB)`` (ctypes, once at process start) or the
equivalent MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ environment variables.

Instances are safe to share between threads (tested).
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from snapfs.errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE

MODE_RANDOM = 0x01
MODE_DET = 0x02
FLAG_PADDED = 0x10
_MODE_MASK = 0x0F
_KNOWN_HEADERS = frozenset(
    {MODE_RANDOM, MODE_DET, MODE_RANDOM | FLAG_PADDED, MODE_DET | FLAG_PADDED}
)

# HKDF labels for the deterministic mode's two subkeys (key separation from random mode).
_INFO_DET_ENC = b"snapfs/v1/aead/siv-encryption"
_INFO_DET_MAC = b"snapfs/v1/aead/siv-nonce-mac"


def hkdf(key: bytes, info: bytes, *, salt: bytes | None = None, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256: the one derivation function of the package (distinct info per use)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def _pad(data: bytes, pad_to: int) -> bytes:
    """ISO/IEC 7816-4 padding: unambiguous for any content, including trailing zeros."""
    padded_len = (len(data) // pad_to + 1) * pad_to
    return data + b"\x80" + bytes(padded_len - len(data) - 1)


def _unpad(data: bytes) -> bytes | None:
    stripped = data.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80:
        return None
    return stripped[:-1]


def _failure(what: str, detail: str = "") -> IntegrityError:
    """The one error of the package for authentication failures (never carries data)."""
    message = f"{what}: authentication failed (damaged or wrong key)"
    if detail:
        message += f": {detail}"
    return IntegrityError(message)


class Aead:
    """AES-256-GCM sealing with random nonces (data) or synthetic nonces (names).

    One instance per key; it is cheap to keep and safe to share between threads. ``what``
    in :meth:`open` is the caller's description of the object (``"chunk 1234"``,
    ``"name in directory 17"``): it becomes the error message, so it must not contain
    plaintext (no file names) or key material.
    """

    __slots__ = ("_gcm", "_key", "_det_gcm", "_det_mac")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"Aead needs a {KEY_SIZE}-byte key, got {len(key)} bytes")
        self._key = bytes(key)
        self._gcm = AESGCM(self._key)
        # The deterministic subkeys are derived on first use: most instances (the data
        # key) never seal names.
        self._det_gcm: AESGCM | None = None
        self._det_mac: bytes | None = None

    def __repr__(self) -> str:
        return "Aead(<key redacted>)"

    # -- random nonces ---------------------------------------------------------------------
    def seal(self, plaintext: bytes, aad: bytes, *, pad_to: int = 0) -> bytes:
        """Encrypt and authenticate plaintext bound to aad, with a fresh random nonce."""
        return self._seal_with_nonce(plaintext, aad, os.urandom(NONCE_SIZE), pad_to=pad_to)

    def _seal_with_nonce(self, plaintext: bytes, aad: bytes, nonce: bytes, *,
                         pad_to: int = 0) -> bytes:
        """The test seam for known-answer vectors: seal with a given nonce. Never reuse
        a nonce under one key outside tests."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        header = MODE_RANDOM
        if pad_to:
            plaintext = _pad(bytes(plaintext), self._check_pad(pad_to))
            header |= FLAG_PADDED
        hdr = bytes((header,))
        return hdr + nonce + self._gcm.encrypt(nonce, plaintext, hdr + aad)

    def open(self, blob: bytes | bytearray | memoryview, aad: bytes, what: str) -> bytes:
        """Verify and decrypt a blob from :meth:`seal`; IntegrityError on any damage."""
        header, nonce, body = self._split(blob, what)
        if header & _MODE_MASK != MODE_RANDOM:
            raise _failure(what, "not a random-nonce blob")
        plaintext = self._decrypt(self._gcm, header, nonce, body, aad, what)
        return self._maybe_unpad(header, plaintext, what)

    def open_into(self, blob: bytes | bytearray | memoryview, aad: bytes, what: str,
                  out: memoryview) -> None:
        """:meth:`open` of an unpadded blob, the plaintext written into out, which must be
        exactly len(blob) - OVERHEAD bytes (large reads assemble their reply in place).
        On any damage IntegrityError, and out holds garbage that must not be used."""
        header, nonce, body = self._split(blob, what)
        if header & _MODE_MASK != MODE_RANDOM:
            raise _failure(what, "not a random-nonce blob")
        if header & FLAG_PADDED or len(out) != len(body) - TAG_SIZE:
            raise ValueError("open_into needs an unpadded blob and an exact output buffer")
        decrypt_into = getattr(self._gcm, "decrypt_into", None)
        if decrypt_into is None:  # cryptography before 45
            out[:] = self._decrypt(self._gcm, header, nonce, body, aad, what)
            return
        try:
            decrypt_into(nonce, body, bytes((header,)) + aad, out)
        except InvalidTag:
            raise _failure(what) from None

    # -- synthetic (deterministic) nonces -------------------------------------------------
    def seal_det(self, plaintext: bytes, aad: bytes, *, pad_to: int = 0) -> bytes:
        """Deterministic sealing: equal (plaintext, aad, pad_to) give equal blobs, so an
        encrypted name can be looked up by sealing the name being searched for."""
        gcm, mac = self._det_keys()
        header = MODE_DET
        if pad_to:
            plaintext = _pad(bytes(plaintext), self._check_pad(pad_to))
            header |= FLAG_PADDED
        hdr = bytes((header,))
        nonce = self._synthetic_nonce(mac, hdr, aad, plaintext)
        return hdr + nonce + gcm.encrypt(nonce, plaintext, hdr + aad)

    def open_det(self, blob: bytes | bytearray | memoryview, aad: bytes, what: str) -> bytes:
        """Verify and decrypt a blob from :meth:`seal_det`; IntegrityError on any damage."""
        header, nonce, body = self._split(blob, what)
        if header & _MODE_MASK != MODE_DET:
            raise _failure(what, "not a deterministic blob")
        gcm, mac = self._det_keys()
        plaintext = self._decrypt(gcm, header, nonce, body, aad, what)
        hdr = bytes((header,))
        if not hmac.compare_digest(self._synthetic_nonce(mac, hdr, aad, plaintext), nonce):
            raise _failure(what, "synthetic nonce mismatch")
        return self._maybe_unpad(header, plaintext, what)

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _check_pad(pad_to: int) -> int:
        if not 1 <= pad_to <= 65536:
            raise ValueError("pad_to must be between 1 and 65536")
        return pad_to

    def _det_keys(self) -> tuple[AESGCM, bytes]:
        gcm, mac = self._det_gcm, self._det_mac
        if gcm is None or mac is None:
            gcm = AESGCM(hkdf(self._key, _INFO_DET_ENC))
            mac = hkdf(self._key, _INFO_DET_MAC)
            # Two threads racing here derive identical values: no lock needed.
            self._det_gcm, self._det_mac = gcm, mac
        return gcm, mac

    @staticmethod
    def _synthetic_nonce(mac: bytes, hdr: bytes, aad: bytes, plaintext: bytes) -> bytes:
        msg = hdr + struct.pack(">Q", len(aad)) + bytes(aad) + bytes(plaintext)
        return hmac.digest(mac, msg, "sha256")[:NONCE_SIZE]

    @staticmethod
    def _split(blob: bytes | bytearray | memoryview, what: str
               ) -> tuple[int, memoryview, memoryview]:
        view = memoryview(blob)
        if len(view) < OVERHEAD:
            raise _failure(what, f"truncated ({len(view)} bytes, at least {OVERHEAD} needed)")
        header = view[0]
        if header not in _KNOWN_HEADERS:
            raise _failure(what, f"unknown format byte 0x{header:02x}")
        return header, view[HEADER_SIZE:HEADER_SIZE + NONCE_SIZE], view[HEADER_SIZE + NONCE_SIZE:]

    @staticmethod
    def _decrypt(gcm: AESGCM, header: int, nonce: memoryview, body: memoryview, aad: bytes,
                 what: str) -> bytes:
        try:
            return gcm.decrypt(nonce, body, bytes((header,)) + aad)
        except InvalidTag:
            raise _failure(what) from None

    @staticmethod
    def _maybe_unpad(header: int, plaintext: bytes, what: str) -> bytes:
        if not header & FLAG_PADDED:
            return plaintext
        unpadded = _unpad(plaintext)
        if unpadded is None:  # authentic but malformed: only a buggy writer does this
            raise _failure(what, "bad padding")
        return unpadded


def _benchmark(size: int = 128 * 1024, total: int = 2 << 30) -> None:
    """``python -m snapfs.crypto.aead [SIZE]``: repeat the GIL measurement of the module
    docstring (1 vs 2 threads sealing SIZE-byte buffers, and the cores kept busy)."""
    import resource
    import threading
    import time

    aead = Aead(os.urandom(KEY_SIZE))
    buf = os.urandom(size)
    calls = max(2, total // size)

    def work(count: int) -> None:
        for _ in range(count):
            aead.seal(buf, b"")

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    results: dict[int, tuple[float, float]] = {}
    for threads in (1, 2, 1, 2):
        cpu0, started = cpu(), time.perf_counter()
        workers = [threading.Thread(target=work, args=(calls // threads,))
                   for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - started
        rate = calls * size / wall / 2 ** 20
        results[threads] = max(results.get(threads, (0.0, 0.0)),
                               (rate, (cpu() - cpu0) / wall))
    (one, busy1), (two, busy2) = results[1], results[2]
    print(f"seal {size} B: 1 thread {one:.0f} MiB/s ({busy1:.2f} cores busy), "
          f"2 threads {two:.0f} MiB/s ({busy2:.2f} cores busy): {two / one:.2f}x")


if __name__ == "__main__":
    import sys

    _benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 128 * 1024)
