"""RawBackend against a TCP sink, and backend selection by URI."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from fixtures_printers import RawSink, free_port

from connector.delivery import DeliveryError, IppBackend, JobTicket, RawBackend, backend_for_uri
from connector.delivery.document import VerifiedDocument, unnamed_file, write_all

TICKET = JobTicket("job-1", "raw", "application/octet-stream")


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, state: str, message: str) -> None:
        self.calls.append((state, message))


async def test_raw_delivery_arrives_intact(raw_sink: RawSink) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    progress = Progress()
    backend = backend_for_uri(raw_sink.uri)
    assert isinstance(backend, RawBackend) and backend.port == raw_sink.port

    result = await backend.deliver(TICKET, chunks(data), progress)

    assert result.state == "completed"
    assert result.message == f"sent {len(data)} bytes to 127.0.0.1:{raw_sink.port}"
    assert progress.calls == [("printing", f"connected to 127.0.0.1:{raw_sink.port}")]
    (document,) = await raw_sink.wait_for(1)
    assert document.size == len(data)
    assert document.sha256 == hashlib.sha256(data).hexdigest()


async def test_printer_that_never_closes(raw_sink: RawSink) -> None:
    raw_sink.close_after_eof = False
    backend = RawBackend("127.0.0.1", raw_sink.port, idle_timeout=0.2)
    result = await backend.deliver(TICKET, chunks(b"%!PS\n"), Progress())
    assert result.state == "completed"
    assert result.message.endswith("it did not close within idle_timeout=0.2 s")
    (document,) = await raw_sink.wait_for(1)
    assert document.size == 5


async def test_unreachable_is_retryable() -> None:
    backend = RawBackend("127.0.0.1", free_port(), connect_timeout=2)
    progress = Progress()
    with pytest.raises(DeliveryError) as info:
        await backend.deliver(TICKET, chunks(b"x"), progress)
    assert info.value.retryable
    assert info.value.message.startswith(f"cannot connect to 127.0.0.1:{backend.port}")
    assert progress.calls == []
    assert await backend.probe() is False


async def test_probe(raw_sink: RawSink) -> None:
    assert await RawBackend("127.0.0.1", raw_sink.port).probe() is True


async def test_stalled_printer_gets_back_pressure_and_times_out(nursery: trio.Nursery) -> None:
    """A printer that accepts and never reads: the document is pulled only as far as the socket
    buffers take it, then the send times out."""
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    total_chunks = 1024  # 64 MiB offered
    pulled = 0

    async def document() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(total_chunks):
            pulled += 1
            yield b"\0" * (64 * 1024)

    backend = RawBackend("127.0.0.1", port, io_timeout=0.5)
    with pytest.raises(DeliveryError) as info:
        await backend.deliver(TICKET, document(), Progress())
    assert info.value.retryable
    assert "took no data for io_timeout=0.5 s" in info.value.message
    assert pulled < total_chunks // 4  # loopback buffers hold a few MiB at most


def test_backend_for_uri() -> None:
    raw = backend_for_uri("socket://printer.example")
    assert isinstance(raw, RawBackend) and (raw.host, raw.port) == ("printer.example", 9100)
    ipp = backend_for_uri("ipp://printer.example/ipp/print")
    assert isinstance(ipp, IppBackend) and ipp.url == "http://printer.example:631/ipp/print"
    v6 = backend_for_uri("ipp://[::1]:8631/printers/q")
    assert isinstance(v6, IppBackend) and v6.url == "http://[::1]:8631/printers/q"
    with pytest.raises(
        ValueError, match=r"unsupported printer URI scheme 'ftp'.*ipp, ipps, socket, lpd, cups"
    ):
        backend_for_uri("ftp://printer.example/queue")
    with pytest.raises(ValueError, match="no host"):
        backend_for_uri("socket:///")


def file_document(data: bytes, directory: Path) -> VerifiedDocument:
    """``data`` as the connector keeps an authenticated job: an unnamed file, sent with sendfile(2)."""
    fd = unnamed_file(directory)
    write_all(fd, [data])
    return VerifiedDocument(size=len(data), fd=fd)


async def test_a_verified_file_goes_by_sendfile_once_per_copy(raw_sink: RawSink, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    document = file_document(data, tmp_path)
    hooks: list[str] = []

    async def first() -> None:
        hooks.append("first")

    async def last() -> None:
        hooks.append("last")

    document.watch(first, last, lambda n: None)
    ticket = JobTicket("job-1", "raw", "application/octet-stream", copies=2)
    result = await RawBackend("127.0.0.1", raw_sink.port, spool_dir=tmp_path / "spool").deliver(
        ticket, document, Progress()
    )
    document.close()
    assert result.state == "completed"
    assert result.message == f"sent 2 copies of {len(data)} bytes to 127.0.0.1:{raw_sink.port}"
    assert hooks == ["first", "last"]  # `feeding` and `handed` once, around the first copy
    copies = await raw_sink.wait_for(2)
    assert [(c.size, c.sha256) for c in copies] == [(len(data), hashlib.sha256(data).hexdigest())] * 2
    assert not (tmp_path / "spool").exists()  # the file itself is sent again: no spool copy


async def test_sendfile_to_a_stalled_printer_times_out(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def hold(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    document = file_document(b"\0" * (64 * 1024 * 1024), tmp_path)
    with pytest.raises(DeliveryError) as info:
        await RawBackend("127.0.0.1", port, io_timeout=0.5).deliver(TICKET, document, Progress())
    document.close()
    assert info.value.retryable
    assert "took no data for io_timeout=0.5 s after" in info.value.message
    assert 0 < document.sent < 16 * 1024 * 1024  # as far as the socket buffers took it
