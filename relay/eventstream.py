"""A tenant's event stream (``GET /v1/events``): its job changes and device events as Server-Sent Events.

Live from the store's notices: this replica's writes once committed, and every other replica's through the
store (PostgreSQL LISTEN/NOTIFY), so a client sees the same events whichever replica it reached. Each event
is ``event: <type>`` and ``data: {"type", "created_at", "data"}``: ``job.state_changed`` (data: job_id,
printer_id, state, at, message) and the device events of relay/store/base.py (data as their webhooks get
it). A person's own token sees their own jobs' changes only (and every device event: printers are listed
to them too).

No replay: the events live in no log a stream could resume from (the webhook outbox holds only what
webhooks subscribed to, until delivered), so there are no ``id:`` lines and ``Last-Event-ID`` is ignored;
a client that reconnects reads the current state (``GET /v1/printers``, ``GET /v1/jobs``) and follows on.
Each client has a bounded queue: one that falls behind gets an ``error`` event and its stream ends.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import trio

from relay.auth import USER_SCOPES, Principal
from relay.jobs import _iso
from relay.store.base import Notice, Store

STREAM_QUEUE = 256  # events a client may lag behind before its stream is ended (memory per client)
MAX_STREAMS_PER_TENANT = 64  # open streams of one tenant on one replica (429 above)
MAX_STREAMS_PER_PRINCIPAL = 8  # of those, one token's or one person's
KEEPALIVE = 15.0  # seconds between comments that keep proxies from closing an idle stream
JOB_EVENT = "job.state_changed"
RECHECK = "recheck"  # not an event: the client's token or user changed; look whether it may go on


class TooManyStreams(Exception):
    pass


def sse(data: dict[str, object], event: str) -> bytes:
    """One Server-Sent Event: its name and its data as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class StreamEvent:
    type: str
    data: dict[str, Any]
    at: float = 0.0

    def encode(self) -> bytes:
        return sse({"type": self.type, "created_at": _iso(self.at), "data": self.data}, self.type)


@dataclass(eq=False)
class Subscriber:
    principal: Principal
    send: trio.MemorySendChannel[StreamEvent]
    receive: trio.MemoryReceiveChannel[StreamEvent]
    owner: str | None = None  # a person's stream: only jobs they own


class EventStreams:
    """This replica's open event streams, by tenant; :meth:`heard` is a store notice handler."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)

    def streams(self, tenant: str) -> int:
        return len(self._subscribers.get(tenant, ()))

    # --- notices ------------------------------------------------------------------------------------

    def heard(self, notice: Notice) -> None:
        if notice.kind in ("job", "device"):
            tenant = str(notice.data.get("tenant", ""))
            event = _event(notice)
            if event is None:
                return
            for sub in list(self._subscribers.get(tenant, ())):
                if notice.kind == "job" and sub.owner is not None and notice.data.get("owner") != sub.owner:
                    continue
                self._offer(sub, event)
        elif notice.kind in ("tokens", "users", "resync"):
            every = not notice.key or notice.kind == "resync"
            for subs in list(self._subscribers.values()):
                for sub in list(subs):
                    principal = sub.principal
                    named = notice.key == (
                        principal.token_id if notice.kind == "tokens" else principal.user_id
                    )
                    if every or named:
                        self._offer(sub, StreamEvent(RECHECK, {}))
                    if notice.kind == "resync":  # notices of other replicas may have been missed meanwhile
                        self._offer(sub, StreamEvent("resync", {"reason": "events may have been missed"}))

    def _offer(self, sub: Subscriber, event: StreamEvent) -> None:
        try:
            sub.send.send_nowait(event)
        except trio.WouldBlock:
            # A client that cannot keep up is dropped, not buffered for: it reads what is queued, then
            # an error event.
            self._forget(sub)
            sub.send.close()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._forget(sub)

    def _forget(self, sub: Subscriber) -> None:
        subs = self._subscribers.get(sub.principal.tenant)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.principal.tenant]

    # --- streams ------------------------------------------------------------------------------------

    def subscribe(self, principal: Principal) -> Subscriber:
        """Events from now on (call before answering, so no change falls before the stream); raises
        :class:`TooManyStreams` past the tenant's limit."""
        if self.streams(principal.tenant) >= MAX_STREAMS_PER_TENANT:
            raise TooManyStreams(
                f"tenant {principal.tenant} has {MAX_STREAMS_PER_TENANT} event streams open on this relay, "
                "the most one tenant may; close one first"
            )
        others = self._subscribers.get(principal.tenant, ())
        mine = sum(1 for sub in others if sub.principal.actor == principal.actor)
        if mine >= MAX_STREAMS_PER_PRINCIPAL:
            raise TooManyStreams(
                f"{principal.actor} has {mine} event streams open on this relay, the most one token or "
                "person may (so that one cannot take the tenant's); close one first"
            )
        send, receive = trio.open_memory_channel[StreamEvent](STREAM_QUEUE)
        sub = Subscriber(principal, send, receive, None if principal.sees_all_jobs else principal.user_id)
        self._subscribers[principal.tenant].add(sub)
        return sub

    def stream(self, sub: Subscriber, *, keepalive: float = KEEPALIVE) -> StreamBody:
        """The SSE body: events as they come, a comment when idle; ends when the client falls behind or
        its token or user may no longer read (revoked, expired, deleted, disabled, role changed)."""
        return StreamBody(self, sub, self._events(sub, keepalive))

    def close(self, sub: Subscriber) -> None:
        self._forget(sub)
        sub.send.close()
        sub.receive.close()

    async def _events(self, sub: Subscriber, keepalive: float) -> AsyncGenerator[bytes, None]:
        try:
            expires_at = await self._allowed_until(sub.principal)
            yield b": stream open\n\n"
            while expires_at is not None and time.time() < expires_at:
                with trio.move_on_after(keepalive) as idle:
                    event = await sub.receive.receive()
                if idle.cancelled_caught:
                    yield b": keep-alive\n\n"
                elif event.type == RECHECK:
                    expires_at = await self._allowed_until(sub.principal)
                else:
                    yield event.encode()
            self._forget(sub)  # before the last words: a client that reads them finds it gone
            yield StreamEvent("error", {"error": "credentials no longer valid; reconnect"}).encode()
        except trio.EndOfChannel:
            yield StreamEvent("error", {"error": f"fell behind by {STREAM_QUEUE} events; reconnect"}).encode()
        finally:
            self.close(sub)

    async def _allowed_until(self, principal: Principal) -> float | None:
        """Until when the principal may go on reading (inf: no expiry); None: not any more."""
        until = float("inf")
        if principal.token_id:
            record = await self._store.get_token(principal.token_id)
            if record is None or record.revoked_at is not None:
                return None
            if record.expires_at is not None:
                until = record.expires_at
        if principal.user_id:
            user = await self._store.get_user(principal.user_id)
            if user is None or user.state != "active" or USER_SCOPES.get(user.role) != principal.scopes:
                return None
        return until if until > time.time() else None


class StreamBody:
    """A response body that unsubscribes when closed, even if never iterated (a HEAD request, a client
    gone before the first byte): an async generator's ``finally`` would not run then."""

    def __init__(self, streams: EventStreams, sub: Subscriber, events: AsyncGenerator[bytes, None]) -> None:
        self._streams, self._sub, self._events = streams, sub, events

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            self._streams.close(self._sub)


def _event(notice: Notice) -> StreamEvent | None:
    data = notice.data
    try:
        at = float(data["at"])
        if notice.kind == "job":
            job = {
                "job_id": notice.key, "printer_id": data.get("printer_id"), "state": str(data["state"]),
                "at": _iso(at), "message": str(data.get("message", "")),
            }  # fmt: skip
            return StreamEvent(JOB_EVENT, job, at)
        return StreamEvent(str(data["type"]), dict(data["data"]), at)
    except (KeyError, TypeError, ValueError):
        return None  # a notice cut to fit PostgreSQL's NOTIFY limit: nothing to show
