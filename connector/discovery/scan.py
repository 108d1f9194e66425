"""A scan of configured address ranges for printers: IPP on 631, RAW on 9100.

For each address, each IPP port gets a Get-Printer-Attributes (a printer answers with its name and
model; a web server that is not IPP does not), each RAW port a TCP connect (a printer's 9100 takes
connections and nothing else tells it apart; an empty connection prints nothing). Probes run at most
``concurrency`` at a time, each bounded by ``probe_timeout``: with the defaults a /24 (254 hosts x 2
ports) takes a few seconds even when every address stays silent.

Only the ranges an admin configured are scanned, and at most :data:`MAX_ADDRESSES` of them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import trio

from connector.delivery import DeliveryError, IppBackend
from connector.discovery.naming import suggest_id
from ipp import DelimiterTag
from tunnel.messages import PrinterCandidate

IPP_PORTS = (631,)
RAW_PORTS = (9100,)
#: a /20: a scan that big belongs to an inventory tool, not to a print connector's sweep
MAX_ADDRESSES = 4096
IPP_PATHS = ("ipp/print",)  # IPP Everywhere's path; CUPS queues are found through cups discovery


def addresses(cidrs: Sequence[str]) -> list[str]:
    """The host addresses of ``cidrs`` (``10.0.0.0/24``, ``127.0.0.0/29``, a single address)."""
    hosts: list[str] = []
    for cidr in cidrs:
        network = ipaddress.ip_network(cidr.strip(), strict=False)
        if network.num_addresses > MAX_ADDRESSES or len(hosts) + network.num_addresses > MAX_ADDRESSES + 2:
            raise ValueError(f"scan range {cidr} is too large: at most {MAX_ADDRESSES} addresses in all")
        hosts.extend(str(h) for h in (network.hosts() if network.num_addresses > 2 else network))
    return hosts


async def _ipp(host: str, port: int, probe_timeout: float) -> PrinterCandidate | None:
    shown = f"[{host}]" if ":" in host else host
    for path in IPP_PATHS:
        uri = f"ipp://{shown}:{port}/{path}"
        backend = IppBackend(uri, connect_timeout=probe_timeout, io_timeout=probe_timeout)
        try:
            with trio.move_on_after(probe_timeout * 2):
                response = await backend.get_printer_attributes(
                    ["printer-name", "printer-make-and-model", "printer-info"]
                )
                if response.code >= 0x0100:
                    continue
                name = response.value(DelimiterTag.PRINTER_ATTRIBUTES, "printer-name")
                model = response.value(DelimiterTag.PRINTER_ATTRIBUTES, "printer-make-and-model")
                shown_name = name if isinstance(name, str) and name else f"{host}:{port}"
                return PrinterCandidate(
                    uri=uri,
                    name=shown_name,
                    source="scan",
                    make_and_model=model if isinstance(model, str) else "",
                    suggested_id=suggest_id(shown_name),
                )
        except DeliveryError:
            return None
    return None


async def _raw(host: str, port: int, probe_timeout: float) -> PrinterCandidate | None:
    with trio.move_on_after(probe_timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return None
        await stream.aclose()
        shown = f"[{host}]" if ":" in host else host
        return PrinterCandidate(
            uri=f"socket://{shown}:{port}",
            name=f"{host}:{port}",
            source="scan",
            suggested_id=suggest_id(f"raw-{host}-{port}"),
        )
    return None


async def scan(
    cidrs: Sequence[str],
    *,
    ipp_ports: Sequence[int] = IPP_PORTS,
    raw_ports: Sequence[int] = RAW_PORTS,
    concurrency: int = 128,
    probe_timeout: float = 1.5,
) -> list[PrinterCandidate]:
    """Printers answering in ``cidrs``, in address order."""
    targets = [(host, port, True) for host in addresses(cidrs) for port in ipp_ports]
    targets += [(host, port, False) for host in addresses(cidrs) for port in raw_ports]
    limiter = trio.CapacityLimiter(max(1, concurrency))
    found: dict[int, PrinterCandidate] = {}

    async def probe(index: int, host: str, port: int, is_ipp: bool) -> None:
        async with limiter:
            if is_ipp:
                candidate = await _ipp(host, port, probe_timeout)
            else:
                candidate = await _raw(host, port, probe_timeout)
        if candidate is not None:
            found[index] = candidate

    async with trio.open_nursery() as nursery:
        for index, (host, port, is_ipp) in enumerate(targets):
            nursery.start_soon(probe, index, host, port, is_ipp)
    return [found[i] for i in sorted(found)]
