"""Create-Job + Send-Document with a journal: a job that comes again after a connector crash is neither
lost nor printed twice, whatever moment the crash hit, nor reported done while the printer still prints it."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from fixtures_printers import IppEvePrinter, free_port
from fixtures_processes import ProcessStack
from fixtures_relay import RelayStack
from test_connector_sigterm import wait_for_state

from connector.app import Connector
from connector.config import ConnectorConfig, parse_printer
from connector.delivery import DeliveryError, IppBackend, JobTicket
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


async def test_a_job_left_waiting_for_its_document_is_canceled_once_stalled(
    ippeveprinter: IppEvePrinter,
) -> None:
    """A connector killed between Create-Job and its journal leaves a printer job nobody knows, waiting for a
    document; ippeveprinter then answers every job "busy", for good (it advertises a 60 s abort it does
    not carry out)."""
    backend = IppBackend(ippeveprinter.uri)
    create = backend.new_request(Operation.CREATE_JOB)
    create.operation.add("requesting-user-name", ValueTag.NAME, "printrelay")
    orphan = (await backend.send(create)).value(DelimiterTag.JOB_ATTRIBUTES, "job-id")
    with pytest.raises(DeliveryError) as refused:
        await backend.deliver(ticket(), chunks(PDF), ignore, lambda _id: _noop())
    assert refused.value.busy
    assert await backend.cancel_stalled("printrelay") == []  # younger than the printer's own time-out
    assert await backend.cancel_stalled("printrelay", older_than=0) == [orphan]
    result = await backend.deliver(ticket(), chunks(PDF), ignore, lambda _id: _noop())
    assert result.state == "completed"
    assert sorted(await ippeveprinter.job_states()) == [7, 9]  # the orphan canceled, the job printed


async def test_a_handed_printer_job_is_followed_to_its_end(ippeveprinter_factory: Any) -> None:
    printer: IppEvePrinter = ippeveprinter_factory(held=True)
    backend = IppBackend(printer.uri)
    journaled: list[int] = []

    async def journal(job_id: int) -> None:
        journaled.append(job_id)

    class Crash(Exception):
        pass

    async def crash(state: str, message: str) -> None:
        raise Crash  # the connector dies as the printer accepts the document: nobody follows the job

    with pytest.raises(Crash):
        await backend.deliver(ticket(), chunks(PDF), crash, journal)
    [printer_job] = journaled
    followed: list[Any] = []

    async def follow() -> None:
        followed.append(await backend.follow(ticket(), printer_job))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # the follow polls the printer
        assert followed == []  # not over while the printer prints
        assert await printer.job_states() == [5]
        printer.release()
    [result] = followed
    assert result.state == "completed" and result.printer_job_id == printer_job
    assert len(await printer.wait_for_documents(1)) == 1
    assert await backend.follow(ticket(), 999) is None  # forgotten: it had the document, never sent again
    gone = IppBackend(f"ipp://127.0.0.1:{free_port()}/ipp/print", connect_timeout=2)
    with pytest.raises(DeliveryError) as unreachable:  # not "forgotten": asked again later
        await gone.follow(ticket(), printer_job)
    assert unreachable.value.retryable


@pytest.mark.e2e
async def test_after_a_connector_crash_a_job_still_printing_is_not_reported_done(
    process_stack: ProcessStack, ippeveprinter_factory: Any
) -> None:
    """The connector is SIGKILLed while the printer prints a job it handed over whole. The job comes again:
    the new connector follows the printer job instead of answering "completed" from its ledger at once
    (the relay showed it done while it printed, and a jam after that would never have been reported)."""
    printer: IppEvePrinter = ippeveprinter_factory(held=True)
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    connector = stack.start_connector({"a": printer.uri})
    await stack.wait_printers_online("a")
    async with stack.client() as client:
        job_id = (await client.post("/v1/printers/a/jobs", content=PDF, headers={"content-type":
                  "application/pdf"})).json()["id"]  # fmt: skip
        await wait_for_state(stack, job_id, "printing")  # the printer has it
        connector.kill(signal.SIGKILL)
        connector.start()
        await wait_for_state(stack, job_id, "printing", times=2)  # sent again, and followed
        events = (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]
        assert "had the document" in events[-1]["message"], events
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["state"] == "printing"
        printer.release()
        await wait_for_state(stack, job_id, "completed")
        events = (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]
        assert "not printed again" in events[-1]["message"], events  # the printer's end, no second copy
    assert len(await printer.wait_for_documents(1)) == 1


async def _noop() -> None:
    return None


async def test_a_connector_that_stops_leaves_the_printer_printing(
    relay_stack: RelayStack, ippeveprinter_factory: Any, nursery: trio.Nursery
) -> None:
    """A connector stopping (its drain grace over) while the printer prints a job: the printer goes on,
    and the job's next delivery follows it. It used to send Cancel-Job, as for a job the relay canceled."""
    printer: IppEvePrinter = ippeveprinter_factory(held=True)
    token = await relay_stack.token("connector", "acme", connector_id="site-1")
    connector = Connector(ConnectorConfig(
        relay=relay_stack.tunnel_url, token=token, printer=[parse_printer(f"a={printer.uri}")],
        state_dir=relay_stack.tmp_path / "connector",
    ))  # fmt: skip
    stopped = trio.Event()

    async def run() -> None:
        await connector.run()
        stopped.set()

    nursery.start_soon(run)
    async with relay_stack.client() as client:
        await printer_until_online(relay_stack)
        job_id = (await client.post("/v1/printers/a/jobs", content=PDF, headers={"content-type":
                  "application/pdf"})).json()["id"]  # fmt: skip
    await relay_stack.wait_job(job_id, states=("printing",))
    with trio.fail_after(20):
        await connector.drain(0.2)  # the grace runs out while the printer still prints
        await stopped.wait()
    assert await printer.job_states() == [5]  # processing, not canceled
    printer.release()
    assert len(await printer.wait_for_documents(1)) == 1
    assert await printer.job_states() == [9]


async def printer_until_online(relay_stack: RelayStack) -> None:
    with trio.fail_after(10):
        while not relay_stack.relay.registry.sessions():
            await relay_stack.relay.registry.changed.wait()
