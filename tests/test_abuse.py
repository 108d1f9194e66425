"""Hostile input against the whole relay: hostile connectors on the tunnel, misbehaving HTTP clients, and
storms of abrupt disconnects. Each ends in a bounded, logged refusal; the relay keeps serving another
tenant meanwhile, and its fd and task counts return to their baseline afterwards.

(tests/test_http_abuse.py storms the HTTP server alone; tests/test_tunnel_protocol.py checks the caps with
bytes. Here the real listeners, the real WebSocket and the real relay are on the other end.)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest
import trio
import trio.testing
from fixtures_relay import RelayStack
from test_http_server import RawClient, open_fds, task_count, wait_until
from test_ipp_endpoint import offline_printer
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

import relay.tunnel
from relay.auth import Principal, authenticate
from service.http import HttpLimits
from tunnel.protocol import FrameScanner, ProtocolViolation, TunnelProtocol, TunnelSettings
from tunnel.wsstream import MAX_MESSAGE_BYTES, SUBPROTOCOL

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class HostileConnector:
    """A connector with a valid token that speaks raw HTTP/2 frames of its choosing."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []

    async def flush(self) -> None:
        await self.ws.send_message(self.h2.data_to_send())

    async def read_until(self, wanted: Callable[[h2.events.Event], bool]) -> h2.events.Event | None:
        """Feed the relay's bytes to h2 until an event matches (None if the WebSocket closes first)."""
        with trio.fail_after(10):
            while True:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    return None
                assert isinstance(message, bytes)
                try:
                    events = self.h2.receive_data(message)
                except h2.exceptions.ProtocolError:
                    return None
                self.events += events
                for event in events:
                    if wanted(event):
                        return event


@pytest.fixture
async def hostile(relay_stack: RelayStack) -> AsyncIterator[Callable[[], object]]:
    token = await relay_stack.token("connector", "mallory", connector_id="evil")

    def connect() -> object:
        return open_websocket_url(
            relay_stack.tunnel_url,
            subprotocols=[SUBPROTOCOL],
            extra_headers=[(b"authorization", f"Bearer {token}".encode())],
            max_message_size=16 * MAX_MESSAGE_BYTES,
        )

    # Warm-up: the first tunnel session the relay tears down opens one fd for good (measured: it never
    # grows with more sessions), so baselines are taken after one.
    async with connect() as ws:  # type: ignore[attr-defined]
        await ws.send_message("warm-up")
        with trio.fail_after(10):
            await HostileConnector(ws).read_until(lambda e: False)
    await wait_until(lambda: relay_stack.relay.registry.sessions() == [])
    yield connect


async def _other_tenant_is_served(stack: RelayStack) -> None:
    async with stack.client() as client:
        response = await client.get("/v1/printers")
        assert response.status_code == 200, response.text


async def _baseline(stack: RelayStack) -> tuple[int, int]:
    await _other_tenant_is_served(stack)  # warms up the httpx/ssl imports and the store
    await stack.token("api")  # a write: SQLite opens its WAL and shared-memory files on the first one
    await trio.testing.wait_all_tasks_blocked()
    return open_fds(), task_count()


async def _back_to(baseline: tuple[int, int], stack: RelayStack) -> None:
    fds, tasks = baseline
    await wait_until(lambda: stack.relay.registry.sessions() == [] and stack.relay.http.open_connections == 0)
    try:
        # One fd of slack: the process sometimes opens one lazily during the first refusals (measured: it
        # never grows); a leak per connection shows in the 1,000-disconnect test.
        await wait_until(lambda: open_fds() <= fds + 1 and task_count() <= tasks, within=10)
    except trio.TooSlowError:
        raise AssertionError(
            f"fds {open_fds()} (baseline {fds}), tasks {task_count()} (baseline {tasks})"
        ) from None


def _goaway(event: h2.events.Event) -> bool:
    return isinstance(event, h2.events.ConnectionTerminated)


