"""The connector's end of the tunnel: dial out, serve HTTP/2 on the WebSocket, reconnect.

The connector only ever dials out (nothing is opened inbound on the site). A :class:`TunnelClient` keeps one
session to the relay; when the session ends — the relay restarted, the network dropped, a PING went
unanswered — it dials again after a full-jitter backoff (1 s base, 60 s cap, reset once a session stayed up
30 s). A 401 means the token is wrong or revoked: the connector keeps trying (an admin may fix the token at
the relay) but honours the relay's ``Retry-After``. A :class:`TunnelGroup` runs several of them, to distinct
relay replicas (``--relay`` given several times, ``--sessions``).

The relay is verified: a ``wss://`` URL needs a certificate that chains to the system store (or
``--ca-file``) and names the relay's host, over TLS 1.2 or newer. Through a proxy the connector asks for a
CONNECT tunnel first (:mod:`connector.proxy`); TLS runs inside it, end to end with the relay.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio

from connector.proxy import Proxy, ProxyError, open_connect_tunnel, proxy_for
from service.signal import Signal
from tunnel.backoff import Backoff
from tunnel.protocol import TunnelSettings
from tunnel.session import H2Session, H2Stream
from tunnel.wsstream import (
    REPLICA_HEADER,
    REPLICAS_HEADER,
    SUBPROTOCOL,
    HandshakeFailed,
    WebSocketRejected,
    WebSocketStream,
    connect,
)

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


def _retry_after(rejection: WebSocketRejected) -> float | None:
    for name, value in rejection.headers or ():
        if name.lower() == b"retry-after":
            try:
                return float(value.decode())
            except ValueError:
                return None
    return None


RESOLVE_INTERVAL = 60.0  # a relay name is resolved again after this long
BACKOFF_BASE, BACKOFF_CAP, BACKOFF_RESET = 1.0, 60.0, 30.0  # full jitter; reset once a session lasted 30 s


@dataclass(frozen=True)
class Target:
    url: str
    address: str | None = None  # one address of the URL's host to dial (None: the host, resolved by trio)


class SameReplica(Exception):
    """The session reached a replica that another session of this connector already holds."""

    def __init__(self, message: str, *, first: bool) -> None:
        super().__init__(message)
        self.first = first  # said once per replica; after that only at debug level


class Targets:
    """Where the slots of a :class:`TunnelGroup` dial: every ``--relay`` URL, a name that resolves to several
    addresses counting as several. Each slot walks the list round-robin from its own starting point and
    skips targets last seen to lead to a replica another slot holds."""

    def __init__(self, urls: Sequence[str], proxied: Callable[[str], bool]) -> None:
        self.urls = list(dict.fromkeys(urls))
        self._proxied = proxied
        self._targets: list[Target] = [Target(u) for u in self.urls]
        self._resolved_at = -math.inf
        self._next: dict[int, int] = {}  # slot -> index of its next target
        self.replica_of: dict[Target, str] = {}  # the replica each target led to last time

    async def _resolve(self) -> None:
        if trio.current_time() - self._resolved_at < RESOLVE_INTERVAL:
            return
        self._resolved_at = trio.current_time()
        targets: list[Target] = []
        for url in self.urls:
            parts = urlsplit(url)
            host = parts.hostname or ""
            if self._proxied(url) or _is_address(host):
                targets.append(Target(url))
                continue
            try:
                infos = await trio.socket.getaddrinfo(host, parts.port or 443, type=trio.socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s: %s", host, exc)
                targets.append(Target(url))
                continue
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            targets += (
                [Target(url, address) for address in addresses] if len(addresses) > 1 else [Target(url)]
            )
        self._targets = targets or [Target(u) for u in self.urls]

    async def next_for(self, slot: int, held_by_others: set[str]) -> Target:
        await self._resolve()
        count = len(self._targets)
        start = self._next.get(slot, slot)
        for step in range(count):
            target = self._targets[(start + step) % count]
            if self.replica_of.get(target) not in held_by_others or step == count - 1:
                self._next[slot] = start + step + 1
                return target
        raise AssertionError("unreachable")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
        targets: Callable[[TunnelClient], Awaitable[Target]] | None = None,
        admit: Callable[[TunnelClient, str, int], None] | None = None,
        ca_file: Path | None = None,
        proxy_setting: str | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.handler = handler
        self.ssl_context = ssl_context
        if self.ssl_context is None and urlsplit(url).scheme == "wss":
            self.ssl_context = client_ssl_context(ca_file)
        self.proxy = proxy
        self.settings = settings or TunnelSettings()
        self.backoff = backoff or Backoff(base=BACKOFF_BASE, cap=BACKOFF_CAP, reset_after=BACKOFF_RESET)
        self.on_session = on_session
        # With several relay URLs (or a name of several addresses), where to dial next, and whether the
        # replica that answered is one this connector should keep a session to (TunnelGroup).
        self._targets = targets
        self._admit = admit
        self._ca_file = ca_file
        self._proxy_setting = proxy_setting
        self.target = Target(url)
        self.session: H2Session | None = None
        self.replica: str | None = None  # the relay replica this session is to
        self.connected = trio.Event()
        self.sessions_opened = 0
        self.retries: collections.Counter[str] = collections.Counter()  # why each redial happened
        self.stopping = False

    async def _next_target(self) -> None:
        if self._targets is None:
            return
        target = await self._targets(self)
        if target.url != self.url:
            self.url = target.url
            secure = urlsplit(target.url).scheme == "wss"
            self.ssl_context = client_ssl_context(self._ca_file) if secure else None
            self.proxy = proxy_for(target.url, self._proxy_setting or "")
        self.target = target

    async def run(self) -> None:
        while not self.stopping:
            retry_after: float | None = None
            reason = "session_ended"
            started = trio.current_time()
            try:
                await self._next_target()
                await self._one_session()
            except SameReplica as exc:
                reason = "duplicate"
                log.log(logging.WARNING if exc.first else logging.DEBUG, "%s", exc)
            except WebSocketRejected as exc:
                retry_after = _retry_after(exc)
                body = (exc.body or b"").decode(errors="replace").strip()
                if exc.status_code == 503:  # overloaded or draining: normal after a relay restart
                    reason = "busy"
                    log.warning("relay busy: %s", body or "HTTP 503")
                else:
                    reason = "refused"
                    log.error("relay refused the tunnel: HTTP %s %s", exc.status_code, body)
            except (HandshakeFailed, OSError, trio.TooSlowError, trio.BrokenResourceError, ProxyError) as exc:
                reason = "unreachable"
                via = f" through proxy {self.proxy.address}" if self.proxy else ""
                log.warning("cannot reach the relay at %s%s: %s", self.url, via, _reason(exc))
            except Exception:
                # Whatever a relay or a proxy on the way answers must not stop the connector (and with it
                # the deliveries running): a bug in one attempt is that attempt's end, and it dials again.
                reason = "unreachable"
                log.exception("the tunnel to %s failed unexpectedly", self.url)
            self.backoff.session_ended(trio.current_time() - started)
            if self.stopping:
                return
            self.retries[reason] += 1
            delay = self.backoff.next_delay(retry_after)
            log.info("reconnecting in %.1f s", delay)
            await trio.sleep(delay)

    async def _one_session(self) -> None:
        async with self._open_websocket() as ws:
            headers = dict(ws.headers)
            replica = headers.get(REPLICA_HEADER.encode(), b"").decode(errors="replace")[:128]
            try:
                advertised = int(headers.get(REPLICAS_HEADER.encode(), b"1"))
            except ValueError:
                advertised = 1
            if self._admit is not None:
                self._admit(self, replica, advertised)  # SameReplica: another session holds that replica
            self.replica = replica or None
            session = H2Session(
                ws, client_side=False, settings=self.settings, handler=self.handler,
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
                self.replica = None
                self.connected = trio.Event()
                if self.on_session:
                    self.on_session(None)

    @contextlib.asynccontextmanager
    async def _open_websocket(self) -> AsyncIterator[WebSocketStream]:
        """Dial (directly or through the proxy), verify TLS, upgrade; all within CONNECT_TIMEOUT."""
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        default_port = 443 if secure else 80
        port = parts.port or default_port
        named = f"[{host}]" if ":" in host else host
        host_header = named if port == default_port else f"{named}:{port}"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await self._dial(host, port, secure, self.target.address)
            try:
                ws = await connect(
                    stream, host_header, resource, subprotocols=[SUBPROTOCOL],
                    headers=[(b"authorization", f"Bearer {self.token}".encode())],
                )  # fmt: skip
            except BaseException:
                # Closed now, not by the garbage collector: a half-open upgrade holds one of the relay's
                # registration slots until its own timeout (after a restart, all 128 stalled for 30 s).
                await trio.aclose_forcefully(stream)
                raise
        try:
            yield ws
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(DISCONNECT_TIMEOUT):
                await ws.aclose()

    async def _dial(
        self, host: str, port: int, secure: bool, address: str | None = None
    ) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        if self.proxy is not None:
            tcp = await open_connect_tunnel(self.proxy, host, port)
        else:
            # One of the name's addresses when the group picked one; TLS still checks the name.
            tcp = await trio.open_tcp_stream(address or host, port)
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


class TunnelGroup:
    """Sessions to ``sessions`` distinct relay replicas, each in a slot that redials on its own with the
    jittered backoff of :class:`TunnelClient`.

    Replicas name themselves on the upgrade, and say how many are alive. The group keeps
    ``min(sessions, replicas alive)`` slots: one for a relay that runs alone. A session that lands on a
    replica another slot holds (two URLs of one replica, or a load balancer choosing the same one again) is
    closed, said once, and its slot dials again after a backoff. A job may arrive on any session: the ledger
    keeps it from printing twice.
    """

    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        handler: Callable[[H2Stream], Awaitable[None]],
        *,
        sessions: int = 2,
        ca_file: Path | None = None,
        proxy_setting: str = "",
        settings: TunnelSettings | None = None,
        on_session: Callable[[H2Session | None], None] | None = None,
    ) -> None:
        self.urls = list(urls)
        self.token = token
        self.handler = handler
        self.sessions_wanted = max(1, sessions)
        self._ca_file = ca_file
        self._proxy_setting = proxy_setting
        self._settings = settings
        self._on_session = on_session
        self.targets = Targets(urls, lambda url: proxy_for(url, proxy_setting) is not None)
        self.clients: list[TunnelClient] = []
        self.replicas_alive = 1  # as the relay last said
        self._warned: set[str] = set()
        self._changed = Signal()
        self._stopping = False
        self.connected = trio.Event()  # set while any session is up
        self.backoff_cap = BACKOFF_CAP  # longest wait between dials of a slot (tests shorten it)

    # --- what the connector reads -----------------------------------------------------------------

    @property
    def sessions(self) -> list[H2Session]:
        return [c.session for c in self.clients if c.session is not None]

    @property
    def session(self) -> H2Session | None:
        """A session that is up, if any (what a single-session caller asks)."""
        found = self.sessions
        return found[0] if found else None

    @property
    def replicas(self) -> set[str]:
        return {c.replica for c in self.clients if c.session is not None and c.replica}

    @property
    def sessions_opened(self) -> int:
        return sum(c.sessions_opened for c in self.clients)

    @property
    def retries(self) -> collections.Counter[str]:
        total: collections.Counter[str] = collections.Counter()
        for client in self.clients:
            total.update(client.retries)
        return total

    @property
    def stopping(self) -> bool:
        return self._stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self._stopping = value
        for client in self.clients:
            client.stopping = value
        self._changed.fire()

    # --- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while not self._stopping:
                wanted = min(self.sessions_wanted, max(1, self.replicas_alive))
                while len(self.clients) < wanted:
                    client = self._slot(len(self.clients))
                    self.clients.append(client)
                    nursery.start_soon(client.run)
                await self._changed.wait()

    def _slot(self, index: int) -> TunnelClient:
        async def next_target(client: TunnelClient) -> Target:
            held = {c.replica for c in self.clients if c is not client and c.replica}
            return await self.targets.next_for(index, held)

        def on_session(session: H2Session | None) -> None:
            if session is not None:
                self.connected.set()
            elif not any(c.session is not None for c in self.clients) and self.connected.is_set():
                self.connected = trio.Event()
            self._changed.fire()
            if self._on_session is not None:
                self._on_session(session)

        first = self.urls[0]
        return TunnelClient(
            first, self.token, self.handler, settings=self._settings, on_session=on_session,
            ssl_context=client_ssl_context(self._ca_file) if first.startswith("wss:") else None,
            proxy=proxy_for(first, self._proxy_setting), targets=next_target, admit=self.admit,
            ca_file=self._ca_file, proxy_setting=self._proxy_setting,
            backoff=Backoff(base=BACKOFF_BASE, cap=self.backoff_cap, reset_after=BACKOFF_RESET),
        )  # fmt: skip

    def replicas_said(self, alive: int) -> None:
        """The relay says ``alive`` replicas exist: open slots up to that many (never beyond --sessions)."""
        if alive != self.replicas_alive:
            self.replicas_alive = alive
            self._changed.fire()

    def admit(self, client: TunnelClient, replica: str, alive: int) -> None:
        """A slot's session reached ``replica``; ``alive`` replicas exist, as the relay said."""
        self.replicas_said(alive)
        self.targets.replica_of[client.target] = replica
        if not replica:
            return  # an older relay names no replica: nothing to compare
        if any(c is not client and c.replica == replica for c in self.clients):
            first = replica not in self._warned
            self._warned.add(replica)
            raise SameReplica(
                f"reached relay replica {replica} again through {client.target.address or client.url}: "
                f"another session holds it; dialing again for another of the {alive} replicas",
                first=first,
            )
