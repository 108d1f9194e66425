"""The connector's end of the tunnel: dial out, serve HTTP/2 on the WebSocket, reconnect.

The connector only ever dials out (nothing is opened inbound on the site). It keeps one session to the
relay; when the session ends — the relay restarted, the network dropped, a PING went unanswered — it
dials again after a full-jitter backoff (1 s base, 60 s cap, reset once a session stayed up 30 s). A
401 means the token is wrong or revoked: the connector keeps trying (an admin may fix the token at the
relay) but honours the relay's ``Retry-After``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import ConnectionRejected, HandshakeError, open_websocket_url

from tunnel.backoff import Backoff
from tunnel.protocol import TunnelSettings
from tunnel.session import H2Session, H2Stream
from tunnel.wsstream import MAX_MESSAGE_BYTES, SUBPROTOCOL, WebSocketStream

log = logging.getLogger("printrelay.connector.tunnel")

CONNECT_TIMEOUT = 15.0


def _retry_after(rejection: ConnectionRejected) -> float | None:
    for name, value in rejection.headers or ():
        if name.lower() == b"retry-after":
            try:
                return float(value.decode())
            except ValueError:
                return None
    return None


class TunnelClient:
    """Keeps a session to the relay up for as long as :meth:`run` runs."""

    def __init__(
        self,
        url: str,
        token: str,
        handler: Callable[[H2Stream], Awaitable[None]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        settings: TunnelSettings | None = None,
        backoff: Backoff | None = None,
        on_session: Callable[[H2Session | None], None] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.handler = handler
        self.ssl_context = ssl_context
        self.settings = settings or TunnelSettings()
        self.backoff = backoff or Backoff(base=1.0, cap=60.0, reset_after=30.0)
        self.on_session = on_session
        self.session: H2Session | None = None
        self.connected = trio.Event()
        self.sessions_opened = 0
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            retry_after: float | None = None
            started = trio.current_time()
            try:
                await self._one_session()
            except ConnectionRejected as exc:
                retry_after = _retry_after(exc)
                body = (exc.body or b"").decode(errors="replace").strip()
                log.error("relay refused the tunnel: HTTP %s %s", exc.status_code, body)
            except (HandshakeError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                log.warning("cannot reach the relay at %s: %s", self.url, exc or type(exc).__name__)
            self.backoff.session_ended(trio.current_time() - started)
            if self.stopping:
                return
            delay = self.backoff.next_delay(retry_after)
            log.info("reconnecting in %.1f s", delay)
            await trio.sleep(delay)

    async def _one_session(self) -> None:
        # trio-websocket bounds the TCP connect and the handshake with connect_timeout.
        async with open_websocket_url(
            self.url,
            self.ssl_context,
            subprotocols=[SUBPROTOCOL],
            extra_headers=[(b"authorization", f"Bearer {self.token}".encode())],
            max_message_size=MAX_MESSAGE_BYTES,
            receive_buffer_size=None,  # its 4 KiB default halves throughput (DESIGN §8)
            connect_timeout=CONNECT_TIMEOUT,
            disconnect_timeout=5,
        ) as ws:
            session = H2Session(
                WebSocketStream(ws), client_side=False, settings=self.settings, handler=self.handler,
                name="tunnel to relay",
            )  # fmt: skip
            self.session = session
            self.sessions_opened += 1
            if self.on_session:
                self.on_session(session)
            log.info("tunnel up to %s", self.url)
            self.connected.set()
            try:
                await session.run()
                log.warning("tunnel down: %s", session.close_reason)
            finally:
                self.session = None
                self.connected = trio.Event()
                if self.on_session:
                    self.on_session(None)
