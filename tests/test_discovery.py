"""Discovery: CUPS queues, DNS-SD (avahi announcing an ippeveprinter) and a loopback range scan."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import trio
from fixtures_peers import Cupsd
from fixtures_printers import IppEvePrinterFactory, RawSink
from zeroconf import ServiceInfo

from connector.discovery import DiscoverySettings, discover, main_discover
from connector.discovery.cups import cups_queues
from connector.discovery.mdns import browse, candidate_from_service
from connector.discovery.naming import suggest_id
from connector.discovery.scan import addresses, scan
from tunnel.messages import PrinterCandidate, candidate_event, decode_event, parse_event


def test_suggested_ids_are_valid_printer_ids() -> None:
    assert suggest_id("HP LaserJet 4 (Floor 2)") == "hp-laserjet-4-floor-2"
    assert suggest_id("Ünïcode ☃") == "n-code"
    assert suggest_id("☃☃") == "printer"
    assert len(suggest_id("x" * 200)) == 63


def test_scan_ranges_are_bounded() -> None:
    assert addresses(["127.0.0.0/29"]) == [f"127.0.0.{i}" for i in range(1, 7)]
    assert addresses(["10.0.0.5"]) == ["10.0.0.5"]
    with pytest.raises(ValueError, match="too large: at most 4096"):
        addresses(["10.0.0.0/16"])
    with pytest.raises(ValueError):
        addresses(["not-a-range"])


def test_service_records_become_uris() -> None:
    def info(type_: str, port: int, props: dict[bytes, bytes]) -> ServiceInfo:
        return ServiceInfo(type_, f"Office Printer.{type_}", port=port, properties=props,
                           addresses=[socket.inet_aton("192.0.2.9")], server="office.local.")  # fmt: skip

    ipp = "_ipp._tcp.local."
    c = candidate_from_service(
        ipp, f"Office Printer.{ipp}", info(ipp, 631, {b"rp": b"ipp/print", b"ty": b"HP X"})
    )
    assert c == PrinterCandidate(
        "ipp://192.0.2.9:631/ipp/print", "Office Printer", "mdns", "HP X", "office-printer"
    )
    lpd = "_printer._tcp.local."
    c = candidate_from_service(lpd, f"Office Printer.{lpd}", info(lpd, 515, {b"rp": b"lp1"}))
    assert c is not None and c.uri == "lpd://192.0.2.9:515/lp1"
    raw = "_pdl-datastream._tcp.local."
    c = candidate_from_service(raw, f"Office Printer.{raw}", info(raw, 9100, {}))
    assert c is not None and c.uri == "socket://192.0.2.9:9100"


def test_candidate_events_round_trip_and_old_decoder_ignores_them() -> None:
    candidate = PrinterCandidate("ipp://10.0.0.5:631/ipp/print", "Lobby", "mdns", "HP", "lobby")
    line = candidate_event(candidate).strip()
    assert parse_event(line) == candidate
    assert decode_event(line) is None
    assert json.loads(line)["type"] == "candidate"


async def test_range_scan_finds_ipp_and_raw_printers(
    ippeveprinter_factory: IppEvePrinterFactory, raw_sink: RawSink
) -> None:
    printer = ippeveprinter_factory("scan-me")
    with trio.fail_after(10):
        found = await scan(["127.0.0.0/29"], ipp_ports=[printer.port], raw_ports=[raw_sink.port])
    assert [c.uri for c in found] == [
        f"ipp://127.0.0.1:{printer.port}/ipp/print",
        f"socket://127.0.0.1:{raw_sink.port}",
    ]
    assert found[0].name == "scan-me" and found[0].suggested_id == "scan-me" and found[0].source == "scan"
    assert raw_sink.documents == []  # a connect-only probe prints nothing


async def test_mdns_finds_an_announced_ippeveprinter(ippeveprinter_factory: IppEvePrinterFactory) -> None:
    name = f"printrelay-mdns-{uuid.uuid4().hex[:8]}"
    # the fixture starts printers with "-r off"; a later -r turns DNS-SD registration back on (via avahi)
    printer = ippeveprinter_factory(name, extra_args=("-r", "_print"))
    expected = f"ipp://127.0.0.1:{printer.port}/ipp/print"
    with trio.fail_after(20):
        while True:  # avahi announces a moment after the printer registers
            found = await browse(1.5, interfaces=["127.0.0.1"])
            match = [c for c in found if c.name == name]
            if match:
                break
    assert match[0].uri == expected and match[0].source == "mdns"
    assert match[0].suggested_id == name


async def test_cups_queues_are_candidates(cupsd: Cupsd, raw_sink: RawSink) -> None:
    cupsd.add_queue("Front_Desk", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    cupsd.add_queue("label", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    found = await cups_queues(("127.0.0.1", cupsd.port))
    assert {c.uri for c in found} == {cupsd.uri("Front_Desk"), cupsd.uri("label")}
    assert {c.suggested_id for c in found} == {"front_desk", "label"}
    assert await cups_queues(("127.0.0.1", 1)) == []  # no cupsd: nothing, not an error


async def test_discover_combines_sources(cupsd: Cupsd, raw_sink: RawSink) -> None:
    cupsd.add_queue("q1", f"socket://127.0.0.1:{raw_sink.port}/?snmp=false")
    settings = DiscoverySettings(
        cups_server=("127.0.0.1", cupsd.port), mdns=False, cidrs=("127.0.0.1/32",),
        ipp_ports=(), raw_ports=(raw_sink.port,),
    )  # fmt: skip
    found = await discover(settings)
    assert [c.uri for c in found] == [cupsd.uri("q1"), f"socket://127.0.0.1:{raw_sink.port}"]


def test_main_discover_prints_candidates(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = main_discover(["--no-mdns", "--no-cups", "--cidr", "127.0.0.1/32", "--ipp-ports", "",
                              "--raw-ports", str(port), "--json"])  # fmt: skip
    assert code == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["uri"] == f"socket://127.0.0.1:{port}"
