"""RFC 8010 encoding of IPP messages, sans-IO.

``encode(message) -> bytes`` writes a message's header and attribute section (a document, if any,
follows on the wire and is not the codec's business). :class:`MessageParser` decodes incrementally:
feed it bytes as they arrive and it reports when the attribute section is complete and where, in
the chunk that completed it, the document begins; so an HTTP handler can stream the document onward
without buffering it. :func:`decode` is the one-shot form.

Wire format (RFC 8010 §3.1)::

    version-number (2) | operation-id or status-code (2) | request-id (4)
    { begin-attribute-group-tag (1)
      { value-tag (1) | name-length (2) | name | value-length (2) | value } }
    end-of-attributes-tag (1) | data

An attribute with name-length 0 is one more value of the previous attribute (1setOf). Collections
(RFC 8010 §3.1.6) are a begCollection value, then per member a memberAttrName whose *value* is the
member's name followed by the member's value(s), then endCollection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ipp.constants import DelimiterTag, Status, ValueTag
from ipp.model import (
    Attribute,
    AttributeGroup,
    IPPError,
    Message,
    Range,
    Resolution,
    StringWithLanguage,
    Value,
)

# value-length and name-length are SIGNED-SHORT fields (RFC 8010 §3.1.4): 32767 is the most they hold.
MAX_FIELD_LENGTH = 32767
SUPPORTED_MAJOR_VERSIONS = (1, 2)

_INT = struct.Struct(">i")
_SHORT = struct.Struct(">H")
_HEADER = struct.Struct(">BBHi")
_RESOLUTION = struct.Struct(">iib")
_RANGE = struct.Struct(">ii")
_DATE = struct.Struct(">HBBBBBBcBB")

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
        ValueTag.MEMBER_ATTR_NAME,
    }
)
_WITH_LANGUAGE_TAGS = frozenset({ValueTag.TEXT_WITH_LANGUAGE, ValueTag.NAME_WITH_LANGUAGE})


def _is_out_of_band(tag: int) -> bool:
    return 0x10 <= tag <= 0x1F


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


@dataclass(frozen=True)
class Limits:
    """Bounds on what a decoder accepts from the network. Exceeding one raises :class:`IPPError`."""

    #: header + every attribute + end tag; CUPS's own default request limit is in the same range
    max_attribute_bytes: int = 1024 * 1024
    #: attributes in the whole message (collection members not counted: bytes and depth bound them)
    max_attributes: int = 1000
    #: one value or name; the wire format cannot carry more than 32767
    max_value_length: int = MAX_FIELD_LENGTH
    #: nested collections (media-col > media-size is 2 deep); bounds the decoder's stack
    max_collection_depth: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.max_value_length <= MAX_FIELD_LENGTH:
            raise ValueError(f"max_value_length must be in 1..{MAX_FIELD_LENGTH}")


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------------------------
# encoding


def _encode_string(text: str) -> bytes:
    # surrogateescape: strings decoded from non-UTF-8 bytes go back out as the same bytes
    return text.encode("utf-8", "surrogateescape")


def _encode_datetime(value: datetime) -> bytes:
    offset = value.utcoffset()
    if offset is None:
        raise ValueError(f"dateTime {value.isoformat()} has no time zone")
    minutes = int(offset.total_seconds()) // 60
    direction = b"+" if minutes >= 0 else b"-"
    minutes = abs(minutes)
    return _DATE.pack(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond // 100_000,
        direction,
        minutes // 60,
        minutes % 60,
    )


def encode_value(tag: int, value: Value) -> bytes:
    """The value field of one value of syntax ``tag``."""
    if isinstance(value, bytes):
        return value
    if value is None:
        if not _is_out_of_band(tag):
            raise ValueError(f"None is only a value for out-of-band tags, not 0x{tag:02x}")
        return b""
    if tag in (ValueTag.INTEGER, ValueTag.ENUM) and isinstance(value, int):
        return _INT.pack(value)
    if tag == ValueTag.BOOLEAN and isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if tag == ValueTag.DATE_TIME and isinstance(value, datetime):
        return _encode_datetime(value)
    if tag == ValueTag.RESOLUTION and isinstance(value, Resolution):
        return _RESOLUTION.pack(*value)
    if tag == ValueTag.RANGE_OF_INTEGER and isinstance(value, Range):
        return _RANGE.pack(*value)
    if tag in _WITH_LANGUAGE_TAGS and isinstance(value, StringWithLanguage):
        language = _encode_string(value.language)
        text = _encode_string(value.text)
        return _SHORT.pack(len(language)) + language + _SHORT.pack(len(text)) + text
    if tag in _STRING_TAGS and isinstance(value, str):
        return _encode_string(value)
    raise ValueError(f"cannot encode {type(value).__name__} value as tag 0x{tag:02x}")


def _field(data: bytes, what: str) -> bytes:
    if len(data) > MAX_FIELD_LENGTH:
        raise ValueError(f"{what} is {len(data)} bytes, more than the {MAX_FIELD_LENGTH} IPP allows")
    return _SHORT.pack(len(data)) + data


def _encode_values(out: bytearray, name: bytes, attribute: Attribute) -> None:
    for index, (tag, value) in enumerate(zip(attribute.tags, attribute.values, strict=True)):
        own_name = name if index == 0 else b""
        if tag == ValueTag.BEG_COLLECTION and isinstance(value, dict):
            out.append(tag)
            out += _field(own_name, "attribute name")
            out += b"\x00\x00"
            for key, member in value.items():
                if member.name != key:
                    raise ValueError(f"collection member {member.name!r} stored under {key!r}")
                out.append(ValueTag.MEMBER_ATTR_NAME)
                out += b"\x00\x00"
                out += _field(_encode_string(key), "member name")
                _encode_values(out, b"", member)
            out += bytes((ValueTag.END_COLLECTION, 0, 0, 0, 0))
            continue
        if not 0x10 <= tag <= 0xFF:
            raise ValueError(f"value tag 0x{tag:02x} of {attribute.name!r} is not a value tag")
        out.append(tag)
        out += _field(own_name, "attribute name")
        out += _field(encode_value(tag, value), f"value of {attribute.name!r}")


def encode(message: Message) -> bytes:
    """The message header and attribute section, ending with the end-of-attributes tag."""
    out = bytearray(_HEADER.pack(message.version[0], message.version[1], message.code, message.request_id))
    for group in message.groups:
        if not 0x00 < group.tag < 0x10 or group.tag == DelimiterTag.END_OF_ATTRIBUTES:
            raise ValueError(f"0x{group.tag:02x} is not a group tag")
        out.append(group.tag)
        for name, attribute in group.attributes.items():
            if not name:
                raise ValueError("attribute with an empty name")
            _encode_values(out, _encode_string(name), attribute)
    out.append(DelimiterTag.END_OF_ATTRIBUTES)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# decoding


def _bad(message: str) -> IPPError:
    return IPPError(Status.CLIENT_ERROR_BAD_REQUEST, message)


def _tag_of(tag: int) -> int:
    try:
        return ValueTag(tag)
    except ValueError:
        return tag


def _group_tag_of(tag: int) -> int:
    try:
        return DelimiterTag(tag)
    except ValueError:
        return tag


def _decode_string(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _decode_datetime(data: bytes, name: str) -> datetime:
    year, month, day, hour, minute, second, decis, direction, tz_h, tz_m = _DATE.unpack(data)
    if direction not in (b"+", b"-") or decis > 9 or tz_m > 59:
        raise _bad(f"attribute {name!r}: malformed dateTime {data.hex()}")
    offset = timedelta(hours=tz_h, minutes=tz_m)
    try:
        return datetime(
            year,
            month,
            day,
            hour,
            minute,
            second,
            decis * 100_000,
            tzinfo=timezone(-offset if direction == b"-" else offset),
        )
    except ValueError as exc:
        raise _bad(f"attribute {name!r}: malformed dateTime {data.hex()}: {exc}") from None


def decode_value(tag: int, data: bytes, name: str = "?") -> Value:
    """The Python value of one value field of syntax ``tag``; ``name`` is for error messages."""
    if _is_out_of_band(tag):
        return data or None
    if tag in (ValueTag.INTEGER, ValueTag.ENUM):
        if len(data) != 4:
            raise _bad(f"attribute {name!r}: integer value of {len(data)} bytes, expected 4")
        return int(_INT.unpack(data)[0])
    if tag == ValueTag.BOOLEAN:
        if data not in (b"\x00", b"\x01"):
            raise _bad(f"attribute {name!r}: boolean value {data.hex()!r}, expected 00 or 01")
        return data == b"\x01"
    if tag == ValueTag.DATE_TIME:
        if len(data) != 11:
            raise _bad(f"attribute {name!r}: dateTime value of {len(data)} bytes, expected 11")
        return _decode_datetime(data, name)
    if tag == ValueTag.RESOLUTION:
        if len(data) != 9:
            raise _bad(f"attribute {name!r}: resolution value of {len(data)} bytes, expected 9")
        return Resolution(*_RESOLUTION.unpack(data))
    if tag == ValueTag.RANGE_OF_INTEGER:
        if len(data) != 8:
            raise _bad(f"attribute {name!r}: rangeOfInteger of {len(data)} bytes, expected 8")
        return Range(*_RANGE.unpack(data))
    if tag in _WITH_LANGUAGE_TAGS:
        if len(data) >= 2:
            lang_len = _SHORT.unpack_from(data)[0]
            text_at = 2 + lang_len
            if text_at + 2 <= len(data):
                text_len = _SHORT.unpack_from(data, text_at)[0]
                if text_at + 2 + text_len == len(data):
                    return StringWithLanguage(
                        _decode_string(data[text_at + 2 :]), _decode_string(data[2:text_at])
                    )
        raise _bad(f"attribute {name!r}: inner lengths of a ...WithLanguage value do not add up")
    if tag in _STRING_TAGS:
        return _decode_string(data)
    # octetString, extension and tags this codec does not know: the raw bytes
    return data


@dataclass(frozen=True)
class AttributesComplete:
    """The attribute section is complete.

    ``document_start`` indexes the chunk given to the :meth:`MessageParser.feed` call that returned
    this event: ``chunk[document_start:]`` is the start of the document.
    """

    message: Message
    document_start: int


class _Values:
    """An attribute (or collection member) while its values are being read."""

    __slots__ = ("name", "tags", "values")

    def __init__(self, name: str) -> None:
        self.name = name
        self.tags: list[int] = []
        self.values: list[Value] = []

    def add(self, tag: int, value: Value) -> None:
        self.tags.append(tag)
        self.values.append(value)

    def build(self) -> Attribute:
        if not self.values:
            raise _bad(f"member {self.name!r} has no value")
        return Attribute(self.name, self.tags[0], tuple(self.values), tuple(self.tags))


class _Collection:
    """A collection being read: members so far, and the member whose values are arriving."""

    __slots__ = ("current", "members", "owner")

    def __init__(self, owner: str) -> None:
        self.owner = owner  # top-level attribute name, for error messages
        self.members: dict[str, Attribute] = {}
        self.current: _Values | None = None

    def finish_member(self) -> None:
        if self.current is not None:
            self.members[self.current.name] = self.current.build()
            self.current = None


class MessageParser:
    """Incremental decoder of one message's header and attribute section.

    1. :meth:`feed` bytes as they arrive; it returns ``None`` until the end-of-attributes tag has been
       seen, then an :class:`AttributesComplete`.
    2. When the input ends early, call :meth:`end_of_input` to turn "incomplete" into an error.

    Each item (tag, name, value) is parsed once, when all of its bytes are there, so feeding a byte at a
    time costs no re-parsing. The buffer never holds more than ``limits.max_attribute_bytes``.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf
        self._base = 0  # stream offset of _buf[0]
        self._message: Message | None = None
        self._group: AttributeGroup | None = None
        self._attribute: _Values | None = None
        self._stack: list[_Collection] = []
        self._attribute_count = 0
        self._done: AttributesComplete | None = None

    @property
    def complete(self) -> bool:
        return self._done is not None

    def feed(self, data: bytes) -> AttributesComplete | None:
        if self._done is not None:
            raise RuntimeError("the attribute section is complete; the rest is document data")
        chunk_start = self._base + len(self._buf)
        room = self.limits.max_attribute_bytes + 1 - chunk_start
        self._buf += data[:room] if len(data) > room else data
        end = self._parse()
        if end is not None:
            assert self._message is not None
            self._done = AttributesComplete(self._message, end - chunk_start)
            self._buf = bytearray()
            return self._done
        if self._base + len(self._buf) > self.limits.max_attribute_bytes:
            raise IPPError(
                Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE,
                f"attribute section exceeds max_attribute_bytes="
                f"{_size(self.limits.max_attribute_bytes)} without an end-of-attributes tag",
            )
        # drop what has been parsed; what remains is at most one partial item
        del self._buf[: self._pos]
        self._base += self._pos
        self._pos = 0
        return None

    def end_of_input(self) -> None:
        """The peer sent no more bytes: an error unless the attribute section was complete."""
        if self._done is None:
            received = self._base + len(self._buf)
            raise _bad(f"message truncated after {received} bytes: no end-of-attributes tag")

    # -- parsing ----------------------------------------------------------------------------

    def _parse(self) -> int | None:
        """Parse complete items; the stream offset just past the end tag once it is seen."""
        buf = self._buf
        if self._message is None:
            if len(buf) < 8:
                return None
            major, minor, code, request_id = _HEADER.unpack_from(buf)
            if major not in SUPPORTED_MAJOR_VERSIONS:
                raise IPPError(
                    Status.SERVER_ERROR_VERSION_NOT_SUPPORTED,
                    f"IPP version {major}.{minor} is not supported (1.x and 2.x are)",
                )
            self._message = Message((major, minor), code, request_id)
            self._pos = 8
        limit = self.limits.max_value_length
        n = len(buf)
        while self._pos < n:
            pos = self._pos
            tag = buf[pos]
            if tag < 0x10:
                self._delimiter(tag)
                self._pos = pos + 1
                if tag == DelimiterTag.END_OF_ATTRIBUTES:
                    return self._base + self._pos
                continue
            if pos + 3 > n:
                return None
            name_len = (buf[pos + 1] << 8) | buf[pos + 2]
            if name_len > limit:
                raise self._too_long("name", name_len, limit)
            value_at = pos + 3 + name_len + 2
            if value_at > n:
                return None
            value_len = (buf[value_at - 2] << 8) | buf[value_at - 1]
            if value_len > limit:
                raise self._too_long("value", value_len, limit)
            if value_at + value_len > n:
                return None
            name = _decode_string(bytes(buf[pos + 3 : value_at - 2]))
            self._item(tag, name, bytes(buf[value_at : value_at + value_len]))
            self._pos = value_at + value_len
        return None

    def _too_long(self, what: str, length: int, limit: int) -> IPPError:
        where = f" after attribute {self._attribute.name!r}" if self._attribute else ""
        status = (
            Status.CLIENT_ERROR_BAD_REQUEST
            if length > MAX_FIELD_LENGTH  # a negative SIGNED-SHORT: malformed, not merely long
            else Status.CLIENT_ERROR_REQUEST_VALUE_TOO_LONG
        )
        return IPPError(status, f"{what} length {length}{where} exceeds max_value_length={limit}")

    def _finish_attribute(self) -> None:
        if self._attribute is None:
            return
        if self._stack:
            raise _bad(f"collection {self._stack[0].owner!r} not closed by endCollection")
        assert self._group is not None
        attribute = self._attribute.build()
        if attribute.name in self._group.attributes:
            raise _bad(f"attribute {attribute.name!r} appears twice in one group")
        self._group.attributes[attribute.name] = attribute
        self._attribute = None

    def _delimiter(self, tag: int) -> None:
        self._finish_attribute()
        if tag == DelimiterTag.END_OF_ATTRIBUTES:
            return
        if tag == 0x00:
            raise _bad("reserved delimiter tag 0x00")
        assert self._message is not None
        self._group = self._message.add_group(_group_tag_of(tag))

    def _item(self, tag: int, name: str, data: bytes) -> None:
        if self._stack:
            self._collection_item(tag, name, data)
            return
        if name:
            self._finish_attribute()
            if self._group is None:
                raise _bad(f"attribute {name!r} before any attribute group tag")
            self._attribute_count += 1
            if self._attribute_count > self.limits.max_attributes:
                raise IPPError(
                    Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE,
                    f"more than max_attributes={self.limits.max_attributes} attributes",
                )
            self._attribute = _Values(name)
        elif self._attribute is None:
            raise _bad("additional value (empty name) without an attribute before it")
        if tag in (ValueTag.END_COLLECTION, ValueTag.MEMBER_ATTR_NAME):
            raise _bad(f"attribute {self._attribute.name!r}: tag 0x{tag:02x} outside a collection")
        if tag == ValueTag.BEG_COLLECTION:
            self._open_collection(data)
        else:
            self._attribute.add(_tag_of(tag), decode_value(tag, data, self._attribute.name))

    def _open_collection(self, data: bytes) -> None:
        assert self._attribute is not None
        if data:
            raise _bad(f"attribute {self._attribute.name!r}: begCollection with a value")
        if len(self._stack) >= self.limits.max_collection_depth:
            raise _bad(
                f"attribute {self._attribute.name!r}: collections nested deeper than "
                f"max_collection_depth={self.limits.max_collection_depth}"
            )
        self._stack.append(_Collection(self._attribute.name))

    def _collection_item(self, tag: int, name: str, data: bytes) -> None:
        frame = self._stack[-1]
        if name:
            raise _bad(f"collection {frame.owner!r}: named attribute {name!r} inside a collection")
        if tag == ValueTag.MEMBER_ATTR_NAME:
            frame.finish_member()
            if not data:
                raise _bad(f"collection {frame.owner!r}: empty member name")
            member = _decode_string(data)
            if member in frame.members:
                raise _bad(f"collection {frame.owner!r}: member {member!r} appears twice")
            frame.current = _Values(member)
            return
        if tag == ValueTag.END_COLLECTION:
            if data:
                raise _bad(f"collection {frame.owner!r}: endCollection with a value")
            frame.finish_member()
            self._stack.pop()
            target = self._stack[-1].current if self._stack else self._attribute
            assert target is not None  # a collection is only opened as a value of something
            target.add(ValueTag.BEG_COLLECTION, frame.members)
            return
        if frame.current is None:
            raise _bad(f"collection {frame.owner!r}: value without a memberAttrName before it")
        if tag == ValueTag.BEG_COLLECTION:
            self._open_collection(data)
        else:
            frame.current.add(_tag_of(tag), decode_value(tag, data, frame.current.name))


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[Message, int]:
    """Decode a whole message: the message and the offset in ``data`` where the document begins."""
    parser = MessageParser(limits)
    done = parser.feed(data)
    if done is None:
        parser.end_of_input()
        raise AssertionError("unreachable")  # end_of_input raised
    return done.message, done.document_start
