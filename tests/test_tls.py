"""TLS everywhere: the relay serves HTTPS and WSS from files, the connector verifies it.

Certificates come from ``trustme``: valid, for the wrong host, expired, and from an unknown CA. The reload
test runs ``printrelay serve`` as a process and sends it SIGHUP, as an operator (or cert-manager) would.
"""

from __future__ import annotations

import hashlib
import signal
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from fixtures_printers import RawSink
from fixtures_processes import ProcessStack, Service
from fixtures_relay import RelayStack, no_streams

from connector.config import ConnectorConfig
from connector.tunnel import TunnelClient, _reason, client_ssl_context
from relay.app import Relay
from relay.auth import new_token
from relay.config import RelayConfig
from relay.tls import ServerTls, TlsError


def write_pair(cert: trustme.LeafCert, directory: Path, name: str = "relay") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def start_tls_relay(
    nursery: trio.Nursery, tmp_path: Path, cert: trustme.LeafCert, name: str = "relay"
) -> RelayStack:
    cert_path, key_path = write_pair(cert, tmp_path / f"{name}-tls")
    config = RelayConfig(
        listen=("127.0.0.1", 0), tunnel_listen=("127.0.0.1", 0), data_dir=tmp_path / name,
        tls_cert=cert_path, tls_key=key_path,
    )  # fmt: skip
    relay = Relay(config)
    addresses = await nursery.start(relay.run)
    api_token, record = new_token("acme", "api", scopes=("admin",))
    await relay.store.add_token(record)
    return RelayStack(
        relay=relay,
        api_url=f"https://127.0.0.1:{addresses.http_port}",
        tunnel_url=f"wss://127.0.0.1:{addresses.tunnel_port}/v1/tunnel",
        api_token=api_token,
        nursery=nursery,
        tmp_path=tmp_path,
    )


@pytest.fixture
async def tls_stack(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> AsyncIterator[RelayStack]:
    yield await start_tls_relay(nursery, tmp_path, ca.issue_cert("127.0.0.1", "localhost"))


async def test_valid_certificate_https_api_and_wss_tunnel(
    tls_stack: RelayStack, ca: trustme.CA, ca_file: Path, raw_sink: RawSink
) -> None:
    async with httpx.AsyncClient(
        base_url=tls_stack.api_url,
        verify=trusting(ca),
        headers={"authorization": f"Bearer {tls_stack.api_token}"},
    ) as client:
        assert (await client.get("/healthz")).status_code == 200
        connector = await tls_stack.start_connector({"label": raw_sink.uri}, ca_file=ca_file)
        assert connector.tunnel.urls[0].startswith("wss://")
        response = await client.post("/v1/printers/label/jobs", content=b"over TLS both ways\n")
        assert response.status_code == 201, response.text
        (document,) = await raw_sink.wait_for(1)
        assert document.sha256 == hashlib.sha256(b"over TLS both ways\n").hexdigest()


async def test_tls_12_is_the_floor(tls_stack: RelayStack, ca: trustme.CA) -> None:
    assert tls_stack.relay.tls is not None
    assert tls_stack.relay.tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    port = int(tls_stack.api_url.rsplit(":", 1)[1])
    modern = trusting(ca)
    async with await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=modern) as stream:
        await stream.do_handshake()
        assert stream.version() in ("TLSv1.2", "TLSv1.3")
    old = trusting(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # which is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=old)
    with pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
    await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-host", "IP address mismatch"),
        ("expired", "certificate has expired"),
        ("unknown-ca", "unable to get local issuer certificate"),
    ],
)
async def test_connector_refuses_a_relay_it_cannot_verify(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA, ca_file: Path, case: str, expected: str
) -> None:
    if case == "wrong-host":
        cert = ca.issue_cert("relay.example.org")
    elif case == "expired":
        now = datetime.now(UTC)
        cert = ca.issue_cert(
            "127.0.0.1", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        )
    else:
        cert = trustme.CA().issue_cert("127.0.0.1")
    stack = await start_tls_relay(nursery, tmp_path, cert)
    token = await stack.token("connector", connector_id="site-1")
    client = TunnelClient(stack.tunnel_url, token, no_streams, ssl_context=client_ssl_context(ca_file))
    with pytest.raises(trio.BrokenResourceError) as info:
        await client._one_session()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert expected in _reason(info.value)
    assert "certificate verify failed" in _reason(info.value)
    assert client.sessions_opened == 0 and stack.relay.registry.sessions() == []


