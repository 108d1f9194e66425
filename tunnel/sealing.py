"""Envelope encryption for job payloads: pure functions and sans-IO codecs, no I/O.

Each job gets a random 256-bit data key (DEK). The relay seals the DEK to the serving
connector's X25519 public key and encrypts the payload with it, so neither the relay's
disk nor its database holds anything the relay itself can decrypt.

Wrapped data key (``seal_key`` / ``open_key``), 93 bytes::

    version (1, = 0x01) || ephemeral X25519 public key (32) || nonce (12)
        || AES-256-GCM(kek, dek (32), aad=context) with its 16-byte tag

    kek = HKDF-SHA256(X25519(ephemeral, recipient), length=32,
                      salt=ephemeral public || recipient public,
                      info=b"printrelay dek v1" || context)

``context`` is the job id, so a wrapped key cannot be moved to another job.

Payload record stream (``PayloadSealer`` / ``PayloadOpener``): the plaintext is cut into
chunks of ``chunk_size`` bytes, each sealed as one record::

    u32 big-endian ciphertext length || u8 flags (bit 0 = final) || nonce (12, random)
        || ciphertext + 16-byte tag

    AAD = b"printrelay/v1" || job id (UTF-8) || u64 big-endian chunk index || flags

Binding the chunk index, the final flag and the job id into the AAD means records cannot be
reordered, swapped between jobs, or dropped from the end without ``PayloadOpener`` raising
``IntegrityError``. The job id needs no length prefix in the AAD: everything after it has
a fixed size. Exactly one record carries the final flag, and it is the last one; a payload
of ``n`` bytes makes ``max(1, ceil(n / chunk_size))`` records (an empty payload is one
empty final record).
"""

from __future__ import annotations

import hashlib
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "DEK_LEN",
    "KEY_ID_LEN",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "RECORD_OVERHEAD",
    "WRAPPED_KEY_LEN",
    "IntegrityError",
    "PayloadOpener",
    "PayloadSealer",
    "generate_private_key",
    "key_id",
    "new_data_key",
    "open_key",
    "public_bytes",
    "seal_key",
    "sealed_size",
]

KEY_ID_LEN = 8  # bytes of sha256(public key); shown as 16 hex characters
DEK_LEN = 32  # AES-256
_PUBLIC_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16

_WRAP_VERSION = 1
_WRAP_INFO = b"printrelay dek v1"
WRAPPED_KEY_LEN = 1 + _PUBLIC_LEN + _NONCE_LEN + DEK_LEN + _TAG_LEN

_AAD_PREFIX = b"printrelay/v1"
_HEADER = struct.Struct(">IB12s")  # ciphertext length, flags, nonce
_HEADER_LEN = _HEADER.size
_AAD_SUFFIX = struct.Struct(">QB")  # chunk index, flags
FLAG_FINAL = 0x01
_KNOWN_FLAGS = FLAG_FINAL
RECORD_OVERHEAD = _HEADER_LEN + _TAG_LEN  # bytes each record adds to its plaintext

# Chunks outside this range are either wasteful (per-record overhead and a syscall for the
# nonce per tiny chunk) or large enough that one record must be held whole in memory.
MIN_CHUNK_SIZE = 1
MAX_CHUNK_SIZE = 16 * 1024 * 1024


class IntegrityError(Exception):
    """Sealed data failed authentication or is malformed; the message says where."""


def key_id(public_key: bytes) -> str:
    """Identify a connector key: hex of the first KEY_ID_LEN bytes of sha256(raw public key)."""
    return hashlib.sha256(public_key).digest()[:KEY_ID_LEN].hex()


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_data_key() -> bytes:
    """A fresh random 256-bit data key (DEK) for one job."""
    return AESGCM.generate_key(bit_length=DEK_LEN * 8)


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral + recipient,
        info=_WRAP_INFO + context,
    ).derive(shared)


