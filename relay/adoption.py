"""Managing a tenant's printers from the relay: adopt a discovered candidate, add, change or remove one.

The connector owns its printer list; the relay asks it over the live tunnel (``POST /v1/printers``,
``DELETE /v1/printers/{id}``), and records the connector's answer in the store before it answers the
admin, so a printer adopted a moment ago takes jobs at once. No restart, and the tunnel stays up.
A connector that is not connected cannot be asked: 503, nothing changes.

With replicas, the admin may ask one that holds no session of the connector. Then the request goes through
the store: a row and a ``request`` notice; the replica that holds a session takes the row, asks the
connector and stores the answer (an ``answer`` notice); the asking replica reads it and goes on as if it
had asked itself. Candidates (printers connectors discovered) are kept in the store for the same reason.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay.auth import NAME_RE
from relay.store.base import ConnectorRequest, ConnectorStore, Notice, Printer
from service import bounded_json
from tunnel.messages import MessageError, PrinterCandidate, PrinterInfo
from tunnel.session import SessionClosed, StreamClosed

if TYPE_CHECKING:
    from relay.tunnel import ConnectorRegistry, ConnectorSession

log = logging.getLogger("printrelay.relay.adoption")

#: the connector answers a printer change within this (it polls the new printer once, bounded)
CHANGE_TIMEOUT = 30.0
REQUESTS_QUEUED = 256  # requests for this replica's sessions waiting to be carried out
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


class Adoption:
    """Changes of a tenant's printers, asked of its connectors wherever their sessions are."""

    def __init__(self, store: ConnectorStore, registry: ConnectorRegistry, replica_id: str) -> None:
        self._store = store
        self._registry = registry
        self._replica_id = replica_id
        self._answers: dict[str, trio.Event] = {}  # request id -> set when its answer is stored
        self._incoming_send, self._incoming = trio.open_memory_channel[str](REQUESTS_QUEUED)

    # --- notices ------------------------------------------------------------------------------------

    def heard(self, notice: Notice) -> None:
        if notice.kind == "answer":
            waiting = self._answers.get(notice.key)
            if waiting is not None:
                waiting.set()
        elif notice.kind == "request" and self._local(
            str(notice.data.get("tenant")), str(notice.data.get("connector_id"))
        ):
            try:
                self._incoming_send.send_nowait(notice.key)
            except trio.WouldBlock:
                log.warning(
                    "too many printer changes queued here; request %s left to another replica", notice.key
                )
        elif notice.kind == "resync":
            for waiting in self._answers.values():
                waiting.set()  # an answer may have been missed: look

    async def run(self) -> None:
        """Carries out the requests other replicas made for the sessions this one holds."""
        async with trio.open_nursery() as nursery:
            async for request_id in self._incoming:
                nursery.start_soon(self._carry_out, request_id)

    async def _carry_out(self, request_id: str) -> None:
        request = await self._store.take_connector_request(request_id, self._replica_id)
        if request is None:
            return  # another replica holding a session took it first
        sessions = self._local(request.tenant, request.connector_id)
        if not sessions:
            status, answer = (
                503,
                json.dumps({"error": f"connector {request.connector_id} went away"}).encode(),
            )
        else:
            try:
                status, answer = await _ask_session(sessions[0], request.method, request.path, request.body)
            except AdoptionError as exc:
                status, answer = exc.status, json.dumps({"error": exc.message}).encode()
        await self._store.answer_connector_request(request_id, status, answer)

    # --- asking ---------------------------------------------------------------------------------------

    def _local(self, tenant: str, connector_id: str) -> list[ConnectorSession]:
        return [s for s in self._registry.sessions(tenant) if s.connector_id == connector_id and s.h2.is_open]

    async def _ask(
        self, tenant: str, connector_id: str, method: str, path: str, body: bytes | None
    ) -> tuple[int, bytes]:
        local = self._local(tenant, connector_id)
        if local:
            return await _ask_session(local[0], method, path, body)
        connector = await self._store.get_connector(tenant, connector_id)
        if connector is None or not connector.online:
            raise AdoptionError(503, f"connector {connector_id} is not connected; try again when it is")
        request = ConnectorRequest(
            f"req_{secrets.token_hex(8)}", tenant, connector_id, method, path, body, time.time()
        )
        answered = self._answers[request.id] = trio.Event()
        try:
            await self._store.add_connector_request(request)
            with trio.fail_after(CHANGE_TIMEOUT):
                while True:
                    await answered.wait()
                    found = await self._store.connector_answer(request.id)
                    if found is not None:
                        return found
                    answered = self._answers[request.id] = trio.Event()  # a resync, not the answer
        except trio.TooSlowError:
            raise AdoptionError(
                504, f"connector {connector_id} did not answer within {CHANGE_TIMEOUT:g} s"
            ) from None
        finally:
            del self._answers[request.id]
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._store.forget_connector_request(request.id)

    async def _connector_for(
        self, tenant: str, connector_id: str | None, uri: str
    ) -> tuple[str, dict[str, Any] | None]:
        """Which connector serves ``uri``: the one named, else the one that discovered it, else the only one
        connected; and the candidate it reported, if any."""
        found = [(cid, c) for cid, c in await self._store.list_candidates(tenant) if c.get("uri") == uri]
        if connector_id is not None:
            return connector_id, next((c for cid, c in found if cid == connector_id), None)
        if len({cid for cid, _ in found}) == 1:
            return found[0]
        online = await self._store.connectors_online(tenant)
        if len(online) == 1:
            return online[0], None
        if not online:
            raise AdoptionError(503, "no connector of this tenant is connected")
        raise AdoptionError(
            400, f"several connectors are connected ({', '.join(online)}): name one in connector_id"
        )

    # --- the operations ---------------------------------------------------------------------------------

    async def candidates(self, tenant: str) -> list[CandidateView]:
        """Printers the tenant's connected connectors found and do not serve yet."""
        views = []
        for connector_id, data in await self._store.list_candidates(tenant):
            try:
                views.append(CandidateView(connector_id, PrinterCandidate.from_json(data)))
            except MessageError:
                continue
        return views

    async def put_printer(self, tenant: str, body: bytes) -> tuple[Printer, bool]:
        """``POST /v1/printers`` ``{"uri", "id"?, "connector_id"?, "pull"?}``: adopt, add or change a
        printer; ``{"id", "pull"}`` alone changes only whether it is a pull printer (the relay's to know,
        the connector is not asked). Returns it and whether it is new."""
        store = self._store
        printer_id, uri, connector_id, pull = _parse_request(body)
        if uri is None and printer_id is not None and pull is not None and connector_id is None:
            return await self._set_pull(tenant, printer_id, pull), False
        if uri is None:
            raise AdoptionError(
                400, "uri is required (a candidate's uri from GET /v1/candidates, or any printer URI); "
                'to make a printer a pull printer or not, {"id": ..., "pull": true|false} alone',
            )  # fmt: skip
        if connector_id is not None and not NAME_RE.match(connector_id):
            raise AdoptionError(400, f"invalid connector_id {connector_id!r}")
        if connector_id is not None and await store.get_connector(tenant, connector_id) is None:
            # Unknown, or another tenant's: the same answer, so neither can be told from the other.
            raise AdoptionError(404, f"connector {connector_id} not found")
        connector_id, candidate = await self._connector_for(tenant, connector_id, uri)
        if printer_id is None:
            suggested = candidate.get("suggested_id") if candidate else None
            if not isinstance(suggested, str) or not suggested:
                raise AdoptionError(400, "id is required for a printer that is not a discovered candidate")
            printer_id = suggested
        existing = await store.get_printer(tenant, printer_id)
        if existing is not None and existing.connector_id != connector_id and existing.state != "removed":
            raise AdoptionError(
                409,
                f"printer id {printer_id} is served by connector {existing.connector_id}; choose another id",
            )
        status, answer = await self._ask(
            tenant, connector_id, "POST", "/v1/printers", json.dumps({"id": printer_id, "uri": uri}).encode()
        )
        if status not in (200, 201):
            raise AdoptionError(
                status if status in (400, 503, 504) else 502, f"connector refused: {_error(answer)}"
            )
        try:
            info = PrinterInfo.from_json(bounded_json.loads(answer))
        except (ValueError, MessageError) as exc:
            raise AdoptionError(502, f"connector answered nonsense: {exc}") from None
        record = printer_record(tenant, connector_id, info)
        await store.update_printer(record)
        if pull is not None:
            await store.set_printer_pull(tenant, info.id, pull)
        await store.remove_candidate(tenant, connector_id, uri)
        self._registry.wake(tenant, connector_id)
        stored = await store.get_printer(tenant, info.id)
        return stored or record, status == 201

    async def _set_pull(self, tenant: str, printer_id: str, pull: bool) -> Printer:
        printer = await self._store.get_printer(tenant, printer_id)
        if printer is None or printer.state == "removed":
            raise AdoptionError(404, f"printer {printer_id} not found")
        if not await self._store.set_printer_pull(tenant, printer_id, pull):
            raise AdoptionError(404, f"printer {printer_id} not found")  # gone meanwhile
        printer.pull = pull
        return printer

    async def remove_printer(self, tenant: str, printer_id: str) -> Printer:
        """``DELETE /v1/printers/{id}``: the connector stops serving it; its jobs fail with that reason."""
        printer = await self._store.get_printer(tenant, printer_id)
        if printer is None or printer.state == "removed":
            raise AdoptionError(404, f"printer {printer_id} not found")
        status, answer = await self._ask(
            tenant, printer.connector_id, "DELETE", f"/v1/printers/{printer_id}", None
        )
        if status not in (200, 404):
            raise AdoptionError(
                status if status in (503, 504) else 502, f"connector refused: {_error(answer)}"
            )
        # the store keeps the row (job history refers to it) marked removed; the connector no longer serves it
        printer.state, printer.reasons, printer.updated_at = "removed", [], time.time()
        await self._store.update_printer(printer)
        return printer


def printer_record(tenant: str, connector_id: str, info: PrinterInfo) -> Printer:
    """A printer a connector reports, as the store keeps it."""
    return Printer(
        tenant=tenant, id=info.id, connector_id=connector_id, uri=info.uri, kind=info.kind, state=info.state,
        reasons=list(info.reasons), capabilities=info.capabilities, online=True, updated_at=time.time(),
        message=info.message,
    )  # fmt: skip


async def _ask_session(
    session: ConnectorSession, method: str, path: str, body: bytes | None
) -> tuple[int, bytes]:
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


def _parse_request(body: bytes) -> tuple[str | None, str | None, str | None, bool | None]:
    try:
        obj = bounded_json.loads(body or b"{}")
    except ValueError as exc:  # UnicodeDecodeError is one
        raise AdoptionError(
            400, f'body must be JSON: {{"uri": ..., "id": ..., "connector_id": ..., "pull": ...}}: {exc}'
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
    pull = obj.get("pull")
    if pull is not None and not isinstance(pull, bool):
        raise AdoptionError(400, f"pull must be true or false, not {json.dumps(pull)[:40]}")
    return printer_id, uri or candidate, connector_id, pull
