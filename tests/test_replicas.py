"""Two relay replicas in this process on one PostgreSQL: what an admin or a client asks of one replica is
done for a connector whose session is held by the other (adoption, printer changes, token revocation,
cancel, live job events)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from fixtures_printers import RawSink, free_port
from prometheus_client.parser import text_string_to_metric_families

from connector.app import Connector
from connector.config import ConnectorConfig, parse_printer
from relay.app import Relay
from relay.auth import TokenCache, new_token
from relay.config import RelayConfig
from relay.store.base import Notice, StoreError, TokenRecord


@dataclass
class Pair:
    a: Relay
    b: Relay
    api: tuple[str, str]
    tunnel: tuple[str, str]
    token: str

    def client(self, n: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.api[n], headers={"authorization": f"Bearer {self.token}"}, timeout=30
        )


@pytest.fixture
async def pair(nursery: trio.Nursery, tmp_path: Path, postgres_url: str) -> AsyncIterator[Pair]:
    relays, api, tunnel = [], [], []
    for n in range(2):
        relay = Relay(
            RelayConfig(
                listen=("127.0.0.1", 0), tunnel_listen=("127.0.0.1", 0), data_dir=tmp_path / f"relay-{n}",
                database_url=postgres_url, secret_key_file=tmp_path / "secret.key", rate_limit=0,
            )
        )  # fmt: skip
        addresses = await nursery.start(relay.run)
        relays.append(relay)
        api.append(f"http://127.0.0.1:{addresses.http_port}")
        tunnel.append(f"ws://127.0.0.1:{addresses.tunnel_port}/v1/tunnel")
    token, record = new_token("acme", "api", scopes=("admin",))
    await relays[0].store.add_token(record)
    yield Pair(relays[0], relays[1], (api[0], api[1]), (tunnel[0], tunnel[1]), token)


async def connect_to_b(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path, raw_sink: RawSink, printers: list[str] | None = None
) -> Connector:
    """A connector whose only session is on replica B, discovering ``raw_sink`` by a loopback scan."""
    secret, record = new_token("acme", "connector", connector_id="site-1")
    await pair.a.store.add_token(record)
    connector = Connector(
        ConnectorConfig(
            relay=pair.tunnel[1], token=secret, sessions=1, state_dir=tmp_path / "connector",
            printer=[parse_printer(p) for p in printers or []],
            discover=True, discover_mdns=False, discover_cups=False, discover_cidr=["127.0.0.1/32"],
            discover_ipp_port=[], discover_raw_port=[raw_sink.port], status_interval=0.5,
        )
    )  # fmt: skip
    await nursery.start(connector.run)
    with trio.fail_after(10):
        while not pair.b.registry.sessions():
            await pair.b.registry.changed.wait()
    assert not pair.a.registry.sessions()
    return connector


async def final_state(client: httpx.AsyncClient, job_id: str) -> str:
    """Follows the job's live events (SSE) on that replica until it ends."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/watch") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                state = json.loads(line[6:]).get("state")
                if state in ("completed", "failed", "canceled", "expired"):
                    return str(state)
    raise AssertionError("the event stream ended before the job did")


async def test_adopt_change_and_remove_through_a_replica_without_the_session(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path, raw_sink: RawSink
) -> None:
    connector = await connect_to_b(pair, nursery, tmp_path, raw_sink)
    uri = f"socket://127.0.0.1:{raw_sink.port}"
    async with pair.client(0) as client:
        with trio.fail_after(15):  # the candidate reaches B over the tunnel, A reads it from the store
            while True:
                if candidates := (await client.get("/v1/candidates")).json()["candidates"]:
                    break
                await trio.sleep(0.05)  # candidates have no event stream: polled
        assert [(c["connector_id"], c["uri"]) for c in candidates] == [("site-1", uri)]

        reply = await client.post("/v1/printers", json={"uri": uri, "id": "front-desk"})
        assert reply.status_code == 201, reply.text
        assert reply.json()["state"] == "idle"
        assert "front-desk" in connector.printers  # B asked the connector for A
        assert (await client.get("/v1/candidates")).json()["candidates"] == []

        reply = await client.post("/v1/printers/front-desk/jobs", content=b"adopted via A")
        assert reply.status_code == 201, reply.text
        job_id = reply.json()["id"]
        with trio.fail_after(20):
            assert await final_state(client, job_id) == "completed"
        (document,) = await raw_sink.wait_for(1)
        assert document.path.read_bytes() == b"adopted via A"

        refused = await client.post("/v1/printers", json={"uri": "ftp://x/y", "id": "bad"})
        assert refused.status_code == 400 and "unsupported URI" in refused.json()["error"]

        reply = await client.delete("/v1/printers/front-desk")
        assert reply.status_code == 200 and reply.json()["printer_state"] == "removed"
        assert "front-desk" not in connector.printers
    assert connector.tunnel.sessions_opened == 1


