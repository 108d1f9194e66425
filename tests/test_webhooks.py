"""Webhooks: signed job changes reach a real HTTP receiver, in order, through failures and restarts."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import trio
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

from relay import egress, webhooks
from relay.app import Relay
from relay.auth import new_token
from relay.config import RelayConfig
from relay.jobs import Job, JobEvent, JobState, new_job_id
from relay.store.base import WebhookDelivery
from relay.store.sqlite import SqliteStore
from service.http.message import Request, Response
from service.http.server import HttpServer

RETRY_BASE = 0.05  # seconds; retries double from here


# --- a receiver that checks every signature -------------------------------------------------------


@dataclass
class Hit:
    path: str
    body: dict[str, Any]
    delivery: str


@dataclass
class Receiver:
    """An HTTP server for webhooks. ``secrets[path]`` verifies, ``failures[path]`` answers 500 that many
    times first; ``hits`` are the deliveries it accepted, ``attempts`` every request in arrival order."""

    url: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (path, event state)
    bad_signatures: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, request: Request) -> Response:
        raw = await request.body.read(1 << 20)
        secret = self.secrets.get(request.path)
        header = request.headers.get("printrelay-signature") or ""
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        try:
            if secret is None or abs(time.time() - int(parts.get("t", "0"))) > 300:
                raise ValueError("unknown path or stale timestamp")
            expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + raw, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, parts.get("v1", "")):
                raise ValueError("signature mismatch")
        except (ValueError, KeyError) as exc:
            self.bad_signatures.append(f"{request.path}: {exc}")
            self._wake()
            return Response.json({"error": "bad signature"}, 400)
        body = json.loads(raw)
        self.attempts.append((request.path, body["event"]["state"]))
        if self.failures.get(request.path, 0) > 0:
            self.failures[request.path] -= 1
            self._wake()
            return Response.json({"error": "receiver is having a bad day"}, 500)
        self.hits.append(Hit(request.path, body, request.headers.get("printrelay-delivery") or ""))
        self._wake()
        return Response(204)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def states(self, path: str, job_id: str | None = None) -> list[str]:
        return [
            h.body["event"]["state"]
            for h in self.hits
            if h.path == path and (job_id is None or h.body["job"]["id"] == job_id)
        ]

    async def wait_until(self, done: Callable[[], bool], within: float = 10.0) -> None:
        with trio.fail_after(within):
            while not done():
                await self._changed.wait()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver()
    port = await nursery.start(HttpServer(receiver.handle).serve, "127.0.0.1", 0)
    receiver.url = f"http://127.0.0.1:{port}"
    return receiver


# --- a relay with short retries, that a test may stop and start again --------------------------------


@asynccontextmanager
async def running_relay(nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> AsyncIterator[RelayStack]:
    """The real relay on free ports (webhook retries after RETRY_BASE); stopped when the block ends."""
    config = RelayConfig(
        listen=("127.0.0.1", 0),
        tunnel_listen=("127.0.0.1", 0),
        data_dir=tmp_path / "relay",
        webhook_retry_base=RETRY_BASE,
        **{"webhook_allow_private": True, **overrides},  # the receivers listen on loopback
    )
    relay = Relay(config)
    stopped = trio.Event()

    async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await relay.run(task_status=task_status)
        finally:
            stopped.set()

    scope = trio.CancelScope()
    addresses = await nursery.start(run)
    token, record = new_token("acme", "api", scopes=("admin",))
    await relay.store.add_token(record)
    try:
        yield RelayStack(
            relay=relay,
            api_url=f"http://127.0.0.1:{addresses.http_port}",
            tunnel_url=f"ws://127.0.0.1:{addresses.tunnel_port}/v1/tunnel",
            api_token=token,
            nursery=nursery,
            tmp_path=tmp_path,
        )
    finally:
        scope.cancel()
        with trio.fail_after(10):
            await stopped.wait()


async def register(
    api: httpx.AsyncClient, receiver: Receiver, path: str, events: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"url": receiver.url + path}
    if events is not None:
        body["events"] = events
    response = await api.post("/v1/webhooks", json=body)
    assert response.status_code == 201, response.text
    hook: dict[str, Any] = response.json()
    assert hook["secret"].startswith("whsec_") and hook["url"] == receiver.url + path
    receiver.secrets[path] = hook["secret"]
    return hook


async def held_job(store: Any, tenant: str) -> str:
    """A job put straight into the store: its events fill the outbox with no REST call or dispatcher."""
    now = time.time()
    job = Job(id=new_job_id(), tenant=tenant, printer_id="p1", state=JobState.HELD, title="report",
              created_at=now, updated_at=now)  # fmt: skip
    await store.insert_job(job, "accepted, held")
    return job.id


# --- end to end -----------------------------------------------------------------------------------


async def test_a_jobs_changes_arrive_in_order_with_valid_signatures(
    nursery: trio.Nursery, tmp_path: Path, receiver: Receiver, raw_sink: RawSink
) -> None:
    async with running_relay(nursery, tmp_path) as stack, stack.client() as api:
        hook = await register(api, receiver, "/hooks/acme")
        listed = (await api.get("/v1/webhooks")).json()["webhooks"]
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        await stack.start_connector({"label": raw_sink.uri})
        response = await api.post("/v1/printers/label/jobs?title=minutes", content=b"%PDF-1.7 minutes")
        job = response.json()
        await receiver.wait_until(lambda: "completed" in receiver.states("/hooks/acme", job["id"]))
        events = (await api.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
    assert receiver.bad_signatures == []
    assert [e["state"] for e in events] == ["queued", "sending", "printing", "completed"]
    hits = [h for h in receiver.hits if h.body["job"]["id"] == job["id"]]
    assert [h.body["event"] for h in hits] == events
    for hit, event in zip(hits, events, strict=True):
        assert hit.body["type"] == "job.state_changed"
        # the job as it was at that change, not as it is by the time the delivery goes out
        assert hit.body["job"]["state"] == event["state"] and hit.body["job"]["title"] == "minutes"
        assert hit.body["job"]["printer_id"] == "label" and "wrapped_key" not in hit.body["job"]
        assert hit.body["delivery_id"] == hit.delivery
    assert len({h.delivery for h in hits}) == len(hits)


async def test_a_failing_receiver_gets_retries_and_then_every_change_in_order(
    nursery: trio.Nursery, tmp_path: Path, receiver: Receiver, raw_sink: RawSink
) -> None:
    receiver.failures["/flaky"] = 3
    async with running_relay(nursery, tmp_path) as stack:
        await stack.start_connector({"label": raw_sink.uri})
        async with stack.client() as api:
            await register(api, receiver, "/flaky")
            job = (await api.post("/v1/printers/label/jobs?hold=true", content=b"pull me")).json()
            assert (await api.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
            await receiver.wait_until(lambda: receiver.states("/flaky") == ["held", "canceled"])
            (hook,) = (await api.get("/v1/webhooks")).json()["webhooks"]
            assert hook["pending"] == 0
            # a webhook's changes go out in order: "held" was delivered, and recorded, before "canceled" left
            assert hook["last_error"].startswith("HTTP 500") and "bad day" in hook["last_error"]
            assert hook["last_delivered_at"] is not None and hook["last_delivered_at"] > hook["last_error_at"]
    # three 500s for the first change, and its successor was not sent before it got through
    assert receiver.attempts == [("/flaky", "held")] * 4 + [("/flaky", "canceled")]
    assert receiver.bad_signatures == []


async def test_a_relay_restart_keeps_pending_deliveries(
    nursery: trio.Nursery, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.failures["/later"] = 1_000_000
    async with running_relay(nursery, tmp_path) as stack:
        async with stack.client() as api:
            hook = await register(api, receiver, "/later")
        job_id = await held_job(stack.relay.store, "acme")
        await receiver.wait_until(lambda: len(receiver.attempts) >= 2)  # failed, and retried
    # The relay is down: a change committed now, with no sender running, is in the outbox too.
    store = SqliteStore(tmp_path / "relay" / "relay.sqlite3")
    await store.open()
    try:
        assert [h.pending for h in await store.list_webhooks("acme")] == [1]
        await store.transition(job_id, JobEvent.CANCEL, "canceled while the relay was down", time.time())
        assert [h.pending for h in await store.list_webhooks("acme")] == [2]
    finally:
        await store.close()
    receiver.failures["/later"] = 0
    async with running_relay(nursery, tmp_path) as stack:
        await receiver.wait_until(lambda: receiver.states("/later") == ["held", "canceled"])
        async with stack.client() as api:
            (listed,) = (await api.get("/v1/webhooks")).json()["webhooks"]
            outcome = {k: listed.pop(k) for k in ("last_error", "last_error_at", "last_delivered_at")}
            registered = {k: v for k, v in hook_public(hook).items() if k not in outcome}
            assert listed == {**registered, "pending": 0}
            assert outcome["last_error"].startswith("HTTP 500") and outcome["last_delivered_at"] is not None
    assert receiver.hits[1].body["event"]["message"] == "canceled while the relay was down"
    assert receiver.bad_signatures == []


def hook_public(hook: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in hook.items() if k != "secret"}


async def test_a_tenant_sees_only_its_own_jobs_and_webhooks(
    nursery: trio.Nursery, tmp_path: Path, receiver: Receiver
) -> None:
    async with running_relay(nursery, tmp_path) as stack:
        globex_token = await stack.token("api", "globex", scopes=("admin",))
        async with stack.client() as acme, stack.client(globex_token) as globex:
            acme_hook = await register(acme, receiver, "/acme")
            await register(globex, receiver, "/globex")
            # another tenant's webhook is invisible: not listed, and 404 like an id that does not exist
            assert [h["url"] for h in (await globex.get("/v1/webhooks")).json()["webhooks"]] == [
                receiver.url + "/globex"
            ]
            assert (await globex.delete(f"/v1/webhooks/{acme_hook['id']}")).status_code == 404
            acme_job = await held_job(stack.relay.store, "acme")
            globex_job = await held_job(stack.relay.store, "globex")
            await receiver.wait_until(lambda: len(receiver.hits) == 2)
            for api in (acme, globex):
                assert [h["pending"] for h in (await api.get("/v1/webhooks")).json()["webhooks"]] == [0]
    assert {(h.path, h.body["job"]["id"]) for h in receiver.hits} == {
        ("/acme", acme_job),
        ("/globex", globex_job),
    }


async def test_events_filter_and_delete(nursery: trio.Nursery, tmp_path: Path, receiver: Receiver) -> None:
    async with running_relay(nursery, tmp_path) as stack, stack.client() as api:
        await register(api, receiver, "/final", events=["job.canceled", "job.completed"])
        doomed = await register(api, receiver, "/doomed")
        removed = await api.delete(f"/v1/webhooks/{doomed['id']}")
        assert removed.status_code == 200 and removed.json()["id"] == doomed["id"]
        assert (await api.delete(f"/v1/webhooks/{doomed['id']}")).status_code == 404
        job_id = await held_job(stack.relay.store, "acme")
        await stack.relay.jobs.transition(job_id, JobEvent.CANCEL, "not needed")
        await receiver.wait_until(lambda: receiver.states("/final") == ["canceled"])
        assert (await api.get("/v1/webhooks")).json()["webhooks"][0]["events"] == [
            "job.canceled", "job.completed",
        ]  # fmt: skip
    assert receiver.states("/doomed") == []


async def test_registration_is_validated(nursery: trio.Nursery, tmp_path: Path, receiver: Receiver) -> None:
    async with running_relay(nursery, tmp_path) as stack:
        async with stack.client() as api:
            for body, status, words in [
                ({"url": "ftp://example.com/x"}, 400, "http or https"),
                ({"url": "file:///etc/passwd"}, 400, "http or https"),
                ({"url": "https://user:pw@example.com/x"}, 400, "credentials"),
                ({"url": "https:///nohost"}, 400, "no host"),
                ({"url": "https://example.com/" + "a" * 3000}, 400, "max_url_chars=2048"),
                ({"url": "https://example.com/x", "events": ["job.exploded"]}, 400, "unknown event"),
                ({"url": "https://example.com/x", "events": []}, 400, "events must be"),
                ({"url": "https://example.com/x", "secret": "mine"}, 400, "unknown field"),
                ({}, 400, "url must be"),
                ([], 400, "JSON object"),
            ]:
                response = await api.post("/v1/webhooks", json=body)
                assert response.status_code == status and words in response.json()["error"], (
                    body,
                    response.text,
                )
            response = await api.post("/v1/webhooks", content=b"{" * 20_000)
            assert response.status_code == 413 and "max_webhook_body" in response.json()["error"]
            for n in range(webhooks.MAX_WEBHOOKS_PER_TENANT):
                await register(api, receiver, f"/n{n}")
            response = await api.post("/v1/webhooks", json={"url": receiver.url + "/one-too-many"})
            assert response.status_code == 409 and "max_webhooks_per_tenant=16" in response.json()["error"]
        weak_token = await stack.token("api", "acme", scopes=("jobs:submit", "jobs:read"))
        async with stack.client(weak_token) as weak:
            for response in (
                await weak.get("/v1/webhooks"),
                await weak.post("/v1/webhooks", json={"url": receiver.url + "/x"}),
            ):
                assert response.status_code == 403


# --- the sender alone -----------------------------------------------------------------------------


def delivery(url: str, secret: str = "whsec_test", **job: Any) -> WebhookDelivery:
    snapshot = {"id": "j1", "tenant": "acme", "printer_id": "p1", "state": "queued", "created_at": 1.0,
                "updated_at": 1.0, "options": {"media": "iso_a4_210x297mm"}, **job}  # fmt: skip
    return WebhookDelivery(
        seq=1, id="whd_1", webhook_id="wh_1", tenant="acme", job_id="j1", at=1.0, state="queued",
        message="accepted", job=snapshot, url=url, secret=secret,
    )  # fmt: skip


async def test_a_receiver_that_hangs_or_redirects_is_an_error(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/hang":
            await trio.sleep_forever()
        return Response(302, [("location", "http://169.254.169.254/")])

    port = await nursery.start(HttpServer(handler).serve, "127.0.0.1", 0)
    store = SqliteStore(Path("unused"))
    impatient = webhooks.WebhookSender(store, max_attempts=3, retry_base=1, timeout=0.3, allow_private=True)
    # The others must fail for their own reason, not a loaded host's slowness against 0.3 s.
    sender = webhooks.WebhookSender(store, max_attempts=3, retry_base=1, timeout=5, allow_private=True)
    async with httpcore.AsyncConnectionPool() as http:
        hung = await impatient.send(http, delivery(f"http://127.0.0.1:{port}/hang"), b"{}")
        moved = await sender.send(http, delivery(f"http://127.0.0.1:{port}/moved"), b"{}")
        closed = await sender.send(http, delivery("http://127.0.0.1:1/"), b"{}")
    assert not hung.delivered and "webhook timeout of 0.3 s" in hung.error
    assert not moved.delivered and moved.error.startswith("HTTP 302")
    assert not closed.delivered and "ConnectError" in closed.error


async def test_the_sender_checks_the_address_it_connects_to(nursery: trio.Nursery) -> None:
    """A webhook registered while its name was public, and resolving to loopback by the time it is sent
    (DNS rebinding), is refused on the connection itself: the receiver hears nothing."""
    heard: list[str] = []

    async def handler(request: Request) -> Response:
        heard.append(request.path)
        return Response(204)

    port = await nursery.start(HttpServer(handler).serve, "127.0.0.1", 0)
    sender = webhooks.WebhookSender(SqliteStore(Path("unused")), max_attempts=3, retry_base=1, timeout=5)
    backend = egress.GuardedBackend(allow_private=False)
    async with httpcore.AsyncConnectionPool(network_backend=backend) as http:
        for url in (f"http://127.0.0.1:{port}/hook", f"http://localhost:{port}/hook"):
            refused = await sender.send(http, delivery(url), b"{}")
            assert not refused.delivered and "non-public address" in refused.error, refused
            assert "webhook_allow_private" in refused.error
    assert heard == []


# --- pure parts -----------------------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering() -> None:
    body = b'{"type":"job.state_changed"}'
    header = webhooks.signature_header("whsec_k", 1_700_000_000, body)
    t, v1 = header.split(",")
    assert t == "t=1700000000" and v1.startswith("v1=") and len(v1) == 3 + 64
    assert webhooks.verify_signature("whsec_k", header, body, now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_k", header, body + b" ", now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_other", header, body, now=1_700_000_100)
    assert not webhooks.verify_signature("whsec_k", header, body, now=1_700_000_000 + 301)  # replayed late
    assert not webhooks.verify_signature("whsec_k", "v1=" + v1[3:], body, now=1_700_000_000)
    assert not webhooks.verify_signature("whsec_k", "garbage", body, now=1_700_000_000)


def test_payload_is_the_job_then_and_bounded() -> None:
    body = json.loads(webhooks.payload(delivery("http://x/", title="t" * 5000, last_error="boom")))
    assert body["type"] == "job.state_changed" and body["delivery_id"] == "whd_1"
    assert body["event"] == {"at": "1970-01-01T00:00:01.000Z", "state": "queued", "message": "accepted"}
    assert body["job"]["id"] == "j1" and body["job"]["last_error"] == "boom"
    assert len(body["job"]["title"]) == webhooks.MAX_FIELD_CHARS + 3
    assert body["job"]["options"] == {"media": "iso_a4_210x297mm"}
    with pytest.raises(ValueError, match="max_payload_bytes"):
        webhooks.payload(delivery("http://x/", options={f"o{i}": "v" * 1000 for i in range(100)}))


def test_urls() -> None:
    assert (
        webhooks.validate_url("https://hooks.example.com:8443/p?q=1")
        == "https://hooks.example.com:8443/p?q=1"
    )
    for bad in (
        "",
        "example.com/x",
        "javascript:alert(1)",
        "http://h:99999/",
        "http://h/a b",
        "http://h/#f",
        7,
    ):
        with pytest.raises(webhooks.WebhookError):
            webhooks.validate_url(bad)


async def test_webhooks_to_private_addresses_are_refused_unless_allowed() -> None:
    for url in ("http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/x", "http://[::1]/x", "http://localhost/x"):  # fmt: skip
        reason = await egress.destination_refusal(url)
        assert reason is not None and "non-public" in reason, url
    assert await egress.destination_refusal("http://93.184.216.34/hook") is None


async def test_registration_refuses_an_address_the_relay_will_never_deliver_to(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with running_relay(nursery, tmp_path, webhook_allow_private=False) as stack, stack.client() as api:
        for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/x",
                    "http://localhost/x"):  # fmt: skip
            response = await api.post("/v1/webhooks", json={"url": url})
            assert response.status_code == 400, response.text
            assert "webhook_allow_private is off" in response.json()["error"], response.text
        assert (await api.get("/v1/webhooks")).json()["webhooks"] == []


async def test_a_url_beyond_ascii_is_sent_encoded(nursery: trio.Nursery) -> None:
    """httpcore takes ASCII only: the path goes percent-encoded (a crash here stopped the sender)."""
    heard: list[str] = []

    async def handler(request: Request) -> Response:
        heard.append(request.target)
        return Response(204)

    port = await nursery.start(HttpServer(handler).serve, "127.0.0.1", 0)
    sender = webhooks.WebhookSender(
        SqliteStore(Path("unused")), max_attempts=3, retry_base=1, timeout=5, allow_private=True
    )
    async with httpcore.AsyncConnectionPool() as http:
        sent = await sender.send(http, delivery(f"http://127.0.0.1:{port}/hook/é?x=ü"), b"{}")
    assert sent.delivered, sent
    assert heard == ["/hook/%C3%A9?x=%C3%BC"]
    with pytest.raises(webhooks.WebhookError, match="not a valid name"):
        webhooks.validate_url("https://" + "ü" * 64 + ".example/hook")