async def test_ping_flood_from_a_hostile_connector(
    relay_stack: RelayStack, hostile: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> None:
    baseline = await _baseline(relay_stack)
    async with hostile() as ws:  # type: ignore[attr-defined]
        evil = HostileConnector(ws)
        for i in range(1000):
            evil.h2.ping(i.to_bytes(8, "big"))
        await evil.flush()
        event = await evil.read_until(_goaway)
    # GOAWAY(ENHANCE_YOUR_CALM) is sent best effort (bounded by a second); the close is what counts.
    assert event is None or (isinstance(event, h2.events.ConnectionTerminated) and event.error_code == CALM)
    await _other_tenant_is_served(relay_stack)
    await _back_to(baseline, relay_stack)
    assert "max_pings_per_second" in caplog.text


async def test_rapid_reset_from_a_hostile_connector(
    relay_stack: RelayStack, hostile: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> None:
    """The relay opens GET /v1/printers on stream 1; the connector resets it, then floods resets of that
    (now closed) stream, which h2 itself would ignore without a trace."""
    baseline = await _baseline(relay_stack)
    async with hostile() as ws:  # type: ignore[attr-defined]
        evil = HostileConnector(ws)
        await evil.flush()
        await evil.read_until(lambda e: isinstance(e, h2.events.RequestReceived))
        frame = hyperframe.frame.RstStreamFrame(1)
        frame.error_code = h2.errors.ErrorCodes.CANCEL
        await ws.send_message(frame.serialize() * 2000)
        event = await evil.read_until(_goaway)
    # GOAWAY(ENHANCE_YOUR_CALM) is sent best effort (bounded by a second); the close is what counts.
    assert event is None or (isinstance(event, h2.events.ConnectionTerminated) and event.error_code == CALM)
    assert "rapid reset" in caplog.text
    await _other_tenant_is_served(relay_stack)
    await _back_to(baseline, relay_stack)


async def test_oversized_header_list_from_a_hostile_connector(
    relay_stack: RelayStack, hostile: Callable[[], object]
) -> None:
    baseline = await _baseline(relay_stack)
    async with hostile() as ws:  # type: ignore[attr-defined]
        evil = HostileConnector(ws)
        await evil.flush()
        request = await evil.read_until(lambda e: isinstance(e, h2.events.RequestReceived))
        assert isinstance(request, h2.events.RequestReceived)
        evil.h2.send_headers(1, [(":status", "200"), ("x-big", "a" * 200_000)])
        await evil.flush()
        event = await evil.read_until(_goaway)
    assert event is None or isinstance(event, h2.events.ConnectionTerminated)
    assert relay_stack.relay.registry.sessions() == []
    await _back_to(baseline, relay_stack)


@pytest.mark.parametrize("message", [b"x" * (MAX_MESSAGE_BYTES + 1), "a text message"])
async def test_oversized_or_text_websocket_messages_close_the_session(
    relay_stack: RelayStack, hostile: Callable[[], object], message: bytes | str
) -> None:
    async def attack() -> None:
        async with hostile() as ws:  # type: ignore[attr-defined]
            evil = HostileConnector(ws)
            await evil.flush()
            await ws.send_message(message)
            assert await evil.read_until(lambda e: False) is None
            assert ws.closed is not None
            # 1009 message too big; a text message gets 1003, or 1006 when the session's teardown
            # closes the transport first. Either way the session is over.
            assert ws.closed.code in ((1009,) if isinstance(message, bytes) else (1003, 1006))

    baseline = await _baseline(relay_stack)
    for _ in range(3):
        await attack()
    await _other_tenant_is_served(relay_stack)
    await _back_to(baseline, relay_stack)


async def test_slow_and_oversized_http_clients_meet_named_limits(relay_stack: RelayStack) -> None:
    relay_stack.relay.http.limits = HttpLimits(
        header_timeout=0.5, body_chunk_timeout=0.5, body_min_rate=2000, body_rate_grace=0.3
    )
    port = int(relay_stack.api_url.rsplit(":", 1)[1])
    await offline_printer(relay_stack, "p")  # a printer whose jobs would queue: the body gets read
    baseline = await _baseline(relay_stack)
    auth = f"Authorization: Bearer {relay_stack.api_token}\r\n".encode()

    slowloris = await RawClient.connect(port)
    await slowloris.send(b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n")
    answer = await slowloris.response()
    assert answer.status == 408 and b"header_timeout" in answer.body

    trickle = await RawClient.connect(port)
    await trickle.send(
        b"POST /v1/printers/p/jobs HTTP/1.1\r\nHost: r\r\n" + auth + b"Content-Length: 100000\r\n\r\n"
    )
    with trio.move_on_after(5):
        try:
            while True:
                await trickle.send(b"x")
                await trio.sleep(0.05)  # the point: bytes trickle in slower than body_min_rate
        except trio.BrokenResourceError:
            pass  # the relay answered and closed
    answer = await trickle.response()
    assert answer.status == 408 and b"body_min_rate" in answer.body
    await _other_tenant_is_served(relay_stack)
    for client in (slowloris, trickle):
        await client.aclose()
    await _back_to(baseline, relay_stack)


async def test_thousand_abrupt_disconnects_on_both_listeners(
    relay_stack: RelayStack, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(relay_stack.api_url.rsplit(":", 1)[1])
    tunnel_port = relay_stack.tunnel_port
    baseline = await _baseline(relay_stack)
    auth = f"Authorization: Bearer {relay_stack.api_token}\r\n".encode()
    openings = [
        b"",
        b"GET /v1/prin",
        b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n" + auth + b"\r\n",
        b"POST /v1/printers/p/jobs HTTP/1.1\r\nHost: r\r\n" + auth + b"Content-Length: 99999\r\n\r\nabc",
        b"GET /v1/tunnel HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ]

    async def abrupt(i: int) -> None:
        c = await RawClient.connect(tunnel_port if i % 4 == 0 else port)
        try:
            if openings[i % len(openings)]:
                await c.send(openings[i % len(openings)])
        finally:
            await (c.reset() if i % 2 else c.aclose())

    for batch in range(20):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(abrupt, batch * 50 + i)
        if batch % 5 == 0:
            await _other_tenant_is_served(relay_stack)
    await _other_tenant_is_served(relay_stack)
    await _back_to(baseline, relay_stack)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize(
    ("opening", "close"),
    [
        # A plain request, no Upgrade: the relay answers 400, and that write meets the reset.
        # Unguarded, 50-75 of these stopped the relay (its reader task raised into the listener).
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "reset"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "fin"),
        # Mid-handshake: an upgrade request cut off before its end.
        (b"GET /v1/tunnel HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Up", "reset"),
        (b"GET /v1/tunnel HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Up", "fin"),
    ],
)
async def test_thousand_requests_then_disconnects_on_the_tunnel_port(
    relay_stack: RelayStack, opening: bytes, close: str
) -> None:
    tunnel_port = relay_stack.tunnel_port
    baseline = await _baseline(relay_stack)

    async def one() -> None:
        c = await RawClient.connect(tunnel_port)
        await c.send(opening)
        await (c.reset() if close == "reset" else c.aclose())

    for _ in range(20):
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
    await _other_tenant_is_served(relay_stack)
    await _back_to(baseline, relay_stack)
    # The tunnel listener still registers connectors.
    await relay_stack.start_connector({}, tenant="acme", connector_id="after-the-storm")


async def test_connectors_that_leave_before_the_upgrade_is_answered_cost_nothing_and_log_no_error(
    relay_stack: RelayStack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connector whose own connect timeout ends while the relay checks its token (a reconnect storm):
    the 101 meets a closed connection, which is the connector's business, not an error of the relay's."""
    checking, left = trio.Event(), trio.Event()

    async def slow_check(*args: Any, **kw: Any) -> Principal:
        checking.set()
        await left.wait()  # the connector resets meanwhile: the relay's 101 meets a closed connection
        return await authenticate(*args, **kw)

    monkeypatch.setattr(relay.tunnel, "authenticate", slow_check)
    caplog.set_level(logging.DEBUG, logger="printrelay.relay.tunnel")
    token = await relay_stack.token("connector", "mallory", connector_id="quitter")
    tunnel_port = relay_stack.tunnel_port
    request = (
        b"GET /v1/tunnel HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\nAuthorization: Bearer " + token.encode()
        + b"\r\n\r\n"
    )  # fmt: skip
    baseline = await _baseline(relay_stack)
    for _ in range(5):
        checking, left = trio.Event(), trio.Event()
        c = await RawClient.connect(tunnel_port)
        await c.send(request)
        with trio.fail_after(10):
            await checking.wait()
        await c.reset()
        left.set()
    await _back_to(baseline, relay_stack)
    assert len([r for r in caplog.records if "left before the upgrade's answer" in r.getMessage()]) == 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    monkeypatch.undo()
    # The listener still registers connectors.
    await relay_stack.start_connector({}, tenant="acme", connector_id="after-the-quitters")


async def test_request_heads_in_pieces_reach_the_api(relay_stack: RelayStack) -> None:
    """Real networks split heads anywhere; a split once cost a 408 after header_timeout."""
    port = int(relay_stack.api_url.rsplit(":", 1)[1])
    auth = f"Authorization: Bearer {relay_stack.api_token}\r\n".encode()
    request = b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n" + auth + b"\r\n"

    async def in_pieces(pieces: list[bytes]) -> int:
        c = await RawClient.connect(port)
        for piece in pieces:
            await c.send(piece)
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        status = (await c.response()).status
        await c.aclose()
        return status

    for at in range(1, len(request), 3):
        assert await in_pieces([request[:at], request[at:]]) == 200, at
    assert await in_pieces([request[i : i + 1] for i in range(len(request))]) == 200
    assert await in_pieces([b"GET /v1/printers HTTP/1.1\r\nX: ", b"a" * 40_000, b"a" * 40_000]) == 431
    assert await in_pieces([b"GET /", b"a" * 40_000, b"a" * 40_000]) == 414
    chunked = b"POST /v1/printers/p/jobs HTTP/1.1\r\nHost: r\r\n" + auth
    chunked += b"Transfer-Encoding: chunked\r\n\r\n"
    await offline_printer(relay_stack, "p")
    assert await in_pieces([chunked, b"ffffffffffffffffff\r\n", b"abc"]) == 400


def test_frame_scanner_sees_every_frame_header_across_reads() -> None:
    frame = hyperframe.frame.RstStreamFrame(1)
    frame.error_code = 8
    ping = hyperframe.frame.PingFrame(0)
    ping.opaque_data = b"12345678"
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame.serialize() + ping.serialize() + frame.serialize()
    scanner = FrameScanner(skip=24)
    seen = [t for i in range(len(data)) for t in scanner.feed(data[i : i + 1])]
    assert seen == [0x3, 0x6, 0x3]


def test_resets_of_closed_streams_count_toward_the_cap() -> None:
    relay_side = TunnelProtocol(TunnelSettings(max_resets_per_second=50), client_side=True)
    relay_side.initiate()
    evil = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    evil.initiate_connection()
    evil.receive_data(relay_side.data_to_send())
    relay_side.receive_data(evil.data_to_send(), 0.0)
    relay_side.conn.send_headers(
        1, [(":method", "GET"), (":scheme", "https"), (":authority", "c"), (":path", "/")]
    )
    frame = hyperframe.frame.RstStreamFrame(1)
    frame.error_code = 8
    with pytest.raises(ProtocolViolation, match="max_resets_per_second=50"):
        for _ in range(200):
            relay_side.receive_data(frame.serialize(), 0.0)


async def test_deeply_nested_json_is_a_400_that_names_the_depth(relay_stack: RelayStack) -> None:
    """8,000 levels of brackets once raised RecursionError out of the parser: a 500."""
    await offline_printer(relay_stack, "p")
    async with relay_stack.client() as client:
        held = await client.post("/v1/printers/p/jobs?hold=true", content=b"%PDF-1.4 x")
        nested = b"[" * 8000 + b"]" * 8000
        for path in ("/v1/webhooks", "/v1/printers", f"/v1/jobs/{held.json()['id']}/release"):
            for body in (nested, b'{"url": ' + nested + b"}"):
                response = await client.post(path, content=body)
                assert response.status_code == 400, (path, response.status_code, response.text)
                assert "nested deeper than 32 levels" in response.json()["error"], response.text
        # Depth within the bound is an ordinary answer.
        ok = await client.post(f"/v1/jobs/{held.json()['id']}/release", json={"printer_id": "p"})
        assert ok.status_code == 200, ok.text


def test_bounded_json_counts_brackets_outside_strings_only() -> None:
    from service import bounded_json

    assert bounded_json.loads('{"a": "' + "[" * 100 + '"}') == {"a": "[" * 100}
    assert bounded_json.loads('["\\"[[[["]') == ['"[[[[']
    assert bounded_json.loads("[" * 32 + "]" * 32, max_depth=32) is not None
    with pytest.raises(bounded_json.JsonTooDeep):
        bounded_json.loads("[" * 33 + "]" * 33, max_depth=32)
