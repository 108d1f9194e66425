"""The connector's settings: every flag of ``printrelay connector`` and its default."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from connector.delivery.cups import parse_cups_uri
from connector.delivery.lpd import parse_lpd_uri
from connector.proxy import parse_proxy
from connector.snmp import snmp_enabled
from service.settings import option, parse_duration, parse_hostport

PRINTER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
SCHEMES = ("ipp", "ipps", "socket", "lpd", "cups")


@dataclass(frozen=True)
class PrinterSpec:
    id: str
    uri: str

    @property
    def kind(self) -> str:
        return urlsplit(self.uri).scheme


def parse_printer(text: str) -> PrinterSpec:
    """``ID=URI``, e.g. ``office=ipp://10.0.0.5:631/ipp/print``, ``label=socket://10.0.0.9:9100``,
    ``old=lpd://10.0.0.7/lp`` or ``plotter=cups:Plotter``."""
    printer_id, sep, uri = text.partition("=")
    printer_id, uri = printer_id.strip(), uri.strip()
    if not sep or not printer_id or not uri:
        raise ValueError(f"printer must be ID=URI, not {text!r}")
    if not PRINTER_ID_RE.match(printer_id):
        raise ValueError(f"invalid printer id {printer_id!r}: use letters, digits, '.', '_' or '-'")
    check_printer_uri(printer_id, uri)
    return PrinterSpec(printer_id, uri)


UNCERTAIN_DELIVERY = ("hold", "reprint")


def parse_uncertain_delivery(text: str) -> tuple[str, str]:
    """``PRINTER=hold|reprint``, PRINTER an id or ``*`` for every printer (those added at run time too)."""
    printer_id, sep, choice = (part.strip() for part in text.partition("="))
    if not sep or (printer_id != "*" and not PRINTER_ID_RE.match(printer_id)):
        raise ValueError(f"uncertain delivery must be PRINTER=hold or PRINTER=reprint (PRINTER may be *), "
                         f"not {text!r}")  # fmt: skip
    if choice not in UNCERTAIN_DELIVERY:
        raise ValueError(f"uncertain delivery for {printer_id} must be hold or reprint, not {choice!r}")
    return printer_id, choice


