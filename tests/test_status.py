"""Printer status and capabilities: summarize() on attributes, poll() on real printers, the relay's view."""

from __future__ import annotations

import trio
from fixtures_peers import *  # noqa: F403  (fixtures)
from fixtures_peers import Cupsd
from fixtures_printers import IppEvePrinter, IppEvePrinterFactory, RawSink, free_port
from fixtures_relay import RelayStack

from connector.delivery import backend_for_uri
from connector.status import MAX_IPP_JSON_BYTES, STREAM_CAPABILITIES, poll, summarize
from ipp import AttributeGroup, DelimiterTag, Range, ValueTag
from ipp.jsonattrs import attributes_from_json


def printer_group() -> AttributeGroup:
    group = AttributeGroup(DelimiterTag.PRINTER_ATTRIBUTES)
    group.add("printer-state", ValueTag.ENUM, 5)
    group.add("printer-state-reasons", ValueTag.KEYWORD, "media-empty-error", "paused")
    group.add("printer-state-message", ValueTag.TEXT, "Load paper in tray 1")
    group.add("printer-up-time", ValueTag.INTEGER, 1234)
    group.add("document-format-supported", ValueTag.MIME_MEDIA_TYPE, "application/pdf", "image/urf")
    group.add("sides-supported", ValueTag.KEYWORD, "one-sided", "two-sided-long-edge")
    group.add("media-supported", ValueTag.KEYWORD, "iso_a4_210x297mm", "na_letter_8.5x11in")
    group.add("print-color-mode-supported", ValueTag.KEYWORD, "monochrome", "color")
    group.add("orientation-requested-supported", ValueTag.ENUM, 3, 4)
    group.add("print-quality-supported", ValueTag.ENUM, 4, 5)
    group.add("page-ranges-supported", ValueTag.BOOLEAN, False)
    group.add("copies-supported", ValueTag.RANGE_OF_INTEGER, Range(1, 99))
    group.add("printer-make-and-model", ValueTag.TEXT, "Example Laser 9000")
    group.add("marker-names", ValueTag.NAME, "Black Toner")
    group.add("marker-levels", ValueTag.INTEGER, 12)
    group.add("marker-types", ValueTag.KEYWORD, "toner")
    group.add("marker-colors", ValueTag.NAME, "#000000")
    return group


def test_summarize_reads_state_reasons_and_capabilities() -> None:
    status = summarize(printer_group())
    assert status.state == "stopped"
    assert status.reasons == ("media-empty-error", "paused")
    assert status.message == "Load paper in tray 1"
    caps = status.capabilities
    assert caps["document_formats"] == ["application/pdf", "image/urf"]
    assert caps["sides"] == ["one-sided", "two-sided-long-edge"]
    assert caps["media"] == ["iso_a4_210x297mm", "na_letter_8.5x11in"]
    assert caps["color"] is True and caps["print_color_modes"] == ["monochrome", "color"]
    assert caps["orientations"] == ["portrait", "landscape"] and caps["print_qualities"] == ["normal", "high"]
    assert caps["copies_max"] == 99 and caps["page_ranges"] is False
    assert caps["options"] == ["sides", "media", "print-color-mode", "orientation-requested", "print-quality"]
    assert caps["markers"] == [{"name": "Black Toner", "level": 12, "type": "toner", "color": "#000000"}]
    names = [a.name for a in attributes_from_json(caps["ipp"])]
    assert "sides-supported" in names
    assert "printer-up-time" not in names and "printer-state" not in names  # volatile: no event per poll


def test_summary_is_stable_and_bounded() -> None:
    first, second = printer_group(), printer_group()
    second.add("printer-up-time", ValueTag.INTEGER, 99999)
    assert summarize(first) == summarize(second)
    huge = printer_group()
    huge.add("media-col-database", ValueTag.KEYWORD, *[f"custom_{i}_{'x' * 40}" for i in range(3000)])
    caps = summarize(huge).capabilities
    assert caps["ipp_left_out"] == ["media-col-database"]
    assert len(str(caps["ipp"])) < MAX_IPP_JSON_BYTES * 2


