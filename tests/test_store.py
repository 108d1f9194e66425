"""The embedded store's group commit, in-memory quota counts, small payloads and the claim's query plan."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.jobs import Job, JobEvent, JobState, new_job_id
from relay.store.base import Conflict, Lease
from relay.store.sqlite import SqliteStore, open_connection

LEASE = Lease("relay-test", 15.0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "relay.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def new_job(tenant: str = "acme", *, sealed_size: int = 100, key: str | None = None) -> Job:
    now = time.time()
    return Job(
        id=new_job_id(), tenant=tenant, printer_id="p1", state=JobState.QUEUED, sealed_size=sealed_size,
        connector_id="c1", idempotency_key=key, created_at=now, updated_at=now,
    )  # fmt: skip


async def test_concurrent_writes_share_transactions_and_all_are_durable(
    store: SqliteStore, tmp_path: Path
) -> None:
    jobs = [new_job() for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(store.insert_job, job, "accepted")
    assert store.batched_writes == 50
    assert store.batches < 50  # one fsync carried several jobs
    # Another connection sees every row: each insert was committed before it returned.
    conn = open_connection(tmp_path / "relay.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 50
    assert conn.execute("SELECT COUNT(*) FROM job_events").fetchone()[0] == 50
    conn.close()


async def test_a_failing_write_undoes_only_itself(store: SqliteStore) -> None:
    await store.insert_job(new_job(key="k1"), "accepted")
    results: dict[int, object] = {}

    async def insert(i: int, job: Job) -> None:
        try:
            results[i] = await store.insert_job(job, "accepted")
        except Conflict as exc:
            results[i] = exc

    jobs = [new_job(), new_job(key="k1"), new_job()]  # the middle one reuses an Idempotency-Key
    async with trio.open_nursery() as nursery:
        for i, job in enumerate(jobs):
            nursery.start_soon(insert, i, job)
    assert isinstance(results[1], Conflict)
    assert results[0] is jobs[0] and results[2] is jobs[2]
    assert await store.get_job("acme", jobs[1].id) is None
    assert await store.job_history(jobs[1].id) == []  # its event row went with it
    assert [e.state for e in await store.job_history(jobs[2].id)] == [JobState.QUEUED]


async def test_a_cancelled_caller_does_not_lose_the_batch_of_others(store: SqliteStore) -> None:
    first, second = new_job(), new_job()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.insert_job, first, "accepted")
        with trio.move_on_after(0):  # cancelled before or while its batch runs
            await store.insert_job(second, "accepted")
    assert await store.get_job("acme", first.id) is not None
    await store.insert_job(new_job(), "accepted")  # the store still works


async def test_a_write_cancelled_while_its_batch_runs_reports_that_it_happened(store: SqliteStore) -> None:
    """Like trio.to_thread: a write that reached the database returns normally even if its caller was
    cancelled meanwhile, so the caller never undoes (erases the payload of) a job that is committed."""
    job = new_job()
    gate = threading.Event()
    scope = trio.CancelScope()
    returned: list[Job] = []

    async def submitter() -> None:
        with scope:
            returned.append(await store.insert_job(job, "accepted"))

    async def other_writer() -> None:
        await store._write(lambda c: gate.wait(10))
        # runs the next batch at once (no checkpoint in between), so the insert is in a batch it does not
        # run itself; this write then cancels the inserting caller from inside that batch
        await store._write(lambda c: trio.from_thread.run_sync(scope.cancel))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_writer)
        await trio.testing.wait_all_tasks_blocked()  # its first batch is in the worker thread
        nursery.start_soon(submitter)
        await trio.testing.wait_all_tasks_blocked()  # the insert waits for the next batch
        gate.set()
    assert scope.cancel_called
    assert returned == [job]
    assert await store.get_job("acme", job.id) is not None


async def test_tenant_usage_counts_unfinished_jobs_and_survives_a_reopen(
    store: SqliteStore, tmp_path: Path
) -> None:
    a, b = new_job(sealed_size=1000), new_job(sealed_size=500)
    await store.insert_job(a, "accepted")
    await store.insert_job(b, "accepted")
    await store.insert_job(new_job("other", sealed_size=7), "accepted")
    assert await store.tenant_usage("acme") == (1500, 2)
    with pytest.raises(Conflict):
        await store.insert_job(a, "accepted again")  # a failed write changes nothing
    assert await store.tenant_usage("acme") == (1500, 2)
    await store.transition(a.id, JobEvent.DISPATCH, "sending", time.time())
    assert await store.tenant_usage("acme") == (1500, 2)
    await store.transition(a.id, JobEvent.COMPLETE, "printed", time.time())
    assert await store.tenant_usage("acme") == (500, 1)
    await store.transition(b.id, JobEvent.CANCEL, "canceled", time.time())
    assert await store.tenant_usage("acme") == (0, 0)
    reopened = SqliteStore(tmp_path / "relay.sqlite3")
    await reopened.open()
    assert await reopened.tenant_usage("acme") == (0, 0)
    assert await reopened.tenant_usage("other") == (7, 1)
    await reopened.close()


async def test_a_small_payload_lives_with_its_job_until_the_final_state(store: SqliteStore) -> None:
    job = new_job()
    await store.insert_job(job, "accepted", payload=b"sealed bytes")
    assert await store.get_payload(job.id) == b"sealed bytes"
    await store.transition(job.id, JobEvent.DISPATCH, "sending", time.time())
    await store.transition(job.id, JobEvent.RETRY, "busy", time.time())
    assert await store.get_payload(job.id) == b"sealed bytes"
    await store.transition(job.id, JobEvent.CANCEL, "canceled", time.time())
    assert await store.get_payload(job.id) is None
    assert await store.get_payload(new_job().id) is None


async def test_claim_reports_the_next_due_time_only_when_it_did_not_fill(store: SqliteStore) -> None:
    from relay.store.base import Printer

    await store.replace_printers("acme", "c1", [Printer("acme", "p1", "c1", state="idle")])
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    now = time.time()
    claimed, due = await store.claim_jobs_and_next_due("acme", "c1", now, 2, LEASE)
    assert [j.id for j in claimed] == [j.id for j in jobs[:2]] and due is None
    later = now + 30
    await store.transition(jobs[0].id, JobEvent.RETRY, "busy", now, next_attempt_at=later)
    claimed, due = await store.claim_jobs_and_next_due("acme", "c1", now, 5, LEASE)
    assert [j.id for j in claimed] == [jobs[2].id]
    assert due == later


async def test_the_claim_walks_the_queue_in_order_without_sorting(store: SqliteStore) -> None:
    """A claim of one job must not sort the whole backlog (it runs every time a stream ends)."""
    statements: list[str] = []
    conn = store._conn
    assert conn is not None
    conn.set_trace_callback(statements.append)  # the SQL with its values bound
    await store.claim_jobs("acme", "c1", time.time(), 1, LEASE)
    conn.set_trace_callback(None)
    [claim] = [s for s in statements if s.startswith("UPDATE jobs SET state = 'sending'")]
    plan = " / ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {claim}"))
    assert "jobs_claim" in plan and "TEMP B-TREE" not in plan, plan