def check_printer_uri(printer_id: str, uri: str) -> None:
    """Refuse a URI no backend can deliver to, with the reason (also for printers added at run time)."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES or (parts.scheme != "cups" and not parts.hostname):
        raise ValueError(
            f"printer {printer_id}: unsupported URI {uri!r} (use ipp://, ipps://, socket://HOST[:PORT], "
            "lpd://HOST[:PORT]/QUEUE or cups:QUEUE)"
        )
    try:
        if parts.scheme == "lpd":
            parse_lpd_uri(uri)
        elif parts.scheme == "cups":
            parse_cups_uri(uri)
        if parts.scheme in ("socket", "lpd"):
            snmp_enabled(uri)  # ?snmp=false, or a value that is neither
    except ValueError as exc:
        raise ValueError(f"printer {printer_id}: {exc}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (plain ws:// is allowed to it without --insecure)."""
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ConnectorConfig:
    relay: list[str] = option(
        ["ws://127.0.0.1:8081/v1/tunnel"], "the relay's tunnel URL (ws:// or wss://); give it once per relay "
        "replica, or once for a name that resolves to several", multiple=True, metavar="URL",
    )  # fmt: skip
    sessions: int = option(
        2, "tunnel sessions to keep, each to a different relay replica (never more than the relay says are "
        "alive: one for a relay that runs alone)",
    )  # fmt: skip
    token: str = option("", "connector token (printrelay token create --kind connector)", secret=True)
    token_file: Path | None = option(
        None, "a file holding the connector token, instead of --token (a token on a command line is seen "
        "by every user of the machine; a systemd credential or a Kubernetes Secret is a file)",
        parse=Path, metavar="FILE",
    )  # fmt: skip
    ca_file: Path | None = option(
        None, "PEM file of CAs that may sign the relay's certificate (default: the system store)",
        parse=Path, metavar="FILE",
    )  # fmt: skip
    insecure: bool = option(
        False, "allow an unencrypted ws:// relay URL to a non-loopback address (certificates of wss:// "
        "relays are verified regardless)",
    )  # fmt: skip
    proxy: str = option(
        "", "HTTP proxy for the tunnel, http://[USER:PASSWORD@]HOST:PORT, or 'none' (default: HTTPS_PROXY "
        "for wss://, HTTP_PROXY for ws://, honouring NO_PROXY)", secret=True,
    )  # fmt: skip
    printer: list[PrinterSpec] = option(
        [], "a printer this connector serves, ID=URI; repeat for more", parse=parse_printer,
        multiple=True, metavar="ID=URI",
    )  # fmt: skip
    uncertain_delivery: list[tuple[str, str]] = option(
        [], "a RAW or LPD job the connector stopped feeding to its printer may or may not have printed: "
        "PRINTER=hold (the default: the job is held at the relay until a person releases or cancels it) or "
        "PRINTER=reprint (print it again); PRINTER may be * for every printer; repeat for more",
        parse=parse_uncertain_delivery, multiple=True, metavar="PRINTER=hold|reprint",
    )  # fmt: skip
    state_dir: Path = option(
        Path("printrelay-connector"), "keys and delivery ledger", parse=Path, metavar="DIR"
    )
    name: str = option("", "a name for this connector shown at the relay (default: host name)")
    max_jobs: int = option(8, "jobs delivered at once")
    drain_grace: float = option(
        60.0, "on SIGTERM, how long in-flight jobs may take to finish", parse=parse_duration
    )
    status_interval: float = option(
        30.0, "seconds between polls of each printer's status (IPP Get-Printer-Attributes; RAW and LPD: "
        "SNMP, else a TCP connect)", parse=parse_duration,
    )  # fmt: skip
    snmp_port: int = option(
        161, "UDP port of the SNMP agents of RAW and LPD printers, asked for their state and page counter "
        "(Printer MIB, SNMPv2c); ?snmp=false on a printer's URI turns it off for that printer",
    )  # fmt: skip
    snmp_community: str = option(
        "public", "SNMP community (read-only) of the RAW and LPD printers' agents", secret=True
    )
    discover: bool = option(
        False, "look for printers (CUPS queues, DNS-SD, --discover-cidr ranges) every --discover-interval "
        "and report them to the relay as candidates to adopt",
    )  # fmt: skip
    discover_interval: float = option(300.0, "seconds between discovery sweeps", parse=parse_duration)
    discover_cidr: list[str] = option(
        [], "an address range to scan for printers (IPP on 631, RAW on 9100); repeat for more",
        multiple=True, metavar="RANGE",
    )  # fmt: skip
    discover_ipp_port: list[int] = option(
        [631], "ports the range scan probes with IPP", parse=int, multiple=True, metavar="PORT"
    )
    discover_raw_port: list[int] = option(
        [9100], "ports the range scan probes as RAW printers", parse=int, multiple=True, metavar="PORT"
    )
    discover_mdns: bool = option(True, "include DNS-SD (Bonjour) in discovery sweeps")
    discover_mdns_interface: list[str] = option(
        [], "browse DNS-SD only on the interface with this address (default: all); repeat for more",
        multiple=True, metavar="ADDRESS",
    )  # fmt: skip
    discover_cups: bool = option(True, "include the host's CUPS queues in discovery sweeps")
    metrics_listen: tuple[str, int] | None = option(
        None, "serve /metrics, /healthz and /readyz on this HOST:PORT (off when unset)", parse=parse_hostport,
        metavar="HOST:PORT",
    )  # fmt: skip
    log_level: str = option("info", "debug, info, warning or error")
    log_format: str = option("auto", "json, text, or auto (text on a terminal, else json)")

    def __post_init__(self) -> None:
        if isinstance(self.relay, str):  # one URL, as code (not flags) often gives it
            object.__setattr__(self, "relay", [self.relay])
        if not self.relay:
            raise ValueError("relay: at least one relay URL is needed")
        for url in self.relay:
            scheme = urlsplit(url).scheme
            if scheme not in {"ws", "wss"}:
                raise ValueError(f"relay must be a ws:// or wss:// URL, not {url!r}")
            host = urlsplit(url).hostname or ""
            if scheme == "ws" and not self.insecure and not is_loopback(host):
                raise ValueError(
                    f"relay {url} is not encrypted and {host or 'its host'} is not a loopback address: "
                    "use wss://, or --insecure to allow plain ws://"
                )
        if self.token and self.token_file:
            raise ValueError("give the connector token once: --token or --token-file, not both")
        if not 1 <= self.sessions <= 8:
            raise ValueError(f"sessions must be between 1 and 8, not {self.sessions}")
        if self.proxy.strip() and self.proxy.strip().lower() not in ("none", "direct"):
            parse_proxy(self.proxy)
        ids = [p.id for p in self.printer]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"printer id {duplicates[0]!r} given more than once")
        named = [printer_id for printer_id, _ in self.uncertain_delivery]
        if len(named) != len(set(named)):
            raise ValueError("uncertain delivery given twice for the same printer")
        if self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if not 1 <= self.snmp_port <= 65535:
            raise ValueError(f"snmp_port must be a UDP port (1 to 65535), not {self.snmp_port}")


MAX_TOKEN_FILE_BYTES = 4096


def read_token_file(path: Path) -> str:
    """The token in ``path``: one line, surrounding whitespace ignored (editors add a newline)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"token file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"token file {path}: larger than {MAX_TOKEN_FILE_BYTES} bytes, not a token")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"token file {path}: not a token (tokens are ASCII)") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token file {path}: expected one token on one line")
    return token


def with_token(config: ConnectorConfig) -> ConnectorConfig:
    """``config`` with its token read from --token-file when one was given."""
    if config.token_file is None:
        return config
    return dataclasses.replace(config, token=read_token_file(config.token_file), token_file=None)


def uncertain_delivery_for(config: ConnectorConfig, printer_id: str) -> str:
    """``hold`` or ``reprint`` for this printer: its own setting, else ``*``'s, else ``hold``."""
    chosen = dict(config.uncertain_delivery)
    return chosen.get(printer_id, chosen.get("*", "hold"))
