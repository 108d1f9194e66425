"""Print from a URL: the SSRF rule (relay.egress), the fetch (relay.fetch), and both front doors (REST
``source_url``, IPP Print-URI / Send-URI) with real servers, a real relay and real printers.

The address rule is checked on the address each connection is opened to. In-process tests give the
fetcher a resolver of their own (names that resolve to public test addresses, to loopback, or first to
one and then to the other) and a network that carries a public test address to a server on loopback, so
the rule, redirects and DNS rebinding are exercised with real HTTP and no outside network.
"""

from __future__ import annotations

import ipaddress
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import pytest
import trio
from fixtures_peers import DOCUMENT, DocumentServer
from fixtures_printers import RawSink, run_ipptool
from fixtures_processes import printrelay
from fixtures_relay import RelayStack

from relay import egress, fetch
from relay.egress import Address

PUBLIC = ipaddress.ip_address("100.1.2.3")  # a global address, carried to the local server below
OTHER_PUBLIC = ipaddress.ip_address("100.1.2.4")


@dataclass
class MadeUpNetwork(httpcore.AsyncNetworkBackend):
    """DNS and routing of a small made-up internet: names to addresses (a name may answer differently
    each time it is asked), and the public test addresses carried to a server on loopback."""

    routes: dict[Address, int]
    names: dict[str, list[list[Address]]]
    connected: list[str] = field(default_factory=list)
    inner: httpcore.AsyncNetworkBackend = field(default_factory=httpcore.TrioBackend)

    async def resolve(self, host: str, port: int) -> list[Address]:
        if host in self.names:
            answers = self.names[host]
            return answers.pop(0) if len(answers) > 1 else answers[0]
        return [ipaddress.ip_address(host.strip("[]"))]

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        address = ipaddress.ip_address(host)
        if address in self.routes:
            host, port = "127.0.0.1", self.routes[address]
        return await self.inner.connect_tcp(host, port, timeout=timeout)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


def fetcher_for(network: MadeUpNetwork, **limits: Any) -> fetch.Fetcher:
    settings: dict[str, Any] = {"max_bytes": 1024 * 1024, **limits}
    return fetch.Fetcher(fetch.FetchLimits(**settings), resolver=network.resolve, network=network)


def network_for(server: DocumentServer) -> MadeUpNetwork:
    loopback = [ipaddress.ip_address("127.0.0.1")]
    return MadeUpNetwork(
        routes={PUBLIC: server.port, OTHER_PUBLIC: server.port},
        names={
            "docs.example": [[PUBLIC]],
            "cdn.example": [[OTHER_PUBLIC]],
            "evil.example": [loopback],
            "both.example": [[PUBLIC, ipaddress.ip_address("10.0.0.7")]],
            # a rebinding name: public when first asked, loopback ever after
            "rebind.example": [[PUBLIC], loopback],
            "xn--bcher-kva.example": [[PUBLIC]],  # bücher.example
        },
    )


async def fetch_all(
    fetcher: fetch.Fetcher, source: fetch.Source, owner: str = ""
) -> tuple[bytes, fetch.Download]:
    async with fetcher.open(source, owner=owner) as download:
        data = b"".join([chunk async for chunk in download.body])
    return data, download


