"""Job options: names and values -> IPP attributes, refusals for RAW/LPD, and IPP delivery with options."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fixtures_printers import IppEvePrinter, RawSink

from connector.delivery import DeliveryError, IppBackend, JobTicket, backend_for_uri
from connector.delivery.options import (
    OPTION_NAMES,
    OptionError,
    ipp_job_attributes,
    option_attribute,
    parse_page_ranges,
    refuse_for_stream,
)
from ipp import Attribute, DelimiterTag, Operation, Range, ValueTag, decode, encode, new_request


def test_each_option_becomes_its_ipp_attribute() -> None:
    assert option_attribute("sides", "two-sided-long-edge") == Attribute(
        "sides", ValueTag.KEYWORD, ("two-sided-long-edge",)
    )
    assert option_attribute("media", "iso_a4_210x297mm") == Attribute(
        "media", ValueTag.KEYWORD, ("iso_a4_210x297mm",)
    )
    assert option_attribute("print-color-mode", "monochrome").values == ("monochrome",)
    assert option_attribute("orientation-requested", "landscape") == Attribute(
        "orientation-requested", ValueTag.ENUM, (4,)
    )
    assert option_attribute("orientation-requested", "6").values == (6,)
    assert option_attribute("print-quality", "high") == Attribute("print-quality", ValueTag.ENUM, (5,))
    assert option_attribute("page-ranges", "1-3,5") == Attribute(
        "page-ranges", ValueTag.RANGE_OF_INTEGER, (Range(1, 3), Range(5, 5))
    )


def test_job_attributes_put_copies_first_and_encode() -> None:
    attributes = ipp_job_attributes(2, {"sides": "one-sided", "media": "na_letter_8.5x11in"})
    assert [a.name for a in attributes] == ["copies", "media", "sides"]
    assert ipp_job_attributes(1, {}) == []
    request = new_request(Operation.PRINT_JOB, 1, printer_uri="ipp://h/ipp/print")
    group = request.add_group(DelimiterTag.JOB_ATTRIBUTES)
    for attribute in attributes:
        group.attributes[attribute.name] = attribute
    decoded, _ = decode(encode(request))
    assert decoded.value(DelimiterTag.JOB_ATTRIBUTES, "copies") == 2


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("sides", "duplex", "sides must be one of one-sided, two-sided-long-edge"),
        ("print-color-mode", "rainbow", "print-color-mode must be one of"),
        ("media", "A4 paper", "is not a media size name"),
        ("orientation-requested", "sideways", "orientation-requested must be one of portrait"),
        ("orientation-requested", "9", "orientation-requested must be one of"),
        ("print-quality", "best", "print-quality must be one of draft, normal, high"),
        ("page-ranges", "3-1", "not a range of pages"),
        ("page-ranges", "0", "not a range of pages"),
        ("page-ranges", "5,1-2", "must ascend without overlapping"),
        ("page-ranges", "1-3,3-4", "must ascend without overlapping"),
        ("page-ranges", "1-", "must look like 1-3,5,8-9"),
        ("staple", "yes", "unknown job option 'staple'"),
    ],
)
def test_bad_values_name_the_option(name: str, value: str, message: str) -> None:
    with pytest.raises(OptionError, match=message) as info:
        option_attribute(name, value)
    assert info.value.name == name


def test_page_ranges_bounded() -> None:
    assert len(parse_page_ranges(",".join(str(n) for n in range(1, 101, 1)))) == 100
    with pytest.raises(OptionError, match="at most 100"):
        parse_page_ranges(",".join(str(n) for n in range(1, 102)))


def test_stream_protocols_refuse_every_option() -> None:
    refuse_for_stream("RAW", {})
    with pytest.raises(OptionError, match=r"RAW printers take no job options besides copies: cannot apply "
                       r"media=iso_a4_210x297mm, sides=one-sided"):  # fmt: skip
        refuse_for_stream("RAW", {"sides": "one-sided", "media": "iso_a4_210x297mm"})


def test_relay_and_connector_agree_on_option_names() -> None:
    from relay.capabilities import OPTION_NAMES as RELAY_OPTION_NAMES

    assert set(RELAY_OPTION_NAMES) == set(OPTION_NAMES)


# --- against real printers -------------------------------------------------------------------------


async def document(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def noop(state: str, message: str) -> None:
    pass


async def job_attributes(printer: IppEvePrinter, job_id: int) -> dict[str, object]:
    request = new_request(Operation.GET_JOB_ATTRIBUTES, 7, printer_uri=printer.plain_uri)
    request.operation.add("job-id", ValueTag.INTEGER, job_id)
    request.operation.add("requested-attributes", ValueTag.KEYWORD, "all")
    async with httpx.AsyncClient(timeout=5) as client:
        reply = await client.post(
            f"http://localhost:{printer.port}/ipp/print",
            content=encode(request),
            headers={"content-type": "application/ipp"},
        )
    response, _ = decode(reply.content)
    group = response.group(DelimiterTag.JOB_ATTRIBUTES)
    assert group is not None
    return {a.name: (a.values if len(a.values) > 1 else a.value) for a in group}


async def test_options_arrive_as_ipp_job_attributes(ippeveprinter: IppEvePrinter) -> None:
    options = {
        "sides": "two-sided-long-edge",
        "media": "iso_a4_210x297mm",
        "print-color-mode": "monochrome",
        "orientation-requested": "landscape",
        "print-quality": "high",
        "page-ranges": "1-2",
    }
    ticket = JobTicket("job-1", "options", "application/pdf", copies=2, options=options)
    result = await IppBackend(ippeveprinter.uri).deliver(ticket, document(b"%PDF-1.4\n%%EOF\n"), noop)
    assert result.state == "completed", result.message
    assert result.printer_job_id is not None
    attrs = await job_attributes(ippeveprinter, result.printer_job_id)
    assert attrs["copies"] == 2
    assert attrs["sides"] == "two-sided-long-edge"
    assert attrs["media"] == "iso_a4_210x297mm"
    assert attrs["print-color-mode"] == "monochrome"
    assert attrs["orientation-requested"] == 4
    assert attrs["print-quality"] == 5
    assert attrs["page-ranges"] == Range(1, 2)


async def test_unsupported_value_is_refused_by_the_printer(ippeveprinter: IppEvePrinter) -> None:
    ticket = JobTicket("job-2", "t", "application/pdf", options={"media": "roll_max_36x1000in"})
    with pytest.raises(DeliveryError) as info:
        await IppBackend(ippeveprinter.uri).deliver(ticket, document(b"%PDF-1.4\n%%EOF\n"), noop)
    assert not info.value.retryable
    assert "attributes-or-values-not-supported" in info.value.message or "media" in info.value.message


async def test_raw_copies_by_repetition(raw_sink: RawSink, tmp_path: object) -> None:
    data = b"\x1b%-12345X@PJL\r\n" + b"p" * 100_000
    backend = backend_for_uri(raw_sink.uri)
    ticket = JobTicket("job-3", "t", "application/vnd.hp-pcl", copies=3)
    result = await backend.deliver(ticket, document(data), noop)
    assert result.state == "completed" and "3 copies" in result.message
    documents = await raw_sink.wait_for(3)
    assert all(d.path.read_bytes() == data for d in documents)


async def test_raw_refuses_options(raw_sink: RawSink) -> None:
    ticket = JobTicket("job-4", "t", "application/pdf", options={"media": "iso_a4_210x297mm"})
    with pytest.raises(DeliveryError, match="RAW printers take no job options") as info:
        await backend_for_uri(raw_sink.uri).deliver(ticket, document(b"x"), noop)
    assert not info.value.retryable
