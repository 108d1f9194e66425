"""What relay and connector say to each other on the tunnel's HTTP/2 streams (DESIGN §4).

Streams the relay opens (it is the HTTP/2 client):

* ``GET /v1/printers`` — the connector's inventory: its public keys and printers (:class:`Inventory`).
* ``GET /v1/events`` — long-lived NDJSON from the connector: printer changes (``printer``) and printers
  discovery found (``candidate``).
* ``POST /v1/printers`` (body ``{"id", "uri"}``) / ``DELETE /v1/printers/{id}`` — serve a printer from
  now on (adopt a candidate, or change a URI) / stop serving one; no restart, the tunnel stays up.
* ``POST /v1/jobs/{id}`` — one job. The ticket travels in the ``x-job-ticket`` header (base64url JSON),
  the sealed payload as the body; the response body is NDJSON status lines (:class:`JobStatus`), the last
  one final.
* ``POST /v1/drain`` — the relay is going away: the connector should dial a new session.
* ``POST /v1/replicas`` (body ``{"alive": N}``) — the number of relay replicas changed: the connector
  keeps sessions to up to that many (it learnt the first count on the upgrade, ``x-printrelay-replicas``).

Everything here is validated on the way in: a peer is never trusted to send well-formed data.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from service import bounded_json

MAX_TICKET_BYTES = 16 * 1024
MAX_STATUS_LINE_BYTES = 16 * 1024
MAX_INVENTORY_BYTES = 4 * 1024 * 1024
TICKET_HEADER = "x-job-ticket"
#: a printer's state message: refused above MAX, kept to KEPT characters (255 characters stay within the 1023
#: octets of IPP's printer-state-message, which the relay's IPP printer passes it on as)
MAX_PRINTER_MESSAGE = 1024
KEPT_PRINTER_MESSAGE = 255
#: a job's page count above this is not a page count
MAX_PAGES = 10**9
NDJSON = "application/x-ndjson"

# "held": the connector cannot know whether the printer took the job (it stopped while a RAW or LPD
# printer was taking it) and its printer is set to hold such jobs for a person (uncertain_delivery).
FINAL_STATUSES = ("completed", "failed", "retry", "canceled", "held")


class MessageError(ValueError):
    """A tunnel message was malformed or out of bounds."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"bad base64: {exc}") from exc


def _str(obj: dict[str, Any], key: str, default: str | None = None, *, limit: int = 4096) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise MessageError(f"{key} must be a string of at most {limit} characters")
    return value


def _int(
    obj: dict[str, Any], key: str, default: int | None = None, *, low: int = 0, high: int = 2**62
) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MessageError(f"{key} must be an integer from {low} to {high}")
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PAGES


