"""relay.spool: sealed payload files on a real directory."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from relay.spool import INLINE_MAX, PayloadTooLarge, Spool, SpoolFull, StoredPayload
from tunnel.sealing import (
    IntegrityError,
    PayloadOpener,
    generate_private_key,
    key_id,
    open_key,
    public_bytes,
    sealed_size,
)

CHUNK = 4096
MARKER = b"PLAINTEXT-MARKER-5f1c9e"
KEY = generate_private_key()
PUBLIC = public_bytes(KEY)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", chunk_size=CHUNK, inline_max=0)  # every payload a file


async def pieces(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


def document(size: int) -> bytes:
    """A body with the marker repeated through it, so any plaintext leak shows."""
    return (MARKER * (size // len(MARKER) + 1))[:size]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def read_back(spool: Spool, job_id: str, stored: StoredPayload) -> bytes:
    dek = open_key(stored.wrapped_key, KEY, context=job_id.encode())
    opener = PayloadOpener(dek, job_id)
    out = []
    async with aclosing(spool.open(job_id, read_size=1000)) as chunks:
        async for data in chunks:
            out += opener.feed(data)
    opener.finish()
    return b"".join(out)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * 1024 * 1024 + 5])
async def test_store_and_read_back(spool: Spool, size: int) -> None:
    body = document(size)
    stored = await spool.store("job1", pieces(split(body, 1500)), recipient_public=PUBLIC, max_bytes=size)
    assert stored.size == size
    assert stored.sealed_size == sealed_size(size, CHUNK)
    assert spool.path("job1").stat().st_size == stored.sealed_size
    assert stored.sha256 == hashlib.sha256(body).hexdigest()
    assert stored.key_id == key_id(PUBLIC)
    assert await read_back(spool, "job1", stored) == body
    # Nothing is left in tmp, and the plaintext is nowhere on disk.
    assert all_files(spool.root) == [spool.path("job1")]
    if size >= len(MARKER):
        assert MARKER not in spool.path("job1").read_bytes()


async def test_wrapped_key_is_bound_to_job(spool: Spool) -> None:
    stored = await spool.store("job-a", pieces([b"x"]), recipient_public=PUBLIC, max_bytes=10)
    with pytest.raises(IntegrityError):
        open_key(stored.wrapped_key, KEY, context=b"job-b")


async def test_body_is_sealed_and_written_as_it_arrives(spool: Spool) -> None:
    half_sent = trio.Event()
    go_on = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        for part in split(document(8 * CHUNK), 1000):
            yield part
        half_sent.set()
        await go_on.wait()
        yield document(CHUNK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: spool.store("job1", body(), recipient_public=PUBLIC, max_bytes=1 << 20))
        with trio.fail_after(5):
            await half_sent.wait()
        [part] = all_files(spool.root)
        assert part.parent.name == "tmp" and part.name.endswith(".part")
        on_disk = part.read_bytes()
        assert len(on_disk) >= 7 * CHUNK  # records written before the body ended
        assert MARKER not in on_disk
        assert not spool.path("job1").exists()  # not visible until complete
        go_on.set()
    assert all_files(spool.root) == [spool.path("job1")]


async def test_too_large_stops_early_and_keeps_nothing(spool: Spool) -> None:
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal consumed
        while True:
            consumed += 1
            yield b"z" * 1024

    with pytest.raises(PayloadTooLarge) as info:
        await spool.store("big", endless(), recipient_public=PUBLIC, max_bytes=10 * 1024)
    assert info.value.limit == 10 * 1024
    assert str(info.value) == "job too large: more than max_job_bytes=10240 bytes"
    assert consumed == 11
    assert all_files(spool.root) == []


async def test_exactly_max_bytes_is_accepted(spool: Spool) -> None:
    stored = await spool.store(
        "fits", pieces([b"a" * 600, b"b" * 424]), recipient_public=PUBLIC, max_bytes=1024
    )
    assert stored.size == 1024


async def test_client_vanishing_removes_partial_file(spool: Spool) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield document(5 * CHUNK)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await spool.store("gone", broken(), recipient_public=PUBLIC, max_bytes=1 << 20)
    assert all_files(spool.root) == []


async def test_cancellation_removes_partial_file(spool: Spool) -> None:
    stalled = trio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield document(5 * CHUNK)
        stalled.set()
        await trio.sleep_forever()
        yield b""  # pragma: no cover

    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await spool.store("slow", slow(), recipient_public=PUBLIC, max_bytes=1 << 20)

        nursery.start_soon(run)
        with trio.fail_after(5):
            await stalled.wait()
        assert len(all_files(spool.root / "tmp")) == 1
        nursery.cancel_scope.cancel()
    assert all_files(spool.root) == []


async def test_disk_full_removes_partial_file_and_keeps_earlier_jobs(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = await spool.store(
        "earlier", pieces([document(CHUNK * 2)]), recipient_public=PUBLIC, max_bytes=1 << 20
    )

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolFull, match=r"spool disk full: No space left on device .* job full"):
        await spool.store("full", pieces([document(CHUNK * 3)]), recipient_public=PUBLIC, max_bytes=1 << 20)
    monkeypatch.undo()
    assert all_files(spool.root) == [spool.path("earlier")]
    assert await read_back(spool, "earlier", earlier) == document(CHUNK * 2)


async def test_duplicate_store_refused(spool: Spool) -> None:
    await spool.store("dup", pieces([b"one"]), recipient_public=PUBLIC, max_bytes=10)
    with pytest.raises(FileExistsError, match="already exists"):
        await spool.store("dup", pieces([b"two"]), recipient_public=PUBLIC, max_bytes=10)


async def test_bad_recipient_key_writes_nothing(spool: Spool) -> None:
    with pytest.raises(ValueError, match="recipient public key is 5 bytes"):
        await spool.store("k", pieces([b"x"]), recipient_public=b"short", max_bytes=10)
    assert all_files(spool.root) == []


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 129, "job.1"])
def test_unsafe_job_ids_rejected(spool: Spool, bad: str) -> None:
    with pytest.raises(ValueError, match="is not 1-128 characters"):
        spool.path(bad)


def test_layout_fans_out(spool: Spool) -> None:
    path = spool.path("job1")
    assert path.name == "job1.sealed"
    assert path.parent.parent == spool.root
    assert len(path.parent.name) == 2
    assert {spool.path(f"job-{i}").parent for i in range(100)} != {path.parent}


async def test_open_missing_raises(spool: Spool) -> None:
    with pytest.raises(FileNotFoundError):
        async with aclosing(spool.open("nope")) as chunks:
            async for _ in chunks:
                pass  # pragma: no cover


async def test_erase_is_idempotent(spool: Spool) -> None:
    await spool.store("e", pieces([b"data"]), recipient_public=PUBLIC, max_bytes=10)
    assert spool.path("e").exists()
    await spool.erase("e")
    assert not spool.path("e").exists()
    await spool.erase("e")
    await spool.erase("never-stored")


async def test_usage(spool: Spool) -> None:
    assert await spool.usage() == (0, 0)
    a = await spool.store("a", pieces([b"1" * 5000]), recipient_public=PUBLIC, max_bytes=1 << 20)
    b = await spool.store("b", pieces([b""]), recipient_public=PUBLIC, max_bytes=1 << 20)
    assert await spool.usage() == (a.sealed_size + b.sealed_size, 2)
    await spool.erase("a")
    assert await spool.usage() == (b.sealed_size, 1)


async def test_remove_orphans(spool: Spool) -> None:
    for job in ("keep", "orphan"):
        await spool.store(job, pieces([b"x"]), recipient_public=PUBLIC, max_bytes=10)
    crashed = spool.root / "tmp" / "lost.abcd1234.part"
    crashed.write_bytes(b"half a job")
    unrelated = spool.root / "README"
    unrelated.write_text("not ours")
    # A periodic sweep with min_age spares fresh files.
    assert await spool.remove_orphans({"keep"}, min_age=3600) == 0
    assert await spool.remove_orphans({"keep"}) == 2
    assert not crashed.exists()
    assert not spool.path("orphan").exists()
    assert spool.path("keep").exists()
    assert unrelated.exists()


async def test_remove_orphans_spares_store_in_progress(spool: Spool) -> None:
    stalled = trio.Event()
    go_on = trio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        stalled.set()
        await go_on.wait()
        yield b"second"

    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await spool.store("busy", body(), recipient_public=PUBLIC, max_bytes=100)

        nursery.start_soon(run)
        with trio.fail_after(5):
            await stalled.wait()
        assert await spool.remove_orphans(set()) == 0
        go_on.set()
    assert spool.path("busy").exists()


async def test_remove_orphans_on_empty_root(tmp_path: Path) -> None:
    assert await Spool(tmp_path / "missing").remove_orphans(set()) == 0
    assert await Spool(tmp_path / "missing").usage() == (0, 0)


async def test_failure_after_rename_removes_final_file(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    calls = 0

    def fail_second(fd: int) -> None:  # the file's fsync passes, the directory's fails
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fail_second)
    with pytest.raises(OSError, match="Input/output error"):
        await spool.store("late", pieces([b"data"]), recipient_public=PUBLIC, max_bytes=10)
    monkeypatch.undo()
    assert calls == 2
    assert all_files(spool.root) == []


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 7])
async def test_small_payload_stays_inline(tmp_path: Path, size: int) -> None:
    """A payload whose sealed form fits in inline_max comes back as bytes and makes no file at all."""
    spool = Spool(tmp_path / "spool", chunk_size=CHUNK, inline_max=sealed_size(3 * CHUNK + 7, CHUNK))
    body = document(size)
    stored = await spool.store("job1", pieces(split(body, 1500)), recipient_public=PUBLIC, max_bytes=size)
    assert stored.inline is not None and len(stored.inline) == stored.sealed_size == sealed_size(size, CHUNK)
    assert all_files(tmp_path) == []
    if size >= len(MARKER):
        assert MARKER not in stored.inline
    dek = open_key(stored.wrapped_key, KEY, context=b"job1")
    opener = PayloadOpener(dek, "job1")
    plain = b"".join(opener.feed(stored.inline))
    opener.finish()
    assert plain == body


async def test_payload_past_inline_max_goes_to_a_file(tmp_path: Path) -> None:
    limit = sealed_size(2 * CHUNK, CHUNK)
    spool = Spool(tmp_path / "spool", chunk_size=CHUNK, inline_max=limit)
    body = document(2 * CHUNK + 1)  # one byte more: one more record, past the limit
    stored = await spool.store(
        "job1", pieces(split(body, 1500)), recipient_public=PUBLIC, max_bytes=len(body)
    )
    assert stored.inline is None
    assert all_files(spool.root) == [spool.path("job1")]
    assert await read_back(spool, "job1", stored) == body


async def test_inline_max_is_capped(tmp_path: Path) -> None:
    assert Spool(tmp_path, inline_max=10**9).inline_max == INLINE_MAX
