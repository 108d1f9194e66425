"""What an outage of the relay's database (PostgreSQL failing over, a lost connection) must not do: end a
connector's whole session, or lose a job that may already be durable."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

from relay.jobs import JobEvent
from relay.store.base import StoreUnavailable

pytestmark = pytest.mark.parametrize("relay_backend", ["sqlite", "postgres"])


async def test_a_store_outage_while_a_job_streams_ends_that_stream_not_the_session(
    relay_stack: RelayStack, raw_sink: RawSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL failing over while jobs stream: a job whose payload could not be read is queued again
    (attempt given back), a "printing" that could not be recorded waits for the final status. Either used
    to end the connector's whole session, and every job streaming on it."""
    relay = relay_stack.relay
    await relay_stack.start_connector({"p": raw_sink.uri})
    [session] = relay.registry.sessions()
    real_payload, real_transition = relay.store.get_payload, relay.jobs.transition
    failed: list[str] = []

    async def get_payload(job_id: str) -> bytes | None:
        if "payload" not in failed:
            failed.append("payload")
            raise StoreUnavailable("connection lost")
        return await real_payload(job_id)

    async def transition(job_id: str, event: JobEvent, message: str, **fields: Any) -> Any:
        if event is JobEvent.ACCEPTED and "printing" not in failed:
            failed.append("printing")
            raise StoreUnavailable("connection lost")
        return await real_transition(job_id, event, message, **fields)

    monkeypatch.setattr(relay.store, "get_payload", get_payload)
    monkeypatch.setattr(relay.jobs, "transition", transition)
    async with relay_stack.client() as client:
        job_id = (await client.post("/v1/printers/p/jobs", content=b"one page")).json()["id"]
    job = await relay_stack.wait_job(job_id)
    assert job["state"] == "completed" and job["attempts"] == 1, job
    assert failed == ["payload", "printing"]
    assert relay.registry.sessions() == [session] and session.h2.close_reason is None
    assert [d.path.read_bytes() for d in await raw_sink.wait_for(1)] == [b"one page"]
    history = [e.message for e in await relay.store.job_history(job_id)]
    assert any("database was unavailable: connection lost" in m for m in history), history


async def test_a_job_whose_commit_may_have_happened_keeps_its_payload(
    relay_stack: RelayStack, raw_sink: RawSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection died during COMMIT, which PostgreSQL may have carried out: the client gets a 503,
    and its retry with the same Idempotency-Key finds the job, which prints. The payload used to be erased
    on any error, leaving a durable job without a document (it then failed: "payload is missing"); and
    nothing woke the dispatcher for it (the commit's notice was lost with the connection)."""
    relay = relay_stack.relay
    await relay_stack.start_connector({"p": raw_sink.uri})
    real_insert = relay.store.insert_job

    async def insert_job(*args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as lost:
            lost.setattr(relay.registry, "wake", lambda tenant, connector_id: None)  # the notice is lost
            await real_insert(*args, **kwargs)
        raise StoreUnavailable("connection lost during COMMIT")

    monkeypatch.setattr(relay.store, "insert_job", insert_job)
    body = bytes(range(256)) * 1024  # 256 KiB: a spool file, not inline
    headers = {"idempotency-key": "order-7"}
    async with relay_stack.client() as client:
        lost = await client.post("/v1/printers/p/jobs", content=body, headers=headers)
        assert lost.status_code == 503, lost.text
        monkeypatch.undo()
        again = await client.post("/v1/printers/p/jobs", content=body, headers=headers)
        assert again.status_code == 200, again.text  # the job the first request made
    job = await relay_stack.wait_job(again.json()["id"])
    assert job["state"] == "completed", job
    assert [d.path.read_bytes() for d in await raw_sink.wait_for(1)] == [body]
