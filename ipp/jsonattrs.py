"""IPP attributes as JSON: how a connector reports a printer's attributes to the relay.

An attribute is ``[name, value_tag, [values...]]``, plus a fourth element ``[tag, ...]`` (one tag per
value) only when a 1setOf mixes syntaxes (``keyword | name``). Values by syntax:

==========================================  =========================================================
syntax (value tag)                          JSON value
==========================================  =========================================================
integer, enum                               number (signed 32-bit)
boolean                                     ``true`` / ``false``
text, name, keyword, uri, charset, ...      string
textWithLanguage, nameWithLanguage          ``[text, language]``
dateTime                                    ISO 8601 string with offset, at most decisecond precision
resolution                                  ``[x, y, units]``
rangeOfInteger                              ``[lower, upper]``
collection                                  list of member attributes, in this same form
octetString, extension, unknown tags        base64 string
out-of-band (no-value, unknown, ...)        ``null``
==========================================  =========================================================

Anything that has no faithful form above (a string that is not valid UTF-8, an out-of-band value that
carries bytes) is ``{"raw": base64}``: the value field as it was on the wire, decoded again by the codec.

The JSON comes from the network (connector -> relay), so :func:`attributes_from_json` checks every
type, length and nesting depth and raises :class:`ValueError` naming what is wrong; what it returns
always encodes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ipp.codec import DEFAULT_LIMITS, MAX_FIELD_LENGTH, decode_value, encode_value
from ipp.constants import ValueTag
from ipp.model import Attribute, IPPError, Range, Resolution, StringWithLanguage, Value

#: collections nested deeper than the codec accepts from the wire are refused here too
MAX_DEPTH = DEFAULT_LIMITS.max_collection_depth
#: values in one attribute (a printer's media-col-database is the longest real list, ~hundreds)
MAX_VALUES = 10_000

_INT32 = (-(2**31), 2**31 - 1)
_STRING_TAGS = frozenset(
    {
        ValueTag.TEXT,
        ValueTag.NAME,
        ValueTag.KEYWORD,
        ValueTag.URI,
        ValueTag.URI_SCHEME,
        ValueTag.CHARSET,
        ValueTag.NATURAL_LANGUAGE,
        ValueTag.MIME_MEDIA_TYPE,
    }
)
_WITH_LANGUAGE_TAGS = frozenset({ValueTag.TEXT_WITH_LANGUAGE, ValueTag.NAME_WITH_LANGUAGE})
_OTHER_SYNTAX_TAGS = frozenset(
    {
        ValueTag.INTEGER,
        ValueTag.BOOLEAN,
        ValueTag.ENUM,
        ValueTag.DATE_TIME,
        ValueTag.RESOLUTION,
        ValueTag.RANGE_OF_INTEGER,
        ValueTag.BEG_COLLECTION,
    }
)
# only meaningful inside the wire form of a collection, never as an attribute's own tag
_FORBIDDEN_TAGS = frozenset({ValueTag.END_COLLECTION, ValueTag.MEMBER_ATTR_NAME})


def _is_out_of_band(tag: int) -> bool:
    return 0x10 <= tag <= 0x1F


def _has_own_syntax(tag: int) -> bool:
    """Whether values of ``tag`` have a JSON form other than base64 bytes."""
    return (
        _is_out_of_band(tag) or tag in _STRING_TAGS or tag in _WITH_LANGUAGE_TAGS or tag in _OTHER_SYNTAX_TAGS
    )


def _tag_of(tag: int) -> int:
    try:
        return ValueTag(tag)
    except ValueError:
        return tag


# --------------------------------------------------------------------------------------------
# to JSON


def _raw(data: bytes) -> dict[str, str]:
    return {"raw": base64.b64encode(data).decode("ascii")}


def _utf8_or_none(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes from a non-UTF-8 peer
        return None
    return text


def _value_to_json(tag: int, value: Value) -> Any:
    if tag == ValueTag.BEG_COLLECTION and isinstance(value, dict):
        return [_attribute_to_json(member) for member in value.values()]
    if value is None:
        return None
    if isinstance(value, bytes):
        if _has_own_syntax(tag):
            return _raw(value)  # bytes where the syntax has another form: keep them as wire bytes
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, StringWithLanguage):
        text, language = _utf8_or_none(value.text), _utf8_or_none(value.language)
        if text is None or language is None:
            return _raw(encode_value(tag, value))
        return [text, language]
    if isinstance(value, Resolution | Range):
        return list(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        text = _utf8_or_none(value)
        return _raw(encode_value(tag, value)) if text is None else text
    raise ValueError(f"cannot express {type(value).__name__} value as JSON")


def _attribute_to_json(attribute: Attribute) -> list[Any]:
    values = [_value_to_json(tag, v) for tag, v in zip(attribute.tags, attribute.values, strict=True)]
    item: list[Any] = [attribute.name, int(attribute.tag), values]
    if attribute.value_tags is not None:
        item.append([int(tag) for tag in attribute.value_tags])
    return item


def attributes_to_json(attrs: Iterable[Attribute]) -> list[Any]:
    """The JSON form (lists, strings, numbers, ``None``) of ``attrs``, in order."""
    return [_attribute_to_json(attribute) for attribute in attrs]


# --------------------------------------------------------------------------------------------
# from JSON


def _field_length(data: bytes, what: str) -> bytes:
    if len(data) > MAX_FIELD_LENGTH:
        raise ValueError(f"{what} is {len(data)} bytes, more than the {MAX_FIELD_LENGTH} IPP allows")
    return data


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what}: invalid base64") from None
    return _field_length(data, what)


def _int32(value: Any, what: str) -> int:
    # bool is an int in Python but not in IPP
    if type(value) is not int:
        raise ValueError(f"{what}: expected an integer, got {type(value).__name__}")
    if not _INT32[0] <= value <= _INT32[1]:
        raise ValueError(f"{what}: {value} is outside the signed 32-bit range")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string, got {type(value).__name__}")
    try:
        _field_length(value.encode("utf-8"), what)
    except UnicodeEncodeError:
        raise ValueError(f"{what}: not valid Unicode text (lone surrogate)") from None
    return value


def _ints(value: Any, count: int, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) != count:
        raise ValueError(f"{what}: expected a list of {count} integers")
    return [_int32(item, what) for item in value]


def _value_from_json(tag: int, value: Any, what: str, depth: int) -> Value:
    if isinstance(value, dict):
        if set(value) != {"raw"}:
            raise ValueError(f"{what}: an object value must be {{'raw': base64}}, got keys {sorted(value)}")
        if tag == ValueTag.BEG_COLLECTION:
            raise ValueError(f"{what}: a collection cannot be given as raw bytes")
        try:
            return decode_value(tag, _b64(value["raw"], what), what)
        except IPPError as exc:
            raise ValueError(f"{what}: {exc.message}") from None
    if _is_out_of_band(tag):
        if value is not None:
            raise ValueError(f"{what}: out-of-band tag 0x{tag:02x} takes null, got {type(value).__name__}")
        return None
    if tag in (ValueTag.INTEGER, ValueTag.ENUM):
        return _int32(value, what)
    if tag == ValueTag.BOOLEAN:
        if not isinstance(value, bool):
            raise ValueError(f"{what}: expected a boolean, got {type(value).__name__}")
        return value
    if tag in _STRING_TAGS:
        return _string(value, what)
    if tag in _WITH_LANGUAGE_TAGS:
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"{what}: expected [text, language]")
        result = StringWithLanguage(_string(value[0], what), _string(value[1], what))
        _field_length(encode_value(tag, result), what)
        return result
    if tag == ValueTag.DATE_TIME:
        return _datetime(value, what)
    if tag == ValueTag.RESOLUTION:
        x, y, units = _ints(value, 3, what)
        if not -128 <= units <= 127:
            raise ValueError(f"{what}: resolution units {units} do not fit the one-byte field")
        return Resolution(x, y, units)
    if tag == ValueTag.RANGE_OF_INTEGER:
        lower, upper = _ints(value, 2, what)
        return Range(lower, upper)
    if tag == ValueTag.BEG_COLLECTION:
        if depth >= MAX_DEPTH:
            raise ValueError(f"{what}: collections nested deeper than {MAX_DEPTH}")
        if not isinstance(value, list):
            raise ValueError(f"{what}: a collection is a list of member attributes")
        members: dict[str, Attribute] = {}
        for item in value:
            member = _attribute_from_json(item, depth + 1, f"{what} member")
            if member.name in members:
                raise ValueError(f"{what}: member {member.name!r} given twice")
            members[member.name] = member
        return members
    # octetString, extension and tags without a syntax of their own: bytes
    return _b64(value, what)


def _datetime(value: Any, what: str) -> datetime:
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"{what}: expected an ISO 8601 date-time string")
    try:
        result = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an ISO 8601 date-time") from None
    offset = result.utcoffset()
    if offset is None:
        raise ValueError(f"{what}: {value!r} has no UTC offset")
    if result.microsecond % 100_000 or offset.total_seconds() % 60:
        raise ValueError(f"{what}: {value!r} is finer than IPP's deciseconds and whole-minute offsets")
    return result


def _attribute_from_json(item: Any, depth: int, what: str) -> Attribute:
    if not isinstance(item, list) or len(item) not in (3, 4):
        raise ValueError(f"{what}: expected [name, value_tag, [values...]] (optionally [tags...])")
    name = _string(item[0], f"{what} name")
    if not name:
        raise ValueError(f"{what}: empty name")
    what = f"{what} {name!r}"
    tag = _int32(item[1], f"{what} value tag")
    values = item[2]
    if not isinstance(values, list) or not values:
        raise ValueError(f"{what}: values must be a non-empty list")
    if len(values) > MAX_VALUES:
        raise ValueError(f"{what}: {len(values)} values exceed MAX_VALUES={MAX_VALUES}")
    if len(item) == 4:
        tags_json = item[3]
        if not isinstance(tags_json, list) or len(tags_json) != len(values):
            raise ValueError(f"{what}: value tags must be a list with one tag per value")
        tags = [_int32(t, f"{what} value tag") for t in tags_json]
        if tags[0] != tag:
            raise ValueError(f"{what}: the first value tag must equal the attribute's tag")
    else:
        tags = [tag] * len(values)
    for t in tags:
        if not 0x10 <= t <= 0xFF or t in _FORBIDDEN_TAGS:
            raise ValueError(f"{what}: 0x{t:02x} is not a value tag an attribute may have")
    decoded = tuple(_value_from_json(t, v, what, depth) for t, v in zip(tags, values, strict=True))
    return Attribute(name, _tag_of(tag), decoded, tuple(_tag_of(t) for t in tags))


def attributes_from_json(data: Any) -> list[Attribute]:
    """Attributes from their JSON form; :class:`ValueError` on anything malformed.

    Names are unique: one printer's attributes are one IPP group, where a name appears once.
    """
    if not isinstance(data, list):
        raise ValueError(f"IPP attributes must be a JSON list, got {type(data).__name__}")
    result: list[Attribute] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        attribute = _attribute_from_json(item, 0, f"attribute #{index}")
        if attribute.name in seen:
            raise ValueError(f"attribute {attribute.name!r} given twice")
        seen.add(attribute.name)
        result.append(attribute)
    return result
