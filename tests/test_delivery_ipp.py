"""IppBackend against a real ippeveprinter."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinter, IppEvePrinterFactory, free_port

from connector.delivery import DeliveryError, IppBackend, JobTicket, backend_for_uri
from ipp import DelimiterTag, Operation, ValueTag, decode, encode, new_request

CHUNK = 64 * 1024


async def chunks(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, state: str, message: str) -> None:
        self.calls.append((state, message))


@pytest.mark.parametrize("size", [1024, 20 * 1024 * 1024], ids=["1KiB", "20MiB"])
async def test_print_job_arrives_byte_identical(ippeveprinter: IppEvePrinter, size: int) -> None:
    # ippeveprinter sniffs application/octet-stream and refuses what it cannot identify: say PDF
    data = b"%PDF-1.7\n" + os.urandom(size - 9)
    progress = Progress()
    backend = IppBackend(ippeveprinter.uri)
    ticket = JobTicket("job-1", "report", "application/pdf", size=size)
    result = await backend.deliver(ticket, chunks(data), progress)

    assert result.state == "completed"
    assert result.printer_job_id == 1
    assert result.message == "printer job 1 completed"
    assert progress.calls == [("printing", "printer job 1 accepted")]
    (document,) = await ippeveprinter.wait_for_documents(1)
    assert document.name.startswith("1-report")
    assert document.stat().st_size == size
    assert hashlib.sha256(document.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_copies_and_pdf(ippeveprinter: IppEvePrinter) -> None:
    data = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 5000 + b"\n%%EOF\n"
    ticket = JobTicket("job-2", "two copies", "application/pdf", copies=2, user="alice")
    result = await IppBackend(ippeveprinter.uri).deliver(ticket, chunks(data, 1000), Progress())
    assert result.state == "completed"
    (document,) = await ippeveprinter.wait_for_documents(1)
    assert document.suffix == ".pdf" and document.read_bytes() == data


async def test_aborted_job_is_a_failed_result(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    printer = ippeveprinter_factory(command="/bin/false")
    ticket = JobTicket("job-3", "doomed", "text/plain")
    result = await IppBackend(printer.uri).deliver(ticket, chunks(b"hello\n"), Progress())
    assert result.state == "failed"
    assert result.printer_job_id == 1
    assert result.message.startswith("printer job 1 aborted")


async def test_unsupported_format_is_a_clear_permanent_error(ippeveprinter: IppEvePrinter) -> None:
    ticket = JobTicket("job-4", "odd", "application/x-not-a-format")
    progress = Progress()
    with pytest.raises(DeliveryError) as info:
        await IppBackend(ippeveprinter.uri).deliver(ticket, chunks(b"x" * 100_000), progress)
    assert not info.value.retryable
    assert info.value.message == (
        f"{ippeveprinter.uri}: printer refused the job: "
        "client-error-attributes-or-values-not-supported "
        "(Unsupported document-format mimeMediaType value.)"
    )
    assert progress.calls == []


async def test_unreachable_printer_is_retryable() -> None:
    backend = IppBackend(f"ipp://127.0.0.1:{free_port()}/ipp/print", connect_timeout=2)
    with pytest.raises(DeliveryError) as info:
        await backend.deliver(JobTicket("job-5", "t", "text/plain"), chunks(b"x"), Progress())
    assert info.value.retryable and not info.value.busy
    assert "ConnectError" in info.value.message
    assert await backend.probe() is False


async def test_busy_printer_is_retryable(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    printer = ippeveprinter_factory(slow=True)
    # occupy the printer: a slow ippeveprinter processes one job at a time for 5-15 s
    first = new_request(Operation.PRINT_JOB, 1, printer_uri=printer.uri)
    first.operation.add("requesting-user-name", ValueTag.NAME, "other")
    first.operation.add("document-format", ValueTag.MIME_MEDIA_TYPE, "text/plain")
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(
            f"http://localhost:{printer.port}/ipp/print",
            content=encode(first) + b"first\n",
            headers={"Content-Type": "application/ipp"},
        )
    accepted, _ = decode(reply.content)
    assert accepted.code == 0 and accepted.value(DelimiterTag.JOB_ATTRIBUTES, "job-id") == 1

    with pytest.raises(DeliveryError) as info:
        with trio.fail_after(10):
            await IppBackend(printer.uri).deliver(
                JobTicket("job-6", "second", "text/plain"), chunks(b"second\n"), Progress()
            )
    assert info.value.retryable and info.value.busy  # not the job's fault: the relay does not count it
    assert "server-error-busy" in info.value.message


async def test_probe_and_backend_for_uri(ippeveprinter: IppEvePrinter) -> None:
    backend = backend_for_uri(ippeveprinter.uri)
    assert isinstance(backend, IppBackend)
    assert backend.url == f"http://localhost:{ippeveprinter.port}/ipp/print"
    assert await backend.probe() is True
    secure = backend_for_uri("ipps://printer.example/ipp/print")
    assert isinstance(secure, IppBackend) and secure.url == "https://printer.example:631/ipp/print"


async def test_ipps_verifies_certificates(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    printer = ippeveprinter_factory(tls=True)
    assert printer.uri.startswith("ipps://localhost:")
    backend = IppBackend(printer.uri)
    with pytest.raises(DeliveryError) as info:
        await backend.deliver(JobTicket("job-7", "t", "application/pdf"), chunks(b"%PDF"), Progress())
    assert not info.value.retryable
    assert "TLS certificate not trusted: self-signed certificate" in info.value.message
    assert await backend.probe() is False
