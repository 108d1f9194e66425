"""RAW and LPD printers' state and page counts over SNMP, against a real agent (net-snmp's snmpd serving a
Printer MIB the test writes), and through a real relay and connector to the API."""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio
from fixtures_peers import LpdReceiver
from fixtures_printers import RawSink
from fixtures_relay import RelayStack, status_rounds_pass
from fixtures_snmp import SnmpAgent, free_udp_port

from connector.delivery import RawBackend, backend_for_uri
from connector.printer_mib import (
    ALERT_COLUMNS,
    HR_PRINTER_DETECTED_ERROR_STATE,
    HR_PRINTER_STATUS,
    PRT_ALERT_CODE,
    PRT_ALERT_SEVERITY_LEVEL,
    PRT_MARKER_LIFE_COUNT,
    SETTLE_WITHIN,
    MibStatus,
    PrinterMib,
)
from connector.snmp import SnmpClient, SnmpError
from connector.status import STREAM_CAPABILITIES, poll

NO_PAPER, DOOR_OPEN, JAMMED, LOW_TONER = 1, 4, 5, 2
IDLE, PRINTING = 3, 4
CRITICAL, WARNING = 3, 4
TRAY_EMPTY = (CRITICAL, 8, 808, "Tray 1 empty: load A4 plain paper")


def client(agent: SnmpAgent, **kw: Any) -> SnmpClient:
    return SnmpClient("127.0.0.1", agent.port, **kw)


# --- the client and the MIB against snmpd ---------------------------------------------------------------


async def test_get_and_bulk_against_snmpd(snmp_agent: SnmpAgent) -> None:
    snmp_agent.printer(status=IDLE, errors=[NO_PAPER], alerts=[TRAY_EMPTY], life_count=4321)
    values = await client(snmp_agent).get(
        [HR_PRINTER_STATUS, HR_PRINTER_DETECTED_ERROR_STATE, PRT_MARKER_LIFE_COUNT]
    )
    assert [(v.kind, v.value) for v in values.values()] == [
        ("integer", 3), ("string", b"\x40\x00"), ("counter", 4321),
    ]  # fmt: skip
    missing = (await client(snmp_agent).get([(*PRT_MARKER_LIFE_COUNT[:-1], 9)]))[
        (*PRT_MARKER_LIFE_COUNT[:-1], 9)
    ]
    assert not missing.exists and missing.kind == "noSuchInstance"
    walked = await client(snmp_agent).bulk(ALERT_COLUMNS, 4)
    assert (walked[0].oid, walked[0].value) == ((*PRT_ALERT_SEVERITY_LEVEL, 1, 1), CRITICAL)
    assert any(v.oid == (*PRT_ALERT_CODE, 1, 1) and v.value == 808 for v in walked)


async def test_no_agent_or_a_wrong_community_is_an_error_within_its_bound(snmp_agent: SnmpAgent) -> None:
    started = time.monotonic()
    try:
        await SnmpClient("127.0.0.1", free_udp_port(), timeout=5.0).get([HR_PRINTER_STATUS])
    except SnmpError as exc:
        assert "port unreachable" in str(exc)  # a connected UDP socket hears the ICMP at once
    else:
        raise AssertionError("a closed port answered")
    assert time.monotonic() - started < 5  # at once: waiting out the tries takes 5 s x 2
    started = time.monotonic()
    try:  # snmpd drops a request of an unknown community without a word
        await client(snmp_agent, community="private", timeout=0.3, retries=1).get([HR_PRINTER_STATUS])
    except SnmpError as exc:
        assert "within 0.3 s x 2" in str(exc)
    else:
        raise AssertionError("a wrong community answered")
    assert 0.55 < time.monotonic() - started < 5  # both tries waited out, and no more
    assert snmp_agent.requests() == 2  # the same request, tried twice

    # a printer whose agent was silent at the last status poll: jobs do not wait for it to be silent again
    silent = PrinterMib(client(snmp_agent, community="private", timeout=0.3))
    assert await silent.status() is None and snmp_agent.requests() == 4
    assert await silent.life_count() is None
    assert snmp_agent.requests() == 4  # not asked
    answering = PrinterMib(client(snmp_agent))
    answering.answering = False  # as after a silent poll: the next poll that hears it counts again
    assert await answering.status() == MibStatus("idle") and await answering.life_count() == 1200


