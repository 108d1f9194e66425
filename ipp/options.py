"""The job options printrelay understands: the IPP job-template vocabulary both sides check against.

The relay validates what a client asks for (and refuses what the printer does not report); the connector
turns the same names into IPP attributes or refuses them for protocols that cannot carry them. One
vocabulary, here, so the two cannot drift apart.
"""

from __future__ import annotations

import re

#: keyword options and their legal values (RFC 8011 §5.2.8, PWG 5100.13 §5.2.3)
SIDES = ("one-sided", "two-sided-long-edge", "two-sided-short-edge")
PRINT_COLOR_MODES = (
    "auto", "auto-monochrome", "bi-level", "color", "highlight", "monochrome",
    "process-bi-level", "process-monochrome",
)  # fmt: skip
#: enum options: the keyword a user writes, and the enum value on the wire (RFC 8011 §5.2.10, §5.2.13)
ORIENTATIONS = {"portrait": 3, "landscape": 4, "reverse-landscape": 5, "reverse-portrait": 6, "none": 7}
PRINT_QUALITIES = {"draft": 3, "normal": 4, "high": 5}

#: PWG 5101.1 self-describing media names (iso_a4_210x297mm) and legacy names (a4, na_letter) alike
MEDIA_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,254}$")
PAGE_RANGES_RE = re.compile(r"^\d{1,9}(-\d{1,9})?(,\d{1,9}(-\d{1,9})?)*$")
#: more ranges than any real selection; bounds the attribute we build
MAX_PAGE_RANGES = 100

OPTION_NAMES = ("sides", "media", "print-color-mode", "page-ranges", "orientation-requested", "print-quality")
