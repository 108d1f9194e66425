"""Finding printers on the site: the host's CUPS queues, DNS-SD announcements, and range scans.

:func:`discover` runs the chosen sources side by side and returns one list of candidates, each URI
once (the first source to find it names it). ``printrelay connector discover`` prints them
(:func:`main_discover`); a connector started with ``--discover`` sweeps every ``--discover-interval``
and reports candidates to the relay, where an admin adopts one (``POST /v1/printers``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from connector.discovery.cups import cups_queues
from connector.discovery.mdns import browse
from connector.discovery.scan import IPP_PORTS, RAW_PORTS, scan
from tunnel.messages import PrinterCandidate

Candidate = PrinterCandidate

__all__ = ["Candidate", "DiscoverySettings", "add_discover_arguments", "discover", "main_discover"]


@dataclass(frozen=True)
class DiscoverySettings:
    cups: bool = True
    cups_server: tuple[str, int] | None = None  # default: CUPS_SERVER or localhost:631
    mdns: bool = True
    mdns_interfaces: tuple[str, ...] = ()  # interface addresses; empty: every IPv4 interface
    browse_seconds: float = 3.0
    cidrs: tuple[str, ...] = ()
    ipp_ports: tuple[int, ...] = IPP_PORTS
    raw_ports: tuple[int, ...] = RAW_PORTS
    concurrency: int = 128
    probe_timeout: float = 1.5


async def discover(settings: DiscoverySettings = DiscoverySettings()) -> list[Candidate]:
    """Every printer the enabled sources find, deduplicated by URI, in source order (cups, mdns, scan)."""
    results: dict[str, list[Candidate]] = {}

    async def run(source: str) -> None:
        if source == "cups":
            results[source] = await cups_queues(settings.cups_server)
        elif source == "mdns":
            results[source] = await browse(settings.browse_seconds, settings.mdns_interfaces or None)
        else:
            results[source] = await scan(
                settings.cidrs, ipp_ports=settings.ipp_ports, raw_ports=settings.raw_ports,
                concurrency=settings.concurrency, probe_timeout=settings.probe_timeout,
            )  # fmt: skip

    sources = [
        s
        for s, on in (("cups", settings.cups), ("mdns", settings.mdns), ("scan", bool(settings.cidrs)))
        if on
    ]
    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(run, source)
    unique: dict[str, Candidate] = {}
    for source in sources:
        for candidate in results.get(source, []):
            unique.setdefault(candidate.uri, candidate)
    return list(unique.values())


def _ports(text: str) -> tuple[int, ...]:
    ports = tuple(int(p) for p in text.split(",") if p.strip())
    if not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be 1-65535: {text!r}")
    return ports


def add_discover_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``printrelay connector discover``."""
    parser.add_argument("--cidr", action="append", default=[], metavar="RANGE",
                        help="scan this address range (e.g. 10.1.2.0/24); repeat for more")  # fmt: skip
    parser.add_argument("--ipp-ports", type=_ports, default=IPP_PORTS, metavar="P,..",
                        help="ports probed with IPP Get-Printer-Attributes (default: 631)")  # fmt: skip
    parser.add_argument("--raw-ports", type=_ports, default=RAW_PORTS, metavar="P,..",
                        help="ports probed by TCP connect as RAW printers (default: 9100)")  # fmt: skip
    parser.add_argument("--no-mdns", action="store_true", help="skip DNS-SD (Bonjour)")
    parser.add_argument("--mdns-interface", action="append", default=[], metavar="ADDRESS",
                        help="browse DNS-SD only on the interface with this address; repeatable")  # fmt: skip
    parser.add_argument("--browse-seconds", type=float, default=3.0, help="DNS-SD browse window (default: 3)")
    parser.add_argument("--no-cups", action="store_true", help="skip the host's CUPS queues")
    parser.add_argument(
        "--cups-server", metavar="HOST:PORT", help="cupsd to list (default: CUPS_SERVER or localhost:631)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per candidate")


def settings_from_args(args: argparse.Namespace) -> DiscoverySettings:
    cups_server = None
    if args.cups_server:
        host, _, port = args.cups_server.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"--cups-server must be HOST:PORT, not {args.cups_server!r}")
        cups_server = (host.strip("[]"), int(port))
    return DiscoverySettings(
        cups=not args.no_cups, cups_server=cups_server, mdns=not args.no_mdns,
        mdns_interfaces=tuple(args.mdns_interface), browse_seconds=args.browse_seconds,
        cidrs=tuple(args.cidr), ipp_ports=tuple(args.ipp_ports), raw_ports=tuple(args.raw_ports),
    )  # fmt: skip


def run_discover(args: argparse.Namespace) -> int:
    """Print what :func:`discover` finds; exit status 0 (finding nothing is not an error)."""
    settings = settings_from_args(args)
    candidates = trio.run(discover, settings)
    out = sys.stdout
    if args.json:
        for candidate in candidates:
            out.write(json.dumps(candidate.to_json()) + "\n")
        return 0
    if not candidates:
        out.write("no printers found\n")
        return 0
    for c in candidates:
        out.write(f"{c.suggested_id}={c.uri}\t{c.source}\t{c.name}\t{c.make_and_model}\n")
    out.write("\nserve one with: printrelay connector --printer ID=URI  (or adopt it at the relay)\n")
    return 0


def main_discover(argv: Sequence[str] | None = None) -> int:
    """``printrelay connector discover [flags]`` as a function: parses ``argv`` and runs."""
    parser = argparse.ArgumentParser(prog="printrelay connector discover", description=__doc__)
    add_discover_arguments(parser)
    return run_discover(parser.parse_args(argv))
