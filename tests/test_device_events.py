"""Device events: connectors coming and going, printers added, removed and changing state, reach a tenant's
webhooks (signed like job changes) and its event stream (GET /v1/events).

The webhook tests run the relay and its connectors as real processes (``printrelay serve`` /
``printrelay connector``) with a short ``--connector-offline-grace``: a killed connector is announced
offline, one that comes back within the grace announces nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinterFactory, RawSink
from fixtures_processes import ProcessStack
from fixtures_relay import RelayStack

from relay.auth import new_token
from relay.users import new_user
from relay.webhooks import verify_signature
from service.http.message import Request, Response
from service.http.server import HttpServer

GRACE = 2.0  # --connector-offline-grace of the relay under test (seconds)
# The relay sweeps every quarter of the grace; a delivery follows at once. Announced offline within this.
OFFLINE_WITHIN = GRACE + 8.0

pytestmark = pytest.mark.timeout(120)


# --- a webhook receiver that checks every signature ---------------------------------------------------


@dataclass
class Delivery:
    path: str
    event_header: str
    delivery_header: str
    body: dict[str, Any]
    received_at: float


@dataclass
class Receiver:
    url: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    bad_signatures: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Request) -> Response:
        raw = await request.body.read(1 << 20)
        secret = self.secrets.get(request.path, "")
        # verify_signature itself is held to fixed vectors in tests/test_webhooks.py
        if not secret or not verify_signature(secret, request.headers.get("printrelay-signature") or "", raw):
            self.bad_signatures.append(request.path)
            return Response.json({"error": "bad signature"}, 400)
        self.deliveries.append(
            Delivery(
                request.path, request.headers.get("printrelay-event") or "",
                request.headers.get("printrelay-delivery") or "", json.loads(raw), time.monotonic(),
            )
        )  # fmt: skip
        self._changed.set()
        self._changed = trio.Event()
        return Response(204)

    def events(self, path: str) -> list[tuple[str, str]]:
        """(type, connector or printer id) of the device events ``path`` got, in arrival order."""
        found = []
        for d in self.deliveries:
            if d.path == path and d.body["type"] != "job.state_changed":
                data = d.body["data"]
                found.append(
                    (d.body["type"], data["printer"]["id"] if "printer" in data else data["connector_id"])
                )
        return found

    def first(self, path: str, event: str, device: str) -> Delivery | None:
        return next(
            (
                d
                for d in self.deliveries
                if d.path == path and (d.body["type"], _device(d.body)) == (event, device)
            ),
            None,
        )

    async def wait_for(self, path: str, event: str, device: str, within: float = 20.0) -> Delivery:
        with trio.fail_after(within):
            while (found := self.first(path, event, device)) is None:
                await self._changed.wait()
        return found

    async def wait_until(self, done: Callable[[], bool], within: float = 20.0) -> None:
        with trio.fail_after(within):
            while not done():
                await self._changed.wait()


def _device(body: dict[str, Any]) -> str:
    data = body.get("data", {})
    return str(data["printer"]["id"] if "printer" in data else data.get("connector_id"))


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver()
    port = await nursery.start(HttpServer(receiver.handle).serve, "127.0.0.1", 0)
    receiver.url = f"http://127.0.0.1:{port}"
    return receiver


async def subscribe(api: httpx.AsyncClient, receiver: Receiver, path: str, events: list[str] | None) -> None:
    body: dict[str, Any] = {"url": receiver.url + path}
    if events is not None:
        body["events"] = events
    response = await api.post("/v1/webhooks", json=body)
    assert response.status_code == 201, response.text
    receiver.secrets[path] = response.json()["secret"]


def start_relay(stack: ProcessStack, grace: float = GRACE) -> None:
    stack.start_relay("--webhook-allow-private", "--connector-offline-grace", f"{grace}s")


# --- webhooks, with real relay and connector processes ---------------------------------------------------


async def test_a_connector_and_its_printers_are_announced_as_they_come_change_and_go(
    process_stack: ProcessStack, receiver: Receiver, ippeveprinter_factory: IppEvePrinterFactory
) -> None:
    printer = ippeveprinter_factory()
    start_relay(process_stack)
    await process_stack.wait_ready()
    async with process_stack.client() as api:
        await subscribe(api, receiver, "/devices", ["connector.*", "printer.*"])
        await subscribe(api, receiver, "/jobs-only", None)  # registered as before device events existed
        # A connector polling its printer often, so that a printer going away is seen at once.
        connector = process_stack.start_connector(
            {"office": printer.uri}, extra=("--status-interval", "0.3s")
        )
        online = await receiver.wait_for("/devices", "connector.online", "site-1")
        assert online.body["data"]["online"] and online.event_header == "connector.online"
        added = await receiver.wait_for("/devices", "printer.added", "office")
        assert added.body["data"]["printer"]["connector_id"] == "site-1"
        if added.body["data"]["printer"]["printer_state"] != "idle":  # the connector had not polled it yet
            await receiver.wait_until(
                lambda: any(
                    d.body["type"] == "printer.state_changed"
                    and d.body["data"]["printer"]["printer_state"] == "idle"
                    for d in receiver.deliveries
                )
            )
        printer.stop()  # unreachable: the connector's next poll says so
        await receiver.wait_until(
            lambda: any(
                d.body["type"] == "printer.state_changed"
                and d.body["data"]["printer"]["printer_state"] == "offline"
                for d in receiver.deliveries
            )
        )
        gone = await api.delete("/v1/printers/office")
        assert gone.status_code == 200, gone.text
        removed = await receiver.wait_for("/devices", "printer.removed", "office")
        assert removed.body["data"]["previous_state"] == "offline"
        killed_at = time.monotonic()
        connector.kill()
        offline = await receiver.wait_for("/devices", "connector.offline", "site-1", within=OFFLINE_WITHIN)
        took = offline.received_at - killed_at
        assert GRACE - 0.5 <= took <= OFFLINE_WITHIN, took  # not before the grace, soon after it
    assert receiver.bad_signatures == []
    events = receiver.events("/devices")
    office = [e for e, device in events if device == "office"]
    assert office[0] == "printer.added" and office[-1] == "printer.removed"
    assert set(office[1:-1]) == {"printer.state_changed"}
    assert [e for e, device in events if device == "site-1"] == ["connector.online", "connector.offline"]
    for delivery in receiver.deliveries:
        body = delivery.body
        assert set(body) == {"type", "delivery_id", "created_at", "data"}
        assert delivery.event_header == body["type"] and delivery.delivery_header == body["delivery_id"]
    assert receiver.events("/jobs-only") == []  # a webhook without events gets job changes only


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_connector_back_within_the_grace_announces_nothing(
    backend: str, request: pytest.FixtureRequest, receiver: Receiver, raw_sink: RawSink
) -> None:
    stack: ProcessStack = request.getfixturevalue(
        "process_stack" if backend == "sqlite" else "pg_process_stack"
    )
    grace = 15.0  # longer than a connector process takes to start and register again, even on a loaded host
    start_relay(stack, grace)
    await stack.wait_ready()
    async with stack.client() as api:
        await subscribe(api, receiver, "/connectors", ["connector.online", "connector.offline"])
        gone = stack.start_connector({"a": raw_sink.uri}, connector_id="site-a")
        back = stack.start_connector({"b": raw_sink.uri}, connector_id="site-b")
        for site in ("site-a", "site-b"):
            await receiver.wait_for("/connectors", "connector.online", site)
        gone.kill()
        back.kill()
        back.start()  # at once: its new session comes within the grace
        # site-a stays away: its offline, announced by the sweep that would have announced site-b's too.
        await receiver.wait_for("/connectors", "connector.offline", "site-a", within=grace + 10)
        gone.start()  # and a later event: anything announced for site-b would have come before it
        await receiver.wait_until(lambda: len(receiver.events("/connectors")) == 4, within=grace + 10)
    assert receiver.events("/connectors")[2:] == [
        ("connector.offline", "site-a"),
        ("connector.online", "site-a"),
    ]
    assert [e for e in receiver.events("/connectors") if e[1] == "site-b"] == [("connector.online", "site-b")]
    assert receiver.bad_signatures == []


# --- the event stream -------------------------------------------------------------------------------------


@dataclass
class EventStream:
    """A client of GET /v1/events: (event name, data) as they arrive."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    async def follow(
        self, client: httpx.AsyncClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with client.stream("GET", "/v1/events") as response:
            self.status = response.status_code
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"] == "text/event-stream"
            task_status.started()  # subscribed: the relay answers once it is
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[6:])))
                    self._changed.set()
                    self._changed = trio.Event()

    def jobs(self, job_id: str) -> list[str]:
        return [
            d["data"]["state"]
            for n, d in self.events
            if n == "job.state_changed" and d["data"]["job_id"] == job_id
        ]

    def names(self) -> list[str]:
        return [n for n, _ in self.events]

    async def wait_until(self, done: Callable[[], bool], within: float = 20.0) -> None:
        with trio.fail_after(within):
            while not done():
                await self._changed.wait()