def seal_key(dek: bytes, recipient_public: bytes, *, context: bytes) -> bytes:
    """Wrap ``dek`` so only the holder of ``recipient_public``'s private key can open it."""
    if len(dek) != DEK_LEN:
        raise ValueError(f"data key is {len(dek)} bytes, expected {DEK_LEN}")
    if len(recipient_public) != _PUBLIC_LEN:
        raise ValueError(f"recipient public key is {len(recipient_public)} bytes, expected {_PUBLIC_LEN}")
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = public_bytes(ephemeral)
    # exchange() rejects low-order points (all-zero shared secret) with ValueError.
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    kek = _kek(shared, ephemeral_public, recipient_public, context)
    nonce = os.urandom(_NONCE_LEN)
    wrapped = AESGCM(kek).encrypt(nonce, dek, context)
    return bytes([_WRAP_VERSION]) + ephemeral_public + nonce + wrapped


def open_key(sealed: bytes, private_key: X25519PrivateKey, *, context: bytes) -> bytes:
    """Unwrap a data key made by ``seal_key``; IntegrityError if it is not for this key/context."""
    if len(sealed) != WRAPPED_KEY_LEN:
        raise IntegrityError(f"wrapped data key is {len(sealed)} bytes, expected {WRAPPED_KEY_LEN}")
    if sealed[0] != _WRAP_VERSION:
        raise IntegrityError(f"wrapped data key has unknown version {sealed[0]}")
    ephemeral_public = sealed[1 : 1 + _PUBLIC_LEN]
    nonce = sealed[1 + _PUBLIC_LEN : 1 + _PUBLIC_LEN + _NONCE_LEN]
    wrapped = sealed[1 + _PUBLIC_LEN + _NONCE_LEN :]
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:  # low-order ephemeral point
        raise IntegrityError(f"wrapped data key has an invalid ephemeral key: {exc}") from None
    kek = _kek(shared, ephemeral_public, public_bytes(private_key), context)
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, context)
    except InvalidTag:
        raise IntegrityError(
            "wrapped data key failed authentication (sealed to another connector key, or to another job)"
        ) from None


