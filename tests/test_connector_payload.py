"""The connector's copy of a RAW/LPD job: received whole and authenticated before the printer gets a byte,
kept in memory when small, in ``incoming/`` (written and checked in batches) when large."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from connector.app import FILE_BATCH, IN_MEMORY_MAX, Connector, _read_file
from tunnel.sealing import IntegrityError, PayloadOpener, PayloadSealer, new_data_key

JOB = "job-1"
FRAME = 256 * 1024  # how the tunnel hands the body on: one HTTP/2 DATA frame at a time


def seal(dek: bytes, plain: bytes) -> bytes:
    sealer = PayloadSealer(dek, JOB, 256 * 1024)
    return sealer.feed(plain) + sealer.finish()


class Body:
    """The part of H2Stream that _receive_verified uses."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.taken = 0

    async def iter_data(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), FRAME):
            self.taken = start + FRAME
            yield self.data[start : start + FRAME]


async def receive(tmp_path: Path, dek: bytes, sealed: bytes) -> Path | bytes:
    owner = SimpleNamespace(config=SimpleNamespace(state_dir=tmp_path))
    return await Connector._receive_verified(owner, Body(sealed), dek, JOB)  # type: ignore[arg-type]


async def plaintext(source: Path | bytes, dek: bytes) -> bytes:
    opener = PayloadOpener(dek, JOB)
    out = b"".join([piece async for piece in _read_file(source, opener, size=100_000)])
    opener.finish()
    return out


async def test_a_small_payload_stays_in_memory(tmp_path: Path) -> None:
    dek = new_data_key()
    plain = os.urandom(IN_MEMORY_MAX // 2)
    sealed = seal(dek, plain)
    kept = await receive(tmp_path, dek, sealed)
    assert kept == sealed
    assert not (tmp_path / "incoming").exists() or not any((tmp_path / "incoming").iterdir())
    assert await plaintext(kept, dek) == plain


async def test_a_large_payload_goes_to_a_file_in_batches(tmp_path: Path) -> None:
    dek = new_data_key()
    plain = os.urandom(3 * FILE_BATCH + 12345)
    sealed = seal(dek, plain)
    kept = await receive(tmp_path, dek, sealed)
    assert isinstance(kept, Path)
    assert kept.parent == tmp_path / "incoming"
    assert kept.read_bytes() == sealed
    assert await plaintext(kept, dek) == plain


@pytest.mark.parametrize("size", [IN_MEMORY_MAX // 2, 3 * FILE_BATCH])
async def test_a_tampered_payload_is_refused_and_nothing_is_kept(tmp_path: Path, size: int) -> None:
    dek = new_data_key()
    sealed = bytearray(seal(dek, os.urandom(size)))
    sealed[-100] ^= 1  # in the last record: found only once every byte arrived
    with pytest.raises(IntegrityError):
        await receive(tmp_path, dek, bytes(sealed))
    assert not (tmp_path / "incoming").exists() or not any((tmp_path / "incoming").iterdir())


@pytest.mark.parametrize("size", [IN_MEMORY_MAX // 2, 3 * FILE_BATCH])
async def test_a_truncated_payload_is_refused_and_nothing_is_kept(tmp_path: Path, size: int) -> None:
    dek = new_data_key()
    sealed = seal(dek, os.urandom(size))
    with pytest.raises(IntegrityError, match="truncated"):
        await receive(tmp_path, dek, sealed[: -(256 * 1024 + 100)])
    assert not (tmp_path / "incoming").exists() or not any((tmp_path / "incoming").iterdir())


async def test_a_file_tampered_at_rest_fails_on_replay(tmp_path: Path) -> None:
    dek = new_data_key()
    sealed = seal(dek, os.urandom(2 * FILE_BATCH))
    kept = await receive(tmp_path, dek, sealed)
    assert isinstance(kept, Path)
    data = bytearray(kept.read_bytes())
    data[FILE_BATCH] ^= 1
    kept.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        await plaintext(kept, dek)
