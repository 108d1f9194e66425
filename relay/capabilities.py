"""Job options at the relay: which names and values exist, and which a printer says it supports.

Options are IPP job template attribute names with string values (``sides=two-sided-long-edge``).
:func:`validate_option` checks the syntax at the front door; :func:`check_options` checks a job against
the capabilities summary the printer's connector reported (``PrinterInfo.capabilities``), so a job the
printer cannot print as asked is refused at submit time with 400 naming the option, instead of failing
later at the printer. A printer whose capabilities are not known yet (never probed, or a protocol with
no way to ask) is given the benefit of the doubt: only what the summary states is checked.

The vocabulary is shared with the connector through ``ipp/options.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

#: the keyword list in the capabilities summary that bounds each option's values
SUMMARY_KEYS = {
    "sides": "sides",
    "media": "media",
    "print-color-mode": "print_color_modes",
    "orientation-requested": "orientations",
    "print-quality": "print_qualities",
}
#: formats any printer is handed as they are (the printer sniffs them)
AUTO_FORMATS = frozenset({"application/octet-stream"})


class OptionRefused(ValueError):
    """An option (or the copies or document format) this submission cannot have; ``option`` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


def _page_ranges(value: str) -> None:
    if not PAGE_RANGES_RE.match(value):
        raise OptionRefused("page-ranges", f"page-ranges {value!r} must look like 1-3,5,8-9")
    previous = 0
    parts = value.split(",")
    if len(parts) > MAX_PAGE_RANGES:
        raise OptionRefused("page-ranges", f"page-ranges has {len(parts)} ranges; at most {MAX_PAGE_RANGES}")
    for part in parts:
        low_text, _, high_text = part.partition("-")
        low, high = int(low_text), int(high_text or low_text)
        if not 1 <= low <= high or low <= previous:
            raise OptionRefused(
                "page-ranges", f"page-ranges {value!r}: ranges must start at 1, ascend and not overlap"
            )
        previous = high


def _keyword_of(table: Mapping[str, int], value: str) -> str | None:
    if value in table:
        return value
    if value.isdigit():
        return next((k for k, v in table.items() if v == int(value)), None)
    return None


def validate_option(name: str, value: str) -> str:
    """Check one option's name and value syntax; returns the value in its canonical keyword form."""
    if name not in OPTION_NAMES:
        raise OptionRefused(name, f"unknown job option {name!r}; options are {', '.join(OPTION_NAMES)}")
    if name == "sides" and value not in SIDES:
        raise OptionRefused(name, f"sides must be one of {', '.join(SIDES)}, not {value!r}")
    if name == "print-color-mode" and value not in PRINT_COLOR_MODES:
        raise OptionRefused(
            name, f"print-color-mode must be one of {', '.join(PRINT_COLOR_MODES)}, not {value!r}"
        )
    if name == "media" and not MEDIA_RE.match(value):
        raise OptionRefused(name, f"media {value!r} is not a media size name such as iso_a4_210x297mm")
    if name in ("orientation-requested", "print-quality"):
        table = ORIENTATIONS if name == "orientation-requested" else PRINT_QUALITIES
        keyword = _keyword_of(table, value)
        if keyword is None:
            raise OptionRefused(name, f"{name} must be one of {', '.join(table)}, not {value!r}")
        return keyword
    if name == "page-ranges":
        _page_ranges(value)
    return value


def _strings(summary: Mapping[str, Any], key: str) -> list[str] | None:
    value = summary.get(key)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def check_options(
    capabilities: Mapping[str, Any], *, document_format: str, copies: int, options: Mapping[str, str]
) -> None:
    """Refuse what the printer's reported capabilities rule out (see the module docstring)."""
    formats = _strings(capabilities, "document_formats")
    if formats and document_format not in AUTO_FORMATS and document_format not in formats:
        raise OptionRefused(
            "document-format",
            f"document-format {document_format} is not supported by this printer "
            f"(supported: {', '.join(formats)})",
        )
    copies_max = capabilities.get("copies_max")
    if isinstance(copies_max, int) and not isinstance(copies_max, bool) and copies > max(1, copies_max):
        raise OptionRefused("copies", f"copies={copies} exceeds this printer's maximum of {copies_max}")
    supported_names = _strings(capabilities, "options")
    for name, value in sorted(options.items()):
        if supported_names is not None and name not in supported_names:
            given = ", ".join(supported_names) or "none"
            raise OptionRefused(
                name, f"this printer does not support the option {name} (it supports: {given})"
            )
        if name == "page-ranges" and capabilities.get("page_ranges") is False:
            raise OptionRefused(name, "this printer does not support page-ranges")
        allowed = _strings(capabilities, SUMMARY_KEYS.get(name, ""))
        if allowed is not None and value not in allowed:
            shown = ", ".join(allowed) or "none"
            raise OptionRefused(name, f"{name}={value} is not supported by this printer (supported: {shown})")
