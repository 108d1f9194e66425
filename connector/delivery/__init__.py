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
from connector.printer_mib import PrinterMib
from connector.snmp import DEFAULT_COMMUNITY, DEFAULT_PORT, SnmpClient, snmp_enabled

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


def backend_for_uri(
    uri: str,
    *,
    spool_dir: Path | None = None,
    snmp_port: int = DEFAULT_PORT,
    snmp_community: str = DEFAULT_COMMUNITY,
) -> Backend:
    """The backend for a printer URI: ``ipp://``, ``ipps://``, ``socket://host[:port]``,
    ``lpd://host[:port]/queue``, ``cups:QUEUE`` or ``cups://localhost[:port]/QUEUE``.

    ``spool_dir`` holds the temporary copies some protocols need (LPD without a known size, RAW copies).
    RAW and LPD printers are also asked over SNMP (``snmp_port`` of their host, ``snmp_community``) for
    their state and page counter, unless the URI says ``?snmp=false`` (as CUPS's backends do).
    """
    parts = urlsplit(uri)
    if parts.scheme in ("ipp", "ipps"):
        return IppBackend(uri)
    if parts.scheme in ("socket", "lpd"):
        if not parts.hostname:
            raise ValueError(f"printer URI {uri!r} has no host")
        snmp = (
            PrinterMib(SnmpClient(parts.hostname, snmp_port, snmp_community)) if snmp_enabled(uri) else None
        )
        if parts.scheme == "socket":
            return RawBackend(parts.hostname, parts.port or 9100, spool_dir=spool_dir, snmp=snmp)
        return LpdBackend(uri, spool_dir=spool_dir, snmp=snmp)
    if parts.scheme == "cups":
        return CupsBackend(uri)
    raise ValueError(
        f"unsupported printer URI scheme {parts.scheme!r} in {uri!r}: "
        f"supported are {', '.join(SUPPORTED_SCHEMES)}"
    )
