"""The Printer MIB read as IPP words, and the SNMP messages carrying it: values and bytes alone, no agent."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyasn1.codec.ber import encoder
from pysnmp.proto.api import v2c

from connector.config import parse_printer
from connector.delivery import LpdBackend, RawBackend, backend_for_uri
from connector.printer_mib import (
    HR_PRINTER_DETECTED_ERROR_STATE,
    HR_PRINTER_STATUS,
    PRT_ALERT_CODE,
    PRT_ALERT_DESCRIPTION,
    PRT_ALERT_SEVERITY_LEVEL,
    PRT_MARKER_LIFE_COUNT,
    Alert,
    MibStatus,
    alerts_from,
    counter,
    error_bits,
    interpret,
    pages_between,
)
from connector.snmp import (
    SnmpError,
    Varbind,
    decode_response,
    encode_request,
    parse_oid,
    snmp_enabled,
)
from relay.api.ipp_attributes import PrinterView, printer_attributes
from tunnel.messages import JobStatus, PrinterInfo

IDLE, PRINTING, WARMUP, OTHER = 3, 4, 5, 1


def octets(*numbers: int) -> bytes:
    value = 0
    for number in numbers:
        value |= 0x8000 >> number
    return value.to_bytes(2, "big")


# --- hrPrinterDetectedErrorState and hrPrinterStatus ------------------------------------------------------


def test_error_bits_count_from_the_first_octets_most_significant_bit() -> None:
    assert error_bits(b"") == set()
    assert error_bits(b"\x00\x00") == set()
    assert error_bits(b"\x40") == {1}  # one octet: noPaper
    assert error_bits(b"\x40\x00") == {1}
    assert error_bits(b"\x04\x00") == {5}  # jammed
    assert error_bits(b"\x00\x04") == {13}  # inputTrayEmpty
    assert error_bits(b"\x88\x01") == {0, 4, 15}


@pytest.mark.parametrize(
    ("status", "errors", "expected"),
    [
        (IDLE, (), MibStatus("idle")),
        (PRINTING, (), MibStatus("processing")),
        (WARMUP, (), MibStatus("processing")),
        (OTHER, (), MibStatus("idle")),  # standby, or a printer that says nothing more
        (IDLE, (1,), MibStatus("stopped", ("media-empty-error",), "out of paper")),
        (OTHER, (13,), MibStatus("idle", ("media-empty-warning",), "input tray empty")),
        (OTHER, (1, 13), MibStatus("stopped", ("media-empty-error",), "out of paper; input tray empty")),
        (IDLE, (5,), MibStatus("stopped", ("media-jam-error",), "paper jam")),
        (IDLE, (4,), MibStatus("stopped", ("door-open-error",), "door open")),
        (IDLE, (3,), MibStatus("stopped", ("toner-empty-error",), "out of toner")),
        (IDLE, (10,), MibStatus("stopped", ("marker-supply-missing-error",),
                                "toner or ink cartridge missing")),
        (IDLE, (12,), MibStatus("stopped", ("output-area-full-error",), "output tray full")),
        # warnings and reports: the printer still prints, so its jobs are not held
        (PRINTING, (2,), MibStatus("processing", ("toner-low-warning",), "toner low")),
        (IDLE, (0, 11), MibStatus("idle", ("media-low-warning", "output-area-almost-full-report"),
                                  "paper low; output tray almost full")),
        (IDLE, (8,), MibStatus("idle", ("input-tray-missing-warning",), "input tray missing")),
        # offline, serviceRequested and overduePreventMaint are left out, as CUPS does: printers set them
        # while asleep, and holding a sleeping printer's jobs would never wake it
        (IDLE, (6, 7, 14), MibStatus("idle")),
        (None, (1,), MibStatus("stopped", ("media-empty-error",), "out of paper")),
    ],
)  # fmt: skip
def test_status_and_error_bits_as_ipp_states_and_reasons(
    status: int | None, errors: tuple[int, ...], expected: MibStatus
) -> None:
    assert interpret(status, octets(*errors)) == expected


def test_alerts_give_the_message_and_reasons_by_their_severity() -> None:
    alerts = [
        Alert(severity=4, group=11, code=1104, description="Black toner low"),
        Alert(severity=3, group=8, code=808, description="Tray 2 empty: load A4"),
        Alert(severity=5, group=6, code=4, description="Cover closed"),  # an event, not a condition
        Alert(severity=3, group=13, code=8, description="Jam in the duplexer"),
        Alert(severity=1, group=5, code=7, description=""),  # configurationChange: no reason, no words
    ]
    status = interpret(IDLE, octets(), alerts)
    assert status.state == "stopped"
    assert status.reasons == ("media-empty-error", "media-jam-error", "toner-low-warning")
    # critical first, then warnings; the binary change event says nothing
    assert status.message == "Tray 2 empty: load A4; Jam in the duplexer; Black toner low"


def test_a_reason_given_twice_keeps_its_most_severe_suffix() -> None:
    # the bits say paper low (a warning), a critical alert says the tray is empty: one media-* reason each
    status = interpret(PRINTING, octets(0), [Alert(3, 8, 808, "Tray 1 empty"), Alert(1, 8, 807, "")])
    assert status.reasons == ("media-empty-error", "media-low-warning")
    status = interpret(IDLE, octets(2), [Alert(3, 11, 1104, "toner low, stopped by policy")])
    assert status.reasons == ("toner-low-error",) and status.state == "stopped"


def test_messages_are_bounded_and_printable() -> None:
    long = "x" * 400
    status = interpret(IDLE, None, [Alert(3, 5, 2, long), Alert(3, 5, 2, long)])
    assert len(status.message) == 255
    answer = [
        vb((*PRT_ALERT_SEVERITY_LEVEL, 1, 1), "integer", 4),
        vb((*PRT_ALERT_DESCRIPTION, 1, 1), "string", b"paper\r\n\tlow\x00" + b"y" * 300),
    ]
    [alert] = alerts_from(answer)
    assert alert.description.startswith("paper low y") and len(alert.description) == 255


def vb(oid: tuple[int, ...], kind: str, value: int | bytes | None) -> Varbind:
    return Varbind(oid, kind, value)


def test_alert_rows_from_a_bulk_walk_of_their_columns() -> None:
    answer = [
        vb((*PRT_ALERT_SEVERITY_LEVEL, 1, 2), "integer", 3),
        vb((*PRT_ALERT_SEVERITY_LEVEL, 1, 7), "integer", 4),
        vb((*PRT_ALERT_CODE, 1, 2), "integer", 808),
        vb((*PRT_ALERT_CODE, 1, 7), "integer", 1104),
        vb((*PRT_ALERT_DESCRIPTION, 1, 2), "string", b"Bac 1 vide"),
        vb((*PRT_ALERT_DESCRIPTION, 1, 7), "string", b"Toner \xe9puis\xe9"),  # Latin-1, not UTF-8
        vb(parse_oid("1.3.6.1.2.1.43.18.1.1.9.1.2"), "timeticks", 100),  # prtAlertTime: not read
        vb(parse_oid("1.3.6.1.2.1.43.19.1"), "integer", 1),  # past the table: the walk ran on
        vb((*PRT_ALERT_CODE, 1, 9), "endOfMibView", None),
    ]
    assert alerts_from(answer) == [
        Alert(severity=3, group=None, code=808, description="Bac 1 vide"),
        Alert(severity=4, group=None, code=1104, description="Toner épuisé"),
    ]
    # a row without a severity is not an alert
    assert alerts_from([vb((*PRT_ALERT_CODE, 1, 1), "integer", 8)]) == []


def test_page_counter_values() -> None:
    assert counter(vb(PRT_MARKER_LIFE_COUNT, "counter", 1203)) == 1203
    assert counter(vb(PRT_MARKER_LIFE_COUNT, "integer", 7)) == 7  # some printers send an Integer
    assert counter(vb(PRT_MARKER_LIFE_COUNT, "noSuchInstance", None)) is None
    assert counter(vb(PRT_MARKER_LIFE_COUNT, "string", b"1203")) is None
    assert counter(vb(PRT_MARKER_LIFE_COUNT, "integer", -1)) is None
    assert counter(None) is None
    assert pages_between(1200, 1203) == 3
    assert pages_between(1200, 1200) == 0
    assert pages_between(1200, 5) is None  # reset or wrapped: unknown, not negative
    assert pages_between(None, 1203) is None and pages_between(1200, None) is None


# --- the SNMP messages -------------------------------------------------------------------------------------


def response(
    request_id: int,
    varbinds: list[tuple[str, object]],
    *,
    community: str = "public",
    error_status: int = 0,
    pdu_type: type = v2c.ResponsePDU,
    version: int = 1,
) -> bytes:
    pdu = pdu_type()
    v2c.apiPDU.set_defaults(pdu)
    v2c.apiPDU.set_request_id(pdu, request_id)
    v2c.apiPDU.set_error_status(pdu, error_status)
    v2c.apiPDU.set_varbinds(pdu, [(v2c.ObjectIdentifier(oid), value) for oid, value in varbinds])
    message = v2c.Message()
    v2c.apiMessage.set_defaults(message)
    message["version"] = version
    v2c.apiMessage.set_community(message, community)
    v2c.apiMessage.set_pdu(message, pdu)
    return bytes(encoder.encode(message))


def test_a_get_request_is_snmpv2c_ber() -> None:
    data = encode_request(0x1234, "public", [HR_PRINTER_STATUS])
    # SEQUENCE { version 1, community "public", GetRequest-PDU [0] { request-id 0x1234, 0, 0, varbinds } }
    assert data.hex() == (
        "302a02010104067075626c6963a01d02021234020100020100301130" "0f060b2b060102011903050101010500"
    )  # fmt: skip
    bulk = encode_request(7, "public", [PRT_ALERT_SEVERITY_LEVEL], repetitions=16)
    assert bulk[13] == 0xA5  # GetBulkRequest-PDU
    with pytest.raises(ValueError, match="request-id"):
        encode_request(0, "public", [HR_PRINTER_STATUS])
    with pytest.raises(ValueError, match="repetitions"):
        encode_request(1, "public", [HR_PRINTER_STATUS], repetitions=1000)


def test_an_answer_is_read_with_its_types() -> None:
    data = response(
        42,
        [
            ("1.3.6.1.2.1.25.3.5.1.1.1", v2c.Integer(3)),
            ("1.3.6.1.2.1.25.3.5.1.2.1", v2c.OctetString(hexValue="4000")),
            ("1.3.6.1.2.1.43.10.2.1.4.1.1", v2c.Counter32(1203)),
            ("1.3.6.1.2.1.43.99.1", v2c.NoSuchObject("")),
        ],
    )
    assert decode_response(data, 42, "public", most=4) == [
        Varbind(HR_PRINTER_STATUS, "integer", 3),
        Varbind(HR_PRINTER_DETECTED_ERROR_STATE, "string", b"\x40\x00"),
        Varbind(PRT_MARKER_LIFE_COUNT, "counter", 1203),
        Varbind(parse_oid("1.3.6.1.2.1.43.99.1"), "noSuchObject", None),
    ]


def test_answers_that_are_not_ours_are_dropped() -> None:
    ok = [("1.3.6.1.2.1.25.3.5.1.1.1", v2c.Integer(3))]
    assert decode_response(response(41, ok), 42, "public", most=1) is None  # another request-id
    assert decode_response(response(42, ok, community="private"), 42, "public", most=1) is None
    assert decode_response(response(42, ok, version=0), 42, "public", most=1) is None  # SNMPv1
    assert decode_response(response(42, ok, pdu_type=v2c.GetRequestPDU), 42, "public", most=1) is None
    assert decode_response(b"\x30\x03\x02\x01\x01", 42, "public", most=1) is None  # BER, not a message
    assert decode_response(b"not BER at all", 42, "public", most=1) is None
    assert decode_response(response(42, ok) + b"\x00", 42, "public", most=1) is None  # trailing bytes
    assert decode_response(b"\x30" + b"\x00" * 70000, 42, "public", most=1) is None  # not a datagram


def test_answers_that_say_an_error_or_too_much_are_errors() -> None:
    ok = [("1.3.6.1.2.1.25.3.5.1.1.1", v2c.Integer(3))]
    with pytest.raises(SnmpError, match="genErr"):
        decode_response(response(42, ok, error_status=5), 42, "public", most=1)
    with pytest.raises(SnmpError, match="2 objects"):
        decode_response(response(42, ok * 2), 42, "public", most=1)


# --- ?snmp=false and the messages to the relay ----------------------------------------------------------


def test_snmp_is_on_unless_the_uri_turns_it_off() -> None:
    assert snmp_enabled("socket://10.0.0.9:9100") is True
    assert snmp_enabled("socket://10.0.0.9:9100/?snmp=true") is True
    for off in ("false", "no", "off", "0", "False"):
        assert snmp_enabled(f"socket://10.0.0.9:9100/?snmp={off}") is False
    assert snmp_enabled("lpd://10.0.0.7/lp?contimeout=5&snmp=false") is False
    with pytest.raises(ValueError, match="snmp must be true or false"):
        snmp_enabled("socket://10.0.0.9/?snmp=maybe")
    with pytest.raises(ValueError, match="snmp must be true or false"):
        parse_printer("labels=socket://10.0.0.9/?snmp=maybe")

    raw = backend_for_uri("socket://10.0.0.9:9100/?snmp=false")
    assert isinstance(raw, RawBackend) and raw.snmp is None and raw.port == 9100
    raw = backend_for_uri("socket://10.0.0.9", snmp_port=1161, snmp_community="s3cret")
    assert isinstance(raw, RawBackend) and raw.snmp is not None
    client = raw.snmp.client
    assert (client.host, client.port, client.community) == ("10.0.0.9", 1161, "s3cret")
    assert "s3cret" not in repr(raw.snmp)  # a community is a password of sorts
    lpd = backend_for_uri("lpd://10.0.0.7/lp?snmp=off")
    assert isinstance(lpd, LpdBackend) and lpd.snmp is None and lpd.queue == "lp"


def test_page_count_and_printer_message_travel_optionally() -> None:
    status = JobStatus("completed", "sent 10 bytes", pages=3)
    assert b'"pages":3' in status.encode()
    assert JobStatus.decode(status.encode()) == status
    assert JobStatus.decode(JobStatus("completed", pages=0).encode()).pages == 0  # zero is a count
    assert JobStatus.decode(b'{"state":"completed"}').pages is None  # an older connector
    assert b"pages" not in JobStatus("completed").encode()
    for bogus in (b"-1", b"true", b"1.5", b'"3"', b"10000000000"):  # dropped, the outcome kept
        assert JobStatus.decode(b'{"state":"completed","pages":%s}' % bogus) == JobStatus("completed")
    info = PrinterInfo(
        "labels", "socket://10.0.0.9", "socket", "stopped", ("media-empty-error",), {}, "Tray 1 empty"
    )
    assert PrinterInfo.from_json(info.to_json()) == info
    old = {k: v for k, v in info.to_json().items() if k != "message"}
    assert PrinterInfo.from_json(old).message == ""  # an older connector


def test_the_relays_ipp_printer_passes_the_printers_message_on() -> None:
    view = PrinterView(
        tenant="acme", printer_id="labels", printer_uri="ipp://relay/ipp/print/labels",
        more_info="http://relay/v1/printers/labels", online=True, state="stopped",
        reasons=["media-empty-error"], message="Tray 1 empty: load A4",
    )  # fmt: skip
    attributes = printer_attributes(None, view)
    assert attributes["printer-state"].value == 5
    assert list(attributes["printer-state-reasons"].values) == ["media-empty-error"]
    assert attributes["printer-state-message"].value == "Tray 1 empty: load A4"
    idle = printer_attributes(
        None, PrinterView("acme", "labels", view.printer_uri, view.more_info, True, "idle")
    )
    assert idle["printer-state-message"].value == "Idle."


ANSWER = response(
    42,
    [
        ("1.3.6.1.2.1.25.3.5.1.1.1", v2c.Integer(3)),
        ("1.3.6.1.2.1.25.3.5.1.2.1", v2c.OctetString(hexValue="4000")),
        ("1.3.6.1.2.1.43.10.2.1.4.1.1", v2c.Counter32(1203)),
        ("1.3.6.1.2.1.43.10.2.1.4.1.2", v2c.NoSuchInstance("")),
        ("1.3.6.1.2.1.43.10.2.1.4.1.3", v2c.Counter64(2**40)),
    ],
)


@settings(max_examples=2000, deadline=None, database=None)
@example(edits=[(60, 128, "s"), (60, 136, "i")])  # a length too large for an index: OverflowError
@given(edits=st.lists(st.tuples(st.integers(0, len(ANSWER) - 1), st.integers(0, 255), st.sampled_from("sdi")),
                      min_size=1, max_size=6))  # fmt: skip
def test_a_mangled_answer_is_dropped_or_an_error_never_a_crash(edits: list[tuple[int, int, str]]) -> None:
    """Whatever a datagram holds, the agent's client drops it, reads it, or says SnmpError: a poll never dies
    of a hostile or broken printer."""
    data = bytearray(ANSWER)
    for position, byte, how in edits:
        position %= len(data) or 1
        if how == "s" and data:
            data[position] = byte
        elif how == "d" and data:
            del data[position]
        else:
            data.insert(position, byte)
    try:
        answer = decode_response(bytes(data), 42, "public", most=5)
    except SnmpError:
        return
    assert answer is None or all(isinstance(v, Varbind) for v in answer)
