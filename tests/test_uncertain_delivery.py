"""A connector that stops while a RAW printer is taking a job cannot know what printed. The job is held
for a person (uncertain_delivery=hold, the default) or printed again (reprint); never printed twice
blindly. (tests/test_crash_connector.py does this with SIGKILL and real processes.)"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from fixtures_relay import RelayStack

from connector.app import UNKNOWN_OUTCOME, Connector
from connector.config import ConnectorConfig, parse_printer, parse_uncertain_delivery
from connector.ledger import Ledger

DOCUMENT = os.urandom(8 * 1024 * 1024)  # far more than the socket buffers hold: the feed stalls


class StallingPrinter:
    """A RAW printer that, while ``stall`` is set, reads a job's first bytes and then stops reading."""

    def __init__(self) -> None:
        self.port = 0
        self.stall = True
        self.first_bytes = trio.Event()
        self.reset_stalled = trio.Event()  # set: stalled connections are reset (SO_LINGER 0)
        self.documents: list[bytes] = []
        self.fragments: list[bytes] = []  # connections that ended before EOF

    @property
    def uri(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        received = bytearray()
        async with stream:
            try:
                async for data in stream:
                    received += data
                    if self.stall:
                        self.first_bytes.set()
                        await self.reset_stalled.wait()
                        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.fragments.append(bytes(received))
                        return
            except trio.BrokenResourceError:
                self.fragments.append(bytes(received))
                return
        if received:  # connections that send nothing are reachability probes
            self.documents.append(bytes(received))


@pytest.fixture
async def printer(nursery: trio.Nursery) -> AsyncIterator[StallingPrinter]:
    printer = StallingPrinter()
    listeners = await nursery.start(partial(trio.serve_tcp, printer.handle, 0, host="127.0.0.1"))
    printer.port = listeners[0].socket.getsockname()[1]
    yield printer


async def start_connector(stack: RelayStack, printer: StallingPrinter, **kw: Any) -> trio.CancelScope:
    """A connector for printer ``raw``, stopped by cancelling the scope (a crash, mid-delivery)."""
    return await stack.stoppable_connector({"raw": printer.uri}, **kw)


async def stop_during_feed(stack: RelayStack, printer: StallingPrinter, **kw: Any) -> str:
    """Submit a job and stop the connector while the printer has part of it; the job id."""
    scope = await start_connector(stack, printer, **kw)
    async with stack.client() as client:
        response = await client.post("/v1/printers/raw/jobs", content=DOCUMENT)
        assert response.status_code == 201, response.text
    with trio.fail_after(30):
        await printer.first_bytes.wait()
    ledger = Ledger(stack.tmp_path / "connector" / "ledger.sqlite3")
    await ledger.open()
    try:
        entry = await ledger.get(response.json()["id"])
    finally:
        await ledger.close()
    assert entry is not None and entry.state == "feeding"  # on disk before the first byte left
    scope.cancel()
    with trio.fail_after(10):
        while stack.relay.registry.sessions():
            await stack.relay.registry.changed.wait()
    printer.stall = False
    job_id: str = response.json()["id"]
    return job_id


async def test_a_job_the_connector_stopped_feeding_is_held_then_released_once(
    relay_stack: RelayStack, printer: StallingPrinter
) -> None:
    job_id = await stop_during_feed(relay_stack, printer)
    await start_connector(relay_stack, printer)
    job = await relay_stack.wait_job(job_id, ("held", "completed", "failed"))
    assert job["state"] == "held"
    assert job["hold_reason"] == UNKNOWN_OUTCOME == job["last_error"]
    assert printer.documents == []  # not printed again blindly
    async with relay_stack.client() as client:
        history = (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]
        assert any(UNKNOWN_OUTCOME in entry["message"] for entry in history)
        released = await client.post(f"/v1/jobs/{job_id}/release")
        assert released.status_code == 200, released.text
    job = await relay_stack.wait_job(job_id)
    assert job["state"] == "completed" and job["hold_reason"] is None
    assert [hashlib.sha256(d).digest() for d in printer.documents] == [hashlib.sha256(DOCUMENT).digest()]


async def test_reprint_prints_a_job_of_unknown_outcome_again(
    relay_stack: RelayStack, printer: StallingPrinter
) -> None:
    reprint = [parse_uncertain_delivery("*=reprint")]
    job_id = await stop_during_feed(relay_stack, printer, uncertain_delivery=reprint)
    await start_connector(relay_stack, printer, uncertain_delivery=reprint)
    job = await relay_stack.wait_job(job_id, ("held", "completed", "failed"))
    assert job["state"] == "completed"
    assert printer.documents == [DOCUMENT]


async def test_a_printer_that_resets_mid_feed_is_retried_not_held(
    relay_stack: RelayStack, printer: StallingPrinter
) -> None:
    """The connector saw that attempt fail: the resend is an ordinary retry, not an unknown outcome."""
    await start_connector(relay_stack, printer)
    async with relay_stack.client() as client:
        job_id = (await client.post("/v1/printers/raw/jobs", content=DOCUMENT)).json()["id"]
    with trio.fail_after(30):
        await printer.first_bytes.wait()
    printer.stall = False
    printer.reset_stalled.set()
    job = await relay_stack.wait_job(job_id, ("held", "completed", "failed"))
    assert job["state"] == "completed" and job["attempts"] == 2
    assert printer.documents == [DOCUMENT] and len(printer.fragments) == 1


def test_parse_uncertain_delivery_names_the_choices() -> None:
    assert parse_uncertain_delivery("labels=reprint") == ("labels", "reprint")
    assert parse_uncertain_delivery(" * = hold ") == ("*", "hold")
    with pytest.raises(ValueError, match="must be hold or reprint, not 'maybe'"):
        parse_uncertain_delivery("labels=maybe")
    with pytest.raises(ValueError, match="PRINTER=hold or PRINTER=reprint"):
        parse_uncertain_delivery("reprint")


async def test_an_old_ledger_gains_the_unknown_outcomes_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE deliveries (job_id TEXT PRIMARY KEY, printer_id TEXT NOT NULL, state TEXT NOT NULL, "
        "message TEXT NOT NULL, printer_job_id INTEGER, started_at REAL NOT NULL, updated_at REAL NOT NULL);"
        "INSERT INTO deliveries VALUES ('j1', 'p', 'handed', 'took it', NULL, 1, 1);"
    )
    old.close()
    ledger = Ledger(path)
    await ledger.open()
    try:
        entry = await ledger.get("j1")
        assert entry is not None and entry.state == "handed" and entry.unknown_outcomes == 0
        await ledger.record("j2", "p", "feeding", unknown_outcomes=2)
        await ledger.record("j2", "p", "started")  # a later write never lowers the count
        entry = await ledger.get("j2")
        assert entry is not None and entry.unknown_outcomes == 2
    finally:
        await ledger.close()


async def _connector_printing_slowly(
    relay_stack: RelayStack, nursery: trio.Nursery, until: trio.Event | None = None
) -> tuple[Connector, trio.Event, str]:
    """A connector with one RAW printer that closes a moment after each job (or once ``until`` is set); a
    job submitted to it and taken by the printer. (The connector, its end, the job id.)"""
    took_it = trio.Event()

    async def slow_to_finish(stream: trio.SocketStream) -> None:
        async with stream:
            data = b"".join([chunk async for chunk in stream])
            if data:
                took_it.set()
                if until is not None:
                    await until.wait()
                else:
                    await trio.sleep(0.5)  # the printer's own pace: it closes a moment after the job

    listeners = await nursery.start(partial(trio.serve_tcp, slow_to_finish, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    token = await relay_stack.token("connector", "acme", connector_id="site-1")
    connector = Connector(
        ConnectorConfig(
            relay=relay_stack.tunnel_url,
            token=token,
            printer=[parse_printer(f"raw=socket://127.0.0.1:{port}")],
            state_dir=relay_stack.tmp_path / "connector",
        )
    )
    stopped = trio.Event()

    async def run() -> None:
        await connector.run()
        stopped.set()

    nursery.start_soon(run)
    with trio.fail_after(10):
        while not relay_stack.relay.registry.sessions():
            await relay_stack.relay.registry.changed.wait()
    async with relay_stack.client() as client:
        job_id = (await client.post("/v1/printers/raw/jobs", content=b"one page")).json()["id"]
    with trio.fail_after(10):
        await took_it.wait()
    return connector, stopped, job_id


async def _history(relay_stack: RelayStack, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with relay_stack.client() as client:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        return job, (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]


async def test_a_draining_connector_reports_the_jobs_it_finishes(
    relay_stack: RelayStack, nursery: trio.Nursery
) -> None:
    """SIGTERM on a connector: the deliveries finish, and their final state reaches the relay before the
    tunnel closes (it used to stay "queued: tunnel lost" until the connector came back)."""
    connector, stopped, job_id = await _connector_printing_slowly(relay_stack, nursery)
    with trio.fail_after(10):
        await connector.drain(30)
        await stopped.wait()
    job, history = await _history(relay_stack, job_id)
    assert job["state"] == "completed", history


async def test_jobs_sent_to_a_stopping_connector_keep_their_attempts(
    relay_stack: RelayStack, nursery: trio.Nursery
) -> None:
    """While a connector drains (SIGTERM, a long job still printing) the relay may send it more jobs; each
    is answered "connector is draining". That is not the job's fault: it used to spend an attempt a
    second, and a stop of more than a few seconds failed every job that came due meanwhile."""
    release = trio.Event()
    connector, stopped, printing = await _connector_printing_slowly(relay_stack, nursery, until=release)
    nursery.start_soon(connector.drain, 30)
    with trio.fail_after(5):
        while not connector.draining:  # noqa: ASYNC110  (set by the drain task's first step)
            await trio.sleep(0.01)
    async with relay_stack.client() as client:
        later = (await client.post("/v1/printers/raw/jobs", content=b"later")).json()["id"]
        with trio.fail_after(20):
            answered = 0
            async for state in relay_stack.watch(client, later):  # queued, sending, queued
                answered += state == "queued"
                if answered == 2:  # turned away
                    break
        job, history = await _history(relay_stack, later)
    assert job["state"] == "queued" and job["attempts"] == 0, history
    assert job["last_error"] == "connector is draining", history
    release.set()
    with trio.fail_after(10):
        await stopped.wait()
    assert (await relay_stack.wait_job(printing))["state"] == "completed"


async def test_a_session_the_relay_drains_reports_its_jobs_before_it_closes(
    relay_stack: RelayStack, nursery: trio.Nursery
) -> None:
    """The relay replica is going away (POST /v1/drain): the session's job finishes and its final state
    goes out on that session before it closes (it used to close first: "tunnel lost", a resend, and a
    "delivered before" from the ledger)."""
    _, _, job_id = await _connector_printing_slowly(relay_stack, nursery)
    [session] = relay_stack.relay.registry.sessions()
    await session.ask_to_drain()
    with trio.fail_after(10):
        await session.h2.finished.wait()
        await relay_stack.wait_job(job_id, states=("completed",))
    job, history = await _history(relay_stack, job_id)
    assert [e["state"] for e in history].count("sending") == 1, history
    assert "delivered before" not in (job.get("message") or ""), history
