"""A job's ticket from an IPP request's job template attributes, checked against the printer. No I/O.

The relay forwards a few options to the printer (``Job.options``, named as their IPP attributes and
spelled as strings: the connector rebuilds the attributes, or refuses options a RAW printer cannot
take). Everything else a client asks for is either what the printer does anyway (its ``xxx-default``)
or unsupported: then, per RFC 8011 §4.1.7, the job is refused when ``ipp-attribute-fidelity`` is true,
and printed without it otherwise, the attribute listed in the response's unsupported-attributes group.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ipp import Attribute, Range, ValueTag
from ipp.options import ORIENTATIONS, PRINT_QUALITIES
from relay.capabilities import OptionRefused, validate_option

#: options that reach the printer, and their IPP syntax
FORWARDED = {
    "sides": ValueTag.KEYWORD,
    "media": ValueTag.KEYWORD,
    "print-color-mode": ValueTag.KEYWORD,
    "orientation-requested": ValueTag.ENUM,
    "print-quality": ValueTag.ENUM,
    "page-ranges": ValueTag.RANGE_OF_INTEGER,
}
#: more ranges than any real page selection; bounds what goes into a ticket
MAX_PAGE_RANGES = 100
_KEYWORDISH = (ValueTag.KEYWORD, ValueTag.NAME)


@dataclass
class Ticket:
    copies: int = 1
    options: dict[str, str] = field(default_factory=dict)
    hold: bool = False  # held until Release-Job (job-hold-until)
    unsupported: list[Attribute] = field(default_factory=list)


def hold_until(printer: Mapping[str, Attribute], attribute: Attribute) -> tuple[bool, bool]:
    """What a job-hold-until asks of this printer: (hold the job, the value is supported).

    A value the printer does not keep (a time of day such as "evening", a site's name, another syntax)
    still asks that the job not print now: it is held until released, the substitution RFC 8011 §4.1.7
    allows, rather than printed at once; the caller reports the value as unsupported.
    """
    value = attribute.value if len(attribute.values) == 1 and attribute.tag in _KEYWORDISH else None
    if value in _supported(printer, "job-hold-until"):
        return value != "no-hold", True
    return True, False


def _supported(printer: Mapping[str, Attribute], name: str) -> tuple[object, ...]:
    attribute = printer.get(f"{name}-supported")
    return attribute.values if attribute is not None else ()


def _is_default(printer: Mapping[str, Attribute], attribute: Attribute) -> bool:
    default = printer.get(f"{attribute.name}-default")
    return default is not None and default.values == attribute.values


def _page_ranges(attribute: Attribute) -> str | None:
    if attribute.tag != ValueTag.RANGE_OF_INTEGER or len(attribute.values) > MAX_PAGE_RANGES:
        return None
    parts: list[str] = []
    last = 0
    for value in attribute.values:
        if not isinstance(value, Range) or not last < value.lower <= value.upper:
            return None  # RFC 8011 §5.2.7: ascending, not overlapping, from page 1
        parts.append(str(value.lower) if value.lower == value.upper else f"{value.lower}-{value.upper}")
        last = value.upper
    return ",".join(parts)


def _option(printer: Mapping[str, Attribute], attribute: Attribute) -> str | None:
    """The option string for a forwarded attribute, if the printer supports the value."""
    text = _option_text(printer, attribute)
    if text is None:
        return None
    try:  # the spelling REST uses and relay.capabilities checks (enums as keywords)
        return validate_option(attribute.name, text)
    except OptionRefused:
        return None


def _option_text(printer: Mapping[str, Attribute], attribute: Attribute) -> str | None:
    name = attribute.name
    if name == "page-ranges":
        return _page_ranges(attribute) if True in _supported(printer, name) else None
    if len(attribute.values) != 1 or any(t != attribute.tag for t in attribute.tags):
        return None
    value = attribute.value
    if FORWARDED[name] == ValueTag.ENUM:
        if attribute.tag != ValueTag.ENUM or value not in _supported(printer, name):
            return None
        return str(value)
    if (
        attribute.tag not in _KEYWORDISH
        or not isinstance(value, str)
        or value not in _supported(printer, name)
    ):
        return None
    return value


def _media_col(printer: Mapping[str, Attribute], attribute: Attribute) -> str | None:
    # media-col with a media-size-name is a media keyword in a collection; other members
    # (source, type, margins) cannot be forwarded yet.
    if len(attribute.values) != 1 or not isinstance(attribute.value, dict):
        return None
    members = attribute.value
    name = members.get("media-size-name")
    if name is None or set(members) - {"media-size-name", "media-size"}:
        return None
    return _option(printer, Attribute("media", ValueTag.KEYWORD, name.values))


def job_ticket(
    printer: Mapping[str, Attribute],
    template: list[Attribute],
    *,
    forward: Collection[str],
    max_copies: int,
) -> Ticket:
    """The ticket for the job template attributes of a request.

    ``forward`` names the options that can reach this printer (its connector says which); for the
    others only the value the printer uses anyway is accepted.
    """
    ticket = Ticket()
    for attribute in template:
        name = attribute.name
        option: str | None = None
        if name == "copies":
            copies_range = printer.get("copies-supported")
            value = attribute.value
            upper = max_copies
            if copies_range is not None and isinstance(copies_range.value, Range):
                upper = min(upper, copies_range.value.upper)
            if (
                attribute.tag == ValueTag.INTEGER
                and len(attribute.values) == 1
                and isinstance(value, int)
                and 1 <= value <= upper
            ):
                ticket.copies = value
                continue
        elif name in FORWARDED:
            option = _option(printer, attribute)
        elif name == "job-hold-until":
            ticket.hold, supported = hold_until(printer, attribute)
            if not supported:
                ticket.unsupported.append(attribute)
            continue
        elif name == "media-col":
            option = _media_col(printer, attribute)
            name = "media"
        if option is not None and name in forward:
            ticket.options[name] = option
            continue
        if _is_default(printer, attribute):
            continue  # what the printer does anyway
        ticket.unsupported.append(attribute)
    return ticket


def option_attributes(copies: int, options: Mapping[str, str], *, held: bool = False) -> list[Attribute]:
    """A job's ticket as job template attributes (for Get-Job-Attributes); a held job's job-hold-until."""
    result = [Attribute("copies", ValueTag.INTEGER, (copies,))]
    if held:
        result.append(Attribute("job-hold-until", ValueTag.KEYWORD, ("indefinite",)))
    enums = {"orientation-requested": ORIENTATIONS, "print-quality": PRINT_QUALITIES}
    for name, text in options.items():
        tag = FORWARDED.get(name)
        if tag is None:
            continue
        if tag == ValueTag.ENUM:
            value = enums[name].get(text, int(text) if text.isdigit() else None)
            if value is not None:
                result.append(Attribute(name, tag, (value,)))
        elif tag == ValueTag.RANGE_OF_INTEGER:
            ranges: list[Range] = []
            for part in text.split(",")[:MAX_PAGE_RANGES]:
                low, _, high = part.partition("-")
                if low.isdigit() and (not high or high.isdigit()):
                    ranges.append(Range(int(low), int(high or low)))
            if ranges:
                result.append(Attribute(name, tag, tuple(ranges)))
        elif tag == ValueTag.KEYWORD:
            result.append(Attribute(name, tag, (text,)))
    return result
