"""tunnel.sealing: wrapped data keys and the sealed record stream, tested with bytes."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.sealing import (
    KEY_ID_LEN,
    RECORD_OVERHEAD,
    WRAPPED_KEY_LEN,
    IntegrityError,
    PayloadOpener,
    PayloadSealer,
    generate_private_key,
    key_id,
    new_data_key,
    open_key,
    public_bytes,
    seal_key,
    sealed_size,
)

JOB = "job-7f3a"
CHUNK = 1024


def seal(dek: bytes, plain: bytes, job_id: str = JOB, chunk_size: int = CHUNK) -> bytes:
    sealer = PayloadSealer(dek, job_id, chunk_size)
    return sealer.feed(plain) + sealer.finish()


def open_all(dek: bytes, sealed: bytes, job_id: str = JOB) -> bytes:
    opener = PayloadOpener(dek, job_id)
    out = b"".join(opener.feed(sealed))
    opener.finish()
    return out


def records(sealed: bytes) -> list[bytes]:
    """Split a record stream into its records (test-side parser)."""
    out = []
    offset = 0
    while offset < len(sealed):
        (length,) = struct.unpack_from(">I", sealed, offset)
        end = offset + 17 + length
        out.append(sealed[offset:end])
        offset = end
    return out


# --- wrapped data keys -------------------------------------------------------------------


def test_key_id_is_hex_of_sha256_prefix() -> None:
    key = generate_private_key()
    pub = public_bytes(key)
    assert len(pub) == 32
    kid = key_id(pub)
    assert len(kid) == 2 * KEY_ID_LEN
    assert kid == key_id(pub)
    assert kid != key_id(public_bytes(generate_private_key()))


def test_seal_and_open_key_round_trip() -> None:
    key = generate_private_key()
    dek = new_data_key()
    sealed = seal_key(dek, public_bytes(key), context=JOB.encode())
    assert len(sealed) == WRAPPED_KEY_LEN
    assert dek not in sealed
    assert open_key(sealed, key, context=JOB.encode()) == dek
    # Fresh ephemeral key and nonce each time.
    assert seal_key(dek, public_bytes(key), context=JOB.encode()) != sealed


def test_wrapped_key_moved_to_another_job_fails() -> None:
    key = generate_private_key()
    sealed = seal_key(new_data_key(), public_bytes(key), context=b"job-a")
    with pytest.raises(IntegrityError, match="wrapped data key failed authentication"):
        open_key(sealed, key, context=b"job-b")


def test_wrapped_key_for_another_connector_fails() -> None:
    sealed = seal_key(new_data_key(), public_bytes(generate_private_key()), context=b"j")
    with pytest.raises(IntegrityError, match="another connector key"):
        open_key(sealed, generate_private_key(), context=b"j")


def test_wrapped_key_tampered_or_malformed() -> None:
    key = generate_private_key()
    sealed = seal_key(new_data_key(), public_bytes(key), context=b"j")
    for i in (1, 40, len(sealed) - 1):  # ephemeral key, nonce, tag
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_key(bytes(bad), key, context=b"j")
    with pytest.raises(IntegrityError, match="unknown version 2"):
        open_key(b"\x02" + sealed[1:], key, context=b"j")
    with pytest.raises(IntegrityError, match="is 92 bytes, expected 93"):
        open_key(sealed[:-1], key, context=b"j")
    # A low-order ephemeral point (all zeros) gives an all-zero shared secret.
    zero = sealed[:1] + bytes(32) + sealed[33:]
    with pytest.raises(IntegrityError, match="invalid ephemeral key"):
        open_key(zero, key, context=b"j")


def test_seal_key_rejects_bad_inputs() -> None:
    pub = public_bytes(generate_private_key())
    with pytest.raises(ValueError, match="data key is 16 bytes, expected 32"):
        seal_key(bytes(16), pub, context=b"j")
    with pytest.raises(ValueError, match="recipient public key is 31 bytes"):
        seal_key(bytes(32), pub[:31], context=b"j")


# --- record stream -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 7, 5 * 1024 * 1024 + 3]
)
def test_round_trip_sizes(size: int) -> None:
    dek = new_data_key()
    plain = os.urandom(size)
    sealed = seal(dek, plain)
    assert len(sealed) == sealed_size(size, CHUNK)
    assert open_all(dek, sealed) == plain


def test_round_trip_default_chunk_size_several_mib() -> None:
    dek = new_data_key()
    plain = os.urandom(6 * 1024 * 1024 + 12345)
    sealer = PayloadSealer(dek, JOB)
    sealed = sealer.feed(plain) + sealer.finish()
    assert len(sealed) == sealed_size(len(plain), 256 * 1024)
    assert sealer.plain_bytes == len(plain)
    assert sealer.sealed_bytes == len(sealed)
    assert open_all(dek, sealed) == plain


def test_record_layout() -> None:
    dek = new_data_key()
    sealed = seal(dek, b"x" * (CHUNK + 5))
    recs = records(sealed)
    assert [len(r) for r in recs] == [CHUNK + RECORD_OVERHEAD, 5 + RECORD_OVERHEAD]
    assert [r[4] for r in recs] == [0, 1]  # only the last record carries the final flag
    assert len({r[5:17] for r in recs}) == 2  # distinct nonces


def test_sealed_size_counts_records() -> None:
    assert sealed_size(0, CHUNK) == RECORD_OVERHEAD
    assert sealed_size(CHUNK, CHUNK) == CHUNK + RECORD_OVERHEAD
    assert sealed_size(CHUNK + 1, CHUNK) == CHUNK + 1 + 2 * RECORD_OVERHEAD
    with pytest.raises(ValueError, match="chunk_size=0 outside"):
        sealed_size(1, 0)


def test_empty_payload_is_one_final_record() -> None:
    dek = new_data_key()
    sealed = seal(dek, b"")
    assert len(sealed) == RECORD_OVERHEAD
    opener = PayloadOpener(dek, JOB)
    assert opener.feed(sealed) == [b""]
    opener.finish()
    assert opener.complete


def test_sealer_emits_complete_records_as_data_arrives() -> None:
    sealer = PayloadSealer(new_data_key(), JOB, CHUNK)
    assert sealer.feed(b"a" * CHUNK) == b""  # might still be the final chunk
    out = sealer.feed(b"b")
    assert len(out) == CHUNK + RECORD_OVERHEAD
    assert sealer.feed(b"c" * (3 * CHUNK)) != b""
    sealer.finish()
    with pytest.raises(RuntimeError, match="twice"):
        sealer.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        sealer.feed(b"x")


@settings(max_examples=60, deadline=None)
@given(
    plain=st.binary(max_size=5 * 64),
    chunk_size=st.integers(min_value=1, max_value=70),
    in_cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    out_cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=12),
)
def test_arbitrary_feed_splits(
    plain: bytes, chunk_size: int, in_cuts: list[int], out_cuts: list[int]
) -> None:
    dek = bytes(range(32))
    sealer = PayloadSealer(dek, JOB, chunk_size)
    sealed = b""
    previous = 0
    for cut in [*sorted(c for c in in_cuts if c <= len(plain)), len(plain)]:
        sealed += sealer.feed(plain[previous:cut])
        previous = cut
    sealed += sealer.finish()
    assert len(sealed) == sealed_size(len(plain), chunk_size)

    opener = PayloadOpener(dek, JOB)
    got: list[bytes] = []
    previous = 0
    for cut in [*sorted(c for c in out_cuts if c <= len(sealed)), len(sealed)]:
        got += opener.feed(sealed[previous:cut])
        previous = cut
    opener.finish()
    assert b"".join(got) == plain
    assert all(len(c) <= chunk_size for c in got)


# --- tampering ---------------------------------------------------------------------------


@pytest.fixture
def dek() -> bytes:
    return new_data_key()


@pytest.fixture
def sealed(dek: bytes) -> bytes:
    return seal(dek, os.urandom(4 * CHUNK + 10))  # 5 records


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_flipped_byte_fails_authentication(dek: bytes, sealed: bytes, where: str) -> None:
    record_len = CHUNK + RECORD_OVERHEAD
    offset = 2 * record_len + {"nonce": 6, "ciphertext": 100, "tag": record_len - 1}[where]
    bad = bytearray(sealed)
    bad[offset] ^= 0x80
    opener = PayloadOpener(dek, JOB)
    with pytest.raises(IntegrityError, match=r"^chunk 2 failed authentication$"):
        opener.feed(bytes(bad))


def test_flipped_final_flag_fails(dek: bytes, sealed: bytes) -> None:
    bad = bytearray(sealed)
    bad[4] = 0x01  # claim chunk 0 is final
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        PayloadOpener(dek, JOB).feed(bytes(bad))


def test_unknown_flags_rejected(dek: bytes, sealed: bytes) -> None:
    bad = bytearray(sealed)
    bad[4] = 0x04
    with pytest.raises(IntegrityError, match="chunk 0 has unknown flags 0x04"):
        PayloadOpener(dek, JOB).feed(bytes(bad))


def test_swapped_chunks_fail(dek: bytes, sealed: bytes) -> None:
    recs = records(sealed)
    swapped = b"".join([recs[0], recs[2], recs[1], *recs[3:]])
    with pytest.raises(IntegrityError, match="chunk 1 failed authentication"):
        PayloadOpener(dek, JOB).feed(swapped)


def test_chunk_from_another_job_fails(dek: bytes, sealed: bytes) -> None:
    # Same key, other job id: the job id in the AAD still tells them apart.
    other = records(seal(dek, os.urandom(4 * CHUNK + 10), job_id="job-other"))
    recs = records(sealed)
    mixed = b"".join([recs[0], other[1], *recs[2:]])
    with pytest.raises(IntegrityError, match="chunk 1 failed authentication"):
        PayloadOpener(dek, JOB).feed(mixed)
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        PayloadOpener(dek, "job-other").feed(sealed)


def test_truncated_stream_fails(dek: bytes, sealed: bytes) -> None:
    recs = records(sealed)
    opener = PayloadOpener(dek, JOB)
    assert len(opener.feed(b"".join(recs[:-1]))) == 4
    with pytest.raises(IntegrityError, match=r"payload truncated after chunk 3 \(no final chunk\)"):
        opener.finish()


def test_truncated_mid_record_fails(dek: bytes, sealed: bytes) -> None:
    opener = PayloadOpener(dek, JOB)
    opener.feed(sealed[:-5])
    with pytest.raises(IntegrityError, match=r"truncated after chunk 3 .*partial record"):
        opener.finish()


def test_empty_stream_fails(dek: bytes) -> None:
    opener = PayloadOpener(dek, JOB)
    with pytest.raises(IntegrityError, match="payload truncated before chunk 0"):
        opener.finish()


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 40])
def test_bytes_after_final_fail(dek: bytes, sealed: bytes, extra: bytes) -> None:
    with pytest.raises(IntegrityError, match=f"{len(extra)} bytes after the final chunk"):
        PayloadOpener(dek, JOB).feed(sealed + extra)
    opener = PayloadOpener(dek, JOB)
    opener.feed(sealed)
    with pytest.raises(IntegrityError, match="after the final chunk"):
        opener.feed(extra)


def test_record_after_final_fails(dek: bytes) -> None:
    one = seal(dek, b"hello")
    with pytest.raises(IntegrityError, match="after the final chunk"):
        PayloadOpener(dek, JOB).feed(one + one)


def test_oversized_record_rejected_before_buffering(dek: bytes) -> None:
    opener = PayloadOpener(dek, JOB, max_record=4096)
    header = struct.pack(">IB", 1 << 30, 0) + bytes(12)
    with pytest.raises(IntegrityError, match="record of 1073741824 bytes exceeds max_record=4096"):
        opener.feed(header)


def test_record_shorter_than_tag_rejected(dek: bytes) -> None:
    header = struct.pack(">IB", 3, 1) + bytes(12) + b"abc"
    with pytest.raises(IntegrityError, match="shorter than its 16-byte tag"):
        PayloadOpener(dek, JOB).feed(header)


def test_wrong_data_key_fails(sealed: bytes) -> None:
    with pytest.raises(IntegrityError, match="chunk 0 failed authentication"):
        PayloadOpener(new_data_key(), JOB).feed(sealed)


def test_bad_dek_length_rejected() -> None:
    with pytest.raises(ValueError, match="data key is 31 bytes"):
        PayloadSealer(bytes(31), JOB)
    with pytest.raises(ValueError, match="data key is 31 bytes"):
        PayloadOpener(bytes(31), JOB)


def test_oversized_record_rejected_when_header_arrives_in_pieces(dek: bytes) -> None:
    opener = PayloadOpener(dek, JOB, max_record=4096)
    header = struct.pack(">IB", 4097, 0) + bytes(12)
    for byte in header[:-1]:
        assert opener.feed(bytes([byte])) == []
    with pytest.raises(IntegrityError, match="record of 4097 bytes exceeds max_record=4096"):
        opener.feed(header[-1:] + bytes(100))


def test_byte_at_a_time(dek: bytes) -> None:
    plain = os.urandom(3 * CHUNK + 1)
    sealed = seal(dek, plain)
    opener = PayloadOpener(dek, JOB)
    got = [chunk for i in range(len(sealed)) for chunk in opener.feed(sealed[i : i + 1])]
    opener.finish()
    assert b"".join(got) == plain
    assert opener.chunks == 4
