"""The relay's end of the tunnel: the WebSocket listener and one :class:`ConnectorSession` per connection.

A connector dials ``/v1/tunnel`` with its bearer token. The token is checked *before* the upgrade (a bad
one gets HTTP 401 and never a WebSocket). After the upgrade the relay is the HTTP/2 client on that byte
stream. The session learns the connector's keys and printers (``GET /v1/printers``), follows its events
(``GET /v1/events``) and runs a :class:`~relay.dispatch.Dispatcher` that streams queued jobs to it. The
session owns all of these tasks; when the tunnel drops they end together and in-flight jobs are queued
again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import trio

from relay import audit
from relay.adoption import printer_record
from relay.auth import AuthError, Principal, authenticate, bearer
from relay.dispatch import Dispatcher
from relay.metrics import RelayMetrics
from relay.store.base import (
    ConnectorRecord,
    ConnectorStore,
    Notice,
    Printer,
    SessionRecord,
    StoreUnavailable,
    TokenStore,
)
from service.signal import Signal
from tunnel.messages import (
    Inventory,
    LineSplitter,
    MessageError,
    PrinterCandidate,
    PrinterInfo,
    parse_event,
    replicas_message,
)
from tunnel.protocol import TunnelSettings
from tunnel.session import H2Session, SessionClosed, StreamClosed
from tunnel.wsstream import (
    MAX_HEAD_BYTES,
    REPLICA_HEADER,
    REPLICAS_HEADER,
    SUBPROTOCOL,
    TUNNEL_PATH,
    NotAnUpgrade,
    UpgradeRequest,
)

log = logging.getLogger("printrelay.relay.tunnel")

HANDSHAKE_TIMEOUT = 10.0
DRAIN_ASK_TIMEOUT = 5.0  # a connector answers POST /v1/drain (and /v1/replicas) within this
SETTLE_TIMEOUT = 5.0  # after a session ends, its job streams this long to read what already arrived
DRAINING_RETRY_AFTER = 2  # seconds a connector dialing a draining replica waits
DISCONNECT_TIMEOUT = 5.0  # for the WebSocket closing handshake
INVENTORY_TIMEOUT = 30.0
RETRY_AFTER_AUTH = 30  # seconds a refused connector should wait
MAX_CANDIDATES = 1000  # discovered printers kept per session (a connector resends them on reconnect)
# Tokens are revoked by another process (printrelay token revoke) that only writes the store; the relay
# re-reads the tokens of its live sessions this often, so a revoked connector is cut off within ~2 s.
TOKEN_RECHECK_INTERVAL = 2.0
# Connectors between their first byte and a finished registration (token check, upgrade, inventory, store
# writes). After a relay restart every connector dials within seconds; working on all of them at once makes
# each one slower than its connect timeout, so they give up, redial, and the work done for them is wasted.
# Beyond this many the relay answers 503 at once, with a Retry-After appointment (see Admission).
MAX_REGISTERING = 128
# A refused connector is asked back at an appointment: no sooner than the first figure, no later than the
# second (connectors cap their wait at 60 s; see tunnel/backoff.py).
BUSY_RETRY_AFTER = (2, 60)
# How long a registration holds its slot, assumed until the first ones finish (then measured).
ASSUMED_REGISTRATION_SECONDS = 1.0


class Admission:
    """Bounds how many connectors register at once (see MAX_REGISTERING), and tells each connector it
    refuses when to come back.

    Each refusal is a TCP and WebSocket handshake the relay pays for. Asked back at random, the thousands
    waiting after a restart came back every few seconds until they were let in, and those refusals took
    the CPU the registrations needed. So refused connectors get appointments instead, one per slot the
    relay expects to free, at the rate it has been registering (Little's law: slots / time per
    registration); most are then refused once. Beyond BUSY_RETRY_AFTER's latest appointment they are
    asked back at random within it, and get an appointment when they return.
    """

    def __init__(self, limit: int = MAX_REGISTERING, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.registering = 0
        self._clock = clock
        self._next_appointment = 0.0
        self._seconds_per_registration = ASSUMED_REGISTRATION_SECONDS  # moving average

    def full(self) -> bool:
        return self.registering >= self.limit

    def enter(self) -> AdmissionTicket | None:
        """A ticket to register now, or None when the relay is busy."""
        if self.full():
            return None
        self.registering += 1
        return AdmissionTicket(self, self._clock())

    def rate(self) -> float:
        """Registrations per second while every slot is busy."""
        return max(self.limit, 1) / self._seconds_per_registration

    def retry_after(self) -> int:
        """Whole seconds until this refused connector's appointment."""
        now = self._clock()
        soonest, latest = BUSY_RETRY_AFTER
        appointment = max(self._next_appointment, now + soonest)
        if appointment - now > latest:
            return random.randint(soonest, latest)
        self._next_appointment = appointment + 1 / self.rate()
        return max(soonest, int(appointment - now))

    def _released(self, entered: float) -> None:
        self.registering -= 1
        held = max(self._clock() - entered, 0.001)
        self._seconds_per_registration += 0.1 * (held - self._seconds_per_registration)