@dataclass(frozen=True)
class JobTicketMessage:
    """Everything the connector needs to deliver a job, besides the payload."""

    job_id: str
    printer_id: str
    title: str
    document_format: str
    copies: int
    user: str
    size: int
    sealed_size: int
    key_id: str
    wrapped_key: bytes
    attempt: int
    options: dict[str, str] = field(default_factory=dict)
    # How often the job was held because a delivery's outcome was unknown (relay/jobs.py): a resend with a
    # higher count than the connector's ledger recorded was released by a person, and prints again.
    unknown_outcomes: int = 0

    def encode(self) -> str:
        obj = {**vars(self), "wrapped_key": _b64(self.wrapped_key)}  # flat: no asdict's deep copy per job
        return _b64(json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def decode(cls, header: str) -> JobTicketMessage:
        if len(header) > MAX_TICKET_BYTES:
            raise MessageError(f"job ticket exceeds {MAX_TICKET_BYTES} bytes")
        try:
            obj = bounded_json.loads(_unb64(header))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep
            raise MessageError(f"job ticket is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise MessageError("job ticket must be an object")
        options = obj.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items()
        ):
            raise MessageError("options must map strings to strings")
        return cls(
            job_id=_str(obj, "job_id", limit=128),
            printer_id=_str(obj, "printer_id", limit=128),
            title=_str(obj, "title", ""),
            document_format=_str(obj, "document_format", limit=256),
            copies=_int(obj, "copies", 1, low=1, high=9999),
            user=_str(obj, "user", "", limit=256),
            size=_int(obj, "size"),
            sealed_size=_int(obj, "sealed_size"),
            key_id=_str(obj, "key_id", limit=64),
            wrapped_key=_unb64(_str(obj, "wrapped_key", limit=1024)),
            attempt=_int(obj, "attempt", 1),
            options=options,
            unknown_outcomes=_int(obj, "unknown_outcomes", 0),
        )


@dataclass(frozen=True)
class JobStatus:
    """One NDJSON line of a job stream's response: progress, or the final result."""

    state: str  # printing | completed | failed | retry | canceled | held
    message: str = ""
    printer_job_id: int | None = None
    retry_after: float | None = None
    duplicate: bool = False  # answered from the ledger: the job had been delivered before
    # A completed job's pages, by the printer's page counter before and after it (RAW and LPD printers
    # with SNMP): best effort. Absent when unknown; relays that predate it ignore it.
    pages: int | None = None
    # A ``retry`` that is not the job's fault (the connector is stopping, the printer is busy with another
    # job): the relay gives the attempt back. Relays that predate it count the attempt.
    uncounted: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATUSES

    def encode(self) -> bytes:
        obj = {k: v for k, v in vars(self).items() if v is not None and v is not False}
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> JobStatus:
        if len(line) > MAX_STATUS_LINE_BYTES:
            raise MessageError(f"status line exceeds {MAX_STATUS_LINE_BYTES} bytes")
        try:
            obj = bounded_json.loads(line)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep
            raise MessageError(f"status line is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise MessageError("status line must be an object")
        state = _str(obj, "state", limit=32)
        if state not in ("printing", *FINAL_STATUSES):
            raise MessageError(f"unknown job state {state!r}")
        printer_job_id = obj.get("printer_job_id")
        retry_after = obj.get("retry_after")
        pages = obj.get("pages")
        return cls(
            state=state,
            message=_str(obj, "message", ""),
            printer_job_id=printer_job_id if isinstance(printer_job_id, int) else None,
            retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
            duplicate=obj.get("duplicate") is True,
            uncounted=obj.get("uncounted") is True,
            # best effort by nature: a count that is not one is dropped, never the job's outcome with it
            pages=pages if _is_count(pages) else None,
        )


@dataclass(frozen=True)
class PrinterInfo:
    id: str
    uri: str
    kind: str
    state: str = "unknown"
    reasons: tuple[str, ...] = ()
    capabilities: dict[str, Any] = field(default_factory=dict)
    # What the printer says about its state for people (IPP printer-state-message, the Printer MIB's
    # alerts); connectors that predate it send none, relays that predate it ignore it.
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, obj: Any) -> PrinterInfo:
        if not isinstance(obj, dict):
            raise MessageError("printer must be an object")
        reasons = obj.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            raise MessageError("reasons must be a list of strings")
        capabilities = obj.get("capabilities", {})
        if not isinstance(capabilities, dict):
            raise MessageError("capabilities must be an object")
        return cls(
            id=_str(obj, "id", limit=128),
            uri=_str(obj, "uri", "", limit=2048),
            kind=_str(obj, "kind", "", limit=32),
            state=_str(obj, "state", "unknown", limit=32),
            reasons=tuple(reasons[:64]),
            capabilities=capabilities,
            message=_str(obj, "message", "", limit=MAX_PRINTER_MESSAGE)[:KEPT_PRINTER_MESSAGE],
        )


@dataclass(frozen=True)
class Inventory:
    """The connector's answer to ``GET /v1/printers``."""

    name: str
    version: str
    key_id: str
    public_key: bytes
    printers: tuple[PrinterInfo, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {
                "connector": {
                    "name": self.name,
                    "version": self.version,
                    "key_id": self.key_id,
                    "public_key": _b64(self.public_key),
                },
                "printers": [p.to_json() for p in self.printers],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Inventory:
        if len(data) > MAX_INVENTORY_BYTES:
            raise MessageError(f"inventory exceeds {MAX_INVENTORY_BYTES} bytes")
        try:
            obj = bounded_json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep
            raise MessageError(f"inventory is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("connector"), dict):
            raise MessageError("inventory must have a connector object")
        connector = obj["connector"]
        printers = obj.get("printers", [])
        if not isinstance(printers, list) or len(printers) > 10_000:
            raise MessageError("printers must be a list of at most 10000")
        public_key = _unb64(_str(connector, "public_key", limit=128))
        if len(public_key) != 32:
            raise MessageError("public_key must be a 32-byte X25519 key")
        return cls(
            name=_str(connector, "name", "", limit=256),
            version=_str(connector, "version", "", limit=64),
            key_id=_str(connector, "key_id", limit=64),
            public_key=public_key,
            printers=tuple(PrinterInfo.from_json(p) for p in printers),
        )


def printer_event(printer: PrinterInfo) -> bytes:
    """One line of ``GET /v1/events``."""
    return (
        json.dumps({"type": "printer", "printer": printer.to_json()}, separators=(",", ":")).encode() + b"\n"
    )


@dataclass(frozen=True)
class PrinterCandidate:
    """A printer the connector found (DNS-SD, a CUPS queue, a range scan) but does not serve yet."""

    uri: str
    name: str  # what the printer or queue calls itself
    source: str  # cups | mdns | scan
    make_and_model: str = ""
    suggested_id: str = ""  # a valid printer id to adopt it under

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> PrinterCandidate:
        if not isinstance(obj, dict):
            raise MessageError("candidate must be an object")
        return cls(
            uri=_str(obj, "uri", limit=2048),
            name=_str(obj, "name", "", limit=256),
            source=_str(obj, "source", "", limit=32),
            make_and_model=_str(obj, "make_and_model", "", limit=256),
            suggested_id=_str(obj, "suggested_id", "", limit=64),
        )


def candidate_event(candidate: PrinterCandidate) -> bytes:
    """One line of ``GET /v1/events``: a discovered printer (older relays ignore the type)."""
    obj = {"type": "candidate", "candidate": candidate.to_json()}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def parse_event(line: bytes) -> PrinterInfo | PrinterCandidate | None:
    """A printer change or a discovered printer; None for event types this version does not know."""
    if len(line) > MAX_STATUS_LINE_BYTES * 8:
        raise MessageError("event line too long")
    try:
        obj = bounded_json.loads(line)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep
        raise MessageError(f"event is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError("event must be an object")
    if obj.get("type") == "printer":
        return PrinterInfo.from_json(obj.get("printer"))
    if obj.get("type") == "candidate":
        return PrinterCandidate.from_json(obj.get("candidate"))
    return None


MAX_REPLICAS = 10_000
MAX_REPLICAS_BYTES = 1024


def replicas_message(alive: int) -> bytes:
    """The body of ``POST /v1/replicas``."""
    return json.dumps({"alive": alive}).encode()


def parse_replicas(body: bytes) -> int:
    """How many relay replicas are alive, from a ``POST /v1/replicas`` body."""
    if len(body) > MAX_REPLICAS_BYTES:
        raise MessageError(f"replicas message over {MAX_REPLICAS_BYTES} bytes")
    try:
        obj = bounded_json.loads(body)
    except ValueError as exc:
        raise MessageError(f"replicas message is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MessageError("replicas message must be an object")
    return _int(obj, "alive", low=1, high=MAX_REPLICAS)


def decode_event(line: bytes) -> PrinterInfo | None:
    """A printer change, or None for event types this version does not know (ignored, not fatal)."""
    event = parse_event(line)
    return event if isinstance(event, PrinterInfo) else None


class LineSplitter:
    """Split a byte stream into lines, refusing any line longer than ``limit`` (sans-IO)."""

    def __init__(self, limit: int = MAX_STATUS_LINE_BYTES) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        lines: list[bytes] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if line:
                lines.append(line)
        if len(self._buffer) > self.limit:
            raise MessageError(f"line exceeds {self.limit} bytes")
        return lines
