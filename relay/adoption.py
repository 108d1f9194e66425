"""Managing a tenant's printers from the relay: adopt a discovered candidate, add, change or remove one.

The connector owns its printer list; the relay asks it over the live tunnel (``POST /v1/printers``,
``DELETE /v1/printers/{id}``), and records the connector's answer in the store before it answers the
admin, so a printer adopted a moment ago takes jobs at once. No restart, and the tunnel stays up.
A connector that is not connected cannot be asked: 503, nothing changes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay.auth import NAME_RE
from relay.store.base import ConnectorStore, Printer
from service import bounded_json
from tunnel.messages import MessageError, PrinterCandidate, PrinterInfo
from tunnel.session import SessionClosed, StreamClosed

if TYPE_CHECKING:
    from relay.tunnel import ConnectorRegistry, ConnectorSession

#: the connector answers a printer change within this (it polls the new printer once, bounded)
CHANGE_TIMEOUT = 30.0
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class AdoptionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CandidateView:
    connector_id: str
    candidate: PrinterCandidate

    def public(self) -> dict[str, Any]:
        return {"connector_id": self.connector_id, **self.candidate.to_json()}


def candidates(registry: ConnectorRegistry, tenant: str) -> list[CandidateView]:
    """Printers the tenant's connected connectors found and do not serve yet."""
    seen: dict[tuple[str, str], CandidateView] = {}
    for session in registry.sessions(tenant):
        for candidate in session.candidates.values():
            seen.setdefault(
                (session.connector_id, candidate.uri), CandidateView(session.connector_id, candidate)
            )
    return sorted(seen.values(), key=lambda v: (v.connector_id, v.candidate.uri))


def _session(
    registry: ConnectorRegistry, tenant: str, connector_id: str | None, uri: str | None
) -> ConnectorSession:
    sessions = [s for s in registry.sessions(tenant) if s.h2.is_open]
    if connector_id is not None:
        sessions = [s for s in sessions if s.connector_id == connector_id]
        if not sessions:
            raise AdoptionError(503, f"connector {connector_id} is not connected; try again when it is")
        return sessions[0]
    ids = sorted({s.connector_id for s in sessions})
    if uri is not None:
        finders = sorted({s.connector_id for s in sessions if uri in s.candidates})
        if len(finders) == 1:
            ids = finders
    if len(ids) == 1:
        return next(s for s in sessions if s.connector_id == ids[0])
    if not ids:
        raise AdoptionError(503, "no connector of this tenant is connected")
    raise AdoptionError(400, f"several connectors are connected ({', '.join(ids)}): name one in connector_id")


async def _ask(session: ConnectorSession, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    try:
        with trio.fail_after(CHANGE_TIMEOUT):
            headers = [("content-type", "application/json")] if body is not None else []
            stream = await session.h2.open_stream(method, path, headers, end_stream=body is None)
            if body is not None:
                await stream.send_data(body, end_stream=True)
            await stream.receive_response()
            return stream.status, await stream.read_body(MAX_ANSWER_BYTES)
    except (SessionClosed, StreamClosed) as exc:
        raise AdoptionError(503, f"connector {session.connector_id} went away: {exc}") from None
    except trio.TooSlowError:
        raise AdoptionError(
            504, f"connector {session.connector_id} did not answer within {CHANGE_TIMEOUT:g} s"
        ) from None


def _error(answer: bytes) -> str:
    try:
        obj = bounded_json.loads(answer)
    except ValueError:
        return answer.decode(errors="replace")[:500]
    return str(obj.get("error", obj)) if isinstance(obj, dict) else str(obj)


def _parse_request(body: bytes) -> tuple[str | None, str | None, str | None]:
    try:
        obj = bounded_json.loads(body or b"{}")
    except ValueError as exc:  # UnicodeDecodeError is one
        raise AdoptionError(
            400, f'body must be JSON: {{"uri": ..., "id": ..., "connector_id": ...}}: {exc}'
        ) from None
    if not isinstance(obj, dict):
        raise AdoptionError(400, "body must be a JSON object")
    values: list[str | None] = []
    for key in ("id", "uri", "connector_id", "candidate"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 2048):
            raise AdoptionError(400, f"{key} must be a string of 1 to 2048 characters")
        values.append(value)
    printer_id, uri, connector_id, candidate = values
    return printer_id, uri or candidate, connector_id


async def put_printer(
    store: ConnectorStore, registry: ConnectorRegistry, tenant: str, body: bytes
) -> tuple[Printer, bool]:
    """``POST /v1/printers`` ``{"uri", "id"?, "connector_id"?}``: adopt, add or change. (printer, created)."""
    printer_id, uri, connector_id = _parse_request(body)
    if uri is None:
        raise AdoptionError(
            400, "uri is required (a candidate's uri from GET /v1/candidates, or any printer URI)"
        )
    if connector_id is not None and not NAME_RE.match(connector_id):
        raise AdoptionError(400, f"invalid connector_id {connector_id!r}")
    if connector_id is not None and await store.get_connector(tenant, connector_id) is None:
        # Unknown, or another tenant's: the same answer, so neither can be told from the other.
        raise AdoptionError(404, f"connector {connector_id} not found")
    session = _session(registry, tenant, connector_id, uri)
    if printer_id is None:
        candidate = session.candidates.get(uri)
        if candidate is None or not candidate.suggested_id:
            raise AdoptionError(400, "id is required for a printer that is not a discovered candidate")
        printer_id = candidate.suggested_id
    existing = await store.get_printer(tenant, printer_id)
    if existing is not None and existing.connector_id != session.connector_id and existing.state != "removed":
        raise AdoptionError(
            409, f"printer id {printer_id} is served by connector {existing.connector_id}; choose another id"
        )
    status, answer = await _ask(
        session, "POST", "/v1/printers", json.dumps({"id": printer_id, "uri": uri}).encode()
    )
    if status not in (200, 201):
        raise AdoptionError(400 if status == 400 else 502, f"connector refused: {_error(answer)}")
    try:
        info = PrinterInfo.from_json(bounded_json.loads(answer))
    except (ValueError, MessageError) as exc:
        raise AdoptionError(502, f"connector answered nonsense: {exc}") from None
    record = session.printer_record(info)
    await store.update_printer(record)
    session.candidates.pop(uri, None)
    registry.wake(tenant, session.connector_id)
    stored = await store.get_printer(tenant, info.id)
    return stored or record, status == 201


async def remove_printer(
    store: ConnectorStore, registry: ConnectorRegistry, tenant: str, printer_id: str
) -> Printer:
    """``DELETE /v1/printers/{id}``: the connector stops serving it; its jobs fail with that reason."""
    printer = await store.get_printer(tenant, printer_id)
    if printer is None or printer.state == "removed":
        raise AdoptionError(404, f"printer {printer_id} not found")
    session = _session(registry, tenant, printer.connector_id, None)
    status, answer = await _ask(session, "DELETE", f"/v1/printers/{printer_id}", None)
    if status not in (200, 404):
        raise AdoptionError(502, f"connector refused: {_error(answer)}")
    # the store keeps the row (job history refers to it) marked removed; the connector no longer serves it
    printer.state, printer.reasons, printer.updated_at = "removed", [], time.time()
    await store.update_printer(printer)
    return printer