async def test_revoking_a_token_on_one_replica_closes_its_session_on_the_other(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path, raw_sink: RawSink
) -> None:
    await connect_to_b(pair, nursery, tmp_path, raw_sink, [f"p={raw_sink.uri}"])
    (connector_token,) = [t for t in await pair.a.store.list_tokens("acme") if t.kind == "connector"]
    assert await pair.a.store.revoke_token(connector_token.id, time.time())  # as `printrelay token revoke`
    with trio.fail_after(10):
        while pair.b.registry.sessions():
            await pair.b.registry.changed.wait()


async def test_cancel_and_watch_a_job_streaming_on_the_other_replica(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path, raw_sink: RawSink
) -> None:
    stalled = trio.Event()

    async def stalling_printer(stream: trio.SocketStream) -> None:
        stalled.set()  # takes the connection, then reads nothing: the job stays printing
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, stalling_printer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    await connect_to_b(pair, nursery, tmp_path, raw_sink, [f"p=socket://127.0.0.1:{port}"])
    async with pair.client(0) as a, pair.client(1) as b:
        reply = await a.post("/v1/printers/p/jobs", content=b"x" * 4_000_000)
        assert reply.status_code == 201, reply.text
        job_id = reply.json()["id"]
        seen: list[str] = []

        async def watch_on_a() -> None:
            seen.append(await final_state(a, job_id))

        async with trio.open_nursery() as inner:
            inner.start_soon(watch_on_a)
            with trio.fail_after(20):
                await stalled.wait()
                reply = await a.post(f"/v1/jobs/{job_id}/cancel")
                assert reply.status_code in (200, 202), reply.text
        assert seen == ["canceled"], seen
        assert (await b.get(f"/v1/jobs/{job_id}")).json()["state"] == "canceled"


async def test_metrics_show_every_replicas_sessions_and_the_notice_lag(
    pair: Pair, nursery: trio.Nursery, tmp_path: Path, raw_sink: RawSink
) -> None:
    await connect_to_b(pair, nursery, tmp_path, raw_sink, [f"p={raw_sink.uri}"])
    async with pair.client(0) as client:
        reply = await client.post("/v1/printers/p/jobs", content=b"counted")
        assert reply.status_code == 201, reply.text
        with trio.fail_after(20):
            assert await final_state(client, reply.json()["id"]) == "completed"
    port = await nursery.start(pair.a.health.listener().serve, "127.0.0.1", 0)
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, name: str, **labels: str) -> float:
        return next(
            s.value for s in families[family].samples if s.name == name and labels.items() <= s.labels.items()
        )

    sessions = "printrelay_replica_tunnel_sessions"
    assert value(sessions, sessions, replica=pair.b.replica_id) == 1
    assert value(sessions, sessions, replica=pair.a.replica_id) == 0
    assert value(TUNNEL, TUNNEL) == 0  # A itself holds none
    calls = "printrelay_store_call_seconds"
    assert value(calls, f"{calls}_count", kind="read") > 0
    assert value(calls, f"{calls}_count", kind="write") > 0
    lag = "printrelay_store_notice_lag_seconds"
    assert value(lag, f"{lag}_count") >= 2  # B's "sending" and "completed" of the job A accepted
    assert value(lag, f"{lag}_sum") < 5


TUNNEL = "printrelay_tunnel_sessions"


async def test_a_connector_that_met_a_lone_replica_opens_its_second_session_when_another_starts(
    nursery: trio.Nursery, tmp_path: Path, postgres_url: str
) -> None:
    ports = [free_port() for _ in range(4)]

    def relay(n: int) -> Relay:
        return Relay(
            RelayConfig(
                listen=("127.0.0.1", ports[2 * n]), tunnel_listen=("127.0.0.1", ports[2 * n + 1]),
                data_dir=tmp_path / f"relay-{n}", database_url=postgres_url,
                secret_key_file=tmp_path / "secret.key",
            )
        )  # fmt: skip

    a = relay(0)
    await nursery.start(a.run)
    secret, record = new_token("acme", "connector", connector_id="site-1")
    await a.store.add_token(record)
    connector = Connector(
        ConnectorConfig(
            relay=[f"ws://127.0.0.1:{ports[1]}/v1/tunnel", f"ws://127.0.0.1:{ports[3]}/v1/tunnel"],
            token=secret, sessions=2, state_dir=tmp_path / "connector",
        )
    )  # fmt: skip
    await nursery.start(connector.run)
    with trio.fail_after(10):
        while not a.registry.sessions():
            await a.registry.changed.wait()
    assert connector.tunnel.replicas_alive == 1 and len(connector.tunnel.sessions) == 1

    b = relay(1)
    await nursery.start(b.run)
    with trio.fail_after(15):  # B joins, A hears it and tells the connector, which dials B
        while not b.registry.sessions():
            await b.registry.changed.wait()
    assert connector.tunnel.replicas_alive == 2
    assert connector.tunnel.replicas == {a.replica_id, b.replica_id}


async def test_a_replica_with_another_secret_key_refuses_to_start(
    pair: Pair, tmp_path: Path, postgres_url: str
) -> None:
    stray = Relay(
        RelayConfig(
            listen=("127.0.0.1", 0), tunnel_listen=("127.0.0.1", 0), data_dir=tmp_path / "relay-stray",
            database_url=postgres_url,  # and the default key file in its own data dir: a new key
        )
    )  # fmt: skip
    with pytest.RaisesGroup(
        pytest.RaisesExc(StoreError, match="not the key the database's other relays use"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(stray.run)
    assert pair.a.secrets_at_rest.fingerprint == pair.b.secrets_at_rest.fingerprint


async def test_an_api_token_revoked_on_one_replica_is_refused_by_the_other_at_once(pair: Pair) -> None:
    secret, record = new_token("acme", "api", scopes=("jobs:read",))
    await pair.b.store.add_token(record)
    revoked = trio.Event()
    pair.a.store.on_notice(lambda notice: revoked.set() if notice.kind == "tokens" else None)
    async with httpx.AsyncClient(
        base_url=pair.api[0], headers={"authorization": f"Bearer {secret}"}, timeout=10
    ) as client:
        assert (await client.get("/v1/jobs")).status_code == 200  # A keeps the record a moment
        assert await pair.b.store.revoke_token(record.id, time.time())
        with trio.fail_after(5):
            await revoked.wait()  # B's NOTIFY
        refused = await client.get("/v1/jobs")
    assert refused.status_code == 401 and refused.json() == {"error": "token revoked"}


async def test_the_token_cache_keeps_only_what_exists_and_never_a_read_that_overlapped_a_revocation() -> None:
    records = {"t1": new_token("acme", "api")[1], "t2": new_token("acme", "api")[1]}
    reads: list[str] = []
    gate = trio.Event()

    class Store:
        async def get_token(self, token_id: str) -> TokenRecord | None:
            reads.append(token_id)
            if token_id == "t2":
                await gate.wait()
            return records.get(token_id)

    cache = TokenCache(Store(), ttl=60, max_entries=1)
    assert await cache.get_token("t1") is records["t1"]
    assert await cache.get_token("t1") is records["t1"] and reads == ["t1"]  # kept
    assert await cache.get_token("nope") is None and await cache.get_token("nope") is None
    assert reads.count("nope") == 2  # misses are not kept
    cache.heard(Notice("tokens", "t1"))
    assert await cache.get_token("t1") is records["t1"] and reads.count("t1") == 2  # dropped, read again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.get_token, "t2")
        await trio.testing.wait_all_tasks_blocked()
        cache.heard(Notice("tokens", ""))  # a revocation while t2 was being read
        gate.set()
    await cache.get_token("t2")
    assert reads.count("t2") == 2  # the overlapping read was not kept
    assert await cache.get_token("t2") is records["t2"] and reads.count("t2") == 2
    assert await cache.get_token("t1") is records["t1"] and reads.count("t1") == 3  # max_entries=1: evicted
