"""The connector's end of the tunnel: dial out, serve HTTP/2 on the WebSocket, reconnect.

The connector only ever dials out (nothing is opened inbound on the site). It keeps one session to the
relay; when the session ends — the relay restarted, the network dropped, a PING went unanswered — it
dials again after a full-jitter backoff (1 s base, 60 s cap, reset once a session stayed up 30 s). A
401 means the token is wrong or revoked: the connector keeps trying (an admin may fix the token at the
relay) but honours the relay's ``Retry-After``.

The relay is verified: a ``wss://`` URL needs a certificate that chains to the system store (or
``--ca-file``) and names the relay's host, over TLS 1.2 or newer. Through a proxy the connector asks for a
CONNECT tunnel first (:mod:`connector.proxy`); TLS runs inside it, end to end with the relay.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionRejected, HandshakeError, WebSocketConnection, wrap_client_stream

from connector.proxy import Proxy, ProxyError, open_connect_tunnel
from tunnel.backoff import Backoff
from tunnel.protocol import TunnelSettings
from tunnel.session import H2Session, H2Stream
from tunnel.wsstream import MAX_MESSAGE_BYTES, SUBPROTOCOL, ReaderTasks, WebSocketStream

log = logging.getLogger("printrelay.connector.tunnel")

CONNECT_TIMEOUT = 15.0
DISCONNECT_TIMEOUT = 5.0


def client_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies the relay: chain to the system store (or ``ca_file`` only) and host name; TLS 1.2+."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


def _reason(exc: BaseException) -> str:
    """What went wrong, down to the cause (trio wraps certificate errors in BrokenResourceError)."""
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in parts[0]:
        parts.append(str(cause))
    return ": ".join(parts)


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real exception in a nursery's group (others are the Cancelled it caused)."""
    leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    return leaves[0] if len(leaves) == 1 else group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


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
        proxy: Proxy | None = None,
        settings: TunnelSettings | None = None,
        backoff: Backoff | None = None,
        on_session: Callable[[H2Session | None], None] | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.handler = handler
        self.ssl_context = ssl_context
        if self.ssl_context is None and urlsplit(url).scheme == "wss":
            self.ssl_context = client_ssl_context()
        self.proxy = proxy
        self.settings = settings or TunnelSettings()
        self.backoff = backoff or Backoff(base=1.0, cap=60.0, reset_after=30.0)
        self.on_session = on_session
        self.session: H2Session | None = None
        self.connected = trio.Event()
        self.sessions_opened = 0
        self.retries: collections.Counter[str] = collections.Counter()  # why each redial happened
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            retry_after: float | None = None
            reason = "session_ended"
            started = trio.current_time()
            try:
                await self._one_session()
            except ConnectionRejected as exc:
                retry_after = _retry_after(exc)
                body = (exc.body or b"").decode(errors="replace").strip()
                if exc.status_code == 503:  # overloaded or draining: normal after a relay restart
                    reason = "busy"
                    log.warning("relay busy: %s", body or "HTTP 503")
                else:
                    reason = "refused"
                    log.error("relay refused the tunnel: HTTP %s %s", exc.status_code, body)
            except (HandshakeError, OSError, trio.TooSlowError, trio.BrokenResourceError, ProxyError) as exc:
                reason = "unreachable"
                via = f" through proxy {self.proxy.address}" if self.proxy else ""
                log.warning("cannot reach the relay at %s%s: %s", self.url, via, _reason(exc))
            self.backoff.session_ended(trio.current_time() - started)
            if self.stopping:
                return
            self.retries[reason] += 1
            delay = self.backoff.next_delay(retry_after)
            log.info("reconnecting in %.1f s", delay)
            await trio.sleep(delay)

    async def _one_session(self) -> None:
        async with self._open_websocket() as ws:
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

    @contextlib.asynccontextmanager
    async def _open_websocket(self) -> AsyncIterator[WebSocketConnection]:
        """Dial (directly or through the proxy), verify TLS, upgrade; all within CONNECT_TIMEOUT."""
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        default_port = 443 if secure else 80
        port = parts.port or default_port
        named = f"[{host}]" if ":" in host else host
        host_header = named if port == default_port else f"{named}:{port}"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await self._dial(host, port, secure)
                    try:
                        ws = await wrap_client_stream(
                            # Its reader's errors end this connection only (see ReaderTasks).
                            ReaderTasks(nursery, f"tunnel to {self.url}").nursery(),
                            stream, host_header, resource, subprotocols=[SUBPROTOCOL],
                            extra_headers=[(b"authorization", f"Bearer {self.token}".encode())],
                            max_message_size=MAX_MESSAGE_BYTES,
                            receive_buffer_size=None,  # its 4 KiB default halves throughput (DESIGN §8)
                        )  # fmt: skip
                    except BaseException:
                        # trio-websocket leaves the connection open when the upgrade fails or times
                        # out. Left to the garbage collector, it held a relay registration slot until
                        # the relay's own timeout: after a restart all 128 slots stalled for 30 s.
                        await trio.aclose_forcefully(stream)
                        raise
                try:
                    yield ws
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            sole = _sole(group)
            if sole is group:
                raise
            raise sole from sole.__cause__  # keeps the cause (the certificate error, say)

    async def _dial(
        self, host: str, port: int, secure: bool
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if self.proxy is not None:
            tcp = await open_connect_tunnel(self.proxy, host, port)
        else:
            tcp = await trio.open_tcp_stream(host, port)
        if not secure:
            return tcp
        assert self.ssl_context is not None
        tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=host, https_compatible=True)
        try:
            await tls.do_handshake()  # here, so a certificate problem is reported as such
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls
