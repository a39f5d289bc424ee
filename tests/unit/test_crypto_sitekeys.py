"""Site keys, their files, and the authenticated bundle stream: truncation, reordering,
foreign records, bit flips and wrong keys are all refused (snapfs/crypto/sitekeys.py)."""

from __future__ import annotations

import io
import os
import stat
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.crypto.aead import Aead
from snapfs.crypto.keys import WrongKey
from snapfs.crypto.sitekeys import (
    MAX_RECORD,
    BundleReader,
    BundleWriter,
    SiteKey,
    bundle_keys,
    create_site_key,
    read_site_key_file,
    unwrap_site_key,
    verify_all,
    wrap_site_key,
    write_site_key_file,
)
from snapfs.errors import AlreadyExists, FormatError, IntegrityError, Refused, UsageError

PARIS = SiteKey("paris", bytes(range(32)))
BUNDLE_ID = bytes(range(16))

KAT_ENC = "49d021733479131b385157c5d636f4d9ef076c244ab5adce44a11fc42335ec12"
KAT_MAC = "09e0cc22e7159d5cb3d6269c8f8ec23fa1ad10cfe17d4b930077d4ba2272541f"
# BundleWriter(PARIS, bundle_id=BUNDLE_ID): one record b"meta", then close(b"end").
KAT_BUNDLE = (
    "534e415046534201057061726973000102030405060708090a0b0c0d0e0f"   # header
    "3e9b5d70826fc339d160e8784edc4817a1b46754e764654fd171d16ac7293719"  # header MAC
    "00000014" "5eb0a416fd5a0aac4115ada58f6fb14339ce23de"  # record 0
    "80000013" "fb3dbfd5741c8c825f647d35984f31044a47a2"    # record 1, last
)


def assert_no_secret(exc: BaseException, *secrets: bytes) -> None:
    text = str(exc) + repr(exc)
    for secret in secrets:
        assert secret.hex() not in text.lower()
        assert repr(secret) not in text


def make_bundle(site_key: SiteKey = PARIS, records=(b"meta", b"x" * 3000, b"chunk 2"),
                trailer: bytes = b"end", bundle_id: bytes | None = None) -> bytes:
    out = io.BytesIO()
    w = BundleWriter(out, site_key, bundle_id=bundle_id)
    for r in records:
        w.write_record(r)
    w.close(trailer)
    assert w.bytes_written == len(out.getvalue())
    return out.getvalue()


def read_all(data: bytes, site_key=PARIS) -> tuple[list[bytes], bytes | None]:
    reader = BundleReader(io.BytesIO(data), site_key)
    return list(reader), reader.trailer


def split_records(data: bytes) -> tuple[bytes, list[bytes]]:
    """(header, [framed record, ...]) of a bundle made by make_bundle with site paris."""
    header_len = 8 + 1 + len(b"paris") + 16 + 32
    header, rest, records = data[:header_len], data[header_len:], []
    while rest:
        (word,) = struct.unpack(">I", rest[:4])
        n = 4 + (word & 0x7FFFFFFF)
        records.append(rest[:n])
        rest = rest[n:]
    return header, records


def refused(data: bytes, site_key=PARIS) -> BaseException:
    # FormatError only for the format version byte of the magic.
    with pytest.raises((IntegrityError, WrongKey, FormatError)) as info:
        verify_all(io.BytesIO(data), site_key)
    assert_no_secret(info.value, site_key.key)
    return info.value


# -- site keys and files -----------------------------------------------------------------
def test_create_site_key():
    keys = {create_site_key("paris") for _ in range(50)}
    assert len(keys) == 50 and all(len(k) == 32 for k in keys)
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "caf\u00e9", "a\x00b", "../x"):
        with pytest.raises(UsageError, match="bad site name"):
            create_site_key(bad)


def test_bundle_keys_known_answer_and_bound_to_the_site():
    keys = bundle_keys(PARIS.key, "paris")
    assert (keys.enc_key.hex(), keys.mac_key.hex()) == (KAT_ENC, KAT_MAC)
    other = bundle_keys(PARIS.key, "lyon")
    assert other.enc_key != keys.enc_key and other.mac_key != keys.mac_key
    assert keys.enc_key != keys.mac_key
    assert PARIS.key.hex() not in repr(keys) + repr(PARIS)


