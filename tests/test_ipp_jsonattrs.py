"""IPP attributes as JSON: every syntax round-trips through json.dumps, and bad JSON is refused."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipp import (
    Attribute,
    DelimiterTag,
    Message,
    Range,
    Resolution,
    StringWithLanguage,
    Value,
    ValueTag,
    collection,
    decode,
    encode,
)
from ipp.jsonattrs import attributes_from_json, attributes_to_json

DATA = Path(__file__).parent / "data" / "ipp"


def through_json(attrs: list[Attribute]) -> list[Attribute]:
    # strict JSON: what a connector sends must parse in any JSON reader
    text = json.dumps(attributes_to_json(attrs), allow_nan=False)
    return attributes_from_json(json.loads(text))


def test_every_syntax_has_a_readable_form() -> None:
    when = datetime(2024, 5, 6, 7, 8, 9, 300_000, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))
    attrs = [
        Attribute("copies-default", ValueTag.INTEGER, (1,)),
        Attribute("printer-state", ValueTag.ENUM, (3,)),
        Attribute("color-supported", ValueTag.BOOLEAN, (True,)),
        Attribute("sides-supported", ValueTag.KEYWORD, ("one-sided", "two-sided-long-edge")),
        Attribute("printer-current-time", ValueTag.DATE_TIME, (when,)),
        Attribute("printer-resolution-default", ValueTag.RESOLUTION, (Resolution(600, 600, 3),)),
        Attribute("copies-supported", ValueTag.RANGE_OF_INTEGER, (Range(1, 999),)),
        Attribute("printer-info", ValueTag.TEXT_WITH_LANGUAGE, (StringWithLanguage("Büro", "de"),)),
        Attribute("printer-firmware-version", ValueTag.OCTET_STRING, (b"\x00\xff",)),
        Attribute("printer-geo-location", ValueTag.UNKNOWN, (None,)),
        Attribute("vendor-thing", 0x7F, (b"\x00\x00\x12\x34abc",)),
        Attribute(
            "media-col-default",
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
                    Attribute("media-type", ValueTag.KEYWORD, ("stationery",)),
                ),
            ),
        ),
        Attribute("job-hold-until-supported", ValueTag.KEYWORD, ("none", "night"), (0x44, 0x42)),
    ]
    data = attributes_to_json(attrs)
    assert data[0] == ["copies-default", 0x21, [1]]
    assert data[2] == ["color-supported", 0x22, [True]]
    assert data[4] == ["printer-current-time", 0x31, ["2024-05-06T07:08:09.300000-05:30"]]
    assert data[5] == ["printer-resolution-default", 0x32, [[600, 600, 3]]]
    assert data[6] == ["copies-supported", 0x33, [[1, 999]]]
    assert data[7] == ["printer-info", 0x35, [["Büro", "de"]]]
    assert data[8] == ["printer-firmware-version", 0x30, ["AP8="]]
    assert data[9] == ["printer-geo-location", 0x12, [None]]
    assert data[11] == [
        "media-col-default",
        0x34,
        [
            [
                ["media-size", 0x34, [[["x-dimension", 0x21, [21000]], ["y-dimension", 0x21, [29700]]]]],
                ["media-type", 0x44, ["stationery"]],
            ]
        ],
    ]
    assert data[12] == ["job-hold-until-supported", 0x44, ["none", "night"], [0x44, 0x42]]
    assert through_json(attrs) == attrs


def test_non_utf8_strings_and_out_of_band_bytes_travel_raw() -> None:
    odd = "caf\udce9"  # latin-1 "café" decoded with surrogateescape by the codec
    attrs = [
        Attribute("printer-name", ValueTag.NAME, (odd,)),
        Attribute("printer-info", ValueTag.TEXT_WITH_LANGUAGE, (StringWithLanguage(odd, "fr"),)),
        Attribute("weird", ValueTag.NO_VALUE, (b"\x01",)),
    ]
    data = attributes_to_json(attrs)
    assert data[0][2] == [{"raw": "Y2Fm6Q=="}]
    assert through_json(attrs) == attrs


def test_captured_printer_attributes_round_trip_byte_for_byte() -> None:
    raw = (DATA / "get-printer-attributes.response.bin").read_bytes()
    message, _ = decode(raw)
    printer = message.group(DelimiterTag.PRINTER_ATTRIBUTES)
    assert printer is not None
    back = through_json(list(printer))
    assert back == list(printer)
    message.groups[message.groups.index(printer)].attributes = {a.name: a for a in back}
    assert encode(message) == raw[: len(encode(message))]


# --- property: any attribute the codec can carry survives JSON ---------------------------------

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(max_size=30)  # includes lone surrogates, which must travel raw
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
    ValueTag.OCTET_STRING: st.binary(max_size=30),
    0x7F: st.binary(max_size=30),
    0x5F: st.binary(max_size=30),  # unregistered tag: bytes
    ValueTag.DATE_TIME: DATETIMES,
    ValueTag.RESOLUTION: st.builds(Resolution, INT32, INT32, st.integers(-128, 127)),
    ValueTag.RANGE_OF_INTEGER: st.builds(Range, INT32, INT32),
    ValueTag.TEXT_WITH_LANGUAGE: st.builds(StringWithLanguage, TEXT, TEXT),
    ValueTag.NAME_WITH_LANGUAGE: st.builds(StringWithLanguage, TEXT, TEXT),
    ValueTag.UNSUPPORTED: st.none(),
    ValueTag.NO_VALUE: st.none() | st.binary(min_size=1, max_size=4),
    **{
        tag: TEXT
        for tag in (
            ValueTag.TEXT,
            ValueTag.NAME,
            ValueTag.KEYWORD,
            ValueTag.URI,
            ValueTag.CHARSET,
            ValueTag.MIME_MEDIA_TYPE,
        )
    },
}
NAMES = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)


@st.composite
def attributes(draw: st.DrawFn, name: str, depth: int = 0) -> Attribute:
    tags = list(SCALARS) + ([ValueTag.BEG_COLLECTION] if depth < 3 else [])
    value_tags = [draw(st.sampled_from(tags)) for _ in range(draw(st.integers(1, 3)))]
    values: list[Value] = []
    for tag in value_tags:
        if tag == ValueTag.BEG_COLLECTION:
            names = draw(st.lists(NAMES, max_size=3, unique=True))
            values.append({m: draw(attributes(m, depth + 1)) for m in names})
        else:
            values.append(draw(SCALARS[tag]))
    return Attribute(name, value_tags[0], tuple(values), tuple(value_tags))


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES, max_size=5, unique=True).flatmap(lambda ns: st.tuples(*(attributes(n) for n in ns))))
def test_round_trip(attrs: tuple[Attribute, ...]) -> None:
    assert through_json(list(attrs)) == list(attrs)


# --- bad input from the network -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"a": 1}, "must be a JSON list"),
        ([["x", 0x21]], "expected [name, value_tag"),
        ([[1, 0x21, [1]]], "expected a string"),
        ([["", 0x21, [1]]], "empty name"),
        ([["x", 0x21, []]], "non-empty list"),
        ([["x", "0x21", [1]]], "expected an integer"),
        ([["x", 0x03, [1]]], "not a value tag"),
        ([["x", 0x37, [None]]], "not a value tag"),
        ([["x", 0x4A, ["m"]]], "not a value tag"),
        ([["x", 0x21, [True]]], "expected an integer"),
        ([["x", 0x21, [2**31]]], "signed 32-bit"),
        ([["x", 0x21, [1.5]]], "expected an integer"),
        ([["x", 0x22, [1]]], "expected a boolean"),
        ([["x", 0x44, [3]]], "expected a string"),
        ([["x", 0x44, ["a" * 40000]]], "more than the 32767"),
        ([["x", 0x44, ["\udce9"]]], "lone surrogate"),
        ([["x", 0x35, ["text"]]], "[text, language]"),
        ([["x", 0x31, ["2024-01-01T00:00:00"]]], "no UTC offset"),
        ([["x", 0x31, ["2024-01-01T00:00:00.123+00:00"]]], "finer than"),
        ([["x", 0x31, ["yesterday"]]], "not an ISO 8601"),
        ([["x", 0x32, [[1, 2]]]], "list of 3 integers"),
        ([["x", 0x32, [[1, 2, 300]]]], "one-byte field"),
        ([["x", 0x33, [[1, "2"]]]], "expected an integer"),
        ([["x", 0x30, ["not base64!"]]], "invalid base64"),
        ([["x", 0x13, [0]]], "takes null"),
        ([["x", 0x21, [{"raw": "AAA="}]]], "integer value of 2 bytes"),
        ([["x", 0x21, [{"raw": "AAAAAA==", "more": 1}]]], "object value"),
        ([["x", 0x34, [{"raw": ""}]]], "cannot be given as raw"),
        ([["x", 0x34, ["members"]]], "list of member attributes"),
        ([["x", 0x34, [[["m", 0x21, [1]], ["m", 0x21, [2]]]]]], "given twice"),
        ([["x", 0x21, [1]], ["x", 0x21, [2]]], "given twice"),
        ([["x", 0x44, ["a", "b"], [0x44]]], "one tag per value"),
        ([["x", 0x44, ["a", "b"], [0x42, 0x44]]], "first value tag"),
        ([["x", 0x44, ["a"] * 10_001]], "MAX_VALUES"),
    ],
)
def test_bad_json_is_refused_with_a_reason(data: Any, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        attributes_from_json(data)
    assert fragment in str(info.value)


def test_collection_depth_is_bounded() -> None:
    value: Any = [["leaf", 0x21, [1]]]
    for _ in range(20):
        value = [["c", 0x34, [value]]]
    with pytest.raises(ValueError, match="nested deeper"):
        attributes_from_json(value)


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=30,
    )
)
def test_arbitrary_json_raises_only_value_error(data: Any) -> None:
    try:
        attrs = attributes_from_json(data)
    except ValueError:
        return
    message = Message((2, 0), 0, 1)
    message.add_group(DelimiterTag.PRINTER_ATTRIBUTES).attributes = {a.name: a for a in attrs}
    assert decode(encode(message))[0] == message  # what is accepted always encodes
    assert attributes_from_json(attributes_to_json(attrs)) == attrs