async def test_printer_states_from_a_real_agent(snmp_agent: SnmpAgent) -> None:
    mib = PrinterMib(client(snmp_agent))
    assert await mib.status() == MibStatus("idle")
    snmp_agent.printer(status=PRINTING)
    assert await mib.status() == MibStatus("processing")
    snmp_agent.printer(status=1, errors=[NO_PAPER], alerts=[TRAY_EMPTY])
    assert await mib.status() == MibStatus(
        "stopped", ("media-empty-error",), "Tray 1 empty: load A4 plain paper"
    )
    snmp_agent.printer(status=1, errors=[JAMMED], alerts=[(CRITICAL, 13, 8, "Paper jam in the fuser")])
    assert await mib.status() == MibStatus("stopped", ("media-jam-error",), "Paper jam in the fuser")
    snmp_agent.printer(status=1, errors=[DOOR_OPEN])  # no alert: the words come from the bit
    assert await mib.status() == MibStatus("stopped", ("door-open-error",), "door open")
    snmp_agent.printer(status=IDLE, errors=[LOW_TONER], alerts=[(WARNING, 11, 1104, "Black toner low")])
    assert await mib.status() == MibStatus("idle", ("toner-low-warning",), "Black toner low")
    snmp_agent.printer(status=IDLE)
    assert await mib.status() == MibStatus("idle")
    assert await mib.life_count() == 1200
    snmp_agent.printer(life_count=None)
    assert await mib.life_count() is None


async def test_page_counter_settles_after_a_job(snmp_agent: SnmpAgent) -> None:
    mib = PrinterMib(client(snmp_agent))
    snmp_agent.printer(status=PRINTING, life_count=1200)

    async def prints_five_pages() -> None:
        await trio.sleep(0.3)
        snmp_agent.printer(status=PRINTING, life_count=1203)
        await trio.sleep(0.3)
        snmp_agent.printer(status=IDLE, life_count=1205)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prints_five_pages)
        started = time.monotonic()
        assert await mib.settled_count(1200, interval=0.1) == 1205  # waited while it printed
    assert time.monotonic() - started > 0.6  # (a count given up at the bound would be None)
    # a counter that never moves (a printer slow to start, a job of no pages): no count, not 0 pages
    assert await mib.settled_count(1205, within=0.5, interval=0.1) is None
    # a printer that never stops printing: no count once the bound is reached, not a partial one
    snmp_agent.printer(status=PRINTING, life_count=1210)
    assert await mib.settled_count(1205, within=0.5, interval=0.1) is None


async def test_poll_asks_snmp_first_and_the_port_without_it(snmp_agent: SnmpAgent, raw_sink: RawSink) -> None:
    snmp_agent.printer(status=1, errors=[NO_PAPER], alerts=[TRAY_EMPTY])
    status = await poll(backend_for_uri(raw_sink.uri, snmp_port=snmp_agent.port))
    assert (status.state, status.reasons, status.message) == (
        "stopped", ("media-empty-error",), "Tray 1 empty: load A4 plain paper",
    )  # fmt: skip
    assert status.capabilities == STREAM_CAPABILITIES
    # no agent answers: the TCP connect, as before
    status = await poll(backend_for_uri(raw_sink.uri, snmp_port=free_udp_port()))
    assert (status.state, status.reasons, status.message) == ("idle", (), "")
    # an agent without the Printer MIB (a print server's host) is no answer either
    snmp_agent.printer(status=None, life_count=None)
    status = await poll(backend_for_uri(raw_sink.uri, snmp_port=snmp_agent.port))
    assert status.state == "idle"
    # ?snmp=false: not one request
    asked = snmp_agent.requests()
    status = await poll(backend_for_uri(f"{raw_sink.uri}/?snmp=false", snmp_port=snmp_agent.port))
    assert status.state == "idle" and snmp_agent.requests() == asked
    # SNMP says idle, the printer's port is closed (its print service is down): offline, jobs wait
    snmp_agent.printer()
    dead = backend_for_uri("socket://127.0.0.1:1", snmp_port=snmp_agent.port)
    assert isinstance(dead, RawBackend) and (await poll(dead)).state == "offline"


async def test_lpd_printers_are_asked_too(snmp_agent: SnmpAgent, lpd_receiver: LpdReceiver) -> None:
    snmp_agent.printer(status=1, errors=[JAMMED])
    status = await poll(backend_for_uri(lpd_receiver.uri("lp"), snmp_port=snmp_agent.port))
    assert (status.state, status.reasons) == ("stopped", ("media-jam-error",))
    status = await poll(backend_for_uri(lpd_receiver.uri("lp") + "?snmp=false", snmp_port=snmp_agent.port))
    assert (status.state, status.reasons) == ("idle", ())


# --- through the relay and the connector ------------------------------------------------------------------


async def printer_until(client: httpx.AsyncClient, printer_id: str, **wanted: Any) -> dict[str, Any]:
    """GET /v1/printers/{id} until it shows ``wanted``."""
    with trio.fail_after(10):
        while True:
            printer: dict[str, Any] = (await client.get(f"/v1/printers/{printer_id}")).json()
            if all(printer.get(k) == v for k, v in wanted.items()):
                return printer
            await trio.sleep(0.05)