class AdmissionTicket:
    def __init__(self, admission: Admission, entered: float) -> None:
        self._admission: Admission | None = admission
        self._entered = entered

    def release(self) -> None:
        """Registered, or gave up: the slot is free (idempotent)."""
        if self._admission is not None:
            self._admission._released(self._entered)
            self._admission = None


class ConnectorRegistry:
    """The sessions this relay process holds, by (tenant, connector id)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], list[ConnectorSession]] = defaultdict(list)
        self._wakeups: dict[tuple[str, str], Signal] = defaultdict(Signal)
        self.changed = trio.Event()
        self.admission = Admission()  # connectors between their first byte and registration
        self._tokens_changed: set[str] = set()  # token ids a notice named ("" for any)
        self._tokens_wakeup = Signal()
        self.token_rounds = Signal()  # fired after each round of token checks (tests wait on it)
        self._unrecorded_closes: set[str] = set()  # session ids whose end the store has not heard yet

    def add(self, session: ConnectorSession) -> None:
        self._sessions[session.key].append(session)
        self._notify()

    def remove(self, session: ConnectorSession) -> None:
        sessions = self._sessions.get(session.key, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self._sessions.pop(session.key, None)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def sessions(self, tenant: str | None = None) -> list[ConnectorSession]:
        return [s for key, ss in self._sessions.items() for s in ss if tenant is None or key[0] == tenant]

    def wakeup(self, tenant: str, connector_id: str) -> Signal:
        return self._wakeups[(tenant, connector_id)]

    def wake(self, tenant: str, connector_id: str) -> None:
        self._wakeups[(tenant, connector_id)].fire()

    def close_token_sessions(self, token_id: str, reason: str) -> int:
        closing = [s for s in self.sessions() if s.principal.token_id == token_id]
        for session in closing:
            session.h2.close(reason)
        return len(closing)

    def heard(self, notice: Notice) -> None:
        """A change committed here or on another replica that this replica's sessions must act on."""
        if notice.kind == "job":
            state = notice.data.get("state")
            tenant, connector_id = str(notice.data.get("tenant")), str(notice.data.get("connector_id"))
            if state == "queued":
                self.wake(tenant, connector_id)
            elif state == "canceled":
                # Whichever of our sessions streams it resets its stream (the others hold no such stream).
                for session in self._sessions.get((tenant, connector_id), []):
                    session.cancel_stream(notice.key)
        elif notice.kind == "tokens":
            self._tokens_changed.add(notice.key)
            self._tokens_wakeup.fire()

    async def watch_tokens(self, store: TokenStore, interval: float = TOKEN_RECHECK_INTERVAL) -> None:
        """Close the sessions of connector tokens revoked, expired or deleted since they registered.

        A token is read once, when its session is new to this watcher, and again only when the store says
        tokens changed (a ``tokens`` notice: another replica or the CLI revoked or deleted one); expiry is
        checked in memory.
        """
        valid: dict[str, float | None] = {}  # token id -> expires_at, as read
        while True:
            woken = self._tokens_wakeup.next_firing()
            with trio.move_on_after(interval):
                await woken.wait()
            changed, self._tokens_changed = self._tokens_changed, set()
            if "" in changed:
                valid = {}
            for token_id in changed:
                valid.pop(token_id, None)
            live = {s.principal.token_id for s in self.sessions()}
            unknown = sorted(live - valid.keys())
            try:
                records = await store.get_tokens(unknown) if unknown else {}
            except StoreUnavailable as exc:
                log.warning("token check skipped: %s", exc)
                self._tokens_changed |= set(unknown)  # asked again next round
                continue
            now = time.time()
            closing: dict[str, str] = {}
            for token_id in unknown:
                record = records.get(token_id)
                if record is None:
                    closing[token_id] = "token deleted"
                elif record.revoked_at is not None:
                    closing[token_id] = "token revoked"
                else:
                    valid[token_id] = record.expires_at
            valid = {t: expires_at for t, expires_at in valid.items() if t in live}
            for token_id, expires_at in list(valid.items()):
                if expires_at is not None and expires_at <= now:
                    closing[token_id] = "token expired"
                    del valid[token_id]
            for token_id, reason in sorted(closing.items()):
                tenants = {s.tenant for s in self.sessions() if s.principal.token_id == token_id}
                closed = self.close_token_sessions(token_id, reason)
                for tenant in tenants:
                    audit.record(
                        "connector.session_closed", tenant=tenant, actor="relay", target=f"token:{token_id}",
                        reason=reason, sessions=closed,
                    )  # fmt: skip
            self.token_rounds.fire()

    def close_all(self, reason: str) -> None:
        for session in self.sessions():
            session.h2.close(reason)

    def session_close_unrecorded(self, session_id: str) -> None:
        """A session ended while the database was unavailable: the heartbeat writes it later."""
        self._unrecorded_closes.add(session_id)

    async def write_pending_closes(self, store: ConnectorStore) -> None:
        for session_id in sorted(self._unrecorded_closes):
            await store.session_closed(session_id, time.time())
            self._unrecorded_closes.discard(session_id)

    def claimed_jobs(self) -> set[str]:
        """Jobs this replica's dispatchers hold (claimed and not yet settled)."""
        return {j for s in self.sessions() if s.dispatcher is not None for j in s.dispatcher.claimed}

    def jobs_in_flight(self) -> int:
        return sum(s.dispatcher.in_flight for s in self.sessions() if s.dispatcher is not None)


DispatcherFactory = Callable[["ConnectorSession"], Dispatcher]


class ConnectorSession:
    """One registered tunnel: an HTTP/2 client session to a connector and the tasks that serve it."""

    def __init__(
        self,
        principal: Principal,
        h2: H2Session,
        remote: str,
        *,
        store: ConnectorStore,
        registry: ConnectorRegistry,
        metrics: RelayMetrics,
        dispatcher: DispatcherFactory,
        replica_id: str,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        assert principal.connector_id is not None
        self._on_registered = on_registered
        self._store = store
        self._registry = registry
        self._metrics = metrics
        self._new_dispatcher = dispatcher
        self.principal = principal
        self.tenant = principal.tenant
        self.connector_id = principal.connector_id
        self.key = (self.tenant, self.connector_id)
        self.h2 = h2
        self.remote = remote
        self.opened_at = time.time()
        self.record = SessionRecord(
            id=f"ses_{secrets.token_hex(8)}", tenant=self.tenant, connector_id=self.connector_id,
            replica_id=replica_id, opened_at=self.opened_at,
        )  # fmt: skip
        self.printer_count = 0  # in its inventory (the inventory itself is not kept: memory)
        self.registered = trio.Event()
        self.dispatcher: Dispatcher | None = None
        self.candidates: dict[str, PrinterCandidate] = {}  # by URI: printers it found, not serving yet

    def cancel_stream(self, job_id: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.cancel(job_id)

    async def tell_replicas(self, alive: int) -> None:
        """How many replicas are alive now (``POST /v1/replicas``). Best effort, bounded: a connector too
        old to know the message answers 404, and learns the count when it next connects."""
        with trio.move_on_after(DRAIN_ASK_TIMEOUT):
            try:
                stream = await self.h2.open_stream(
                    "POST", "/v1/replicas", [("content-type", "application/json")]
                )
                await stream.send_data(replicas_message(alive), end_stream=True)
                await stream.receive_response()
            except (StreamClosed, SessionClosed):
                pass

    async def ask_to_drain(self) -> None:
        """This replica is going away: the connector finishes this session's jobs, then closes it and dials
        again (most likely reaching another replica). Best effort, bounded."""
        with trio.move_on_after(DRAIN_ASK_TIMEOUT):
            try:
                stream = await self.h2.open_stream("POST", "/v1/drain", end_stream=True)
                await stream.receive_response()
            except (StreamClosed, SessionClosed):
                pass

    async def run(self) -> None:
        store = self._store
        async with trio.open_nursery() as nursery:
            await nursery.start(self.h2.run)
            try:
                with trio.fail_after(INVENTORY_TIMEOUT):
                    await self._register()
            except (trio.TooSlowError, SessionClosed, StreamClosed, MessageError, StoreUnavailable) as exc:
                timed_out = isinstance(exc, trio.TooSlowError)  # whose str() is empty
                why = f"no inventory within {INVENTORY_TIMEOUT:g} s" if timed_out else str(exc)
                log.warning(
                    "connector %s/%s registration failed: %s", self.tenant, self.connector_id, why,
                    extra={"tenant": self.tenant, "connector_id": self.connector_id},
                )  # fmt: skip
                self._metrics.registration_failures.labels("inventory").inc()
                self.h2.close(f"registration failed: {why}")
                nursery.cancel_scope.cancel()
                return
            try:
                await store.session_opened(self.record)
            except StoreUnavailable as exc:
                log.warning("connector %s/%s not registered: %s", self.tenant, self.connector_id, exc)
                self.h2.close(f"registration failed: {exc}")
                nursery.cancel_scope.cancel()
                return
            self._registry.add(self)
            log.info(
                "connector %s/%s registered from %s with %d printers", self.tenant, self.connector_id,
                self.remote, self.printer_count,
                extra={"tenant": self.tenant, "connector_id": self.connector_id},
            )  # fmt: skip
            self.registered.set()
            if self._on_registered is not None:
                self._on_registered()
            try:
                self.dispatcher = self._new_dispatcher(self)
                nursery.start_soon(self.dispatcher.run)
                # In this task rather than one of its own: a relay holds thousands of idle sessions, and
                # each task costs memory. It returns when its stream ends (with the session, as a rule).
                await self._follow_events()
                await self.h2.finished.wait()
                # Final statuses that arrived with the connector's goodbye (a draining connector sends its
                # last ones just before it closes) are still read: job streams settle before the rest ends.
                with trio.move_on_after(SETTLE_TIMEOUT):
                    await self.dispatcher.settled()
                nursery.cancel_scope.cancel()
            finally:
                self._registry.remove(self)
                with trio.CancelScope(shield=True), trio.move_on_after(10) as slow:
                    try:
                        await store.session_closed(self.record.id, time.time())
                    except StoreUnavailable:
                        self._registry.session_close_unrecorded(self.record.id)
                if slow.cancelled_caught:
                    self._registry.session_close_unrecorded(self.record.id)
                log.info(
                    "connector %s/%s session closed: %s", self.tenant, self.connector_id,
                    self.h2.close_reason,
                    extra={"tenant": self.tenant, "connector_id": self.connector_id},
                )  # fmt: skip

    async def _register(self) -> None:
        stream = await self.h2.open_stream("GET", "/v1/printers", end_stream=True)
        await stream.receive_response()
        if stream.status != 200:
            raise MessageError(f"inventory answered {stream.status}")
        inventory = Inventory.decode(await stream.read_body(4 * 1024 * 1024))
        self.printer_count = len(inventory.printers)
        store = self._store
        await store.upsert_connector(
            ConnectorRecord(
                tenant=self.tenant,
                id=self.connector_id,
                public_key=inventory.public_key,
                key_id=inventory.key_id,
                name=inventory.name,
                version=inventory.version,
                last_seen=time.time(),
            )
        )
        await store.replace_printers(
            self.tenant, self.connector_id, [self._printer(p) for p in inventory.printers]
        )

    def _printer(self, info: PrinterInfo) -> Printer:
        return printer_record(self.tenant, self.connector_id, info)

    async def _follow_events(self) -> None:
        """Printer changes the connector reports; a malformed event ends only this stream."""
        try:
            stream = await self.h2.open_stream("GET", "/v1/events", end_stream=True)
            await stream.receive_response()
            splitter = LineSplitter()
            async for chunk in stream.iter_data():
                for line in splitter.feed(chunk):
                    event = parse_event(line)
                    if isinstance(event, PrinterInfo):
                        await self._store.update_printer(self._printer(event))
                        if self.candidates.pop(event.uri, None) is not None:
                            await self._store.remove_candidate(self.tenant, self.connector_id, event.uri)
                        self._registry.wake(self.tenant, self.connector_id)
                    elif (
                        isinstance(event, PrinterCandidate)
                        and len(self.candidates) < MAX_CANDIDATES
                        # in the store, so that every replica lists it (and can adopt it)
                        and await self._store.add_candidate(
                            self.tenant,
                            self.connector_id,
                            event.uri,
                            event.to_json(),
                            time.time(),
                            MAX_CANDIDATES,
                        )
                    ):
                        self.candidates[event.uri] = event
        except (StreamClosed, SessionClosed):
            return
        except StoreUnavailable as exc:
            # Printer states cannot be kept now: end the session, the connector dials again and its
            # inventory brings them back once the database is.
            self.h2.close(f"printer events not recorded: {exc}")
        except MessageError as exc:
            log.warning(
                "connector %s/%s sent a bad event: %s", self.tenant, self.connector_id, exc,
                extra={"tenant": self.tenant, "connector_id": self.connector_id},
            )  # fmt: skip


Refusal = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body
SessionFactory = Callable[[Principal, H2Session, str, Callable[[], None]], ConnectorSession]


class TunnelListener:
    """Accepts connector WebSockets on ``--tunnel-listen``."""

    def __init__(
        self,
        registry: ConnectorRegistry,
        tokens: TokenStore,
        metrics: RelayMetrics,
        new_session: SessionFactory,
        *,
        replica: Callable[[], tuple[str, int]] = lambda: ("", 1),
        draining: Callable[[], bool] = lambda: False,
        ssl_context: ssl.SSLContext | None = None,
        settings: TunnelSettings | None = None,
    ) -> None:
        self._replica = replica  # (this replica's id, replicas alive), told to each connector on the upgrade
        self._draining = draining
        self._registry = registry
        self._tokens = tokens
        self._metrics = metrics
        self._new_session = new_session
        self.ssl_context = ssl_context
        self.settings = settings or TunnelSettings()

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        tcp = await trio.open_tcp_listeners(port, host=host or None)
        bound_port = int(tcp[0].socket.getsockname()[1])
        listeners: list[trio.abc.Listener[Any]] = list(tcp)
        if self.ssl_context is not None:
            listeners = [trio.SSLListener(t, self.ssl_context, https_compatible=True) for t in tcp]
        async with trio.open_nursery() as nursery:
            # Each connection's handler catches whatever it raises (see _connection), so nothing a peer
            # does ends the listener.
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(bound_port)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        """One connection, from its first byte to its close. Whatever it raises ends it alone."""
        remote = _peer(stream)
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                received = await read_request_head(stream)
            if received is None:  # the peer left, stalled, or sent no HTTP request head
                return
            head, rest = received
            # Refused from the head alone: after a restart most connections are (thousands dial within
            # seconds, and 128 register at once), and each refusal should cost as little as it can.
            refusal = self._refusal(request_path(head))
            if refusal is None:
                try:
                    request = UpgradeRequest.parse(head, rest)
                except NotAnUpgrade as exc:
                    refusal = exc.status, exc.headers, f"{exc}\n".encode()
                else:
                    await self._serve_request(request, stream, remote)
                    return
            await _answer(stream, refusal)
        except Exception:
            log.exception("tunnel connection from %s failed", remote)
        finally:
            await trio.aclose_forcefully(stream)

    def _refusal(self, path: str) -> Refusal | None:
        """The answer to a connection that will not register now (wrong path, draining, busy), or None."""
        if path.split("?")[0] != TUNNEL_PATH:
            return 404, [], b"not found: the tunnel is at /v1/tunnel\n"
        if self._draining():
            # Going away: a connector registering now would only have to move again in a moment.
            return (
                503, [(b"retry-after", str(DRAINING_RETRY_AFTER).encode())],
                f"relay replica is draining; retry in {DRAINING_RETRY_AFTER} s (another replica, if "
                "any)\n".encode(),
            )  # fmt: skip
        admission = self._registry.admission
        if not admission.full():
            return None
        retry_after = admission.retry_after()
        self._metrics.registration_failures.labels("busy").inc()
        return (
            503, [(b"retry-after", str(retry_after).encode())],
            f"relay busy: {admission.registering} connectors are registering "
            f"(at most {admission.limit} at once); retry in {retry_after} s\n".encode(),
        )  # fmt: skip

    async def _serve_request(self, request: UpgradeRequest, stream: trio.abc.Stream, remote: str) -> None:
        ticket = self._registry.admission.enter()
        assert ticket is not None, "nothing was awaited since _refusal found a slot"
        try:
            await self._admitted(request, stream, remote, ticket.release)
        finally:
            ticket.release()

    async def _admitted(
        self, request: UpgradeRequest, stream: trio.abc.Stream, remote: str, registered: Callable[[], None]
    ) -> None:
        token = bearer(request.headers.get("authorization"))
        try:
            if token is None:
                raise AuthError("missing bearer token")
            principal = await authenticate(self._tokens, token, kind="connector")
        except AuthError as exc:
            log.warning("tunnel from %s refused: %s", remote, exc, extra={"remote": remote})
            self._metrics.registration_failed(str(exc))
            await _answer(stream, (
                401,
                [(b"www-authenticate", b'Bearer realm="printrelay"'),
                 (b"retry-after", str(RETRY_AFTER_AUTH).encode())],
                f"{exc}\n".encode(),
            ))  # fmt: skip
            return
        if SUBPROTOCOL not in request.subprotocols:
            await _answer(stream, (400, [], f"subprotocol {SUBPROTOCOL} required\n".encode()))
            return
        replica_id, alive = self._replica()
        # A connector keeps sessions to distinct replicas: it must know which one answered, and how many
        # there are (connector/tunnel.py TunnelGroup).
        named = [
            (REPLICA_HEADER.encode(), replica_id.encode()),
            (REPLICAS_HEADER.encode(), str(alive).encode()),
        ]
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as sending:
                ws = await request.upgrade(stream, SUBPROTOCOL, named)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # It gave up first (its own connect timeout, in a reconnect storm): nothing to register.
            log.debug("tunnel from %s left before the upgrade's answer: %r", remote, exc)
            return
        if sending.cancelled_caught:
            return
        h2 = H2Session(
            ws,
            client_side=True,
            settings=self.settings,
            name=f"tunnel {principal.tenant}/{principal.connector_id}",
        )
        try:
            with self._metrics.tunnel_session(h2):
                await self._new_session(principal, h2, remote, registered).run()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT):
                await ws.aclose()  # the closing handshake; the connection is closed after it regardless


async def read_request_head(
    stream: trio.abc.Stream, limit: int = MAX_HEAD_BYTES
) -> tuple[bytes, bytes] | None:
    """An HTTP request's head through its blank line, and what came after it; None if the peer left or
    sent more than ``limit`` bytes without one."""
    received = b""
    while (end := received.find(b"\r\n\r\n")) < 0:
        if len(received) > limit:
            return None
        try:
            data = await stream.receive_some(limit + 4 - len(received))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None
        if not data:
            return None
        received += data
    return received[: end + 4], received[end + 4 :]


def request_path(head: bytes) -> str:
    """The target of a request head's first line ("" when it has none)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) == 3 else ""


def plain_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"content-length: " + str(len(body)).encode(), b"connection: close", b"", b""]
    return b"\r\n".join(lines) + body


async def _answer(stream: trio.abc.Stream, refusal: Refusal) -> None:
    """Send a refusal, unless the peer left or stopped reading (bounded: it is a courtesy)."""
    status, headers, body = refusal
    with (
        trio.move_on_after(HANDSHAKE_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.send_all(plain_response(status, headers, body))


def _peer(stream: trio.abc.Stream) -> str:
    """The peer's address for logs ("a departed peer" when it left before we asked)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    try:
        peer = inner.socket.getpeername() if isinstance(inner, trio.SocketStream) else None
    except OSError:
        return "a departed peer"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "a peer")
