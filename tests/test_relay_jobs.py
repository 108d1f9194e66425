"""A job's path through the real relay, tunnel and connector, in one process: on SQLite, and on PostgreSQL
(where payloads larger than 64 KiB live in the database as chunk rows)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest
import trio
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

pytestmark = pytest.mark.parametrize("relay_backend", ["sqlite", "postgres"])


async def test_job_travels_to_a_raw_printer(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    body = os.urandom(3 * 1024 * 1024 + 17)
    async with relay_stack.client() as client:
        response = await client.post(
            "/v1/printers/label/jobs?title=hello", content=body, headers={"content-type": "application/pdf"}
        )
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["state"] == "queued" and job["size"] == len(body) and job["printer_id"] == "label"
    done = await relay_stack.wait_job(job["id"])
    assert done["state"] == "completed", done
    [document] = await raw_sink.wait_for(1)
    assert document.sha256 == hashlib.sha256(body).hexdigest()
    async with relay_stack.client() as client:
        events = (await client.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
    assert [e["state"] for e in events] == ["queued", "sending", "printing", "completed"]


async def test_printers_are_listed_with_their_connector(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"a": raw_sink.uri, "b": "socket://127.0.0.1:9"})
    async with relay_stack.client() as client:
        printers = (await client.get("/v1/printers")).json()["printers"]
    assert {p["id"] for p in printers} == {"a", "b"}
    assert all(p["connector_id"] == "site-1" and p["online"] for p in printers)


async def test_unknown_printer_and_bad_token(relay_stack: RelayStack) -> None:
    async with relay_stack.client() as client:
        response = await client.post("/v1/printers/p9/jobs", content=b"x")
        assert response.status_code == 404
        assert response.json()["error"] == "printer p9 not found"
    async with relay_stack.client("pra_aaaaaaaaaa_" + "x" * 43) as client:
        response = await client.get("/v1/jobs")
        assert response.status_code == 401


async def test_mistakes_are_refused_not_ignored(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})

    async def chunked_empty() -> AsyncIterator[bytes]:
        return
        yield b""  # an async generator that sends no bytes: a chunked body that ends at once

    async with relay_stack.client() as client:
        misspelt = await client.post(
            "/v1/printers/label/jobs", params={"side": "two-sided-long-edge"}, content=b"x"
        )
        assert misspelt.status_code == 400
        error = misspelt.json()["error"]
        assert (
            error.startswith("unknown parameter 'side'; a job takes ")
            and "sides" in error
            and "title" in error
        )
        for body in (b"", chunked_empty()):
            empty = await client.post("/v1/printers/label/jobs", content=body)
            assert empty.status_code == 400, empty.text
            assert empty.json()["error"] == "the document is empty (0 bytes): nothing to print"
        assert (await client.get("/v1/jobs")).json()["jobs"] == []  # nothing was accepted
        assert await relay_stack.relay.spool.usage() == (0, 0)  # and nothing left in the spool


async def test_many_concurrent_jobs(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    bodies = [os.urandom(n) for n in (1024, 50_000, 1_000_000, 2_500_000) * 3]
    ids: list[str] = []
    async with relay_stack.client() as client, trio.open_nursery() as nursery:
        for body in bodies:

            async def submit(body: bytes = body) -> None:
                r = await client.post("/v1/printers/label/jobs", content=body)
                assert r.status_code == 201
                ids.append(r.json()["id"])

            nursery.start_soon(submit)
    for job_id in ids:
        assert (await relay_stack.wait_job(job_id))["state"] == "completed"
    documents = await raw_sink.wait_for(len(bodies))
    assert sorted(d.sha256 for d in documents) == sorted(hashlib.sha256(b).hexdigest() for b in bodies)
