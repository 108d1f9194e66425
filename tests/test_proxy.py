"""Outbound proxies: the connector reaches the relay only through an HTTP CONNECT proxy.

The relay is named ``relay.invalid``, a name that resolves nowhere (RFC 6761) except inside the test's
proxy, so a session that comes up can only have come through the proxy. TLS runs inside the CONNECT
tunnel, verified against the relay's name, so the proxy sees nothing but ciphertext.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from fixtures_printers import RawSink
from fixtures_relay import RelayStack, no_streams
from test_tls import start_tls_relay, trusting

from connector.proxy import (
    ConnectExchange,
    Proxy,
    ProxyError,
    bypasses_proxy,
    parse_proxy,
    proxy_for,
)
from connector.tunnel import TunnelClient, client_ssl_context

RELAY_NAME = "relay.invalid"
MAX_HEAD = 16 * 1024


class ConnectProxy:
    """A small forward proxy: CONNECT only, optional Basic credentials, names resolved from a table."""

    def __init__(self, hosts: dict[str, str], credentials: tuple[str, str] | None = None) -> None:
        self.hosts = hosts
        self.credentials = credentials
        self.port = 0
        self.tunnels: list[str] = []
        self.refusals: list[int] = []

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            head = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    chunk = await client.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, *_ = [*lines[0].split(" "), "", ""]
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            if method != "CONNECT":
                return await self._refuse(client, 405, "Method Not Allowed")
            if self.credentials is not None:
                expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
                if headers.get("proxy-authorization") != expected:
                    return await self._refuse(client, 407, "Proxy Authentication Required")
            host, _, port = target.rpartition(":")
            if host not in self.hosts:
                return await self._refuse(client, 502, "Bad Gateway")
            upstream = await trio.open_tcp_stream(self.hosts[host], int(port))
            self.tunnels.append(target)
            async with upstream:
                await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._splice, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._splice, upstream, client, nursery.cancel_scope)

    async def _refuse(self, client: trio.SocketStream, status: int, reason: str) -> None:
        self.refusals.append(status)
        extra = 'Proxy-Authenticate: Basic realm="corp"\r\n' if status == 407 else ""
        answer = f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        await client.send_all(answer.encode())

    @staticmethod
    async def _splice(source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def _start_proxy(nursery: trio.Nursery, proxy: ConnectProxy) -> ConnectProxy:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    proxy.port = listeners[0].socket.getsockname()[1]
    return proxy


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def named_relay(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> AsyncIterator[RelayStack]:
    """A TLS relay whose tunnel URL names it ``relay.invalid``: reachable only through the proxy."""
    stack = await start_tls_relay(nursery, tmp_path, ca.issue_cert(RELAY_NAME, "127.0.0.1"))
    port = str(stack.tunnel_port)
    yield dataclasses.replace(stack, tunnel_url=f"wss://{RELAY_NAME}:{port}/v1/tunnel")


async def _print_through(stack: RelayStack, ca: trustme.CA, sink: RawSink, body: bytes) -> None:
    async with httpx.AsyncClient(
        base_url=stack.api_url, verify=trusting(ca), headers={"authorization": f"Bearer {stack.api_token}"}
    ) as client:
        response = await client.post("/v1/printers/label/jobs", content=body)
        assert response.status_code == 201, response.text
    (document,) = await sink.wait_for(1, within=15)
    assert document.sha256 == hashlib.sha256(body).hexdigest()


async def test_direct_connection_is_impossible(named_relay: RelayStack, ca_file: Path) -> None:
    token = await named_relay.token("connector", connector_id="site-1")
    client = TunnelClient(named_relay.tunnel_url, token, no_streams, ssl_context=client_ssl_context(ca_file))
    with pytest.raises(OSError):
        await client._one_session()


async def test_connector_through_an_open_proxy(
    nursery: trio.Nursery, named_relay: RelayStack, ca: trustme.CA, ca_file: Path, raw_sink: RawSink
) -> None:
    proxy = await _start_proxy(nursery, ConnectProxy({RELAY_NAME: "127.0.0.1"}))
    await named_relay.start_connector(
        {"label": raw_sink.uri}, ca_file=ca_file, proxy=f"http://127.0.0.1:{proxy.port}"
    )
    await _print_through(named_relay, ca, raw_sink, b"through the corporate proxy\n")
    port = str(named_relay.tunnel_port)
    assert proxy.tunnels == [f"{RELAY_NAME}:{port}"]


async def test_connector_through_a_proxy_with_credentials_from_https_proxy(
    nursery: trio.Nursery,
    named_relay: RelayStack,
    ca: trustme.CA,
    ca_file: Path,
    raw_sink: RawSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await _start_proxy(nursery, ConnectProxy({RELAY_NAME: "127.0.0.1"}, ("corp", "s3cret:@x")))
    monkeypatch.setenv("HTTPS_PROXY", f"http://corp:s3cret%3A%40x@127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    await named_relay.start_connector({"label": raw_sink.uri}, ca_file=ca_file)
    await _print_through(named_relay, ca, raw_sink, b"authenticated proxy\n")
    assert len(proxy.tunnels) == 1 and proxy.refusals == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:{port}", r"requires credentials \(407\)"),
        ("http://corp:wrong@127.0.0.1:{port}", r"refused the credentials for corp \(407\)"),
    ],
)
async def test_proxy_refusals_are_named(
    nursery: trio.Nursery, named_relay: RelayStack, ca_file: Path, url: str, message: str
) -> None:
    proxy = await _start_proxy(nursery, ConnectProxy({RELAY_NAME: "127.0.0.1"}, ("corp", "s3cret")))
    token = await named_relay.token("connector", connector_id="site-1")
    client = TunnelClient(
        named_relay.tunnel_url, token, no_streams, ssl_context=client_ssl_context(ca_file),
        proxy=parse_proxy(url.format(port=proxy.port)),
    )  # fmt: skip
    with pytest.raises(ProxyError, match=message) as info:
        await client._one_session()
    assert "wrong" not in str(info.value)  # the password never appears
    assert proxy.tunnels == [] and proxy.refusals == [407]


# ---- sans-IO parts -----------------------------------------------------------------------------------


def test_connect_request_and_answers_as_bytes() -> None:
    exchange = ConnectExchange(Proxy("proxy", 3128, "u", "p"), "relay.example.com", 443)
    assert exchange.request_bytes() == (
        b"CONNECT relay.example.com:443 HTTP/1.1\r\nhost: relay.example.com:443\r\n"
        b"proxy-authorization: Basic dTpw\r\n\r\n"
    )
    assert exchange.receive(b"HTTP/1.1 200 Connection est") is False
    assert exchange.receive(b"ablished\r\nVia: 1.1 proxy\r\n\r\n") is True

    refused = ConnectExchange(Proxy("proxy", 3128), "relay.example.com", 443)
    with pytest.raises(ProxyError, match=r"refused CONNECT relay\.example\.com:443: 403 Forbidden"):
        refused.receive(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    chatty = ConnectExchange(Proxy("proxy", 3128), "relay.example.com", 443)
    with pytest.raises(ProxyError, match="sent data after its CONNECT answer"):
        chatty.receive(b"HTTP/1.1 200 OK\r\n\r\nhello")

    endless = ConnectExchange(Proxy("proxy", 3128), "relay.example.com", 443)
    with pytest.raises(ProxyError, match=f"answer head exceeds {MAX_HEAD} bytes"):
        endless.receive(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 20000)

    closed = ConnectExchange(Proxy("proxy", 3128), "2001:db8::1", 443)
    assert closed.request_bytes().startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n")
    with pytest.raises(ProxyError, match="closed the connection"):
        closed.receive(b"")


def test_proxy_urls() -> None:
    assert parse_proxy("http://u:p%40ss@proxy.corp:3128") == Proxy("proxy.corp", 3128, "u", "p@ss")
    assert parse_proxy("proxy.corp:3128") == Proxy("proxy.corp", 3128)
    assert "p@ss" not in repr(parse_proxy("http://u:p%40ss@proxy.corp:3128"))
    for bad in ("https://proxy:3128", "http://proxy:3128/path", "http://:3128", "socks5://proxy:1080"):
        with pytest.raises(ValueError, match="proxy"):
            parse_proxy(bad)


def test_which_proxy_and_no_proxy() -> None:
    env = {
        "HTTPS_PROXY": "http://p:1",
        "http_proxy": "http://plain:2",
        "NO_PROXY": ".corp.example,10.0.0.0/8",
    }
    assert proxy_for("wss://relay.example.com/v1/tunnel", "", env) == Proxy("p", 1)
    assert proxy_for("ws://relay.example.com:8081/v1/tunnel", "", env) == Proxy("plain", 2)
    assert proxy_for("wss://relay.corp.example/v1/tunnel", "", env) is None
    assert proxy_for("wss://10.1.2.3/v1/tunnel", "", env) is None
    assert proxy_for("wss://relay.example.com/v1/tunnel", "none", env) is None
    assert proxy_for("wss://relay.corp.example/v1/tunnel", "http://explicit:3", env) == Proxy("explicit", 3)
    assert proxy_for("wss://relay.example.com/v1/tunnel", "", {}) is None

    assert bypasses_proxy("relay.example.com", 443, "*")
    assert bypasses_proxy("relay.example.com", 443, "example.com")
    assert not bypasses_proxy("badexample.com", 443, "example.com")
    assert bypasses_proxy("relay.example.com", 443, "relay.example.com:443")
    assert not bypasses_proxy("relay.example.com", 443, "relay.example.com:8443")
    assert bypasses_proxy("::1", 443, "[::1]")
    assert bypasses_proxy("192.168.1.5", 443, " 192.168.0.0/16 ")
    assert not bypasses_proxy("192.169.1.5", 443, "192.168.0.0/16")