def sealed_size(plain_size: int, chunk_size: int) -> int:
    """Exact length of the record stream for ``plain_size`` plaintext bytes."""
    if plain_size < 0:
        raise ValueError(f"plain_size must be >= 0, got {plain_size}")
    _check_chunk_size(chunk_size)
    records = max(1, -(-plain_size // chunk_size))
    return plain_size + records * RECORD_OVERHEAD


def _check_chunk_size(chunk_size: int) -> None:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size={chunk_size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")


def _check_dek(dek: bytes) -> None:
    if len(dek) != DEK_LEN:
        raise ValueError(f"data key is {len(dek)} bytes, expected {DEK_LEN}")


class PayloadSealer:
    """Sans-IO encoder: plaintext in, sealed records out.

    A full chunk is held back until more data arrives or ``finish()`` is called, because
    only then is it known whether that chunk is the final one.
    """

    def __init__(self, dek: bytes, job_id: str, chunk_size: int = 256 * 1024) -> None:
        _check_dek(dek)
        _check_chunk_size(chunk_size)
        self._aead = AESGCM(dek)
        self._aad_prefix = _AAD_PREFIX + job_id.encode("utf-8")
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._index = 0
        self._finished = False
        self.plain_bytes = 0  # plaintext consumed so far
        self.sealed_bytes = 0  # record bytes produced so far

    def _record(self, plain: bytes | bytearray | memoryview, flags: int) -> list[bytes]:
        nonce = os.urandom(_NONCE_LEN)
        aad = self._aad_prefix + _AAD_SUFFIX.pack(self._index, flags)
        ciphertext = self._aead.encrypt(nonce, plain, aad)
        self._index += 1
        self.sealed_bytes += _HEADER_LEN + len(ciphertext)
        return [_HEADER.pack(len(ciphertext), flags, nonce), ciphertext]

    def feed(self, data: bytes) -> bytes:
        """Consume plaintext; return the bytes of any records now complete (may be b"")."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self.plain_bytes += len(data)
        size = self._chunk_size
        if len(self._buffer) + len(data) <= size:
            self._buffer += data
            return b""
        parts: list[bytes] = []
        view = memoryview(data)
        if self._buffer:
            # Top the buffered chunk up; it is certainly not final (more data follows).
            take = size - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            parts += self._record(self._buffer, 0)
            self._buffer = bytearray()
        # Seal straight from the caller's buffer, keeping back the last (possibly final) chunk.
        offset = 0
        while len(view) - offset > size:
            parts += self._record(view[offset : offset + size], 0)
            offset += size
        self._buffer += view[offset:]
        return b"".join(parts)

    def finish(self) -> bytes:
        """The final record (its plaintext may be empty)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        parts = self._record(self._buffer, FLAG_FINAL)
        self._buffer = bytearray()
        return b"".join(parts)


class PayloadOpener:
    """Sans-IO decoder: record bytes in (split anywhere), plaintext chunks out, in order.

    ``max_record`` bounds the ciphertext length a record header may announce, so a hostile
    or corrupt length field cannot make the opener buffer without limit.
    """

    def __init__(self, dek: bytes, job_id: str, *, max_record: int = 2 * 1024 * 1024) -> None:
        _check_dek(dek)
        self._aead = AESGCM(dek)
        self._aad_prefix = _AAD_PREFIX + job_id.encode("utf-8")
        self._max_record = max_record
        self._buffer = bytearray()
        self._index = 0
        self._final_seen = False
        self.plain_bytes = 0  # plaintext produced so far

    @property
    def chunks(self) -> int:
        """Records authenticated so far."""
        return self._index

    @property
    def complete(self) -> bool:
        """True once the final record has been authenticated."""
        return self._final_seen

    def _parse(self, view: memoryview, out: list[bytes]) -> int:
        """Open every whole record at the start of ``view``; return the bytes consumed."""
        offset = 0
        end = len(view)
        while not self._final_seen and end - offset >= _HEADER_LEN:
            length, flags, nonce = _HEADER.unpack_from(view, offset)
            if length > self._max_record:
                raise IntegrityError(
                    f"chunk {self._index} record of {length} bytes exceeds "
                    f"max_record={self._max_record} bytes"
                )
            if length < _TAG_LEN:
                raise IntegrityError(
                    f"chunk {self._index} record of {length} bytes is shorter than its {_TAG_LEN}-byte tag"
                )
            if flags & ~_KNOWN_FLAGS:
                raise IntegrityError(f"chunk {self._index} has unknown flags 0x{flags:02x}")
            start = offset + _HEADER_LEN
            if end - start < length:
                break
            aad = self._aad_prefix + _AAD_SUFFIX.pack(self._index, flags)
            try:
                plain = self._aead.decrypt(nonce, view[start : start + length], aad)
            except InvalidTag:
                raise IntegrityError(f"chunk {self._index} failed authentication") from None
            out.append(plain)
            self.plain_bytes += len(plain)
            self._index += 1
            self._final_seen = bool(flags & FLAG_FINAL)
            offset = start + length
        if self._final_seen and offset < end:
            raise IntegrityError(f"{end - offset} bytes after the final chunk (chunk {self._index - 1})")
        return offset

    def _missing(self) -> int:
        """Bytes the buffered partial record still lacks (0: complete, or a bad header)."""
        have = len(self._buffer)
        if have < _HEADER_LEN:
            return _HEADER_LEN - have
        length: int = struct.unpack_from(">I", self._buffer)[0]
        if length > self._max_record:
            return 0  # let _parse() reject it before anything more is buffered
        return max(0, _HEADER_LEN + length - have)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume record bytes; return the plaintext of each record completed by them."""
        out: list[bytes] = []
        if not data:
            return out
        with memoryview(data) as view:
            offset = 0
            # Complete a buffered partial record from the front of ``data`` only, so large
            # reads are parsed in place rather than copied through the buffer.
            while self._buffer:
                missing = self._missing()
                if missing == 0:
                    with memoryview(self._buffer) as buffered:
                        used = self._parse(buffered, out)
                    del self._buffer[:used]
                    continue
                if offset == len(view):
                    return out
                take = min(missing, len(view) - offset)
                self._buffer += view[offset : offset + take]
                offset += take
            used = self._parse(view[offset:], out)
            self._buffer += view[offset + used :]
        return out

    def finish(self) -> None:
        """End of input: IntegrityError unless the final record was seen and nothing is left."""
        if not self._final_seen:
            where = "before chunk 0" if self._index == 0 else f"after chunk {self._index - 1}"
            partial = f", {len(self._buffer)} bytes of a partial record" if self._buffer else ""
            raise IntegrityError(f"payload truncated {where} (no final chunk{partial})")
        if self._buffer:  # unreachable through feed(), kept as a guard
            raise IntegrityError(f"{len(self._buffer)} bytes after the final chunk")
