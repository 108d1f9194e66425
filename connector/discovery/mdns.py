"""DNS-SD / Bonjour discovery with python-zeroconf: the printer services a site's printers announce.

python-zeroconf is a blocking library with its own thread and asyncio loop, so one browse runs in a
worker thread (``trio.to_thread``) for a fixed window, then resolves what it saw and closes its
sockets. Each service type maps onto a printer URI (PWG 5100.14 §4, Bonjour Printing 1.2):

=====================  ========================================
``_ipp._tcp``          ``ipp://ADDRESS:PORT/RP`` (TXT ``rp``)
``_ipps._tcp``         ``ipps://ADDRESS:PORT/RP``
``_pdl-datastream``    ``socket://ADDRESS:PORT`` (RAW, 9100)
``_printer._tcp``      ``lpd://ADDRESS:PORT/RP`` (LPD queue)
=====================  ========================================

URIs use the address, not the ``.local`` host name: the connector's resolver may not speak mDNS.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Sequence

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceListener, Zeroconf

from connector.discovery.naming import suggest_id
from tunnel.messages import PrinterCandidate

SERVICE_SCHEMES = {
    "_ipp._tcp.local.": "ipp",
    "_ipps._tcp.local.": "ipps",
    "_pdl-datastream._tcp.local.": "socket",
    "_printer._tcp.local.": "lpd",
}
#: services resolved in one browse; a network announcing more is not one site's printers
MAX_SERVICES = 512
RESOLVE_TIMEOUT_MS = 1000


class _Seen(ServiceListener):
    def __init__(self) -> None:
        self.services: dict[tuple[str, str], None] = {}
        self.lock = threading.Lock()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            if len(self.services) < MAX_SERVICES:
                self.services[(type_, name)] = None

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.services.pop((type_, name), None)


def _text(info: ServiceInfo, key: bytes) -> str:
    value = (info.properties or {}).get(key)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _preference(address: str, interfaces: Sequence[str]) -> tuple[int, int]:
    """Sort key: an address on the /24 of an interface we browsed on first (a host announces all its
    addresses, and only some may be reachable from here), then IPv4 (no zone indexes in a URI)."""
    ip = ipaddress.ip_address(address)
    near = any(
        ip.version == 4 and ip in ipaddress.ip_network(f"{i}/24", strict=False)
        for i in interfaces
        if ipaddress.ip_address(i).version == 4
    )
    return (0 if near else 1, ip.version)


def candidate_from_service(
    type_: str, name: str, info: ServiceInfo, interfaces: Sequence[str] = ()
) -> PrinterCandidate | None:
    """One resolved service -> a candidate (pure, given the resolved record)."""
    scheme = SERVICE_SCHEMES.get(type_)
    addresses = info.parsed_addresses()
    if scheme is None or not addresses or not info.port:
        return None
    address = sorted(addresses, key=lambda a: _preference(a, interfaces))[0]
    host = f"[{address}]" if ":" in address else address
    instance = name[: -len(type_) - 1] if name.endswith("." + type_) else name
    rp = _text(info, b"rp").strip("/")
    if scheme in ("ipp", "ipps"):
        uri = f"{scheme}://{host}:{info.port}/{rp or 'ipp/print'}"
    elif scheme == "lpd":
        uri = f"lpd://{host}:{info.port}/{rp or 'auto'}"
    else:
        uri = f"socket://{host}:{info.port}"
    return PrinterCandidate(
        uri=uri,
        name=instance,
        source="mdns",
        make_and_model=_text(info, b"ty") or _text(info, b"product").strip("()"),
        suggested_id=suggest_id(instance),
    )


def _browse_blocking(browse_seconds: float, interfaces: Sequence[str] | None) -> list[PrinterCandidate]:
    if interfaces:
        zc = Zeroconf(interfaces=list(interfaces), use_asyncio=False)
    else:
        zc = Zeroconf(ip_version=IPVersion.V4Only, use_asyncio=False)
    try:
        seen = _Seen()
        browser = ServiceBrowser(zc, list(SERVICE_SCHEMES), listener=seen)
        time.sleep(browse_seconds)  # in a worker thread: the browse window
        browser.cancel()
        with seen.lock:
            services = list(seen.services)
        found: dict[str, PrinterCandidate] = {}
        for type_, name in services:
            info = zc.get_service_info(type_, name, timeout=RESOLVE_TIMEOUT_MS)
            candidate = (
                candidate_from_service(type_, name, info, interfaces or ()) if info is not None else None
            )
            if candidate is not None:
                found.setdefault(candidate.uri, candidate)
        return list(found.values())
    finally:
        zc.close()


async def browse(
    browse_seconds: float = 3.0, interfaces: Sequence[str] | None = None
) -> list[PrinterCandidate]:
    """Printers announced on the local links within ``browse_seconds`` (plus resolve time).

    ``interfaces``: IP addresses of the interfaces to use (default: every IPv4 interface).
    """
    return await trio.to_thread.run_sync(_browse_blocking, browse_seconds, interfaces, abandon_on_cancel=True)