# --- the address rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
        "fd00:ec2::254", "fe80::1", "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "::ffff:127.0.0.1",
        "64:ff9b::7f00:1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:f5ff:fffe", "64:ff9b:1::a00:1",
        "::ffff:0:127.0.0.1", "::127.0.0.1", "::10.0.0.1", "fec0::1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str) -> None:
    assert egress.refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["100.1.2.3", "8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert egress.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "source_url must be a non-empty string"),
        ({"source_url": "file:///etc/passwd"}, "scheme must be one of http, https, ftp"),
        ({"source_url": "gopher://example.com/"}, "scheme must be one of"),
        ({"source_url": "http:///nohost"}, "has no host"),
        ({"source_url": "http://example.com/a b"}, "whitespace"),
        ({"source_url": "http://example.com/" + "a" * 3000}, "exceeds 2048"),
        ({"source_url": "http://example.com/", "url": "x"}, "unknown field 'url'"),
        ({"source_url": "http://example.com/", "source_headers": {"Host": "x"}}, "set by the relay"),
        ({"source_url": "http://example.com/", "source_headers": {"X-A": "a\r\nB: c"}}, "printable ASCII"),
        ({"source_url": "http://example.com/", "source_headers": {"X-A": "caf\u00e9"}}, "printable ASCII"),
        ({"source_url": "http://" + "ü" * 64 + ".example/"}, "not a valid name"),
        ({"source_url": "http://example.com/", "source_headers": {"bad name": "v"}}, "not a header name"),
        ({"source_url": "ftp://example.com/f", "source_headers": {"X-A": "v"}}, "not ftp"),
        ({"source_url": "http://example.com/", "document_format": "pdf"}, "must be a MIME type"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(body: dict[str, Any], message: str) -> None:
    with pytest.raises(fetch.FetchError) as refused:
        fetch.parse_source(body)
    assert refused.value.failure is fetch.Failure.BAD_SOURCE
    assert message in refused.value.message


# --- the fetcher, in a made-up network ----------------------------------------------------------


async def test_a_public_source_is_fetched_whole_with_its_format(documents: DocumentServer) -> None:
    network = network_for(documents)
    data, download = await fetch_all(fetcher_for(network), fetch.Source("http://docs.example/doc"))
    assert data == DOCUMENT
    assert (download.length, download.document_format) == (len(DOCUMENT), "application/postscript")
    assert network.connected == [str(PUBLIC)]


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/doc",  # a name that resolves to loopback
        "http://both.example/doc",  # one public and one private address: the name is refused
        "http://127.0.0.1:{port}/doc",
        "http://[::1]:{port}/doc",
        "http://10.1.2.3/doc",
        "http://169.254.169.254/latest/meta-data/",
        # redirects from an allowed server to forbidden ones
        "http://docs.example/redirect?to=http://127.0.0.1:{port}/doc",
        "http://docs.example/redirect?to=http://evil.example/doc",
        "http://docs.example/redirect?to=http://169.254.169.254/latest/meta-data/",
    ],
)
async def test_non_public_destinations_are_refused_before_connecting(
    documents: DocumentServer, url: str
) -> None:
    network = network_for(documents)
    with pytest.raises(fetch.FetchError) as refused:
        await fetch_all(fetcher_for(network), fetch.Source(url.format(port=documents.port)))
    assert refused.value.failure is fetch.Failure.BAD_SOURCE
    assert "non-public address" in refused.value.message and "fetch_allow_private" in refused.value.message
    assert "/doc" not in documents.paths() and all(ip in (str(PUBLIC),) for ip in network.connected)


async def test_dns_rebinding_cannot_reach_loopback(documents: DocumentServer) -> None:
    """The name answers a public address when first asked and loopback afterwards: every connection
    is opened to the address that was checked, so loopback is never connected to."""
    network = network_for(documents)
    source = fetch.Source("http://rebind.example/redirect?to=http://rebind.example:81/doc")
    with pytest.raises(fetch.FetchError) as refused:
        await fetch_all(fetcher_for(network), source)
    # which address it resolved to, the client is not told (the relay's network stays its own)
    assert "rebind.example resolves to a non-public address" in refused.value.message
    assert "127.0.0.1" not in refused.value.message
    assert network.connected == [str(PUBLIC)]


