"""The connector's copy of a RAW/LPD job: received whole and authenticated before the printer gets a byte;
its plaintext kept in memory when small, in an unnamed file in ``incoming/`` (written and checked in
batches) when large, and sent with sendfile(2)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from connector.app import FILE_BATCH, IN_MEMORY_MAX, Connector
from connector.delivery.document import VerifiedDocument, remove_leftovers, unnamed_file, write_all
from tunnel.sealing import IntegrityError, PayloadSealer, new_data_key

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


async def receive(tmp_path: Path, dek: bytes, sealed: bytes) -> VerifiedDocument:
    owner = SimpleNamespace(config=SimpleNamespace(state_dir=tmp_path))
    return await Connector._receive_verified(owner, Body(sealed), dek, JOB)  # type: ignore[arg-type]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def nothing_kept(tmp_path: Path) -> bool:
    return not (tmp_path / "incoming").exists() or not any((tmp_path / "incoming").iterdir())


async def sent_through_a_socket(document: VerifiedDocument) -> bytes:
    """What ``document.send_to`` puts on a socket, read from its other end."""
    ours, theirs = trio.socket.socketpair()
    received = bytearray()
    async with trio.SocketStream(ours) as stream, trio.SocketStream(theirs) as peer:

        async def read() -> None:
            while data := await peer.receive_some(1 << 20):
                received.extend(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.fail_after(30):
                assert await document.send_to(stream, io_timeout=10) == document.size
            await stream.send_eof()
    return bytes(received)


async def test_a_small_payload_stays_in_memory(tmp_path: Path) -> None:
    dek = new_data_key()
    plain = os.urandom(IN_MEMORY_MAX // 2)
    kept = await receive(tmp_path, dek, seal(dek, plain))
    assert nothing_kept(tmp_path)
    assert kept.size == len(plain)
    assert b"".join([piece async for piece in kept]) == plain
    assert await sent_through_a_socket(kept) == plain


async def test_a_large_payload_goes_to_a_file_without_a_name(tmp_path: Path) -> None:
    dek = new_data_key()
    plain = os.urandom(3 * FILE_BATCH + 12345)
    before = open_fds()
    kept = await receive(tmp_path, dek, seal(dek, plain))
    fd = kept.fileno()
    assert fd is not None
    info = os.fstat(fd)
    # nothing another process could open by a path, nothing left behind if we die; only ours
    assert (info.st_nlink, stat.S_IMODE(info.st_mode), info.st_size) == (0, 0o600, len(plain))
    assert nothing_kept(tmp_path)
    assert stat.S_IMODE((tmp_path / "incoming").stat().st_mode) == 0o700
    assert kept.size == len(plain)
    assert await sent_through_a_socket(kept) == plain  # sendfile(2)
    assert await sent_through_a_socket(kept) == plain  # again, as for a second copy
    assert b"".join([piece async for piece in kept]) == plain
    kept.close()
    assert open_fds() == before


@pytest.mark.parametrize("size", [0, IN_MEMORY_MAX // 2, 3 * FILE_BATCH])
async def test_hooks_run_once_around_the_bytes(tmp_path: Path, size: int) -> None:
    """``before_first`` before any byte leaves (the ledger's ``feeding``), ``after_last`` once the last
    one has (``handed``), each once however many copies go out."""
    dek = new_data_key()
    plain = os.urandom(size)
    kept = await receive(tmp_path, dek, seal(dek, plain))
    events: list[str] = []
    counted: list[int] = []

    async def first() -> None:
        events.append(f"first after {sum(counted)}")

    async def last() -> None:
        events.append(f"last after {sum(counted)}")

    kept.watch(first, last, counted.append)
    assert await sent_through_a_socket(kept) == plain
    assert await sent_through_a_socket(kept) == plain
    assert events == ["first after 0", f"last after {size}"]
    assert sum(counted) == 2 * size
    kept.close()


@pytest.mark.parametrize("size", [IN_MEMORY_MAX // 2, 3 * FILE_BATCH])
async def test_a_tampered_payload_is_refused_and_nothing_is_kept(tmp_path: Path, size: int) -> None:
    dek = new_data_key()
    sealed = bytearray(seal(dek, os.urandom(size)))
    sealed[-100] ^= 1  # in the last record: found only once every byte arrived
    before = open_fds()
    with pytest.raises(IntegrityError):
        await receive(tmp_path, dek, bytes(sealed))
    assert nothing_kept(tmp_path)
    assert open_fds() == before


@pytest.mark.parametrize("size", [IN_MEMORY_MAX // 2, 3 * FILE_BATCH])
async def test_a_truncated_payload_is_refused_and_nothing_is_kept(tmp_path: Path, size: int) -> None:
    dek = new_data_key()
    sealed = seal(dek, os.urandom(size))
    before = open_fds()
    with pytest.raises(IntegrityError, match="truncated"):
        await receive(tmp_path, dek, sealed[: -(256 * 1024 + 100)])
    assert nothing_kept(tmp_path)
    assert open_fds() == before


def test_an_earlier_versions_leftovers_are_removed(tmp_path: Path) -> None:
    """An older connector that died mid-job left the sealed payload in incoming/ under the job's name."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("job-1.sealed", "job-x1y2.part", "notes.txt"):
        (incoming / name).write_bytes(b"x")
    assert remove_leftovers(incoming) == 2
    assert [p.name for p in incoming.iterdir()] == ["notes.txt"]
    assert remove_leftovers(tmp_path / "missing") == 0


def test_without_o_tmpfile_the_file_is_unlinked_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "O_TMPFILE")  # not Linux, say
    fd = unnamed_file(tmp_path / "incoming")
    try:
        info = os.fstat(fd)
        assert (info.st_nlink, stat.S_IMODE(info.st_mode)) == (0, 0o600)
        assert nothing_kept(tmp_path)
    finally:
        os.close(fd)


def test_many_small_records_are_written_in_groups(tmp_path: Path) -> None:
    """Tiny records make more plaintext parts per batch than one writev(2) takes (IOV_MAX)."""
    parts = [bytes([n % 256]) * 3 for n in range(3000)]
    fd = unnamed_file(tmp_path)
    try:
        assert write_all(fd, parts) == 9000
        assert os.pread(fd, 10000, 0) == b"".join(parts)
    finally:
        os.close(fd)
