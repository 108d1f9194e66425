"""CupsBackend: jobs handed to a private cupsd's queue, followed there to their end."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest
import trio
from fixtures_peers import Cupsd
from fixtures_printers import RawSink, free_port

from connector.delivery import CupsBackend, DeliveryError, JobTicket, backend_for_uri
from connector.delivery.cups import parse_cups_uri, queue_ipp_uri


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, state: str, message: str) -> None:
        self.calls.append((state, message))


def test_cups_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUPS_SERVER", raising=False)
    assert parse_cups_uri("cups:Office") == ("localhost", 631, "Office")
    assert parse_cups_uri("cups://localhost/Office") == ("localhost", 631, "Office")
    assert queue_ipp_uri("cups://127.0.0.1:6310/Label_2") == "ipp://127.0.0.1:6310/printers/Label_2"
    monkeypatch.setenv("CUPS_SERVER", "print-gw:6311")
    assert parse_cups_uri("cups:Office") == ("print-gw", 6311, "Office")
    for bad in ("cups:", "cups://localhost/", "cups:a/b", "cups:with space"):
        with pytest.raises(ValueError, match="CUPS queue name"):
            parse_cups_uri(bad)


async def test_job_goes_through_the_queue_intact(cupsd: Cupsd, raw_sink: RawSink) -> None:
    cupsd.add_queue("office", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    backend = backend_for_uri(cupsd.uri("office"))
    assert isinstance(backend, CupsBackend)
    data = b"%!PS-Adobe-3.0\n" + os.urandom(2 * 1024 * 1024)
    progress = Progress()
    ticket = JobTicket("job-1", "budget", "application/vnd.cups-raw", user="carol", size=len(data))

    result = await backend.deliver(ticket, chunks(data), progress)

    assert result.state == "completed", result.message
    assert result.message == f"printer job {result.printer_job_id} completed"
    assert progress.calls == [("printing", f"printer job {result.printer_job_id} accepted")]
    (document,) = await raw_sink.wait_for(1)
    assert document.sha256 == hashlib.sha256(data).hexdigest()


async def test_failed_job_reports_cups_reason(cupsd: Cupsd) -> None:
    # nothing listens there; CUPS gives up after contimeout and, by this policy, aborts the job
    dead = free_port()
    cupsd.add_queue("gone", f"socket://127.0.0.1:{dead}/?contimeout=1&snmp=false")
    await trio.run_process(
        ["lpadmin", "-h", cupsd.server, "-p", "gone", "-o", "printer-error-policy=abort-job"]
    )
    ticket = JobTicket("job-2", "t", "application/vnd.cups-raw", user="carol", size=4)
    result = await backend_for_uri(cupsd.uri("gone")).deliver(ticket, chunks(b"data"), Progress())
    assert result.state == "failed"
    assert "aborted" in result.message, result.message


async def test_queue_not_accepting_is_refused(cupsd: Cupsd, raw_sink: RawSink) -> None:
    cupsd.add_queue("closed", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    await trio.run_process(["cupsreject", "-h", cupsd.server, "closed"])
    ticket = JobTicket("job-3", "t", "application/vnd.cups-raw", user="carol", size=4)
    with pytest.raises(DeliveryError, match="not-accepting-jobs"):
        await backend_for_uri(cupsd.uri("closed")).deliver(ticket, chunks(b"data"), Progress())


async def test_unknown_queue_is_refused(cupsd: Cupsd) -> None:
    ticket = JobTicket("job-4", "t", "application/vnd.cups-raw", size=4)
    with pytest.raises(DeliveryError) as info:
        await backend_for_uri(cupsd.uri("nosuch")).deliver(ticket, chunks(b"data"), Progress())
    assert not info.value.retryable, info.value.message
    assert await backend_for_uri(cupsd.uri("nosuch")).probe() is False
