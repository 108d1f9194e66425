"""Printers at run time: offline and back (jobs wait, then print), adoption of a discovered candidate,
changes and removal over the live tunnel, and the connector's printer book across restarts."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fixtures_peers import LpdReceiver
from fixtures_printers import RawSink
from fixtures_relay import RelayStack, status_rounds_pass

from connector.config import PrinterSpec
from connector.printerbook import PrinterBook, parse_printer_request


async def wait_printer(
    client: httpx.AsyncClient, printer_id: str, state: str, within: float = 10
) -> dict[str, Any]:
    with trio.fail_after(within):
        while True:  # the relay has no push for printer state yet
            reply = await client.get(f"/v1/printers/{printer_id}")
            if reply.status_code == 200 and reply.json()["state"] == state:
                printer: dict[str, Any] = reply.json()
                return printer
            await trio.sleep(0.05)


async def test_offline_printer_holds_jobs_then_prints(
    relay_stack: RelayStack, lpd_receiver: LpdReceiver, nursery: trio.Nursery
) -> None:
    connector = await relay_stack.start_connector({"lpd": lpd_receiver.uri("lp")}, status_interval=0.2)
    async with relay_stack.client() as client:
        await wait_printer(client, "lpd", "idle")
        lpd_receiver.stop()
        offline = await wait_printer(client, "lpd", "offline")
        assert offline["reasons"] == ["offline-report"] and offline["online"] is True

        data = b"%!PS\n" + bytes(range(256)) * 400
        reply = await client.post("/v1/printers/lpd/jobs", content=data)
        assert reply.status_code == 201, reply.text
        job_id = reply.json()["id"]
        # several rounds of status polls pass while it is offline; the job is not attempted
        await status_rounds_pass(connector, 3)
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "queued" and job["attempts"] == 0, job
        assert connector.deliveries == 0

        await lpd_receiver.start(nursery)  # the printer comes back on the same port
        done = await relay_stack.wait_job(job_id)
        assert done["state"] == "completed", done
        assert done["attempts"] == 1  # no attempt was spent while it was away
        (received,) = await lpd_receiver.wait_for(1)
        assert received.sha256 == hashlib.sha256(data).hexdigest()
        assert (await client.get("/v1/printers/lpd")).json()["state"] == "idle"


async def test_adopt_a_discovered_printer_without_restart(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    connector = await relay_stack.start_connector(
        {}, discover=True, discover_mdns=False, discover_cups=False, discover_cidr=["127.0.0.1/32"],
        discover_ipp_port=[], discover_raw_port=[raw_sink.port], status_interval=0.5,
    )  # fmt: skip
    uri = f"socket://127.0.0.1:{raw_sink.port}"
    async with relay_stack.client() as client:
        with trio.fail_after(15):
            while True:
                candidates = (await client.get("/v1/candidates")).json()["candidates"]
                if candidates:
                    break
                await trio.sleep(0.05)
        assert candidates == [
            {"connector_id": "site-1", "uri": uri, "name": f"127.0.0.1:{raw_sink.port}", "source": "scan",
             "make_and_model": "", "suggested_id": f"raw-127.0.0.1-{raw_sink.port}"},
        ]  # fmt: skip

        reply = await client.post("/v1/printers", json={"uri": uri, "id": "front-desk"})
        assert reply.status_code == 201, reply.text
        assert reply.json()["id"] == "front-desk" and reply.json()["state"] == "idle"
        assert (await client.get("/v1/candidates")).json()["candidates"] == []

        reply = await client.post("/v1/printers/front-desk/jobs", content=b"hello printer")
        assert reply.status_code == 201, reply.text
        job = await relay_stack.wait_job(reply.json()["id"])
        assert job["state"] == "completed", job
        (document,) = await raw_sink.wait_for(1)
        assert document.path.read_bytes() == b"hello printer"
    assert connector.tunnel.sessions_opened == 1  # the tunnel stayed up throughout
    assert (relay_stack.tmp_path / "connector-site-1" / "printers.json").exists()


async def test_change_and_remove_printers(
    relay_stack: RelayStack, raw_sink: RawSink, lpd_receiver: LpdReceiver
) -> None:
    connector = await relay_stack.start_connector({"p1": raw_sink.uri})
    async with relay_stack.client() as client:
        reply = await client.post("/v1/printers", json={"id": "p1", "uri": lpd_receiver.uri("q")})
        assert reply.status_code == 200, reply.text
        assert connector.printers["p1"].spec.uri == lpd_receiver.uri("q")
        reply = await client.post("/v1/printers/p1/jobs", content=b"via lpd now")
        assert (await relay_stack.wait_job(reply.json()["id"]))["state"] == "completed"
        (job,) = await lpd_receiver.wait_for(1)
        assert job.queue == "q"

        bad = await client.post("/v1/printers", json={"id": "p2", "uri": "ftp://printer/x"})
        assert bad.status_code == 400 and "unsupported URI" in bad.json()["error"]
        bad = await client.post("/v1/printers", json={"uri": "socket://10.9.9.9"})
        assert bad.status_code == 400 and "id is required" in bad.json()["error"]

        reply = await client.delete("/v1/printers/p1")
        assert reply.status_code == 200 and reply.json()["printer_state"] == "removed"
        assert "p1" not in connector.printers
        assert (await client.delete("/v1/printers/p1")).status_code == 404

    weak = await relay_stack.token("api", scopes=("jobs:submit", "jobs:read"))
    async with relay_stack.client(weak) as client:
        reply = await client.post("/v1/printers", json={"id": "p3", "uri": raw_sink.uri})
        assert reply.status_code == 403 and "printers:admin" in reply.json()["error"]
    assert connector.tunnel.sessions_opened == 1


async def test_printer_book_survives_restart(tmp_path: Path) -> None:
    configured = [PrinterSpec("a", "socket://10.0.0.1"), PrinterSpec("b", "socket://10.0.0.2")]
    book = PrinterBook(tmp_path, configured)
    await book.put(PrinterSpec("c", "lpd://10.0.0.3/lp"))
    await book.put(PrinterSpec("a", "ipp://10.0.0.9/ipp/print"))
    assert await book.remove("b")
    assert not await book.remove("nope")
    again = PrinterBook(tmp_path, configured)
    assert {s.id: s.uri for s in again.specs()} == {"a": "ipp://10.0.0.9/ipp/print", "c": "lpd://10.0.0.3/lp"}


def test_printer_requests_are_validated() -> None:
    assert parse_printer_request(b'{"id": "x", "uri": "cups:Office"}') == PrinterSpec("x", "cups:Office")
    for body, message in [
        (b"[]", "must be an object"),
        (b"{", "not JSON"),
        (b'{"id": "bad id", "uri": "socket://h"}', "invalid printer id"),
        (b'{"id": "x"}', "uri must be a string"),
        (b'{"id": "x", "uri": "lpd://h"}', "needs a queue name"),
        (b"x" * 20000, "exceeds"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_printer_request(body)
