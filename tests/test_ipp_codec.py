"""The sans-IO IPP codec, tested with bytes: RFC 8010 examples, round trips, bad and oversized input."""

from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipp import (
    Attribute,
    AttributeGroup,
    DelimiterTag,
    IPPError,
    JobState,
    Limits,
    Message,
    MessageParser,
    Operation,
    Range,
    Resolution,
    Status,
    StringWithLanguage,
    Value,
    ValueTag,
    collection,
    decode,
    encode,
    error_response,
    keyword,
    new_request,
    new_response,
)


def attr(tag: int, name: str, value: bytes) -> bytes:
    """One attribute-with-one-value on the wire."""
    return bytes([tag]) + struct.pack(">H", len(name)) + name.encode() + struct.pack(">H", len(value)) + value


def more(tag: int, value: bytes) -> bytes:
    """An additional value (empty name)."""
    return attr(tag, "", value)


# RFC 8010 Appendix A.1 "Print-Job Request", transcribed from its table.
RFC_PRINT_JOB = (
    b"\x01\x01\x00\x02\x00\x00\x00\x01"
    + b"\x01"
    + attr(0x47, "attributes-charset", b"utf-8")
    + attr(0x48, "attributes-natural-language", b"en-us")
    + attr(0x45, "printer-uri", b"ipp://printer.example.com/ipp/print/pinetree")
    + attr(0x42, "job-name", b"foobar")
    + attr(0x22, "ipp-attribute-fidelity", b"\x01")
    + b"\x02"
    + attr(0x21, "copies", b"\x00\x00\x00\x14")
    + attr(0x44, "sides", b"two-sided-long-edge")
    + b"\x03"
)
RFC_DOCUMENT = b"%!PS-Adobe-3.0\n...\n"

# RFC 8010 Appendix A.3 "Print-Job Response (Failure)": the unsupported attributes come back.
RFC_PRINT_JOB_FAILURE = (
    b"\x01\x01\x04\x0b\x00\x00\x00\x01"
    + b"\x01"
    + attr(0x47, "attributes-charset", b"utf-8")
    + attr(0x48, "attributes-natural-language", b"en-us")
    + attr(0x41, "status-message", b"client-error-attributes-or-values-not-supported")
    + b"\x05"
    + attr(0x21, "copies", b"\x00\x00\x00\x14")
    + attr(0x10, "sides", b"")
    + b"\x03"
)


def test_rfc_print_job_request_decodes() -> None:
    message, offset = decode(RFC_PRINT_JOB + RFC_DOCUMENT)
    assert message.version == (1, 1)
    assert message.code == Operation.PRINT_JOB
    assert message.request_id == 1
    assert offset == len(RFC_PRINT_JOB)
    op = message.operation
    assert list(op.attributes)[:2] == ["attributes-charset", "attributes-natural-language"]
    assert op["printer-uri"] == Attribute(
        "printer-uri", ValueTag.URI, ("ipp://printer.example.com/ipp/print/pinetree",)
    )
    assert message.value(DelimiterTag.OPERATION_ATTRIBUTES, "ipp-attribute-fidelity") is True
    assert message.value(DelimiterTag.JOB_ATTRIBUTES, "copies") == 20
    assert message.value(DelimiterTag.JOB_ATTRIBUTES, "sides") == "two-sided-long-edge"
    assert encode(message) == RFC_PRINT_JOB


def test_rfc_failure_response_with_out_of_band_value() -> None:
    message, _ = decode(RFC_PRINT_JOB_FAILURE)
    assert message.code == Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED
    sides = message.attribute(DelimiterTag.UNSUPPORTED_ATTRIBUTES, "sides")
    assert sides == Attribute("sides", ValueTag.UNSUPPORTED, (None,))
    assert encode(message) == RFC_PRINT_JOB_FAILURE


def test_builders_put_charset_and_language_first() -> None:
    request = new_request(
        Operation.PRINT_JOB, 1, printer_uri="ipp://printer.example.com/ipp/print/pinetree", language="en-us"
    )
    request.operation.add("job-name", ValueTag.NAME, "foobar")
    request.operation.add("ipp-attribute-fidelity", ValueTag.BOOLEAN, True)
    job = request.add_group(DelimiterTag.JOB_ATTRIBUTES)
    job.add("copies", ValueTag.INTEGER, 20)
    job.add("sides", ValueTag.KEYWORD, "two-sided-long-edge")
    request.version = (1, 1)
    assert encode(request) == RFC_PRINT_JOB

    response = new_response(request, Status.SUCCESSFUL_OK, status_message="ok")
    assert response.request_id == 1 and response.version == (1, 1)
    assert [a.name for a in response.operation] == [
        "attributes-charset",
        "attributes-natural-language",
        "status-message",
    ]


def test_error_response_names_the_problem() -> None:
    error = IPPError(Status.SERVER_ERROR_VERSION_NOT_SUPPORTED, "IPP version 3.0 is not supported")
    message, _ = decode(encode(error_response(7, error)))
    assert message.code == 0x0503 and message.request_id == 7 and message.version == (1, 1)
    assert "3.0" in str(message.value(DelimiterTag.OPERATION_ATTRIBUTES, "status-message"))


def test_keywords() -> None:
    assert keyword(Status, 0x0507) == "server-error-busy"
    assert keyword(Status, 0x0408) == "client-error-request-entity-too-large"
    assert keyword(Operation, 0x003B) == "close-job"
    assert keyword(Status, 0x0777) == "0x0777"
    assert JobState.ABORTED.is_terminal and not JobState.PROCESSING_STOPPED.is_terminal
    assert Status.SUCCESSFUL_OK_CONFLICTING_ATTRIBUTES.is_success and not Status.SERVER_ERROR_BUSY.is_success


def test_1set_of_and_mixed_syntaxes() -> None:
    data = (
        b"\x02\x00\x00\x00\x00\x00\x00\x05\x04"
        + attr(0x44, "job-sheets-supported", b"none")
        + more(0x42, b"company-confidential")
        + more(0x44, b"standard")
        + attr(0x21, "media-bottom-margin-supported", b"\x00\x00\x00\x00")
        + more(0x21, b"\x00\x00\x04\x90")
        + b"\x03"
    )
    message, _ = decode(data)
    sheets = message.attribute(DelimiterTag.PRINTER_ATTRIBUTES, "job-sheets-supported")
    assert sheets is not None
    assert sheets.values == ("none", "company-confidential", "standard")
    assert sheets.tags == (ValueTag.KEYWORD, ValueTag.NAME, ValueTag.KEYWORD)
    margins = message.attribute(DelimiterTag.PRINTER_ATTRIBUTES, "media-bottom-margin-supported")
    assert margins == Attribute("media-bottom-margin-supported", ValueTag.INTEGER, (0, 1168))
    assert margins.value_tags is None
    assert encode(message) == data


# RFC 8010 §3.1.6: media-col with a nested media-size collection, then a second media-col value.
MEDIA_COL = (
    b"\x02\x00\x00\x02\x00\x00\x00\x09\x02"
    + attr(0x34, "media-col", b"")
    + attr(0x4A, "", b"media-size")
    + attr(0x34, "", b"")
    + attr(0x4A, "", b"x-dimension")
    + attr(0x21, "", b"\x00\x00\x52\x08")
    + attr(0x4A, "", b"y-dimension")
    + attr(0x21, "", b"\x00\x00\x74\x04")
    + attr(0x37, "", b"")
    + attr(0x4A, "", b"media-type")
    + attr(0x44, "", b"stationery")
    + more(0x42, b"letterhead")
    + attr(0x37, "", b"")
    + attr(0x34, "", b"")
    + attr(0x37, "", b"")
    + b"\x03"
)


def test_nested_collections() -> None:
    message, _ = decode(MEDIA_COL)
    media_col = message.attribute(DelimiterTag.JOB_ATTRIBUTES, "media-col")
    assert media_col is not None and media_col.tag == ValueTag.BEG_COLLECTION
    first, second = media_col.values
    assert isinstance(first, dict) and second == {}
    size = first["media-size"].value
    assert isinstance(size, dict)
    assert size["x-dimension"].value == 21000 and size["y-dimension"].value == 29700
    assert first["media-type"].tags == (ValueTag.KEYWORD, ValueTag.NAME)
    assert encode(message) == MEDIA_COL

    built = Message((2, 0), Operation.PRINT_JOB, 9)
    built.add_group(DelimiterTag.JOB_ATTRIBUTES).attributes["media-col"] = Attribute(
        "media-col",
        ValueTag.BEG_COLLECTION,
        (
            collection(
                Attribute(
                    "media-size",
                    ValueTag.BEG_COLLECTION,
                    (
                        collection(
                            Attribute("x-dimension", ValueTag.INTEGER, (21000,)),
                            Attribute("y-dimension", ValueTag.INTEGER, (29700,)),
                        ),
                    ),
                ),
                Attribute(
                    "media-type",
                    ValueTag.KEYWORD,
                    ("stationery", "letterhead"),
                    (ValueTag.KEYWORD, ValueTag.NAME),
                ),
            ),
            {},
        ),
    )
    assert encode(built) == MEDIA_COL
    assert built == message


