"""Delivery backends: how the connector hands a document to a printer, chosen by the printer's URI."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from connector.delivery.base import (
    Backend,
    DeliveryError,
    DeliveryResult,
    JobTicket,
    Progress,
)
from connector.delivery.cups import CupsBackend
from connector.delivery.ipp import IppBackend
from connector.delivery.lpd import LpdBackend
from connector.delivery.raw import RawBackend

__all__ = [
    "Backend",
    "CupsBackend",
    "DeliveryError",
    "DeliveryResult",
    "IppBackend",
    "JobTicket",
    "LpdBackend",
    "Progress",
    "RawBackend",
    "backend_for_uri",
]

SUPPORTED_SCHEMES = ("ipp", "ipps", "socket", "lpd", "cups")


def backend_for_uri(uri: str, *, spool_dir: Path | None = None) -> Backend:
    """The backend for a printer URI: ``ipp://``, ``ipps://``, ``socket://host[:port]``,
    ``lpd://host[:port]/queue``, ``cups:QUEUE`` or ``cups://localhost[:port]/QUEUE``.

    ``spool_dir`` holds the temporary copies some protocols need (LPD without a known size, RAW copies).
    """
    parts = urlsplit(uri)
    if parts.scheme in ("ipp", "ipps"):
        return IppBackend(uri)
    if parts.scheme == "socket":
        if not parts.hostname:
            raise ValueError(f"printer URI {uri!r} has no host")
        return RawBackend(parts.hostname, parts.port or 9100, spool_dir=spool_dir)
    if parts.scheme == "lpd":
        return LpdBackend(uri, spool_dir=spool_dir)
    if parts.scheme == "cups":
        return CupsBackend(uri)
    raise ValueError(
        f"unsupported printer URI scheme {parts.scheme!r} in {uri!r}: "
        f"supported are {', '.join(SUPPORTED_SCHEMES)}"
    )
