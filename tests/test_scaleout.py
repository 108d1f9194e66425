"""Relay replicas on PostgreSQL with real processes: the database restarting under them, replicas killed and
drained while jobs stream, connectors holding sessions to several replicas. Every job that got a 201
prints exactly once."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import httpx
import pytest
import trio
from fixtures_postgres import PostgresServer
from fixtures_printers import RawSink
from fixtures_processes import ProcessStack

pytestmark = pytest.mark.e2e


async def submit(client: httpx.AsyncClient, printer: str, body: bytes) -> httpx.Response:
    return await client.post(f"/v1/printers/{printer}/jobs", content=body)


async def wait_all_completed(client: httpx.AsyncClient, ids: set[str], within: float = 120) -> None:
    with trio.fail_after(within):
        while True:
            jobs = (await client.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
            states = {job["id"]: job["state"] for job in jobs if job["id"] in ids}
            bad = {i: s for i, s in states.items() if s in ("failed", "canceled", "expired")}
            assert not bad, bad
            if len(states) == len(ids) and set(states.values()) == {"completed"}:
                return
            await trio.sleep(0.2)  # another process: polled


async def test_a_relay_rides_out_a_database_restart(
    pg_process_stack: ProcessStack, postgres_server: PostgresServer, raw_sink: RawSink
) -> None:
    stack = pg_process_stack
    stack.start_relay()
    await stack.wait_ready()
    stack.start_connector({"p": raw_sink.uri})
    await stack.wait_printers_online("p")
    bodies = {}
    async with stack.client() as client:
        for n in range(5):
            body = f"before {n} ".encode() + os.urandom(100_000)
            response = await submit(client, "p", body)
            assert response.status_code == 201, response.text
            bodies[response.json()["id"]] = body
        postgres_server.stop()
        try:
            refused = await submit(client, "p", b"while the database is down")
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            assert "database is unavailable" in refused.json()["error"]
            assert (await client.get("/readyz")).status_code == 503
        finally:
            postgres_server.start()
        with trio.fail_after(60):  # the relay comes back by itself: no restart
            while (await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110  (another process)
                await trio.sleep(0.2)
        for n in range(5):
            body = f"after {n} ".encode() + os.urandom(100_000)
            response = await submit(client, "p", body)
            assert response.status_code == 201, response.text
            bodies[response.json()["id"]] = body
        await wait_all_completed(client, set(bodies))
    printed = Counter(d.sha256 for d in await raw_sink.wait_for(len(bodies), within=60))
    assert printed == Counter(hashlib.sha256(b).hexdigest() for b in bodies.values())