def test_site_key_file(tmp_path):
    path = str(tmp_path / "paris.sitekey")
    key = SiteKey("paris", create_site_key("paris"))
    write_site_key_file(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_site_key_file(path) == key
    with pytest.raises(AlreadyExists) as info:
        write_site_key_file(path, SiteKey("paris", create_site_key("paris")))
    assert_no_secret(info.value, key.key)
    assert read_site_key_file(path) == key
    os.chmod(path, 0o640)
    with pytest.raises(Refused):
        read_site_key_file(path)


@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"format": "other"}',
    b'{"format": "snapfs-site-key", "version": 1, "site": "paris", "key": "abcd"}',
    b'{"format": "snapfs-site-key", "version": 1, "site": "a/b", "key": "' + b"ab" * 32
    + b'"}',
])
def test_bad_site_key_files(tmp_path, content):
    path = tmp_path / "f"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(UsageError) as info:
        read_site_key_file(str(path))
    assert "ab" * 32 not in str(info.value)


def test_site_key_wrapped_in_the_repository():
    meta = Aead(os.urandom(32))
    wrapped = wrap_site_key(meta, PARIS)
    assert PARIS.key.hex() not in str(wrapped)
    assert unwrap_site_key(meta, wrapped) == PARIS
    with pytest.raises(IntegrityError, match="stored key of site lyon") as info:
        unwrap_site_key(meta, {**wrapped, "site": "lyon"})  # relabelled
    assert_no_secret(info.value, PARIS.key)
    with pytest.raises(IntegrityError, match="stored key of site paris"):
        unwrap_site_key(Aead(os.urandom(32)), wrapped)
    with pytest.raises(FormatError):
        unwrap_site_key(meta, {**wrapped, "sealed": "xyz"})


# -- bundles: the good path --------------------------------------------------------------
def test_bundle_known_answer():
    data = make_bundle(records=[b"meta"], bundle_id=BUNDLE_ID)
    assert data.hex() == KAT_BUNDLE
    assert read_all(bytes.fromhex(KAT_BUNDLE)) == ([b"meta"], b"end")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=10), st.binary(max_size=100))
def test_bundle_round_trip(records, trailer):
    data = make_bundle(records=records, trailer=trailer)
    reader = BundleReader(io.BytesIO(data), PARIS)
    assert list(reader) == records
    assert reader.trailer == trailer and reader.records == len(records)
    assert reader.site == "paris" and len(reader.bundle_id) == 16


def test_verify_all_then_apply_from_the_spool():
    data = make_bundle()
    spool = io.BytesIO()
    bundle_id = verify_all(io.BytesIO(data), PARIS, copy_to=spool)
    assert spool.getvalue() == data
    spool.seek(0)
    reader = BundleReader(spool, PARIS)
    assert reader.bundle_id == bundle_id
    assert list(reader) == [b"meta", b"x" * 3000, b"chunk 2"]
    with pytest.raises(RuntimeError):
        iter(reader)


def test_site_key_looked_up_by_name():
    seen = []

    def lookup(site: str) -> SiteKey:
        seen.append(site)
        return PARIS

    verify_all(io.BytesIO(make_bundle()), lookup)
    assert seen == ["paris"]


def test_bundle_ids_differ():
    assert make_bundle()[14:30] != make_bundle()[14:30]


def test_write_records_gives_the_same_stream():
    records = [os.urandom(128 * 1024) for _ in range(20)]
    one_by_one = make_bundle(records=records, bundle_id=BUNDLE_ID)
    out = io.BytesIO()
    w = BundleWriter(out, PARIS, bundle_id=BUNDLE_ID)
    w.write_records(iter(records[:13]))
    w.write_records(records[13:])
    w.close(b"end")
    assert out.getvalue() == one_by_one
    with pytest.raises(ValueError, match="closed"):
        w.write_record(b"late")


def test_record_size_limit():
    w = BundleWriter(io.BytesIO(), PARIS)
    with pytest.raises(ValueError, match="at most"):
        w.write_record(bytes(MAX_RECORD + 1))
    # A reader refuses an impossible length before allocating anything.
    header, records = split_records(make_bundle())
    forged = header + struct.pack(">I", 0x7FFFFFFF) + b"\x00" * 100
    assert "impossible length" in str(refused(forged))


# -- bundles: everything that must be refused --------------------------------------------
def test_truncation_at_every_byte_is_refused():
    data = make_bundle(records=[b"meta", b"chunk"])
    for size in range(len(data)):
        exc = refused(data[:size])
        assert isinstance(exc, IntegrityError)
        assert "truncated" in str(exc) or "missing" in str(exc)


def test_dropping_whole_records_is_refused():
    header, records = split_records(make_bundle())
    assert "missing" in str(refused(header + b"".join(records[:-1])))  # no last record
    assert "record 1" in str(refused(header + records[0] + records[2] + records[3]))


def test_data_after_the_end_is_refused():
    data = make_bundle()
    assert "after the last record" in str(refused(data + b"\x00"))
    assert "after the last record" in str(refused(data + data))


def test_reordered_and_duplicated_records_are_refused():
    header, records = split_records(make_bundle())
    r0, r1, r2, last = records
    for order in ([r1, r0, r2, last], [r0, r2, r1, last], [r0, r0, r1, r2, last],
                  [r0, r1, r1, r2, last], [r0, r1, r2, last, last]):
        refused(header + b"".join(order))


def test_faking_the_end_is_refused():
    header, records = split_records(make_bundle())
    r0, r1, r2, last = records
    word = struct.unpack(">I", r2[:4])[0] | 0x80000000  # mark record 2 as the last
    refused(header + r0 + r1 + struct.pack(">I", word) + r2[4:])


def test_records_from_another_bundle_are_refused():
    one = make_bundle(records=[b"meta A", b"chunk A"])
    two = make_bundle(records=[b"meta B", b"chunk B"])
    h1, rec1 = split_records(one)
    h2, rec2 = split_records(two)
    refused(h1 + rec1[0] + rec2[1] + rec1[2])  # one foreign record
    refused(h1 + b"".join(rec2))                # another bundle's records, our header
    refused(h2 + rec2[0] + rec2[1] + rec1[2])   # another bundle's end


def test_every_bit_flip_is_refused():
    data = make_bundle(records=[b"meta", b"chunk"], trailer=b"t")
    for bit in range(len(data) * 8):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        refused(bytes(b))


def test_wrong_site_key_is_refused():
    data = make_bundle()
    stranger = SiteKey("paris", os.urandom(32))
    exc = refused(data, stranger)
    assert isinstance(exc, WrongKey) and "wrong site key" in str(exc)
    assert exc.exit_code == 13
    assert_no_secret(exc, PARIS.key, stranger.key)
    exc = refused(data, SiteKey("lyon", PARIS.key))  # same bytes, other site
    assert isinstance(exc, WrongKey) and "'paris'" in str(exc) and "'lyon'" in str(exc)
    # The same key bytes under another name cannot read paris's bundles even with the
    # header rewritten to claim lyon: the site name is in the key derivation.
    lyon = SiteKey("lyon", PARIS.key)
    header, records = split_records(data)
    relabelled = header[:8] + bytes((4,)) + b"lyon" + header[14:30] + header[30:]
    refused(relabelled + b"".join(records), lyon)


def test_not_a_bundle():
    assert "not a snapfs bundle" in str(refused(b""))
    assert "not a snapfs bundle" in str(refused(b"PK\x03\x04" + bytes(100)))
    with pytest.raises(FormatError, match="version"):
        verify_all(io.BytesIO(b"SNAPFSB\x02" + bytes(100)), PARIS)


def test_reader_yields_only_verified_records():
    """Records before a damaged one are yielded, the damaged one never is: this is why
    the importer must run verify_all before applying anything."""
    data = bytearray(make_bundle(records=[b"first", b"second"]))
    data[-5] ^= 1  # inside the last (trailer) record
    got = []
    with pytest.raises(IntegrityError):
        for record in BundleReader(io.BytesIO(bytes(data)), PARIS):
            got.append(record)
    assert got == [b"first", b"second"]
