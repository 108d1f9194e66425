"""Create-Job + Send-Document with a journal: a job that comes again after a connector crash is neither
lost nor printed twice, whatever moment the crash hit."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from fixtures_printers import IppEvePrinter

from connector.delivery import IppBackend, JobTicket
from ipp import DelimiterTag, Operation, ValueTag

PDF = b"%PDF-1.4\n" + os.urandom(20_000)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


async def ignore(state: str, message: str) -> None:
    pass


def ticket(earlier: int | None = None) -> JobTicket:
    return JobTicket("j1", "resume", "application/pdf", earlier_printer_job=earlier)


async def test_the_printer_job_id_is_journaled_before_the_document_is_sent(
    ippeveprinter: IppEvePrinter,
) -> None:
    journaled: list[int] = []

    async def journal(job_id: int) -> None:
        assert ippeveprinter.documents() == []  # no document byte has left yet
        journaled.append(job_id)

    result = await IppBackend(ippeveprinter.uri).deliver(ticket(), chunks(PDF), ignore, journal)
    assert result.state == "completed"
    assert journaled == [result.printer_job_id]
    [document] = await ippeveprinter.wait_for_documents(1)
    assert document.read_bytes() == PDF


async def test_a_job_whose_document_arrived_is_not_printed_again(ippeveprinter: IppEvePrinter) -> None:
    backend = IppBackend(ippeveprinter.uri)
    first = await backend.deliver(ticket(), chunks(PDF), ignore, lambda _id: _noop())
    assert first.state == "completed" and first.printer_job_id is not None
    # The connector died after the printer got the document but before it learned the end.
    again = await backend.deliver(ticket(first.printer_job_id), chunks(PDF), ignore, lambda _id: _noop())
    assert again.state == "completed" and again.printer_job_id == first.printer_job_id
    assert len(await ippeveprinter.wait_for_documents(1)) == 1
    assert await ippeveprinter.job_states() == [9]  # one job at the printer, completed


async def test_a_job_created_without_its_document_is_canceled_and_delivered_anew(
    ippeveprinter: IppEvePrinter,
) -> None:
    backend = IppBackend(ippeveprinter.uri)
    # The connector died right after Create-Job: the printer holds an empty job.
    create = backend.new_request(Operation.CREATE_JOB)
    create.operation.add("requesting-user-name", ValueTag.NAME, "printrelay")
    created = await backend.send(create)
    orphan = created.value(DelimiterTag.JOB_ATTRIBUTES, "job-id")
    assert isinstance(orphan, int)
    result = await backend.deliver(ticket(orphan), chunks(PDF), ignore, lambda _id: _noop())
    assert result.state == "completed" and result.printer_job_id != orphan
    [document] = await ippeveprinter.wait_for_documents(1)
    assert document.read_bytes() == PDF
    assert sorted(await ippeveprinter.job_states()) == [7, 9]  # the orphan canceled, the new job printed


async def _noop() -> None:
    return None