async def open_stream(stack: RelayStack, token: str | None = None) -> EventStream:
    stream = EventStream()
    await stack.nursery.start(stream.follow, stack.client(token))
    return stream


async def test_the_event_stream_carries_job_changes_and_device_events(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    ann = new_user("acme", "ann@acme.example")
    await relay_stack.relay.store.add_user(ann)
    ann_token, ann_record = new_token("acme", "user", user_id=ann.id)
    await relay_stack.relay.store.add_token(ann_record)
    everything = await open_stream(relay_stack)
    own = await open_stream(relay_stack, ann_token)  # a person: their own jobs only
    await relay_stack.start_connector({"office": raw_sink.uri})
    await everything.wait_until(lambda: {"connector.online", "printer.added"} <= set(everything.names()))
    online = next(d for n, d in everything.events if n == "connector.online")
    assert online["type"] == "connector.online" and online["data"]["connector_id"] == "site-1"
    assert online["created_at"].endswith("Z")
    async with relay_stack.client() as api, relay_stack.client(ann_token) as ann_api:
        theirs = (await api.post("/v1/printers/office/jobs", content=b"the app's\n")).json()["id"]
        mine = (await ann_api.post("/v1/printers/office/jobs", content=b"ann's\n")).json()["id"]
    final = ["queued", "sending", "printing", "completed"]
    await everything.wait_until(lambda: everything.jobs(theirs) == final and everything.jobs(mine) == final)
    await own.wait_until(lambda: own.jobs(mine) == final)
    job_event = next(
        d for n, d in everything.events if n == "job.state_changed" and d["data"]["job_id"] == mine
    )
    assert job_event["data"]["printer_id"] == "office" and job_event["data"]["state"] == "queued"
    # Her token revoked: her stream ends with an error (after whatever was queued), the tenant's goes on.
    await relay_stack.relay.store.revoke_token(ann_record.id, time.time())
    await own.wait_until(lambda: own.names()[-1:] == ["error"])
    assert own.jobs(theirs) == []  # ann's stream: not the app's job
    assert "connector.online" in own.names()  # devices: a person sees the printers too
    assert relay_stack.relay.api.events.streams("acme") == 1