async def test_system_store_is_the_default_and_does_not_trust_a_private_ca(
    tls_stack: RelayStack,
) -> None:
    token = await tls_stack.token("connector", connector_id="site-1")
    client = TunnelClient(tls_stack.tunnel_url, token, no_streams)  # no CA file: the system store
    with pytest.raises(trio.BrokenResourceError) as info:
        await client._one_session()
    assert "certificate verify failed" in _reason(info.value)


def test_plain_ws_only_to_loopback_unless_insecure() -> None:
    for url in (
        "ws://127.0.0.1:8081/v1/tunnel",
        "ws://localhost:8081/v1/tunnel",
        "ws://[::1]:8081/v1/tunnel",
    ):
        ConnectorConfig(relay=url)
    for url in ("ws://10.0.0.5:8081/v1/tunnel", "ws://relay.example.com/v1/tunnel"):
        with pytest.raises(ValueError, match=r"not encrypted.*--insecure"):
            ConnectorConfig(relay=url)
        ConnectorConfig(relay=url, insecure=True)
    ConnectorConfig(relay="wss://relay.example.com/v1/tunnel")


def test_cli_refuses_plain_ws_to_a_remote_relay(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "printrelay.cli", "connector", "--relay", "ws://192.0.2.10:8081/v1/tunnel",
            "--token", "x", "--printer", "p=socket://127.0.0.1:9100",
            "--state-dir", str(tmp_path / "c")]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "not encrypted" in result.stderr and "--insecure" in result.stderr


def test_relay_config_needs_cert_and_key_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        RelayConfig(tls_cert=tmp_path / "c.pem")


def test_bad_reload_keeps_the_current_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    cert_path, key_path = write_pair(ca.issue_cert("127.0.0.1"), tmp_path)
    tls = ServerTls(cert_path, key_path)
    other_key = ca.issue_cert("127.0.0.1").private_key_pem.bytes()
    key_path.write_bytes(other_key)  # a key that does not match the certificate
    assert tls.reload() is False and tls.reloads == 0
    key_path.write_bytes(b"")
    with pytest.raises(TlsError, match=str(cert_path)):
        ServerTls(cert_path, key_path)


async def _peer_certificate(port: int, context: ssl.SSLContext) -> bytes:
    async with await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context) as stream:
        await stream.do_handshake()
        peer = stream.getpeercert(binary_form=True)
        assert peer is not None
        return bytes(peer)


async def test_sighup_reload_reaches_new_connections_and_keeps_old_ones(
    process_stack: ProcessStack, ca: trustme.CA, ca_file: Path, raw_sink: RawSink, tmp_path: Path
) -> None:
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(first, tmp_path / "tls")
    relay = process_stack.start_relay("--tls-cert", str(cert_path), "--tls-key", str(key_path))
    context = trusting(ca)
    port = process_stack.http_port
    with trio.fail_after(20):
        while True:
            try:
                assert await _peer_certificate(port, context) == der(first)
                break
            except OSError:
                await trio.sleep(0.05)  # an external process: nothing to wait on but its port
    token = process_stack.token("connector", "acme", "--connector", "site-1")
    connector = Service(
        "connector",
        ["connector", "--relay", f"wss://127.0.0.1:{process_stack.tunnel_port}/v1/tunnel", "--ca-file",
         str(ca_file), "--state-dir", str(tmp_path / "connector"), "--printer", f"label={raw_sink.uri}"],
        tmp_path / "connector.log", env={"PRINTRELAY_TOKEN": token},
    )  # fmt: skip
    connector.start()
    process_stack.services.append(connector)
    async with httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}",
        verify=context,
        headers={"authorization": f"Bearer {process_stack.api_token}"},
    ) as client:
        with trio.fail_after(20):
            while True:  # another process: nothing to wait on but its answers
                if any(p["online"] for p in (await client.get("/v1/printers")).json()["printers"]):
                    break
                await trio.sleep(0.05)
        # A connection opened before the reload, used after it.
        old = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=context, https_compatible=True
        )
        await old.do_handshake()

        write_pair(second, tmp_path / "tls")
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while True:
                if await _peer_certificate(port, context) == der(second):
                    break
                await trio.sleep(0.05)

        assert old.getpeercert(binary_form=True) == der(first)
        await old.send_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while chunk := await old.receive_some(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        await trio.aclose_forcefully(old)

        # The connector's session lived through the reload: a job still goes through it.
        response = await client.post("/v1/printers/label/jobs", content=b"after reload\n")
        assert response.status_code == 201
        await raw_sink.wait_for(1, within=15)
    assert relay.log().count("registered from") == 1, process_stack.logs()
    assert "TLS certificate reloaded" in relay.log()