def test_every_scalar_syntax() -> None:
    when = datetime(2024, 2, 29, 23, 59, 58, 700_000, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    message = Message((2, 0), 0, 3)
    g = message.add_group(DelimiterTag.PRINTER_ATTRIBUTES)
    g.add("i", ValueTag.INTEGER, -(2**31), 2**31 - 1)
    g.add("b", ValueTag.BOOLEAN, False, True)
    g.add("e", ValueTag.ENUM, 3)
    g.add("o", ValueTag.OCTET_STRING, b"\x00\xff")
    g.add("d", ValueTag.DATE_TIME, when)
    g.add("r", ValueTag.RESOLUTION, Resolution(600, 1200, 3))
    g.add("range", ValueTag.RANGE_OF_INTEGER, Range(1, 999))
    g.add("t", ValueTag.TEXT_WITH_LANGUAGE, StringWithLanguage("Bonjour", "fr"))
    g.add("n", ValueTag.NAME_WITH_LANGUAGE, StringWithLanguage("", "de"))
    g.add("u", ValueTag.URI, "ipp://h/p")
    g.add("nv", ValueTag.NO_VALUE, None)
    g.add("unk", ValueTag.UNKNOWN, None)
    g.add("vendor", 0x2F, b"\x01\x02")  # an integer-class tag no one has registered
    data = encode(message)
    decoded, offset = decode(data)
    assert offset == len(data)
    assert decoded == message
    assert decoded.value(DelimiterTag.PRINTER_ATTRIBUTES, "d") == when
    d = decoded.attribute(DelimiterTag.PRINTER_ATTRIBUTES, "d")
    assert d is not None and isinstance(d.value, datetime) and d.value.utcoffset() == when.utcoffset()
    assert encode(decoded) == data
    # the dateTime field itself, per RFC 2579
    assert encode(message)[data.index(b"\x00\x01d") + 5 :][:11] == bytes(
        [0x07, 0xE8, 2, 29, 23, 59, 58, 7]
    ) + b"-" + bytes([5, 30])


def test_non_utf8_text_round_trips() -> None:
    data = b"\x01\x01\x00\x00\x00\x00\x00\x01\x04" + attr(0x41, "printer-info", b"caf\xe9") + b"\x03"
    message, _ = decode(data)
    assert encode(message) == data


def test_get_jobs_response_keeps_repeated_groups() -> None:
    response = new_response(Message((2, 0), Operation.GET_JOBS, 4), Status.SUCCESSFUL_OK)
    for job_id in (1, 2):
        response.add_group(DelimiterTag.JOB_ATTRIBUTES).add("job-id", ValueTag.INTEGER, job_id)
    response.add_group(DelimiterTag.JOB_ATTRIBUTES)  # an empty group is legal and kept
    decoded, _ = decode(encode(response))
    assert [len(g) for g in decoded.groups_of(DelimiterTag.JOB_ATTRIBUTES)] == [1, 1, 0]
    assert [g.get("job-id") for g in decoded.groups_of(DelimiterTag.JOB_ATTRIBUTES)][1] == Attribute(
        "job-id", ValueTag.INTEGER, (2,)
    )


# --- incremental parsing ------------------------------------------------------------------------


def test_parser_byte_at_a_time_reports_document_start() -> None:
    stream = RFC_PRINT_JOB + RFC_DOCUMENT
    parser = MessageParser()
    for i in range(len(RFC_PRINT_JOB) - 1):
        assert parser.feed(stream[i : i + 1]) is None
    done = parser.feed(stream[len(RFC_PRINT_JOB) - 1 :])
    assert done is not None and done.document_start == 1
    assert stream[len(RFC_PRINT_JOB) - 1 :][done.document_start :] == RFC_DOCUMENT
    assert done.message == decode(RFC_PRINT_JOB)[0]
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_parser_document_start_in_a_later_chunk_of_a_huge_feed() -> None:
    parser = MessageParser(Limits(max_attribute_bytes=len(RFC_PRINT_JOB)))
    assert parser.feed(RFC_PRINT_JOB[:50]) is None
    big = RFC_PRINT_JOB[50:] + b"D" * 5_000_000  # more than the limit: only the limit is buffered
    done = parser.feed(big)
    assert done is not None and big[done.document_start :] == b"D" * 5_000_000


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_parser_any_split_gives_the_same_message(data: st.DataObject) -> None:
    stream = MEDIA_COL + b"doc"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = MessageParser()
    done = None
    start = 0
    for cut in [*cuts, len(stream)]:
        if done is None:
            done = parser.feed(stream[start:cut])
            if done is not None:
                assert stream[start:cut][done.document_start :] + stream[cut:] == b"doc"
        start = cut
    assert done is not None and encode(done.message) == MEDIA_COL


# --- bad input ----------------------------------------------------------------------------------


def test_every_truncation_is_bad_request() -> None:
    for end in range(len(MEDIA_COL)):
        with pytest.raises(IPPError) as info:
            decode(MEDIA_COL[:end])
        assert info.value.status == Status.CLIENT_ERROR_BAD_REQUEST
        assert "truncated" in info.value.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (
            b"\x02\x00\x00\x02\x00\x00\x00\x01" + attr(0x21, "copies", b"\x00\x00\x00\x01") + b"\x03",
            "before any",
        ),
        (
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + more(0x21, b"\x00\x00\x00\x01") + b"\x03",
            "without an attribute",
        ),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x21, "copies", b"\x00\x01") + b"\x03", "expected 4"),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x22, "b", b"\x02") + b"\x03", "expected 00 or 01"),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x31, "d", b"\x00" * 11) + b"\x03", "dateTime"),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x35, "t", b"\x00\x05en") + b"\x03", "do not add up"),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x37, "x", b"") + b"\x03", "outside a collection"),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x34, "c", b"") + b"\x03", "not closed"),
        (
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x01"
            + attr(0x34, "c", b"")
            + attr(0x21, "", b"\x00\x00\x00\x01")
            + b"\x03",
            "without a memberAttrName",
        ),
        (
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x01"
            + attr(0x34, "c", b"")
            + attr(0x21, "n", b"\x00\x00\x00\x01")
            + b"\x03",
            "inside a collection",
        ),
        (
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + attr(0x44, "a", b"x") + attr(0x44, "a", b"y") + b"\x03",
            "appears twice",
        ),
        (b"\x02\x00\x00\x02\x00\x00\x00\x01\x00", "reserved delimiter"),
    ],
)
def test_malformed_input_is_bad_request(data: bytes, fragment: str) -> None:
    with pytest.raises(IPPError) as info:
        decode(data)
    assert info.value.status == Status.CLIENT_ERROR_BAD_REQUEST
    assert fragment in info.value.message


def test_unsupported_version() -> None:
    with pytest.raises(IPPError) as info:
        decode(b"\x03\x00\x00\x02\x00\x00\x00\x01\x03")
    assert info.value.status == Status.SERVER_ERROR_VERSION_NOT_SUPPORTED
    assert "3.0" in info.value.message


def test_attribute_section_too_large() -> None:
    filler = b"".join(attr(0x41, f"a{i}", b"x" * 2000) for i in range(550))
    data = b"\x02\x00\x00\x02\x00\x00\x00\x01\x01" + filler + b"\x03"
    with pytest.raises(IPPError) as info:
        decode(data)
    assert info.value.status == Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE
    assert "max_attribute_bytes=1 MiB" in info.value.message
    # the same bytes pass with a larger limit, and fail as soon as the limit is crossed when streamed
    assert decode(data, Limits(max_attribute_bytes=2 * 1024 * 1024))[1] == len(data)
    parser = MessageParser(Limits(max_attribute_bytes=4096))
    with pytest.raises(IPPError):
        for i in range(0, len(data), 1000):
            parser.feed(data[i : i + 1000])
        pytest.fail("not rejected")
    assert i < 5000


def test_too_many_attributes() -> None:
    data = (
        b"\x02\x00\x00\x02\x00\x00\x00\x01\x01"
        + b"".join(attr(0x21, f"a{i}", b"\x00" * 4) for i in range(11))
        + b"\x03"
    )
    with pytest.raises(IPPError) as info:
        decode(data, Limits(max_attributes=10))
    assert info.value.status == Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE
    assert "max_attributes=10" in info.value.message


def test_value_too_long_is_reported_before_the_value_arrives() -> None:
    head = b"\x02\x00\x00\x02\x00\x00\x00\x01\x01\x41\x00\x04name\x10\x00"  # value-length 4096
    with pytest.raises(IPPError) as info:
        MessageParser(Limits(max_value_length=1023)).feed(head)
    assert info.value.status == Status.CLIENT_ERROR_REQUEST_VALUE_TOO_LONG
    assert "value length 4096" in info.value.message and "max_value_length=1023" in info.value.message
    # 0x8000 and up is a negative SIGNED-SHORT: malformed
    with pytest.raises(IPPError) as info:
        decode(b"\x02\x00\x00\x02\x00\x00\x00\x01\x01\x41\x80\x00")
    assert info.value.status == Status.CLIENT_ERROR_BAD_REQUEST