async def test_api_shows_paper_out_holds_jobs_and_counts_pages(
    relay_stack: RelayStack, raw_sink: RawSink, snmp_agent: SnmpAgent
) -> None:
    connector = await relay_stack.start_connector(
        {"labels": raw_sink.uri}, snmp_port=snmp_agent.port, status_interval=0.2
    )
    async with relay_stack.client() as api:
        printer = await printer_until(api, "labels", state="idle")
        assert (printer["reasons"], printer["message"], printer["kind"]) == ([], "", "socket")

        # the agent goes from idle to paper out: the printer is stopped, with IPP's reason, and says why
        snmp_agent.printer(status=1, errors=[NO_PAPER], alerts=[TRAY_EMPTY])
        printer = await printer_until(api, "labels", state="stopped")
        assert printer["printer_state"] == "stopped" and printer["online"] is True
        assert printer["reasons"] == ["media-empty-error"]
        assert printer["message"] == "Tray 1 empty: load A4 plain paper"

        # a job waits at the relay rather than being sent into a printer that cannot print
        reply = await api.post("/v1/printers/labels/jobs", content=b"^XA^FDlabel^FS^XZ",
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert reply.status_code == 201, reply.text
        job_id = reply.json()["id"]
        await status_rounds_pass(connector, 3)  # the printer was asked, and the job not sent
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "queued" and job["attempts"] == 0 and job["pages"] is None
        assert raw_sink.documents == []

        # paper loaded: the printer prints (the counter moves while it does) and the job completes
        snmp_agent.printer(status=PRINTING, life_count=1200)
        await printer_until(api, "labels", state="processing", reasons=[], message="")
        with trio.fail_after(10):
            await raw_sink.wait_for(1)
        snmp_agent.printer(status=IDLE, life_count=1203)
        job = await relay_stack.wait_job(job_id)
        assert job["state"] == "completed" and job["pages"] == 3, job
        events = (await api.get(f"/v1/jobs/{job_id}/events")).json()["events"]
        assert "3 pages by the printer's page counter (best effort)" in events[-1]["message"]
        await printer_until(api, "labels", state="idle")

        # a printer whose counter the agent does not have: the job completes, its pages unknown
        snmp_agent.printer(life_count=None)
        reply = await api.post("/v1/printers/labels/jobs", content=b"second",
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
        job = await relay_stack.wait_job(reply.json()["id"])
        assert job["state"] == "completed" and job["pages"] is None


async def test_snmp_false_sends_nothing_and_keeps_the_tcp_connect(
    relay_stack: RelayStack, raw_sink: RawSink, snmp_agent: SnmpAgent
) -> None:
    snmp_agent.printer(status=1, errors=[NO_PAPER], alerts=[TRAY_EMPTY])
    uri = f"{raw_sink.uri}/?snmp=false"
    await relay_stack.start_connector({"plain": uri}, snmp_port=snmp_agent.port, status_interval=0.2)
    async with relay_stack.client() as api:
        printer = await printer_until(api, "plain", state="idle")
        assert printer["reasons"] == [] and printer["message"] == ""
        reply = await api.post("/v1/printers/plain/jobs", content=b"raw bytes",
                               headers={"content-type": "application/octet-stream"})  # fmt: skip
        job = await relay_stack.wait_job(reply.json()["id"])
        assert job["state"] == "completed" and job["pages"] is None
    assert snmp_agent.requests() == 0, snmp_agent.log()


async def test_jobs_queued_for_a_printer_are_printed_not_held_back_for_page_counts(
    relay_stack: RelayStack, raw_sink: RawSink, snmp_agent: SnmpAgent
) -> None:
    """A page count waits up to SETTLE_WITHIN (5 s) for the counter to settle; jobs waiting for the printer
    meanwhile would each pay that. With a counter that never moves (it never settles), three jobs submitted
    together all reach the printer well within one settle time."""
    await relay_stack.start_connector({"labels": raw_sink.uri}, snmp_port=snmp_agent.port)
    snmp_agent.printer(status=IDLE, life_count=500)
    async with relay_stack.client() as api:
        await printer_until(api, "labels", state="idle")
        for n in range(3):
            reply = await api.post("/v1/printers/labels/jobs", content=b"label %d" % n,
                                   headers={"content-type": "application/octet-stream"})  # fmt: skip
            assert reply.status_code == 201, reply.text
        with trio.fail_after(SETTLE_WITHIN * 1.5):  # held back, the third would arrive after two settles
            await raw_sink.wait_for(3)
