"""Outbound HTTP proxies for the tunnel: HTTP ``CONNECT`` with optional Basic auth.

Corporate sites often allow outbound traffic only through a proxy. The connector then opens a TCP
connection to the proxy, asks it to ``CONNECT relay:443``, and runs TLS and the WebSocket inside the
tunnel the proxy grants, so the proxy sees only the relay's name and encrypted bytes.

Which proxy: ``--proxy URL`` if given (``--proxy none`` forces a direct connection); else, like curl,
``https_proxy``/``HTTPS_PROXY`` for ``wss://`` and ``http_proxy``/``HTTP_PROXY`` for ``ws://``, unless the
relay's host matches ``no_proxy``/``NO_PROXY`` (comma-separated: ``*``, host names, ``.domain`` or
``domain`` suffixes, IP addresses and CIDR ranges, each optionally with ``:port``).

The CONNECT exchange is sans-IO (:class:`ConnectExchange`: bytes in, a verdict out, bounded); the trio
part (:func:`open_connect_tunnel`) only moves bytes and keeps the deadline.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11
import trio

# The proxy's answer to CONNECT is a status line and a few headers; anything longer is not a proxy.
MAX_RESPONSE_HEAD = 16 * 1024
DEFAULT_PROXY_PORT = 8080


class ProxyError(Exception):
    """The proxy is unusable or refused the tunnel; the message names the proxy and the reason."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or reprs

    @property
    def address(self) -> str:
        """``host:port`` for messages: never the credentials."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def authorization(self) -> str | None:
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def parse_proxy(url: str) -> Proxy:
    """``http://[user:password@]host[:port]`` (a bare ``host:port`` means http://)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError(f"proxy must be an http:// URL (CONNECT is spoken in clear to it), not {url!r}")
    if not parts.hostname:
        raise ValueError(f"proxy URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"proxy URL {url!r} must be http://[user:password@]host:port, without a path")
    try:
        port = parts.port or DEFAULT_PROXY_PORT
    except ValueError:
        raise ValueError(f"proxy URL {url!r} has an invalid port") from None
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.hostname, port, username, password)


def _env(environ: Mapping[str, str], name: str) -> str:
    # curl prefers the lower-case names; an empty value means "unset".
    return environ.get(name.lower()) or environ.get(name.upper()) or ""


def bypasses_proxy(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``host:port`` matches a ``NO_PROXY`` list."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port
            inside, _, rest = entry[1:].partition("]")
            entry = inside
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            name, _, maybe_port = entry.partition(":")
            if maybe_port.isdigit():
                entry, entry_port = name, int(maybe_port)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip("*").lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def proxy_for(relay_url: str, explicit: str = "", environ: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy to reach ``relay_url`` through, or None for a direct connection."""
    if explicit.strip().lower() in ("none", "direct"):
        return None
    if explicit.strip():
        return parse_proxy(explicit)
    environ = os.environ if environ is None else environ
    parts = urlsplit(relay_url)
    configured = _env(environ, "https_proxy" if parts.scheme == "wss" else "http_proxy")
    if not configured:
        return None
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    if bypasses_proxy(parts.hostname or "", port, _env(environ, "no_proxy")):
        return None
    return parse_proxy(configured)


class ConnectExchange:
    """Sans-IO: the CONNECT request for ``host:port`` and the verdict on the proxy's answer."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self.proxy = proxy
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.authority = authority
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        headers = [("host", authority)]
        auth = proxy.authorization()
        if auth is not None:
            headers.append(("proxy-authorization", auth))
        self._request = self._h11.send(h11.Request(method="CONNECT", target=authority, headers=headers))

    def request_bytes(self) -> bytes:
        return self._request or b""

    def receive(self, data: bytes) -> bool:
        """Feed the proxy's bytes (``b""`` at EOF). True once the tunnel is open; False for more data.
        Raises :class:`ProxyError` for a refusal or a malformed answer."""
        if not data:  # EOF: the answer is not complete, or receive() would have returned True already
            raise ProxyError(f"proxy {self.proxy.address} closed the connection before answering CONNECT")
        self._h11.receive_data(data)
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise ProxyError(
                        f"proxy {self.proxy.address}: answer head exceeds {MAX_RESPONSE_HEAD} bytes"
                    ) from None
                raise ProxyError(f"proxy {self.proxy.address} sent a malformed answer: {exc}") from None
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.ConnectionClosed):
                raise ProxyError(f"proxy {self.proxy.address} closed the connection before answering CONNECT")
            if not isinstance(event, h11.InformationalResponse):  # a 1xx is skipped
                break
        assert isinstance(event, h11.Response), event
        status = event.status_code
        if 200 <= status < 300:
            if self._h11.trailing_data[0]:
                # Client speaks first in TLS and WebSocket; a proxy that talks first is not a tunnel.
                raise ProxyError(f"proxy {self.proxy.address} sent data after its CONNECT answer")
            return True
        reason = event.reason.decode("latin-1", "replace")
        if status == 407:
            if self.proxy.username is None:
                raise ProxyError(
                    f"proxy {self.proxy.address} requires credentials (407): "
                    "use --proxy http://USER:PASSWORD@HOST:PORT"
                )
            raise ProxyError(
                f"proxy {self.proxy.address} refused the credentials for {self.proxy.username} (407)"
            )
        raise ProxyError(f"proxy {self.proxy.address} refused CONNECT {self.authority}: {status} {reason}")


async def open_connect_tunnel(proxy: Proxy, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to ``host:port`` through ``proxy``. The caller bounds the time (``fail_after``)."""
    try:
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyError(f"cannot reach proxy {proxy.address}: {exc.strerror or exc}") from None
    try:
        exchange = ConnectExchange(proxy, host, port)
        await stream.send_all(exchange.request_bytes())
        # Read a little at a time: every byte read past the answer head would belong to the tunnel.
        while not exchange.receive(await stream.receive_some(1024)):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise ProxyError(f"proxy {proxy.address} dropped the connection: {exc}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream
