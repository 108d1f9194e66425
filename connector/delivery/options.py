"""Job options -> what each printer protocol can carry (sans-IO: strings in, IPP attributes out).

A job's options travel from the relay as ``{name: value}`` strings, named as their IPP job template
attributes (PWG 5100.x / RFC 8011 §5.2). For IPP printers each becomes the attribute of that name in
the job-attributes group. RAW and LPD carry no job ticket at all: ``copies`` is done by repetition and
every other option is refused with a message naming it, since printing without it would be a silent lie.

The relay validates the same names and values first (``relay/capabilities.py``); they are checked again
here because the connector never trusts what comes over the tunnel.
"""

from __future__ import annotations

from collections.abc import Mapping

from ipp import Attribute, Range, ValueTag
from ipp.options import (
    MAX_PAGE_RANGES,
    MEDIA_RE,
    OPTION_NAMES,
    ORIENTATIONS,
    PAGE_RANGES_RE,
    PRINT_COLOR_MODES,
    PRINT_QUALITIES,
    SIDES,
)

# The vocabulary itself lives in ipp/options.py, shared with the relay's checks.


class OptionError(ValueError):
    """An option the printer cannot be given; ``name`` is the option."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


def parse_page_ranges(text: str) -> list[Range]:
    """``1-3,5,8-9`` -> ranges; ascending and not overlapping, as RFC 8011 §5.2.7 requires."""
    if not PAGE_RANGES_RE.match(text):
        raise OptionError("page-ranges", f"page-ranges {text!r} must look like 1-3,5,8-9")
    ranges: list[Range] = []
    for part in text.split(","):
        low_text, _, high_text = part.partition("-")
        low = int(low_text)
        high = int(high_text) if high_text else low
        if not 1 <= low <= high:
            raise OptionError("page-ranges", f"page-ranges {text!r}: {part} is not a range of pages from 1")
        if ranges and low <= ranges[-1].upper:
            raise OptionError("page-ranges", f"page-ranges {text!r} must ascend without overlapping")
        ranges.append(Range(low, high))
    if len(ranges) > MAX_PAGE_RANGES:
        raise OptionError("page-ranges", f"page-ranges has {len(ranges)} ranges; at most {MAX_PAGE_RANGES}")
    return ranges


def _enum(name: str, value: str, table: Mapping[str, int]) -> int:
    if value in table:
        return table[value]
    if value.isdigit() and int(value) in table.values():
        return int(value)
    raise OptionError(name, f"{name} must be one of {', '.join(table)}, not {value!r}")


def _keyword(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise OptionError(name, f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def option_attribute(name: str, value: str) -> Attribute:
    """One option as the IPP job template attribute of the same name."""
    if name == "sides":
        return Attribute(name, ValueTag.KEYWORD, (_keyword(name, value, SIDES),))
    if name == "print-color-mode":
        return Attribute(name, ValueTag.KEYWORD, (_keyword(name, value, PRINT_COLOR_MODES),))
    if name == "media":
        if not MEDIA_RE.match(value):
            raise OptionError(name, f"media {value!r} is not a media size name such as iso_a4_210x297mm")
        return Attribute(name, ValueTag.KEYWORD, (value,))
    if name == "orientation-requested":
        return Attribute(name, ValueTag.ENUM, (_enum(name, value, ORIENTATIONS),))
    if name == "print-quality":
        return Attribute(name, ValueTag.ENUM, (_enum(name, value, PRINT_QUALITIES),))
    if name == "page-ranges":
        return Attribute(name, ValueTag.RANGE_OF_INTEGER, tuple(parse_page_ranges(value)))
    raise OptionError(name, f"unknown job option {name!r}; options are {', '.join(OPTION_NAMES)}")


def ipp_job_attributes(copies: int, options: Mapping[str, str]) -> list[Attribute]:
    """The job-attributes group of a Print-Job or Create-Job request."""
    attributes = [option_attribute(name, value) for name, value in sorted(options.items())]
    if copies > 1:
        attributes.insert(0, Attribute("copies", ValueTag.INTEGER, (copies,)))
    return attributes


def refuse_for_stream(protocol: str, options: Mapping[str, str]) -> None:
    """RAW and LPD send bytes and nothing else: only copies (by repetition) can be honoured."""
    if options:
        given = ", ".join(f"{name}={value}" for name, value in sorted(options.items()))
        raise OptionError(
            sorted(options)[0],
            f"{protocol} printers take no job options besides copies: cannot apply {given} "
            "(send a document already laid out that way, or use an IPP printer)",
        )
