"""Delivery backends: how the connector hands a document to a printer, chosen by the printer's URI."""

from __future__ import annotations

from urllib.parse import urlsplit

from connector.delivery.base import (
    Backend,
    DeliveryError,
    DeliveryResult,
    JobTicket,
    Progress,
)
from connector.delivery.ipp import IppBackend
from connector.delivery.raw import RawBackend

__all__ = [
    "Backend",
    "DeliveryError",
    "DeliveryResult",
    "IppBackend",
    "JobTicket",
    "Progress",
    "RawBackend",
    "backend_for_uri",
]

SUPPORTED_SCHEMES = ("ipp", "ipps", "socket")


def backend_for_uri(uri: str) -> Backend:
    """The backend for a printer URI: ``ipp://``, ``ipps://`` or ``socket://host[:port]``."""
    parts = urlsplit(uri)
    if parts.scheme in ("ipp", "ipps"):
        return IppBackend(uri)
    if parts.scheme == "socket":
        if not parts.hostname:
            raise ValueError(f"printer URI {uri!r} has no host")
        return RawBackend(parts.hostname, parts.port or 9100)
    raise ValueError(
        f"unsupported printer URI scheme {parts.scheme!r} in {uri!r}: "
        f"supported are {', '.join(SUPPORTED_SCHEMES)}"
    )
