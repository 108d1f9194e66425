"""The sans-IO parts of the IPP endpoint: request checks, attribute sets and groups, job tickets."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from ipp import (
    Attribute,
    DelimiterTag,
    IPPError,
    Message,
    Operation,
    PrinterState,
    Range,
    Status,
    ValueTag,
    collection,
    decode,
    new_request,
)
from relay.api.ipp import check_request, job_number, uri_credentials
from relay.api.ipp_attributes import (
    DEFAULT_PRINTER_ATTRIBUTES,
    PrinterView,
    is_job_template,
    printer_attributes,
    printer_groups,
    select,
)
from relay.api.ipp_ticket import job_ticket, option_attributes

DATA = Path(__file__).parent / "data" / "ipp"
URI = "ipp://relay.example/ipp/print/hall"


def view(**kw: object) -> PrinterView:
    base: dict[str, object] = {
        "tenant": "acme",
        "printer_id": "hall",
        "printer_uri": URI,
        "more_info": "http://relay.example/v1/printers/hall",
        "online": True,
        "now": 1_700_000_000.0,
    }
    return PrinterView(**{**base, **kw})  # type: ignore[arg-type]


def captured() -> list[Attribute]:
    message, _ = decode((DATA / "get-printer-attributes.response.bin").read_bytes())
    return list(message.group(DelimiterTag.PRINTER_ATTRIBUTES) or ())


def test_check_request_accepts_a_plain_request_and_names_what_is_wrong() -> None:
    check_request(new_request(Operation.GET_JOBS, 1, printer_uri=URI))
    request = new_request(Operation.GET_JOBS, 1, printer_uri=URI)
    request.operation.add("limit", ValueTag.INTEGER, 1, 2)
    with pytest.raises(IPPError, match="'limit' must have one value") as info:
        check_request(request)
    assert info.value.status == Status.CLIENT_ERROR_BAD_REQUEST
    request = new_request(Operation.RESTART_JOB, 1, printer_uri=URI)
    with pytest.raises(IPPError, match="restart-job is not supported") as info:
        check_request(request)
    assert info.value.status == Status.SERVER_ERROR_OPERATION_NOT_SUPPORTED


def test_job_number_from_job_uri_job_id_or_path() -> None:
    request = new_request(Operation.GET_JOB_ATTRIBUTES, 1)
    request.operation.add("job-uri", ValueTag.URI, f"{URI}/17")
    assert job_number(request, None) == 17
    request = new_request(Operation.GET_JOB_ATTRIBUTES, 1, printer_uri=URI)
    assert job_number(request, 5) == 5
    request.operation.add("job-id", ValueTag.INTEGER, 9)
    assert job_number(request, 5) == 9
    request.operation.add("job-id", ValueTag.INTEGER, -1)
    with pytest.raises(IPPError):
        job_number(request, None)


def test_relay_owned_attributes_replace_the_devices() -> None:
    attrs = printer_attributes(captured(), view(online=False, connector_id="site-9"))
    assert attrs["printer-uri-supported"].values == (URI,)
    assert attrs["uri-authentication-supported"].values == ("basic",)
    assert attrs["printer-state"].value == PrinterState.STOPPED
    assert "site-9" in str(attrs["printer-state-message"].value)
    assert "printer-icons" not in attrs and "printer-supply-info-uri" not in attrs
    assert attrs["printer-make-and-model"].value == "Example Printer"
    assert attrs["ipp-features-supported"].values == ("ipp-everywhere",)
    assert {Operation.PRINT_URI, Operation.SEND_URI} <= set(attrs["operations-supported"].values)
    assert attrs["reference-uri-schemes-supported"].values == ("http", "https", "ftp")
    tls = printer_attributes(None, view(printer_uri="ipps://relay.example/ipp/print/hall"))
    assert tls["uri-security-supported"].values == ("tls",)


def test_default_printer_offers_one_value_per_job_template_attribute() -> None:
    attrs = printer_attributes(None, view(state="processing", reasons=["media-low-warning", "Bad Keyword!"]))
    assert attrs["printer-state"].value == PrinterState.PROCESSING
    assert attrs["printer-state-reasons"].values == ("media-low-warning",)
    for attribute in DEFAULT_PRINTER_ATTRIBUTES:
        if attribute.name.endswith("-supported") and attribute.name != "document-format-supported":
            assert len(attribute.values) == 1 or attribute.name == "media-col-supported", attribute.name


def test_requested_attribute_groups() -> None:
    attrs = printer_attributes(captured(), view())
    groups = printer_groups(attrs)
    template = {a.name for a in select(attrs, ["job-template"], groups)}
    description = {a.name for a in select(attrs, ["printer-description"], groups)}
    assert {"copies-supported", "media-col-default", "sides-supported", "media-size-supported"} <= template
    assert {"printer-name", "printer-state", "document-format-supported"} <= description
    assert not template & description
    assert len(select(attrs, ["all"], groups)) == len(attrs)
    assert [a.name for a in select(attrs, ["printer-name", "no-such-thing"], groups)] == ["printer-name"]
    assert is_job_template("print-quality-default") and not is_job_template("printer-name")


def test_ticket_forwards_supported_options_and_reports_the_rest() -> None:
    attrs = printer_attributes(captured(), view())
    template = [
        Attribute("copies", ValueTag.INTEGER, (3,)),
        Attribute("sides", ValueTag.KEYWORD, ("two-sided-short-edge",)),
        Attribute("orientation-requested", ValueTag.ENUM, (4,)),
        Attribute("page-ranges", ValueTag.RANGE_OF_INTEGER, (Range(1, 2), Range(5, 5))),
        Attribute(
            "media-col",
            ValueTag.BEG_COLLECTION,
            (collection(Attribute("media-size-name", ValueTag.KEYWORD, ("iso_a4_210x297mm",))),),
        ),
        Attribute("print-quality", ValueTag.ENUM, (7,)),  # not a quality the printer has
        Attribute("finishings", ValueTag.ENUM, (3,)),  # its default: fine, nothing to forward
    ]
    forward = ["sides", "orientation-requested", "page-ranges", "media", "print-quality"]
    ticket = job_ticket(attrs, template, forward=forward, max_copies=999)
    assert ticket.copies == 3
    assert ticket.options == {
        "sides": "two-sided-short-edge",
        "orientation-requested": "landscape",
        "page-ranges": "1-2,5",
        "media": "iso_a4_210x297mm",
    }
    assert [a.name for a in ticket.unsupported] == ["print-quality"]
    # The same request to a printer whose connector forwards nothing (RAW):
    raw = job_ticket(attrs, template, forward=[], max_copies=999)
    assert raw.options == {} and {a.name for a in raw.unsupported} >= {"sides", "page-ranges"}
    overlapping = [Attribute("page-ranges", ValueTag.RANGE_OF_INTEGER, (Range(3, 5), Range(4, 6)))]
    assert job_ticket(attrs, overlapping, forward=forward, max_copies=999).unsupported == overlapping


def test_options_render_back_as_attributes() -> None:
    attrs = option_attributes(
        2, {"orientation-requested": "landscape", "page-ranges": "1-2,5", "media": "a4"}
    )
    assert [(a.name, a.values) for a in attrs] == [
        ("copies", (2,)),
        ("orientation-requested", (4,)),
        ("page-ranges", (Range(1, 2), Range(5, 5))),
        ("media", ("a4",)),
    ]


def test_uri_credentials_only_from_a_get_printer_attributes_printer_uri() -> None:
    def request(operation: int, uri: str) -> Message:
        return new_request(operation, 1, printer_uri=uri)

    found = uri_credentials(
        request(
            Operation.GET_PRINTER_ATTRIBUTES,
            "ipps://ann%40example.com:p%40ss%3Aword@relay.example/ipp/print/x",
        )
    )
    assert found == "Basic " + base64.b64encode(b"ann@example.com:p@ss:word").decode()
    for message in (
        request(Operation.GET_JOBS, "ipp://ann%40example.com:pw@relay.example/ipp/print/x"),
        request(Operation.GET_PRINTER_ATTRIBUTES, "ipp://relay.example/ipp/print/x"),
        request(Operation.GET_PRINTER_ATTRIBUTES, "ipp://ann%40example.com@relay.example/ipp/print/x"),
        request(Operation.GET_PRINTER_ATTRIBUTES, "ipp://[bad/ipp/print/x"),
        new_request(Operation.GET_PRINTER_ATTRIBUTES, 1),
    ):
        assert uri_credentials(message) is None


@pytest.mark.parametrize(
    ("pull", "value", "held", "unsupported"),
    [
        (False, "no-hold", False, False),
        (False, "indefinite", True, False),
        (False, "evening", True, True),  # a time the relay does not keep: held until released
        (True, "indefinite", True, False),
        (True, "no-hold", True, True),  # a pull printer holds every job
    ],
)
def test_job_hold_until_holds_the_job_or_is_substituted(
    pull: bool, value: str, held: bool, unsupported: bool
) -> None:
    attrs = printer_attributes(None, view(pull=pull))
    assert attrs["job-hold-until-default"].values == (("indefinite",) if pull else ("no-hold",))
    asked = Attribute("job-hold-until", ValueTag.KEYWORD, (value,))
    ticket = job_ticket(attrs, [asked], forward=(), max_copies=999)
    assert (ticket.hold, ticket.unsupported) == (held, [asked] if unsupported else [])
    assert Attribute("job-hold-until", ValueTag.KEYWORD, ("indefinite",)) in option_attributes(
        1, {}, held=True
    )
    assert all(a.name != "job-hold-until" for a in option_attributes(1, {}))