async def test_poll_ipp_printer(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    printer = ippeveprinter_factory("status-test")
    status = await poll(backend_for_uri(printer.uri))
    assert status.state == "idle" and status.reachable
    caps = status.capabilities
    assert "application/pdf" in caps["document_formats"]
    assert "two-sided-long-edge" in caps["sides"]  # the fixture starts it with -2 (duplex)
    assert caps["copies_max"] >= 1
    assert any(a.name == "printer-name" for a in attributes_from_json(caps["ipp"]))


async def test_poll_ipps_printer(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    printer = ippeveprinter_factory("status-tls", tls=True)
    # self-signed and not trusted: reported as unreachable with the reason, never as a crash
    status = await poll(backend_for_uri(printer.uri))
    assert status.state == "offline" and "certificate" in status.message
    assert (await poll(backend_for_uri(printer.plain_uri))).state == "idle"


async def test_poll_stream_printers_and_dead_ones(raw_sink: RawSink) -> None:
    status = await poll(backend_for_uri(raw_sink.uri))
    assert status.state == "idle" and status.capabilities == STREAM_CAPABILITIES
    dead = await poll(backend_for_uri(f"socket://127.0.0.1:{free_port()}"))
    assert (dead.state, dead.reasons) == ("offline", ("offline-report",))
    dead_ipp = await poll(backend_for_uri(f"ipp://127.0.0.1:{free_port()}/ipp/print"))
    assert dead_ipp.state == "offline"


async def test_poll_cups_queue_stopped(cupsd: Cupsd, raw_sink: RawSink) -> None:
    cupsd.add_queue("desk", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    backend = backend_for_uri(cupsd.uri("desk"))
    assert (await poll(backend)).state == "idle"
    await trio.run_process(["cupsdisable", "-h", cupsd.server, "-r", "out of paper", "desk"])
    status = await poll(backend)
    assert status.state == "stopped" and "paused" in status.reasons


# --- at the relay ------------------------------------------------------------------------------------


async def test_relay_shows_state_and_refuses_unsupported_options(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter
) -> None:
    await relay_stack.start_connector({"eve": ippeveprinter.uri})
    async with relay_stack.client() as client:
        with trio.fail_after(10):
            while True:  # the first status poll follows registration
                printer = (await client.get("/v1/printers/eve")).json()
                if printer["state"] == "idle":
                    break
                await trio.sleep(0.05)
        assert "two-sided-long-edge" in printer["capabilities"]["sides"]
        assert printer["capabilities"]["ipp"]

        pdf = b"%PDF-1.4\n%%EOF\n"
        headers = {"content-type": "application/pdf"}
        bad = await client.post(
            "/v1/printers/eve/jobs?media=roll_max_36x1000in", content=pdf, headers=headers
        )
        assert bad.status_code == 400
        assert "media=roll_max_36x1000in is not supported by this printer" in bad.json()["error"]
        bad = await client.post("/v1/printers/eve/jobs?sides=sideways", content=pdf, headers=headers)
        assert bad.status_code == 400 and "sides must be one of" in bad.json()["error"]
        bad = await client.post("/v1/printers/eve/jobs", content=pdf, headers={"content-type": "text/x-nope"})
        assert bad.status_code == 400 and "document-format text/x-nope" in bad.json()["error"]

        reply = await client.post(
            "/v1/printers/eve/jobs?sides=two-sided-short-edge&media=iso_a4_210x297mm&orientation-requested=4",
            content=pdf, headers=headers,
        )  # fmt: skip
        assert reply.status_code == 201, reply.text
        options = reply.json()["options"]
        assert options["sides"] == "two-sided-short-edge" and options["media"] == "iso_a4_210x297mm"
        assert options["orientation-requested"] == "landscape"
    job = await relay_stack.wait_job(reply.json()["id"])
    assert job["state"] == "completed", job