def test_collection_depth_limit() -> None:
    def nested(depth: int) -> bytes:
        body = attr(0x34, "c", b"")
        for _ in range(depth - 1):
            body += attr(0x4A, "", b"m") + attr(0x34, "", b"")
        return body + attr(0x37, "", b"") * depth

    ok = b"\x02\x00\x00\x02\x00\x00\x00\x01\x02" + nested(8) + b"\x03"
    assert encode(decode(ok)[0]) == ok
    with pytest.raises(IPPError) as info:
        decode(b"\x02\x00\x00\x02\x00\x00\x00\x01\x02" + nested(9) + b"\x03")
    assert "max_collection_depth=8" in info.value.message


def test_encoder_refuses_what_the_wire_cannot_carry() -> None:
    message = Message((2, 0), 2, 1, [AttributeGroup(DelimiterTag.OPERATION_ATTRIBUTES)])
    message.operation.add("long", ValueTag.TEXT, "x" * 40_000)
    with pytest.raises(ValueError, match="40000 bytes"):
        encode(message)
    message.operation.add("long", ValueTag.INTEGER, "not an int")
    with pytest.raises(ValueError, match="cannot encode"):
        encode(message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_only_ipp_error(data: bytes) -> None:
    try:
        message, _ = decode(b"\x02\x00\x00\x02\x00\x00\x00\x01" + data)
    except IPPError:
        return
    encode(message)


# --- round trips of every syntax ------------------------------------------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(max_size=40)
DATETIMES = st.builds(
    lambda dt, decis, minutes: dt.replace(
        microsecond=decis * 100_000, tzinfo=timezone(timedelta(minutes=minutes))
    ),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    st.integers(0, 9),
    st.integers(-14 * 60, 14 * 60),
)

SCALARS: dict[int, st.SearchStrategy[Value]] = {
    ValueTag.INTEGER: INT32,
    ValueTag.ENUM: INT32,
    ValueTag.BOOLEAN: st.booleans(),
    ValueTag.OCTET_STRING: st.binary(max_size=40),
    ValueTag.DATE_TIME: DATETIMES,
    ValueTag.RESOLUTION: st.builds(Resolution, INT32, INT32, st.integers(-128, 127)),
    ValueTag.RANGE_OF_INTEGER: st.builds(Range, INT32, INT32),
    ValueTag.TEXT_WITH_LANGUAGE: st.builds(StringWithLanguage, TEXT, TEXT),
    ValueTag.NAME_WITH_LANGUAGE: st.builds(StringWithLanguage, TEXT, TEXT),
    ValueTag.UNSUPPORTED: st.none(),
    ValueTag.UNKNOWN: st.none(),
    ValueTag.NO_VALUE: st.none(),
    **{
        tag: TEXT
        for tag in (
            ValueTag.TEXT,
            ValueTag.NAME,
            ValueTag.KEYWORD,
            ValueTag.URI,
            ValueTag.URI_SCHEME,
            ValueTag.CHARSET,
            ValueTag.NATURAL_LANGUAGE,
            ValueTag.MIME_MEDIA_TYPE,
        )
    },
}
NAMES = st.text(min_size=1, max_size=20)


@st.composite
def attributes(draw: st.DrawFn, name: str, depth: int = 0) -> Attribute:
    tags = list(SCALARS) + ([ValueTag.BEG_COLLECTION] if depth < 3 else [])
    n = draw(st.integers(1, 3))
    value_tags = [draw(st.sampled_from(tags)) for _ in range(n)]
    values: list[Value] = []
    for tag in value_tags:
        if tag == ValueTag.BEG_COLLECTION:
            names = draw(st.lists(NAMES, max_size=3, unique=True))
            values.append({m: draw(attributes(m, depth + 1)) for m in names})
        else:
            values.append(draw(SCALARS[tag]))
    return Attribute(name, value_tags[0], tuple(values), tuple(value_tags))


@st.composite
def messages(draw: st.DrawFn) -> Message:
    message = Message(
        (draw(st.integers(1, 2)), draw(st.integers(0, 255))),
        draw(st.integers(0, 0xFFFF)),
        draw(INT32),
    )
    for tag in draw(st.lists(st.sampled_from([1, 2, 4, 5, 6, 7, 9, 0x0F]), max_size=4)):
        group = message.add_group(tag)
        for name in draw(st.lists(NAMES, max_size=4, unique=True)):
            group.attributes[name] = draw(attributes(name))
    return message


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(message: Message) -> None:
    data = encode(message)
    decoded, offset = decode(data + b"%PDF")
    assert offset == len(data)
    assert decoded == message
    assert encode(decoded) == data
