"""Bytes captured once from a real ippeveprinter (CUPS 2.4.2): decode -> encode is byte for byte."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from ipp import (
    DelimiterTag,
    JobState,
    Operation,
    PrinterState,
    Range,
    Resolution,
    Status,
    ValueTag,
    decode,
    encode,
)

DATA = Path(__file__).parent / "data" / "ipp"
PRINTER = DelimiterTag.PRINTER_ATTRIBUTES
JOB = DelimiterTag.JOB_ATTRIBUTES


@pytest.mark.parametrize(
    "name",
    [
        "get-printer-attributes.request.bin",
        "get-printer-attributes.response.bin",
        "print-job.request.bin",
        "print-job.response.bin",
    ],
)
def test_captured_bytes_round_trip(name: str) -> None:
    data = (DATA / name).read_bytes()
    message, offset = decode(data)
    assert encode(message) == data[:offset]


def test_get_printer_attributes_response_values() -> None:
    message, _ = decode((DATA / "get-printer-attributes.response.bin").read_bytes())
    assert message.code == Status.SUCCESSFUL_OK and message.version == (2, 0)
    assert message.request_id == 1
    assert message.value(PRINTER, "printer-name") == "capture"
    assert message.value(PRINTER, "printer-state") == PrinterState.IDLE
    assert message.value(PRINTER, "printer-is-accepting-jobs") is True
    assert message.value(PRINTER, "copies-supported") == Range(1, 999)
    assert message.value(PRINTER, "printer-resolution-default") == Resolution(600, 600, 3)
    assert isinstance(message.value(PRINTER, "printer-current-time"), datetime)
    assert message.attribute(PRINTER, "printer-geo-location") is not None
    assert message.value(PRINTER, "printer-geo-location", default="x") is None  # 'unknown'
    formats = message.attribute(PRINTER, "document-format-supported")
    assert formats is not None and formats.tag == ValueTag.MIME_MEDIA_TYPE
    assert {"application/pdf", "application/octet-stream", "text/plain"} <= set(formats.values)
    operations = message.attribute(PRINTER, "operations-supported")
    assert operations is not None and operations.tag == ValueTag.ENUM
    assert {Operation.PRINT_JOB, Operation.GET_JOB_ATTRIBUTES, Operation.CLOSE_JOB} <= set(operations.values)
    media_col = message.value(PRINTER, "media-col-default")
    assert isinstance(media_col, dict)
    size = media_col["media-size"].value
    assert isinstance(size, dict) and size["x-dimension"].value == 21590


def test_print_job_request_and_response() -> None:
    data = (DATA / "print-job.request.bin").read_bytes()
    request, offset = decode(data)
    assert request.code == Operation.PRINT_JOB
    assert data[offset:] == b"Hello from printrelay\n"
    response, _ = decode((DATA / "print-job.response.bin").read_bytes())
    assert response.code == Status.SUCCESSFUL_OK and response.request_id == request.request_id
    assert response.value(JOB, "job-id") == 1
    assert response.value(JOB, "job-state") == JobState.PENDING
    assert response.value(JOB, "job-uri") == "ipp://localhost:18631/ipp/print/1"