async def test_credentials_go_to_their_own_origin_only(documents: DocumentServer) -> None:
    network = network_for(documents)
    source = fetch.Source(
        "http://reader:s3cret@docs.example/redirect?to=http://cdn.example/doc",
        headers={"X-Api-Key": "k-123"},
    )
    data, _ = await fetch_all(fetcher_for(network), source)
    assert data == DOCUMENT
    (_, first_headers), (second, second_headers) = documents.seen
    assert first_headers["x-api-key"] == "k-123" and first_headers["authorization"].startswith("Basic ")
    assert second == "/doc" and "x-api-key" not in second_headers and "authorization" not in second_headers


async def test_limits_of_size_time_and_answers(documents: DocumentServer) -> None:
    network = network_for(documents)
    small = fetcher_for(network, max_bytes=1000)
    with pytest.raises(fetch.FetchError) as big:
        await fetch_all(small, fetch.Source("http://docs.example/big"))
    assert big.value.failure is fetch.Failure.TOO_LARGE and "max_job_bytes=1000" in big.value.message
    with pytest.raises(fetch.FetchError) as stalled:
        await fetch_all(fetcher_for(network, read_timeout=0.5), fetch.Source("http://docs.example/stall"))
    assert stalled.value.failure is fetch.Failure.TIMEOUT
    with pytest.raises(fetch.FetchError) as whole:
        await fetch_all(fetcher_for(network, timeout=0.5), fetch.Source("http://docs.example/stall"))
    assert whole.value.failure is fetch.Failure.TIMEOUT and "more than 0.5 s" in whole.value.message
    with pytest.raises(fetch.FetchError) as missing:
        await fetch_all(fetcher_for(network), fetch.Source("http://docs.example/missing?sig=SECRET"))
    assert missing.value.failure is fetch.Failure.UNREACHABLE
    assert missing.value.message == "http://docs.example answered HTTP 404, not 200"
    loop = "http://docs.example/redirect?to=http://docs.example/redirect%3Fto%3Dhttp://docs.example/doc"
    with pytest.raises(fetch.FetchError) as hops:
        await fetch_all(fetcher_for(network, max_redirects=1), fetch.Source(loop))
    assert "more than 1 redirects" in hops.value.message


# --- through the relay --------------------------------------------------------------------------


async def test_rest_refuses_non_public_sources_and_keeps_nothing(
    relay_stack: RelayStack, raw_sink: RawSink, documents: DocumentServer
) -> None:
    await relay_stack.start_connector({"raw": raw_sink.uri})
    port = documents.port
    async with relay_stack.client() as api:
        for url in (
            f"http://127.0.0.1:{port}/doc", f"http://[::1]:{port}/doc", f"http://localhost:{port}/doc",
            "http://10.1.2.3/doc", "http://169.254.169.254/latest/meta-data/",
        ):  # fmt: skip
            answer = await api.post("/v1/printers/raw/jobs", json={"source_url": url})
            assert answer.status_code == 400, answer.text
            assert "non-public address" in answer.json()["error"], answer.text
            assert "fetch_allow_private" in answer.json()["error"]
        answer = await api.post("/v1/printers/raw/jobs", json={"source_url": "file:///etc/passwd"})
        assert answer.status_code == 400 and "scheme" in answer.json()["error"]
        assert (await api.get("/v1/jobs")).json()["jobs"] == []
    assert documents.seen == []


