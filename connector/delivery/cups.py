"""Delivery to the host's print queues (``cups:QUEUE``, ``cups://localhost[:631]/QUEUE``).

A site that already drives a printer through CUPS (a vendor driver, a filter chain, a USB printer)
keeps doing so: the job goes to the local cupsd, which runs the queue's filters and backend exactly as
it would for ``lp``. We talk IPP to cupsd at ``/printers/QUEUE`` rather than running ``lp``: the
document streams over the socket without a temporary file, the job's options travel as IPP attributes,
and Get-Job-Attributes follows the job through the queue to its end, with CUPS's own reasons when it
fails. That is :class:`~connector.delivery.ipp.IppBackend`'s work; this module only finds the queue.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from connector.delivery.ipp import IppBackend

DEFAULT_SERVER = ("localhost", 631)
#: CUPS queue names: printable, no space, '/', '\\', '#' or quote, at most 127 characters
QUEUE_RE = re.compile(r"^[^\s/\\#'\"]{1,127}$")


def default_server() -> tuple[str, int]:
    """``CUPS_SERVER`` as the CUPS tools read it (``host[:port]``; a socket path is not IPP over TCP)."""
    server = os.environ.get("CUPS_SERVER", "")
    if not server or server.startswith("/"):
        return DEFAULT_SERVER
    host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
    return (host or server), int(port) if port.isdigit() else DEFAULT_SERVER[1]


def parse_cups_uri(uri: str) -> tuple[str, int, str]:
    """``cups:QUEUE`` or ``cups://host[:port]/QUEUE`` -> (cupsd host, port, queue)."""
    parts = urlsplit(uri)
    if parts.scheme != "cups":
        raise ValueError(f"not a cups: printer URI: {uri!r}")
    if parts.netloc:
        host, port = parts.hostname or DEFAULT_SERVER[0], parts.port or DEFAULT_SERVER[1]
        queue = unquote(parts.path.lstrip("/"))
    else:
        (host, port), queue = default_server(), unquote(parts.path)
    if not QUEUE_RE.match(queue):
        raise ValueError(f"printer URI {uri!r} needs a CUPS queue name: cups:QUEUE or cups://localhost/QUEUE")
    return host, port, queue


def queue_ipp_uri(uri: str) -> str:
    host, port, queue = parse_cups_uri(uri)
    shown = f"[{host}]" if ":" in host else host
    return f"ipp://{shown}:{port}/printers/{quote(queue, safe='')}"


class CupsBackend(IppBackend):
    """An :class:`IppBackend` aimed at a local CUPS queue."""

    def __init__(self, uri: str, **kwargs: Any) -> None:
        super().__init__(queue_ipp_uri(uri), **kwargs)
        self.cups_uri = uri

    def __repr__(self) -> str:
        return f"CupsBackend({self.cups_uri!r})"
