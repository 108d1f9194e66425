"""The IPP attribute model: messages, attribute groups, attributes and their Python values.

Values are plain Python objects, and each attribute keeps its value tag(s) so that decode -> encode
reproduces the original bytes:

==========================================  =========================================================
syntax (value tag)                          Python value
==========================================  =========================================================
integer, enum                               ``int``
boolean                                     ``bool``
octetString, unknown/extension tags         ``bytes``
dateTime                                    ``datetime`` (aware, decisecond precision)
resolution                                  :class:`Resolution` (a tuple)
rangeOfInteger                              :class:`Range` (a tuple)
textWithLanguage, nameWithLanguage          :class:`StringWithLanguage` (a tuple)
text, name, keyword, uri, charset, ...      ``str``
collection                                  ``dict[str, Attribute]`` (member name -> member)
out-of-band (unsupported, no-value, ...)    ``None``
==========================================  =========================================================

Any value may also be given as ``bytes``: it is then written as the raw value field, whatever the tag.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, TypeAlias

from ipp.constants import DelimiterTag, Status, ValueTag


class Resolution(NamedTuple):
    x: int
    y: int
    units: int  # 3 = dots per inch, 4 = dots per centimeter


class Range(NamedTuple):
    lower: int
    upper: int


class StringWithLanguage(NamedTuple):
    text: str
    language: str


Value: TypeAlias = (
    "int | bool | str | bytes | datetime | Resolution | Range | StringWithLanguage "
    "| dict[str, Attribute] | None"
)


class IPPError(Exception):
    """Bad IPP input. ``status`` is the status code to answer the peer with."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Attribute:
    """One attribute: a name and one value (or a 1setOf several values).

    ``tag`` is the value tag of every value, unless ``value_tags`` gives one tag per value (a 1setOf
    that mixes syntaxes, e.g. ``keyword | name``). ``value_tags`` equal to ``tag`` throughout is
    normalised to ``None`` so equal attributes compare equal however they were built.
    """

    name: str
    tag: int
    values: tuple[Value, ...]
    value_tags: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.values, tuple):
            object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise ValueError(f"attribute {self.name!r} has no values")
        if self.value_tags is not None:
            tags = tuple(self.value_tags)
            if len(tags) != len(self.values):
                raise ValueError(
                    f"attribute {self.name!r}: {len(tags)} value tags for {len(self.values)} values"
                )
            if tags[0] != self.tag:
                raise ValueError(f"attribute {self.name!r}: tag must equal the first value tag")
            object.__setattr__(self, "value_tags", None if all(t == self.tag for t in tags) else tags)

    @property
    def tags(self) -> tuple[int, ...]:
        """The value tag of each value."""
        if self.value_tags is None:
            return (self.tag,) * len(self.values)
        return self.value_tags

    @property
    def value(self) -> Value:
        """The first (usually the only) value."""
        return self.values[0]


def collection(*members: Attribute) -> dict[str, Attribute]:
    """A collection value from its member attributes, in order."""
    result: dict[str, Attribute] = {}
    for member in members:
        if member.name in result:
            raise ValueError(f"collection member {member.name!r} given twice")
        result[member.name] = member
    return result


@dataclass
class AttributeGroup:
    """One attribute group (operation, job, printer, ...) with its attributes in order."""

    tag: int
    attributes: dict[str, Attribute] = field(default_factory=dict)

    def add(self, name: str, tag: int, *values: Value) -> Attribute:
        """Add (or replace) attribute ``name`` with ``values`` of syntax ``tag``."""
        attribute = Attribute(name, tag, values)
        self.attributes[name] = attribute
        return attribute

    def get(self, name: str) -> Attribute | None:
        return self.attributes.get(name)

    def __getitem__(self, name: str) -> Attribute:
        return self.attributes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.attributes

    def __iter__(self) -> Iterator[Attribute]:
        return iter(self.attributes.values())

    def __len__(self) -> int:
        return len(self.attributes)


@dataclass
class Message:
    """An IPP request or response.

    ``code`` is the operation-id of a request and the status-code of a response: the encoding is the
    same, and only the HTTP direction tells them apart (RFC 8010 §3.1.1).
    """

    version: tuple[int, int]
    code: int
    request_id: int
    groups: list[AttributeGroup] = field(default_factory=list)

    def add_group(self, tag: int) -> AttributeGroup:
        group = AttributeGroup(tag)
        self.groups.append(group)
        return group

    def group(self, tag: int) -> AttributeGroup | None:
        """The first group with ``tag``."""
        for group in self.groups:
            if group.tag == tag:
                return group
        return None

    def groups_of(self, tag: int) -> list[AttributeGroup]:
        """Every group with ``tag`` (a Get-Jobs response has one job group per job)."""
        return [group for group in self.groups if group.tag == tag]

    def attribute(self, tag: int, name: str) -> Attribute | None:
        """Attribute ``name`` from the first group with ``tag`` that has it."""
        for group in self.groups:
            if group.tag == tag and name in group.attributes:
                return group.attributes[name]
        return None

    def value(self, tag: int, name: str, default: Value = None) -> Value:
        """The first value of attribute ``name`` in a group with ``tag``, else ``default``."""
        attribute = self.attribute(tag, name)
        return default if attribute is None else attribute.values[0]

    @property
    def operation(self) -> AttributeGroup:
        """The operation-attributes group, created first if missing."""
        group = self.group(DelimiterTag.OPERATION_ATTRIBUTES)
        if group is None:
            group = AttributeGroup(DelimiterTag.OPERATION_ATTRIBUTES)
            self.groups.insert(0, group)
        return group


def new_request(
    operation: int,
    request_id: int,
    *,
    printer_uri: str | None = None,
    version: tuple[int, int] = (2, 0),
    language: str = "en",
) -> Message:
    """A request whose operation group starts, as RFC 8011 §4.1.4 requires, with attributes-charset
    and attributes-natural-language, then ``printer-uri`` when given."""
    message = Message(version, operation, request_id)
    group = message.add_group(DelimiterTag.OPERATION_ATTRIBUTES)
    group.add("attributes-charset", ValueTag.CHARSET, "utf-8")
    group.add("attributes-natural-language", ValueTag.NATURAL_LANGUAGE, language)
    if printer_uri is not None:
        group.add("printer-uri", ValueTag.URI, printer_uri)
    return message


def new_response(
    request: Message,
    status: int,
    *,
    status_message: str | None = None,
    language: str = "en",
) -> Message:
    """A response to ``request``: same version and request-id, charset and language first."""
    message = Message(request.version, status, request.request_id)
    group = message.add_group(DelimiterTag.OPERATION_ATTRIBUTES)
    group.add("attributes-charset", ValueTag.CHARSET, "utf-8")
    group.add("attributes-natural-language", ValueTag.NATURAL_LANGUAGE, language)
    if status_message is not None:
        group.add("status-message", ValueTag.TEXT, status_message)
    return message


def error_response(request_id: int, error: IPPError, *, version: tuple[int, int] = (2, 0)) -> Message:
    """The response to a request that could not be decoded (``error`` tells why)."""
    # IPP 2.0 may not be understood by the peer that sent a version we refused: answer 1.1 then.
    if error.status == Status.SERVER_ERROR_VERSION_NOT_SUPPORTED:
        version = (1, 1)
    message = Message(version, error.status, request_id)
    group = message.add_group(DelimiterTag.OPERATION_ATTRIBUTES)
    group.add("attributes-charset", ValueTag.CHARSET, "utf-8")
    group.add("attributes-natural-language", ValueTag.NATURAL_LANGUAGE, "en")
    group.add("status-message", ValueTag.TEXT, error.message[:255])
    return message