@pytest.mark.parametrize("relay_overrides", [{"fetch_allow_private": True}])
async def test_rest_prints_from_a_url_and_forgets_its_credentials(
    relay_stack: RelayStack, raw_sink: RawSink, documents: DocumentServer, ftp_server: tuple[int, Path]
) -> None:
    await relay_stack.start_connector({"raw": raw_sink.uri})
    ftp_port, ftp_root = ftp_server
    (ftp_root / "doc.ps").write_bytes(DOCUMENT)
    async with relay_stack.client() as api:
        created = await api.post(
            "/v1/printers/raw/jobs?title=from-url",
            json={
                "source_url": f"http://reader:pw-9f8e@127.0.0.1:{documents.port}/doc?signature=sig-7d6c",
                "source_headers": {"Authorization-Extra": "tok-5b4a"},
            },
        )
        assert created.status_code == 201, created.text
        job = created.json()
        assert (job["size"], job["document_format"]) == (len(DOCUMENT), "application/postscript")
        from_ftp = await api.post(
            "/v1/printers/raw/jobs", json={"source_url": f"ftp://127.0.0.1:{ftp_port}/doc.ps"}
        )
        assert from_ftp.status_code == 201, from_ftp.text
        missing = await api.post(
            "/v1/printers/raw/jobs", json={"source_url": f"ftp://127.0.0.1:{ftp_port}/x"}
        )
        assert missing.status_code == 502 and "550" in missing.json()["error"], missing.text
    for done in (job["id"], from_ftp.json()["id"]):
        assert (await relay_stack.wait_job(done))["state"] == "completed"
    printed = await raw_sink.wait_for(2)
    assert [document.path.read_bytes() for document in printed] == [DOCUMENT, DOCUMENT]
    _, headers = documents.seen[0]
    assert headers["authorization-extra"] == "tok-5b4a" and headers["authorization"].startswith("Basic ")
    # nothing of the URL's credentials is kept: not in the database, the spool, or the job's history
    for path in (relay_stack.tmp_path / "relay").rglob("*"):
        if path.is_file():
            kept = path.read_bytes()
            for secret in (b"pw-9f8e", b"sig-7d6c", b"tok-5b4a"):
                assert secret not in kept, (path, secret)


IPP_URI_TEST = """
{
    NAME "Print-URI with a bad scheme"
    OPERATION Print-URI
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name $user
    ATTR uri document-uri "bogus://bogus"
    STATUS client-error-uri-scheme-not-supported
}
{
    NAME "Print-URI of a loopback address"
    OPERATION Print-URI
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name $user
    ATTR uri document-uri $loopback
    STATUS client-error-document-access-error
}
{
    NAME "the URI schemes"
    OPERATION Get-Printer-Attributes
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR keyword requested-attributes operations-supported,reference-uri-schemes-supported
    STATUS successful-ok
    EXPECT operations-supported WITH-VALUE 3
    EXPECT operations-supported WITH-VALUE 7
    EXPECT reference-uri-schemes-supported WITH-ALL-VALUES "/^(http|https|ftp)$$/" COUNT 3
}
"""


