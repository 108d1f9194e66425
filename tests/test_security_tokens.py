"""Tokens, revocation, rate limits and the audit log."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
from fixtures_printers import RawSink
from fixtures_relay import RelayStack, no_streams

from connector import tunnel as connector_tunnel
from connector.app import Connector
from connector.config import ConnectorConfig, parse_printer
from connector.tunnel import TunnelClient
from relay import audit
from relay.auth import AuthError, Principal, authenticate, hash_secret, new_token
from relay.ratelimit import TokenRateLimiter
from relay.store.base import TokenRecord
from relay.store.sqlite import SqliteStore
from relay.tunnel import Admission, ConnectorRegistry, ConnectorSession
from tunnel.wsstream import SUBPROTOCOL


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "printrelay.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


async def test_revoking_a_connector_token_from_the_cli_closes_its_session_within_5_s(
    relay_stack: RelayStack, raw_sink: RawSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="printrelay.audit")
    await relay_stack.start_connector({"label": raw_sink.uri}, connector_id="site-1")
    (session,) = relay_stack.relay.registry.sessions()
    data_dir = str(relay_stack.relay.config.data_dir)
    revoked = await trio.to_thread.run_sync(
        cli, "token", "revoke", "--data-dir", data_dir, session.principal.token_id
    )
    started = trio.current_time()
    assert f"token {session.principal.token_id} revoked" in revoked.stderr
    entry = json.loads(revoked.stderr.splitlines()[0])["audit"]
    assert entry["action"] == "token.revoked" and entry["tenant"] == "acme" and entry["actor"] == "cli"
    with trio.fail_after(15):  # seconds, not a restart; generous for a loaded machine
        while session in relay_stack.relay.registry.sessions():
            await relay_stack.relay.registry.changed.wait()
    print(f"the session closed {trio.current_time() - started:.2f} s after the revocation")
    assert session.h2.close_reason == "token revoked"
    closed = [r.__dict__["audit"] for r in caplog.records if r.name == "printrelay.audit"]
    assert closed[-1]["action"] == "connector.session_closed" and closed[-1]["reason"] == "token revoked"
    # The connector dials again and is refused before the upgrade.
    assert await relay_stack.relay.store.get_token(session.principal.token_id) is not None


async def test_a_connector_session_ends_when_its_token_expires(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri}, token_expires_in=3)
    (session,) = relay_stack.relay.registry.sessions()
    with trio.fail_after(10):
        while session in relay_stack.relay.registry.sessions():
            await relay_stack.relay.registry.changed.wait()
    assert session.h2.close_reason == "token expired"


async def test_revoked_api_token_is_refused_at_its_next_request(relay_stack: RelayStack) -> None:
    token = await relay_stack.token("api", scopes=("jobs:read",))
    token_id = token.split("_")[1]
    async with relay_stack.client(token) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
        await trio.to_thread.run_sync(
            cli, "token", "revoke", "--data-dir", str(relay_stack.relay.config.data_dir), token_id
        )
        refused = await client.get("/v1/jobs")
    assert refused.status_code == 401
    assert refused.json() == {"error": "token revoked"}
    assert refused.headers["www-authenticate"].startswith("Bearer")


def test_cli_token_create_shows_the_secret_once_and_audits_without_it(tmp_path: Path) -> None:
    created = cli("token", "create", "--data-dir", str(tmp_path), "--tenant", "acme", "--kind", "api",
                  "--scopes", "jobs:read", "--expires-in", "1d")  # fmt: skip
    secret = created.stdout.strip()
    assert secret.startswith("pra_") and len(secret.split("_", 2)[2]) == 43  # 256 bits, base64url
    assert secret not in created.stderr
    entry = json.loads(created.stderr.splitlines()[0])["audit"]
    assert entry["action"] == "token.created" and entry["scopes"] == "jobs:read"
    assert entry["target"] == f"token:{secret.split('_')[1]}" and entry["expires_at"] > time.time()
    listing = cli("token", "list", "--data-dir", str(tmp_path))
    assert secret.split("_")[1] in listing.stdout and secret.split("_", 2)[2] not in listing.stdout


async def test_tokens_are_stored_as_hashes_and_expire(relay_stack: RelayStack) -> None:
    store = relay_stack.relay.store
    secret, record = new_token("acme", "api", expires_in=60, now=1000.0)
    await store.add_token(record)
    stored = await store.get_token(record.id)
    assert stored is not None and stored.secret_hash == hash_secret(secret) and secret not in repr(stored)
    assert (await authenticate(store, secret, kind="api", now=1059.0)).tenant == "acme"
    with pytest.raises(AuthError, match="token expired"):
        await authenticate(store, secret, kind="api", now=1060.0)
    with pytest.raises(AuthError, match="invalid api token"):
        await authenticate(store, secret[:-1] + ("A" if secret[-1] != "A" else "B"), kind="api")
    with pytest.raises(AuthError, match="invalid connector token"):
        await authenticate(store, secret, kind="connector")


@pytest.mark.parametrize("relay_overrides", [{"rate_limit": 1, "rate_burst": 3}])
async def test_rate_limit_answers_429_with_retry_after_per_token(relay_stack: RelayStack) -> None:
    other = await relay_stack.token("api", scopes=("jobs:read",))
    async with relay_stack.client() as client, relay_stack.client(other) as calm:
        answers = [(await client.get("/v1/jobs")).status_code for _ in range(3)]
        limited = await client.get("/v1/jobs")
        assert (await calm.get("/v1/jobs")).status_code == 200  # another token has its own budget
    assert answers == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"
    assert "rate_limit=1 requests/s" in limited.json()["error"]


def test_rate_limiter_refills_and_stays_bounded() -> None:
    limiter = TokenRateLimiter(rate=2, burst=2, max_tracked=100)
    assert limiter.check("a", 0.0) is None and limiter.check("a", 0.0) is None
    wait = limiter.check("a", 0.0)
    assert wait == pytest.approx(0.5)
    assert limiter.retry_after_header(0.01) == "1" and limiter.retry_after_header(2.2) == "3"
    assert limiter.check("a", 0.5) is None
    for i in range(10_000):
        limiter.check(f"token-{i}", 1.0)
    assert len(limiter) == 100
    assert TokenRateLimiter(rate=0, burst=1).check("a", 0.0) is None  # 0 disables


async def test_printer_adoption_is_audited(
    relay_stack: RelayStack, raw_sink: RawSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="printrelay.audit")
    await relay_stack.start_connector({"label": raw_sink.uri}, connector_id="site-1")
    async with relay_stack.client() as client:
        added = await client.post("/v1/printers", json={"uri": raw_sink.uri, "id": "second"})
        assert added.status_code == 201, added.text
        assert (await client.delete("/v1/printers/second")).status_code == 200
    entries = [r.__dict__["audit"] for r in caplog.records if r.name == "printrelay.audit"]
    actor = f"token:{relay_stack.api_token.split('_')[1]}"
    assert [(e["action"], e["target"], e["actor"]) for e in entries] == [
        ("printer.adopted", "printer:second", actor),
        ("printer.removed", "printer:second", actor),
    ]
    assert all(relay_stack.api_token not in json.dumps(e) for e in entries)


def test_audit_entries_are_bounded_and_named() -> None:
    entry = audit.entry("job.canceled", tenant="acme", actor="token:x", target="job:1", reason="r" * 10_000)
    assert len(entry["reason"]) < 300
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.entry("job.deleted", tenant="acme", actor="cli", target="job:1")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refused_connectors_get_appointments_at_the_rate_the_relay_registers() -> None:
    clock = FakeClock()
    admission = Admission(limit=4, clock=clock)
    # 4 slots, 1 s each until measured: 4 registrations a second, so 4 appointments per second from 2 s on.
    assert [admission.retry_after() for _ in range(12)] == [2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    tickets = [admission.enter() for _ in range(5)]
    assert tickets[4] is None and admission.registering == 4
    clock.now += 0.1  # registrations now take 0.1 s: the rate estimate rises towards 40/s
    for ticket in tickets[:4]:
        assert ticket is not None
        ticket.release()
        ticket.release()  # idempotent
    assert admission.registering == 0
    assert 4 < admission.rate() < 40
    # Later refusals queue behind the appointments already given (the next free one is at +5 s, now +4.9 s).
    assert admission.retry_after() == 4


def test_appointments_beyond_a_minute_are_asked_back_at_random_without_booking() -> None:
    clock = FakeClock()
    admission = Admission(limit=1, clock=clock)  # one a second
    assert [admission.retry_after() for _ in range(59)] == list(range(2, 61))
    overflow = [admission.retry_after() for _ in range(200)]
    assert all(2 <= wait <= 60 for wait in overflow) and len(set(overflow)) > 1
    clock.now += 30  # half the book is used up: appointments resume after the last one given
    assert admission.retry_after() == 31


async def test_a_relay_busy_registering_answers_503_with_retry_after_and_the_connector_comes_back(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    admission = relay_stack.relay.registry.admission
    admission.limit = 0  # as if 128 connectors were registering right now
    token = await relay_stack.token("connector", connector_id="site-1")
    async with httpx.AsyncClient() as client:
        url = relay_stack.tunnel_url.replace("ws://", "http://")
        response = await client.get(
            url,
            headers={
                "authorization": f"Bearer {token}",
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                "sec-websocket-protocol": SUBPROTOCOL,
            },
        )
    assert response.status_code == 503
    assert 2 <= int(response.headers["retry-after"]) <= 60
    assert "at most 0 at once" in response.text
    assert admission.registering == 0

    config = ConnectorConfig(
        relay=relay_stack.tunnel_url,
        token=token,
        printer=[parse_printer(f"label={raw_sink.uri}")],
        state_dir=relay_stack.tmp_path / "connector",
    )
    connector = Connector(config)
    connector.tunnel.backoff_cap = 0.1  # come back at once instead of after the Retry-After
    relay_stack.nursery.start_soon(connector.run)
    with trio.fail_after(10):
        while not connector.tunnel.retries["busy"]:  # noqa: ASYNC110 - a plain counter, no event to wait on
            await trio.sleep(0.05)
    admission.limit = 128
    with trio.fail_after(10):
        while not relay_stack.relay.registry.sessions():
            await relay_stack.relay.registry.changed.wait()
        await relay_stack.relay.registry.sessions()[0].registered.wait()
    assert admission.registering == 0  # the registered session gave its slot back
    connector.tunnel.stopping = True


async def test_a_busy_relay_refuses_before_the_websocket_handshake_and_keeps_404_and_draining(
    relay_stack: RelayStack,
) -> None:
    # Busy or draining, the relay answers from the request head alone (no WebSocket machinery): the
    # same statuses, headers and texts as after a full handshake, whatever pieces the head comes in.
    admission = relay_stack.relay.registry.admission
    admission.limit = 0
    port = relay_stack.tunnel_port
    head = (
        "GET {path} HTTP/1.1\r\nhost: relay\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )

    async def ask(path: str) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            data = head.format(path=path).encode()
            for start in range(0, len(data), 7):
                await stream.send_all(data[start : start + 7])
            answer = b""
            with trio.fail_after(10):
                while chunk := await stream.receive_some():
                    answer += chunk
        return answer

    busy = await ask("/v1/tunnel")
    assert busy.startswith(b"HTTP/1.1 503 ") and b"\r\nconnection: close\r\n" in busy
    retry_after = busy.split(b"\r\nretry-after: ")[1].split(b"\r\n")[0]
    assert 2 <= int(retry_after) <= 60
    assert busy.endswith(b"(at most 0 at once); retry in " + retry_after + b" s\n")
    assert (await ask("/elsewhere")).startswith(b"HTTP/1.1 404 ")
    relay_stack.relay.drain_state.draining = True
    try:
        draining = await ask("/v1/tunnel")
    finally:
        relay_stack.relay.drain_state.draining = False
    assert draining.startswith(b"HTTP/1.1 503 ") and b"relay replica is draining" in draining
    assert admission.registering == 0


async def test_a_connector_that_gives_up_on_the_upgrade_hangs_up(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relay too busy to answer the upgrade in time: the connector must close the connection, or the
    # relay keeps a registration slot for it until its own timeout.
    monkeypatch.setattr(connector_tunnel, "CONNECT_TIMEOUT", 0.3)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    hung_up = trio.Event()

    async def never_answers(stream: trio.SocketStream) -> None:
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass  # the upgrade request
        hung_up.set()

    nursery.start_soon(trio.serve_listeners, never_answers, listeners)
    client = TunnelClient(f"ws://127.0.0.1:{port}/v1/tunnel", "token", no_streams)
    with pytest.raises(trio.TooSlowError):
        await client._one_session()
    with trio.fail_after(5):
        await hung_up.wait()


class StandInSession:
    """What watch_tokens uses of a ConnectorSession."""

    def __init__(self, registry: ConnectorRegistry, connector_id: str, token_id: str) -> None:
        self.key = ("acme", connector_id)
        self.tenant = "acme"
        self.principal = Principal("acme", "connector", token_id, connector_id=connector_id)
        self.h2 = self
        self.closed: str | None = None
        self._registry = registry

    def close(self, reason: str) -> None:
        self.closed = reason
        self._registry.remove(cast(ConnectorSession, self))


class CountingStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.asked: list[list[str]] = []

    async def get_tokens(self, token_ids: Sequence[str]) -> dict[str, TokenRecord]:
        self.asked.append(list(token_ids))
        return await super().get_tokens(token_ids)


async def test_idle_sessions_tokens_are_read_again_only_after_another_process_writes(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "relay.sqlite3")
    await store.open()
    registry = ConnectorRegistry()
    store.on_notice(registry.heard)
    sessions = []
    for n in range(3):
        _, record = new_token("acme", "connector", connector_id=f"c{n}")
        await store.add_token(record)
        sessions.append(StandInSession(registry, f"c{n}", record.id))
        registry.add(cast(ConnectorSession, sessions[-1]))

    async def rounds(n: int) -> None:
        for _ in range(n):
            await registry.token_rounds.wait()

    cli = SqliteStore(tmp_path / "relay.sqlite3")  # `printrelay token revoke` is another process
    await cli.open()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(registry.watch_tokens, store, 0.01)
            await nursery.start(store.follow_other_processes)
            with trio.fail_after(10):
                await rounds(5)
            assert store.asked == [sorted(s.principal.token_id for s in sessions)]  # once, all together
            await cli.revoke_token(sessions[1].principal.token_id, time.time())
            with trio.fail_after(10):
                while sessions[1].closed is None:
                    await registry.changed.wait()
            assert sessions[1].closed == "token revoked"
            assert store.asked[1] == sorted(s.principal.token_id for s in sessions)
            assert sessions[0].closed is None and sessions[2].closed is None
            nursery.cancel_scope.cancel()
    finally:
        await cli.close()
        await store.close()