async def test_ipp_print_uri_refuses_bad_schemes_and_non_public_sources(
    relay_stack: RelayStack, raw_sink: RawSink, documents: DocumentServer, tmp_path: Path
) -> None:
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    await relay_stack.start_connector({"raw": raw_sink.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    test = tmp_path / "uri.test"
    test.write_text(IPP_URI_TEST)
    loopback = f"http://127.0.0.1:{documents.port}/doc"
    uri = f"ipp://acme:{relay_stack.api_token}@127.0.0.1:{port}/ipp/print/raw"
    code, report = await trio.to_thread.run_sync(lambda: run_ipptool(uri, test, tmp_path, loopback=loopback))
    assert code == 0, report
    assert documents.seen == []


@pytest.mark.parametrize("relay_overrides", [{"fetch_allow_private": True}])
async def test_submit_url_from_the_command_line(
    relay_stack: RelayStack, raw_sink: RawSink, documents: DocumentServer
) -> None:
    await relay_stack.start_connector({"raw": raw_sink.uri})
    where = ("--relay", relay_stack.api_url, "--token", relay_stack.api_token, "--printer", "raw")
    url = f"http://127.0.0.1:{documents.port}/doc"
    done = await trio.to_thread.run_sync(
        lambda: printrelay("submit", *where, "--url", url, "--header", "X-Api-Key: k-42", "--wait")
    )
    assert len(done.stdout.strip()) >= 20, done  # the job id
    assert [document.path.read_bytes() for document in await raw_sink.wait_for(1)] == [DOCUMENT]
    assert documents.seen[0][1]["x-api-key"] == "k-42"
    missing = await trio.to_thread.run_sync(
        lambda: printrelay("submit", *where, "--url", url.replace("/doc", "/gone"), check=False)
    )
    assert missing.returncode != 0 and "answered HTTP 404, not 200" in missing.stderr, missing
    both = await trio.to_thread.run_sync(lambda: printrelay("submit", *where, check=False))
    assert both.returncode != 0 and "give a FILE to upload or --url" in both.stderr, both


async def test_names_and_paths_beyond_ascii_are_encoded(documents: DocumentServer) -> None:
    network = network_for(documents)
    data, _ = await fetch_all(fetcher_for(network), fetch.Source("http://bücher.example/doc"))
    assert data == DOCUMENT
    with pytest.raises(fetch.FetchError) as missing:
        await fetch_all(fetcher_for(network), fetch.Source("http://docs.example/Rechnung_März.pdf?q=ü"))
    assert missing.value.failure is fetch.Failure.UNREACHABLE  # the server's 404, not a crash
    assert documents.paths()[-1] == "/Rechnung_M%C3%A4rz.pdf?q=%C3%BC"


async def test_the_deadline_bounds_the_network_not_the_reader(documents: DocumentServer) -> None:
    """A reader that takes its time after the last byte (a job being stored) is not a late fetch."""
    # Roomy enough for a loaded host to finish the loopback fetch itself within it.
    fetcher = fetcher_for(network_for(documents), timeout=3)
    async with fetcher.open(fetch.Source("http://docs.example/doc")) as download:
        data = b"".join([chunk async for chunk in download.body])
        await trio.sleep(3.5)  # the reader's own work, past the fetch's deadline
    assert data == DOCUMENT


async def test_fetches_at_once_are_bounded_per_tenant(documents: DocumentServer) -> None:
    fetcher = fetcher_for(network_for(documents), max_fetches_per_owner=1, max_fetches=2)
    async with fetcher.open(fetch.Source("http://docs.example/stall"), owner="acme"):
        with pytest.raises(fetch.FetchError) as busy:
            await fetch_all(fetcher, fetch.Source("http://docs.example/doc"), owner="acme")
        assert busy.value.failure is fetch.Failure.BUSY and "retry" in busy.value.message
        data, _ = await fetch_all(fetcher, fetch.Source("http://docs.example/doc"), owner="globex")
        assert data == DOCUMENT
    data, _ = await fetch_all(fetcher, fetch.Source("http://docs.example/doc"), owner="acme")
    assert data == DOCUMENT


async def test_a_resolver_that_never_answers_is_a_timeout(documents: DocumentServer) -> None:
    async def silent(host: str, port: int) -> list[Address]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    fetcher = fetch.Fetcher(fetch.FetchLimits(max_bytes=1024, connect_timeout=0.2), resolver=silent)
    for url in ("http://docs.example/doc", "ftp://docs.example/doc"):
        with pytest.raises(fetch.FetchError) as late:
            await fetch_all(fetcher, fetch.Source(url))
        assert late.value.failure is fetch.Failure.TIMEOUT, late.value.message


@pytest.mark.parametrize("relay_overrides", [{"fetch_allow_private": True}])
async def test_a_retried_submit_with_its_idempotency_key_does_not_fetch_again(
    relay_stack: RelayStack, raw_sink: RawSink, documents: DocumentServer
) -> None:
    await relay_stack.start_connector({"raw": raw_sink.uri})
    body = {"source_url": f"http://127.0.0.1:{documents.port}/doc"}
    async with relay_stack.client() as api:
        first = await api.post("/v1/printers/raw/jobs", json=body, headers={"idempotency-key": "k1"})
        again = await api.post("/v1/printers/raw/jobs", json=body, headers={"idempotency-key": "k1"})
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    assert documents.paths().count("/doc") == 1
