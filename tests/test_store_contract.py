"""The store's contract, held by both backends: SQLite (one relay) and PostgreSQL (replicas).

Every test runs twice. Where a test needs a second replica, ``other()`` opens a second store on the same
database, as another relay process would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relay.jobs import RELAY_STOPPED, IllegalTransition, IppJobState, Job, JobEvent, JobState, new_job_id
from relay.store import store_for
from relay.store.base import (
    Conflict,
    ConnectorRecord,
    IppJob,
    Lease,
    Notice,
    OidcProvider,
    Printer,
    Quota,
    QuotaExceeded,
    SessionRecord,
    TenantRecord,
    Webhook,
    WebSession,
)
from relay.store.sql import SqlStore
from relay.users import new_user

Opener = Callable[[], Awaitable[SqlStore]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Opener:
    """Opens stores on one database (the first migrates it); each is closed after the test."""
    url = ""
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
    opened: list[SqlStore] = []

    async def opener() -> SqlStore:
        store = store_for(tmp_path, url)
        assert isinstance(store, SqlStore)
        await store.open()
        opened.append(store)
        return store

    opener.opened = opened  # type: ignore[attr-defined]
    return opener


async def _close_all(stores: list[SqlStore]) -> None:
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[SqlStore]:
    first = await open_store()
    await first.replace_printers("acme", "c1", [Printer("acme", "p1", "c1", state="idle")])
    await first.upsert_connector(ConnectorRecord("acme", "c1", public_key=b"k" * 32, key_id="k1"))
    try:
        yield first
    finally:
        await _close_all(open_store.opened)  # type: ignore[attr-defined]


def new_job(
    tenant: str = "acme", *, sealed_size: int = 100, key: str | None = None, state: JobState = JobState.QUEUED
) -> Job:
    now = time.time()
    return Job(
        id=new_job_id(), tenant=tenant, printer_id="p1", state=state, sealed_size=sealed_size,
        connector_id="c1", idempotency_key=key, created_at=now, updated_at=now, wrapped_key=b"w" * 93,
        options={"sides": "one-sided"},
    )  # fmt: skip


LEASE = Lease("relay-a", 60.0)


# --- group commit -------------------------------------------------------------------------------------


async def test_concurrent_writes_share_transactions_and_all_are_durable(
    store: SqlStore, open_store: Opener
) -> None:
    jobs = [new_job() for _ in range(50)]
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(store.insert_job, job, "accepted")
    assert store.batched_writes >= 50
    assert store.batches < store.batched_writes  # one commit carried several jobs
    other = await open_store()  # another process sees every row: each was committed before it returned
    assert len(await other.list_jobs("acme", limit=500)) == 50
    assert [e.state for e in await other.job_history(jobs[7].id)] == [JobState.QUEUED]


async def test_a_failing_write_undoes_only_itself(store: SqlStore) -> None:
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
    assert await store.tenant_usage("acme") == (300, 3)  # and its quota count
    assert [e.state for e in await store.job_history(jobs[2].id)] == [JobState.QUEUED]


async def test_a_cancelled_caller_does_not_lose_the_batch_of_others(store: SqlStore) -> None:
    first, second = new_job(), new_job()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.insert_job, first, "accepted")
        with trio.move_on_after(0):  # cancelled before or while its batch runs
            await store.insert_job(second, "accepted")
    assert await store.get_job("acme", first.id) is not None
    await store.insert_job(new_job(), "accepted")  # the store still works


async def test_a_write_cancelled_while_its_batch_runs_reports_that_it_happened(store: SqlStore) -> None:
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
        await store._write(lambda tx: gate.wait(10))
        # runs the next batch at once (no checkpoint in between), so the insert is in a batch it does not
        # run itself; this write then cancels the inserting caller from inside that batch
        await store._write(lambda tx: trio.from_thread.run_sync(scope.cancel))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_writer)
        await trio.testing.wait_all_tasks_blocked()  # its first batch is in the worker thread
        nursery.start_soon(submitter)
        await trio.testing.wait_all_tasks_blocked()  # the insert waits for the next batch
        gate.set()
    assert scope.cancel_called
    assert returned == [job]
    assert await store.get_job("acme", job.id) is not None


# --- jobs, quotas, payloads ----------------------------------------------------------------------------


async def test_a_job_reads_back_as_it_was_written(store: SqlStore) -> None:
    job = new_job(key="k-roundtrip")
    job.user, job.title, job.expires_at = "ann@example.com", "Q3 report", time.time() + 60
    await store.insert_job(job, "accepted")
    assert await store.get_job("acme", job.id) == job
    assert await store.get_job("globex", job.id) is None  # another tenant's job does not exist
    assert await store.find_job_by_idempotency_key("acme", "k-roundtrip") == job


async def test_tenant_usage_counts_unfinished_jobs_and_survives_a_reopen(
    store: SqlStore, open_store: Opener
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
    reopened = await open_store()
    assert await reopened.tenant_usage("acme") == (0, 0)
    assert await reopened.tenant_usage("other") == (7, 1)


async def test_quotas_hold_when_replicas_submit_at_once(store: SqlStore, open_store: Opener) -> None:
    other = await open_store()
    quota = Quota(max_bytes=10_000, max_jobs=3)
    outcomes: list[str] = []

    async def submit(replica: SqlStore) -> None:
        try:
            await replica.insert_job(new_job(sealed_size=100), "accepted", quota=quota)
            outcomes.append("accepted")
        except QuotaExceeded as exc:
            assert exc.what == "jobs" and "tenant_max_jobs=3" in exc.message
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(submit, store if i % 2 else other)
    assert sorted(outcomes) == ["accepted"] * 3 + ["refused"] * 5
    assert await store.tenant_usage("acme") == (300, 3)
    with pytest.raises(QuotaExceeded) as refused:
        await store.insert_job(new_job("big", sealed_size=20_000), "accepted", quota=quota)
    assert refused.value.what == "bytes"
    assert await store.tenant_usage("big") == (0, 0)


async def test_a_submit_looks_up_printer_connector_and_usage_at_once(store: SqlStore) -> None:
    await store.insert_job(new_job(sealed_size=700), "accepted")
    printer, connector, usage = await store.submit_lookups("acme", "p1")
    assert printer is not None and printer.id == "p1"
    assert connector is not None and connector.id == "c1" and connector.public_key == b"k" * 32
    assert usage == (700, 1) == await store.tenant_usage("acme")
    assert await store.submit_lookups("acme", "nope") == (None, None, (700, 1))
    assert await store.submit_lookups("other", "p1") == (None, None, (0, 0))


async def test_a_small_payload_lives_with_its_job_until_the_final_state(store: SqlStore) -> None:
    job = new_job()
    await store.insert_job(job, "accepted", payload=b"sealed bytes")
    assert await store.get_payload(job.id) == b"sealed bytes"
    await store.transition(job.id, JobEvent.DISPATCH, "sending", time.time())
    await store.transition(job.id, JobEvent.RETRY, "busy", time.time())
    assert await store.get_payload(job.id) == b"sealed bytes"
    await store.transition(job.id, JobEvent.CANCEL, "canceled", time.time())
    assert await store.get_payload(job.id) is None
    assert await store.get_payload(new_job().id) is None


async def test_transitions_follow_the_table_and_one_replica_wins(store: SqlStore, open_store: Opener) -> None:
    job = new_job(state=JobState.HELD)
    await store.insert_job(job, "held")
    with pytest.raises(IllegalTransition):
        await store.transition(job.id, JobEvent.COMPLETE, "nope", time.time())
    other = await open_store()
    results = []

    async def release(replica: SqlStore) -> None:
        try:
            results.append(await replica.transition(job.id, JobEvent.RELEASE, "released", time.time()))
        except IllegalTransition:
            results.append(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release, store)
        nursery.start_soon(release, other)
    assert sum(r is not None for r in results) == 1
    assert [e.state for e in await store.job_history(job.id)] == [JobState.HELD, JobState.QUEUED]
    assert await store.transition(new_job_id(), JobEvent.CANCEL, "gone", time.time()) is None


async def test_claims_report_the_next_due_time_only_when_they_did_not_fill(store: SqlStore) -> None:
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    now = time.time()
    claimed, due = await store.claim_jobs_and_next_due("acme", "c1", now, 2, LEASE)
    assert [j.id for j in claimed] == [j.id for j in jobs[:2]] and due is None
    assert all(j.state is JobState.SENDING and j.attempts == 1 for j in claimed)
    later = now + 30
    await store.transition(jobs[0].id, JobEvent.RETRY, "busy", now, next_attempt_at=later)
    claimed, due = await store.claim_jobs_and_next_due("acme", "c1", now, 5, LEASE)
    assert [j.id for j in claimed] == [jobs[2].id]
    assert due == pytest.approx(later)


async def test_replicas_claiming_at_once_never_claim_the_same_job(
    store: SqlStore, open_store: Opener
) -> None:
    jobs = [new_job() for _ in range(60)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    replicas = [store, await open_store(), await open_store()]
    taken: list[str] = []

    async def claim(replica: SqlStore, n: int) -> None:
        while True:
            got, _ = await replica.claim_jobs_and_next_due("acme", "c1", time.time(), 4, Lease(f"r{n}", 60))
            if not got:
                return
            taken.extend(j.id for j in got)

    async with trio.open_nursery() as nursery:
        for n, replica in enumerate(replicas):
            nursery.start_soon(claim, replica, n)
    assert sorted(taken) == sorted(j.id for j in jobs)


async def test_a_stopped_printer_holds_its_jobs(store: SqlStore) -> None:
    await store.insert_job(new_job(), "accepted")
    await store.update_printer(Printer("acme", "p1", "c1", state="stopped"))
    assert await store.claim_jobs_and_next_due("acme", "c1", time.time(), 5, LEASE) == ([], None)


async def test_leases_renew_lapse_on_the_database_clock_and_end_with_the_flight(store: SqlStore) -> None:
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    await store.claim_jobs_and_next_due(
        "acme", "c1", time.time(), 3, Lease("relay-a", -1.0)
    )  # lapsed already
    assert {j.id for j in await store.lapsed_leases(10)} == {j.id for j in jobs}
    await store.renew_leases(Lease("relay-a", 60.0), [jobs[0].id])
    await store.renew_leases(Lease("relay-b", 60.0), [jobs[1].id])  # not its claim: no effect
    await store.transition(jobs[2].id, JobEvent.COMPLETE, "printed", time.time())  # no longer in flight
    assert [j.id for j in await store.lapsed_leases(10)] == [jobs[1].id]


async def test_jobs_of_a_replica_that_is_gone_queue_again(store: SqlStore) -> None:
    await store.register_replica("relay-a", "host a")
    mine, orphan = new_job(), new_job()
    await store.insert_job(mine, "accepted")
    await store.claim_jobs_and_next_due("acme", "c1", time.time(), 1, Lease("relay-a", 60))
    await store.insert_job(orphan, "accepted")
    await store.claim_jobs_and_next_due("acme", "c1", time.time(), 1, Lease("relay-dead", 60))
    assert await store.requeue_orphaned(time.time()) == [orphan.id]
    requeued = await store.get_job("acme", orphan.id)
    assert requeued is not None and requeued.state is JobState.QUEUED
    assert requeued.attempts == 0  # a relay's crash is not the job's fault: the attempt is given back
    assert requeued.last_error == RELAY_STOPPED  # and a later dispatch is not timed as a first one
    kept = await store.get_job("acme", mine.id)
    assert kept is not None and kept.state is JobState.SENDING


# --- connectors, sessions, replicas, duties -------------------------------------------------------------


async def test_a_printer_is_online_while_a_live_replica_holds_a_session(
    store: SqlStore, open_store: Opener
) -> None:
    other = await open_store()
    await other.register_replica("relay-b", "host b")
    await other.session_opened(SessionRecord("s1", "acme", "c1", "relay-b", time.time()))
    printer = await store.get_printer("acme", "p1")
    assert printer is not None and printer.online
    connector = await store.get_connector("acme", "c1")
    assert connector is not None and connector.sessions == 1
    await store.heartbeat("relay-b")
    assert await store.retire_silent_replicas(3600) == []
    assert await store.retire_silent_replicas(-1) == ["relay-b"]  # silent "for -1 s": gone
    printer = await store.get_printer("acme", "p1")
    assert printer is not None and not printer.online


async def test_a_closed_session_leaves_its_connector_offline(store: SqlStore) -> None:
    await store.register_replica("relay-a", "host a")
    session = SessionRecord("s1", "acme", "c1", "relay-a", time.time())
    await store.session_opened(session)
    listed = await store.list_printers("acme")
    assert [(p.id, p.online) for p in listed] == [("p1", True)]
    await store.session_closed("s1", time.time())
    assert [(p.id, p.online) for p in await store.list_printers("acme")] == [("p1", False)]


async def test_one_replica_holds_a_duty_at_a_time(store: SqlStore, open_store: Opener) -> None:
    other = await open_store()
    assert await store.take_duty("expiry", "relay-a", 60)
    assert not await other.take_duty("expiry", "relay-b", 60)
    assert await store.take_duty("expiry", "relay-a", 60)  # kept by its holder
    assert await store.take_duty("expiry", "relay-a", -1)  # held until a moment ago
    assert await other.take_duty("expiry", "relay-b", 60)  # lapsed: taken over


# --- IPP numbers ------------------------------------------------------------------------------------------


async def test_ipp_numbers_are_unique_per_tenant_across_replicas(store: SqlStore, open_store: Opener) -> None:
    other = await open_store()
    jobs = [new_job() for _ in range(20)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    numbers: dict[str, int] = {}

    async def number(replica: SqlStore, ids: list[str]) -> None:
        numbers.update(await replica.ipp_job_numbers("acme", "p1", ids, time.time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(number, store, [j.id for j in jobs[:12]])
        nursery.start_soon(number, other, [j.id for j in jobs[8:]])
    assert len(numbers) == 20 and len(set(numbers.values())) == 20
    again = await other.ipp_job_numbers("acme", "p1", [jobs[0].id], time.time())
    assert again == {jobs[0].id: numbers[jobs[0].id]}  # a number, once given, stays
    created = await store.create_ipp_job(
        IppJob("acme", 0, "p1", state=IppJobState.INCOMING, ticket={"copies": 2})
    )
    assert created.number not in numbers.values()
    assert await store.set_ipp_job_state(
        "acme", created.number, IppJobState.INCOMING, IppJobState.RECEIVING, 1.0
    )
    assert not await other.set_ipp_job_state(
        "acme", created.number, IppJobState.INCOMING, IppJobState.RECEIVING, 1.0
    )
    found = await other.get_ipp_job("acme", created.number)
    assert found is not None and found.state is IppJobState.RECEIVING and found.ticket == {"copies": 2}
    listed = await store.list_ipp_jobs("acme", "p1", [IppJobState.RECEIVING], 10)
    assert [j.number for j in listed] == [created.number]


# --- webhooks ---------------------------------------------------------------------------------------------


async def test_job_changes_fill_the_outbox_of_the_webhooks_that_want_them(store: SqlStore) -> None:
    all_changes = Webhook("wh_all", "acme", "http://h/all", ("job.state_changed",), "s1", 1.0)
    finished = Webhook("wh_done", "acme", "http://h/done", ("job.completed",), "s2", 2.0)
    for hook in (all_changes, finished):
        assert await store.add_webhook(hook, limit=2)
    assert not await store.add_webhook(Webhook("wh_3", "acme", "http://h/3", ("job.queued",), "s3"), limit=2)
    job = new_job()
    await store.insert_job(job, "accepted")
    await store.transition(job.id, JobEvent.DISPATCH, "sending", time.time())
    await store.transition(job.id, JobEvent.COMPLETE, "printed", time.time())
    listed = {h.id: h.pending for h in await store.list_webhooks("acme")}
    assert listed == {"wh_all": 3, "wh_done": 1}
    got = await store.claim_webhook_deliveries("relay-a", time.time(), 10, per_webhook=10, lease_seconds=60)
    # one per (webhook, job) line at a time: a job's next change waits for the one before
    assert sorted((d.webhook_id, d.state) for d in got) == [("wh_all", "queued"), ("wh_done", "completed")]
    snapshot = next(d.job for d in got if d.webhook_id == "wh_done")
    assert snapshot["state"] == "completed" and snapshot["options"] == {"sides": "one-sided"}
    assert await store.delete_webhook("acme", "wh_all") is not None
    assert {h.id: h.pending for h in await store.list_webhooks("acme")} == {"wh_done": 1}


async def test_a_webhook_added_in_a_batch_gets_the_job_changes_after_it(store: SqlStore) -> None:
    """SQLite looks once per transaction whether a tenant has webhooks: a webhook added in the same
    transaction must not miss the changes written after it."""
    before, after = new_job(), new_job()
    gate = threading.Event()
    hook = Webhook("wh_1", "acme", "http://h/", ("job.state_changed",), "s")
    batches = store.batches
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._write, lambda tx: gate.wait(10))
        await trio.testing.wait_all_tasks_blocked()  # that batch is in the worker thread
        for call in (
            lambda: store.insert_job(before, "accepted"),
            lambda: store.add_webhook(hook, limit=5),
            lambda: store.insert_job(after, "accepted"),
        ):
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()  # queued, in this order, for the next batch
        gate.set()
    assert store.batches == batches + 2  # the three ran in one transaction
    got = await store.claim_webhook_deliveries("relay-a", time.time(), 10, per_webhook=10, lease_seconds=60)
    assert [d.job_id for d in got] == [after.id]


async def test_outbox_rows_are_claimed_by_one_sender_at_a_time(store: SqlStore, open_store: Opener) -> None:
    await store.add_webhook(Webhook("wh_1", "acme", "http://h/", ("job.state_changed",), "s"), limit=5)
    jobs = [new_job() for _ in range(6)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    other = await open_store()
    a = await store.claim_webhook_deliveries("relay-a", time.time(), 10, per_webhook=4, lease_seconds=60)
    b = await other.claim_webhook_deliveries("relay-b", time.time(), 10, per_webhook=4, lease_seconds=60)
    assert len(a) == 4 and b == []  # four in flight to that webhook at most, whoever sends them
    await store.remove_webhook_delivery(a[0].seq)
    await store.webhook_delivery_failed(a[1].seq, 1, time.time() + 3600, "HTTP 500")
    b = await other.claim_webhook_deliveries("relay-b", time.time(), 10, per_webhook=4, lease_seconds=60)
    assert len(b) == 2 and not {d.seq for d in a} & {d.seq for d in b}
    due = await store.next_webhook_due()
    assert due is not None


# --- tokens and notices -------------------------------------------------------------------------------------


async def test_writes_are_heard_here_once_committed(store: SqlStore) -> None:
    heard: list[Notice] = []
    store.on_notice(heard.append)
    job = new_job()
    await store.insert_job(job, "accepted")
    await store.transition(job.id, JobEvent.CANCEL, "canceled by ann", time.time())
    assert [(n.kind, n.key, n.data["state"]) for n in heard] == [
        ("job", job.id, "queued"),
        ("job", job.id, "canceled"),
    ]
    assert heard[1].data["message"] == "canceled by ann" and heard[1].data["connector_id"] == "c1"
    with pytest.raises(Conflict):
        await store.insert_job(job, "again")
    assert len(heard) == 2  # a write undone says nothing


@pytest.mark.parametrize("backend", ["postgres"])  # SQLite has one process: nothing to hear
async def test_other_replicas_hear_only_the_writes_that_stayed(store: SqlStore, open_store: Opener) -> None:
    replica = await open_store()
    await store.insert_job(new_job(key="k1"), "accepted")
    heard: list[str] = []
    last = new_job()
    done = trio.Event()

    def hear(notice: Notice) -> None:
        heard.append(notice.key)
        if notice.key == last.id:
            done.set()

    replica.on_notice(hear)
    kept = [new_job(), new_job()]
    async with trio.open_nursery() as nursery:
        await nursery.start(replica.follow_other_processes)
        async with trio.open_nursery() as writers:  # batched: a Conflict among writes that stay
            for job in (kept[0], new_job(key="k1"), kept[1]):
                writers.start_soon(_insert_quietly, store, job)
        await store.insert_job(last, "accepted")  # notices arrive in order: after it, nothing more
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert sorted(heard) == sorted([kept[0].id, kept[1].id, last.id])


async def _insert_quietly(store: SqlStore, job: Job) -> None:
    with contextlib.suppress(Conflict):
        await store.insert_job(job, "accepted")


async def test_tokens_revoked_anywhere_are_heard_by_every_replica(
    store: SqlStore, open_store: Opener
) -> None:
    from relay.auth import new_token

    _, record = new_token("acme", "connector", connector_id="c1")
    await store.add_token(record)
    assert (await store.get_tokens([record.id, "nope"])).keys() == {record.id}
    heard: list[Notice] = []
    revoked = trio.Event()

    def hear(notice: Notice) -> None:
        heard.append(notice)
        if notice.kind == "tokens":
            revoked.set()

    store.on_notice(hear)
    cli = await open_store()  # `printrelay token revoke`: another process
    async with trio.open_nursery() as nursery:
        await nursery.start(store.follow_other_processes)
        assert await cli.revoke_token(record.id, time.time())
        with trio.fail_after(10):  # SQLite notices within its data_version poll (2 s), PostgreSQL at once
            await revoked.wait()
        nursery.cancel_scope.cancel()
    assert any(n.key in (record.id, "") for n in heard if n.kind == "tokens")
    token = await store.get_token(record.id)
    assert token is not None and token.revoked_at is not None
    assert not await cli.revoke_token(record.id, time.time())  # once only


async def test_a_sample_counts_the_queue_and_the_fleet(store: SqlStore) -> None:
    from relay.auth import new_token

    await store.add_token(new_token("acme", "connector", connector_id="c1")[1])
    await store.insert_job(new_job(), "accepted")
    await store.insert_job(new_job(state=JobState.HELD), "held")
    sample = await store.sample(time.time())
    assert sample.jobs_by_state == {"queued": 1, "held": 1}
    assert sample.oldest_queued_at is not None
    assert (sample.connectors_online, sample.connectors_offline) == (0, 1)


# --- payloads as chunk rows ---------------------------------------------------------------------------------


async def test_a_payload_in_chunk_rows_streams_back_whole_and_goes_with_the_final_state(
    store: SqlStore,
) -> None:
    from relay.spool import CHUNK_ROW_BYTES, DatabaseSpool
    from tunnel.sealing import PayloadOpener, generate_private_key, open_key, public_bytes

    key = generate_private_key()
    spool = DatabaseSpool(store)
    job = new_job()
    body = bytes(range(256)) * (3 * CHUNK_ROW_BYTES // 256) + b"tail"

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    stored = await spool.store(job.id, pieces(), recipient_public=public_bytes(key), max_bytes=len(body))
    assert stored.inline is None and stored.size == len(body)
    used, payloads = await spool.usage()
    assert payloads == 1 and used == stored.sealed_size
    job.sealed_size, job.wrapped_key = stored.sealed_size, stored.wrapped_key
    await store.insert_job(job, "accepted")
    opener = PayloadOpener(open_key(stored.wrapped_key, key, context=job.id.encode()), job.id)
    plain = b"".join([p async for chunk in spool.open(job.id) for p in opener.feed(chunk)])
    opener.finish()
    assert plain == body
    await store.transition(job.id, JobEvent.CANCEL, "canceled", time.time())
    assert await spool.usage() == (0, 0)
    with pytest.raises(FileNotFoundError):
        [chunk async for chunk in spool.open(job.id)]


async def test_chunks_of_an_upload_that_died_are_swept_once_silent(store: SqlStore) -> None:
    await store.add_payload_chunk("died", 0, b"sealed")
    await store.add_payload_chunk("alive", 0, b"sealed")
    job = new_job()
    await store.insert_job(job, "accepted")
    await store.add_payload_chunk(job.id, 0, b"sealed")
    assert await store.remove_orphan_chunks(3600) == 0  # written a moment ago: maybe still uploading
    assert await store.remove_orphan_chunks(-1) == 2  # silent "for -1 s": both uploads died
    assert await store.payload_chunks(job.id, 0, 10) == [b"sealed"]  # a job's chunks stay


async def test_users_are_unique_by_email_and_their_changes_are_heard(store: SqlStore) -> None:
    heard: list[Notice] = []
    store.on_notice(heard.append)
    ann = new_user("acme", "Ann@Example.com", name="Ann", password_hash="$argon2id$x")
    await store.add_user(ann)
    with pytest.raises(Conflict):
        await store.add_user(new_user("other", "ann@example.com"))  # emails are unique across tenants
    assert await store.find_user("ann@example.com") == ann and await store.get_user(ann.id) == ann
    assert [u.email for u in await store.list_users("acme")] == ["ann@example.com"]
    assert await store.list_users("other") == []
    ann.state, ann.disabled_at, ann.role = "disabled", 5.0, "admin"
    assert await store.update_user(ann)
    assert await store.get_user(ann.id) == ann
    assert [(n.kind, n.key) for n in heard] == [("users", ann.id)]
    stranger = dataclasses.replace(ann, tenant="other")
    assert not await store.update_user(stranger)  # not in that tenant: nothing changes


async def test_jobs_list_by_owner(store: SqlStore) -> None:
    mine = dataclasses.replace(new_job(), owner="usr_1")
    await store.insert_job(mine, "accepted")
    await store.insert_job(new_job(), "accepted")
    assert [j.id for j in await store.list_jobs("acme", owner="usr_1")] == [mine.id]
    assert len(await store.list_jobs("acme")) == 2
    assert (await store.get_job("acme", mine.id)).owner == "usr_1"  # type: ignore[union-attr]


async def test_a_printers_pull_flag_survives_its_connectors_reports(store: SqlStore) -> None:
    assert await store.set_printer_pull("acme", "p1", True)
    assert not await store.set_printer_pull("acme", "nope", True)
    await store.replace_printers("acme", "c1", [Printer("acme", "p1", "c1", state="processing")])
    printer = await store.get_printer("acme", "p1")
    assert printer is not None and printer.pull and printer.state == "processing"
    assert printer.public()["pull"] is True
    await store.replace_printers("acme", "c1", [Printer("acme", "p2", "c1")])
    assert not (await store.get_printer("acme", "p2")).pull  # type: ignore[union-attr]


async def test_web_sessions_and_oidc_providers(store: SqlStore) -> None:
    now = time.time()
    first = WebSession("s" * 64, "acme", "usr_1", now, now + 3600)
    await store.add_web_session(first)
    await store.add_web_session(dataclasses.replace(first, id="t" * 64))
    await store.add_web_session(dataclasses.replace(first, id="u" * 64, user_id="usr_2", via="oidc"))
    await store.touch_web_session(first.id, now + 5)
    found = await store.get_web_session(first.id)
    assert found is not None and found.last_seen_at == now + 5 and found.revoked_at is None
    assert await store.revoke_web_sessions(session_id=first.id, at=now + 6) == 1
    assert await store.revoke_web_sessions(user_id="usr_1", at=now + 7) == 1  # the other one of usr_1
    assert (await store.get_web_session("u" * 64)).revoked_at is None  # type: ignore[union-attr]
    assert await store.get_web_session("x" * 64) is None
    provider = OidcProvider("acme", "https://id.example", "printrelay", b"sealed", created_at=now)
    await store.set_oidc_provider(provider)
    await store.set_oidc_provider(dataclasses.replace(provider, create_users=True))
    assert await store.get_oidc_provider("acme") == dataclasses.replace(provider, create_users=True)
    assert await store.delete_oidc_provider("acme") and await store.get_oidc_provider("acme") is None


async def test_child_tenants_list_by_parent_in_pages_up_to_a_limit(store: SqlStore) -> None:
    kids = [TenantRecord(f"t_{n}", "acme", f"customer {n}", created_at=float(n // 2)) for n in range(4)]
    for kid in kids[:3]:
        assert await store.add_tenant(kid, limit=3)
    assert not await store.add_tenant(kids[3], limit=3)  # the parent has its three
    assert await store.get_tenant("t_3") is None
    assert await store.add_tenant(TenantRecord("t_9", "globex", "theirs", created_at=0.0), limit=3)
    with pytest.raises(Conflict):
        await store.add_tenant(TenantRecord("t_9", "globex", "again"), limit=3)
    assert await store.get_tenant("t_1") == kids[1]
    assert await store.list_tenants("acme") == kids[:3]  # oldest first; the same time by id
    first = await store.list_tenants("acme", limit=2)
    assert first == kids[:2]
    assert await store.list_tenants("acme", after=first[-1].id, limit=2) == kids[2:3]
    assert await store.list_tenants("acme", after="t_9") == []  # a cursor of another parent's child
    assert await store.list_tenants("t_0") == []


async def test_tenant_job_totals_count_jobs_and_bytes_by_state_in_a_period(store: SqlStore) -> None:
    for at, size, state, tenant in (
        (100.0, 10, JobState.QUEUED, "acme"),
        (200.0, 20, JobState.QUEUED, "acme"),
        (200.0, 5, JobState.HELD, "acme"),
        (300.0, 40, JobState.QUEUED, "acme"),
        (200.0, 1000, JobState.QUEUED, "globex"),
    ):
        job = dataclasses.replace(new_job(tenant, state=state), size=size, created_at=at, updated_at=at)
        await store.insert_job(job, "accepted")
    assert await store.tenant_job_totals("acme") == {"queued": (3, 70), "held": (1, 5)}
    period = await store.tenant_job_totals("acme", since=200.0, until=300.0)
    assert period == {"queued": (1, 20), "held": (1, 5)}  # since is in the period, until is not
    assert await store.tenant_job_totals("acme", since=301.0) == {}
    assert await store.tenant_job_totals("nobody") == {}


# --- device events ------------------------------------------------------------------------------------------


async def _drain_outbox(store: SqlStore) -> dict[str, list[tuple[str, str, dict[str, Any]]]]:
    """Every delivery in the outbox, sent and removed: by webhook, (event, line, data) in send order."""
    sent: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    while got := await store.claim_webhook_deliveries(
        "relay-a", time.time(), 100, per_webhook=100, lease_seconds=60
    ):
        for delivery in got:
            sent.setdefault(delivery.webhook_id, []).append((delivery.event, delivery.job_id, delivery.job))
            await store.remove_webhook_delivery(delivery.seq, delivered_at=time.time())
    return sent


async def test_printer_changes_are_announced_to_the_webhooks_that_subscribed(store: SqlStore) -> None:
    for hook in (
        Webhook("wh_jobs", "acme", "http://h/jobs", ("job.state_changed",), "s1", 1.0),
        Webhook("wh_printers", "acme", "http://h/p", ("printer.*",), "s2", 2.0),
        Webhook("wh_removed", "acme", "http://h/r", ("printer.removed",), "s3", 3.0),
        Webhook("wh_globex", "globex", "http://h/g", ("printer.*",), "s4", 4.0),
    ):
        assert await store.add_webhook(hook, limit=5)
    heard: list[Notice] = []
    store.on_notice(heard.append)
    printer = Printer("acme", "p1", "c1", state="idle", online=True)
    await store.replace_printers("acme", "c1", [printer, Printer("acme", "p2", "c1", state="unknown")])
    # p1 was there (the fixture): nothing; p2 is new
    for state in ("unknown", "idle", "stopped", "stopped", "unknown", "idle"):
        # a connector's unknown (before its first poll) is stored, not announced: going unknown and back
        # to the state last announced says nothing
        await store.update_printer(dataclasses.replace(printer, state=state, reasons=[f"{state}-r"] * 40))
    assert (p1 := await store.get_printer("acme", "p1")) is not None and p1.state == "idle"
    await store.update_printer(Printer("acme", "p2", "c1", state="removed"))
    await store.update_printer(Printer("acme", "p2", "c1", state="removed"))
    await store.update_printer(Printer("acme", "p2", "c1", state="idle"))  # served again
    sent = await _drain_outbox(store)
    assert "wh_jobs" not in sent and "wh_globex" not in sent
    events = [
        (event, line, data["previous_state"], data["printer"]["state"])
        for event, line, data in sent["wh_printers"]
    ]
    assert [e for e in events if e[1] == "printer:p1"] == [
        ("printer.state_changed", "printer:p1", "idle", "stopped"),
        ("printer.state_changed", "printer:p1", "stopped", "idle"),
    ]
    assert [e for e in events if e[1] == "printer:p2"] == [
        ("printer.added", "printer:p2", None, "offline"),  # no session: the public state says so
        ("printer.removed", "printer:p2", None, "offline"),
        ("printer.added", "printer:p2", None, "offline"),
    ]
    stopped = next(data["printer"] for event, line, data in sent["wh_printers"] if line == "printer:p1")
    assert stopped["printer_state"] == "stopped" and stopped["online"] and "capabilities" not in stopped
    assert len(stopped["reasons"]) == 16  # bounded: a notice carries it to the other replicas
    assert [event for event, _, _ in sent["wh_removed"]] == ["printer.removed"]
    device = [(n.key, n.data["type"]) for n in heard if n.kind == "device"]
    assert device.count(("printer:p1", "printer.state_changed")) == 2 and len(device) == 5
    assert all(n.data["tenant"] == "acme" for n in heard if n.kind == "device")


async def test_a_connector_is_announced_online_once_and_offline_once_after_the_grace(
    store: SqlStore, open_store: Opener
) -> None:
    assert await store.add_webhook(
        Webhook("wh_c", "acme", "http://h/c", ("connector.online", "connector.offline"), "s"), limit=5
    )
    other = await open_store()  # another replica
    for replica in ("relay-a", "relay-b"):
        await store.register_replica(replica, replica)
    await store.session_opened(SessionRecord("s1", "acme", "c1", "relay-a", time.time()))  # first seen
    await other.session_opened(SessionRecord("s2", "acme", "c1", "relay-b", time.time()))  # a second one
    await store.session_closed("s1", time.time())
    assert await store.announce_offline(time.time() + 1) == []  # s2 is still open
    await other.session_closed("s2", time.time())
    assert await store.announce_offline(time.time() - 3600) == []  # within the grace
    await store.session_opened(SessionRecord("s3", "acme", "c1", "relay-b", time.time()))  # back in time
    await store.session_closed("s3", time.time())
    # Both replicas sweep at once: one of them announces it.
    found: list[list[tuple[str, str]]] = []

    async def sweep(replica: SqlStore) -> None:
        found.append(await replica.announce_offline(time.time() + 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweep, store)
        nursery.start_soon(sweep, other)
    assert sorted(found) == [[], [("acme", "c1")]]
    assert await other.announce_offline(time.time() + 1) == []
    await other.session_opened(SessionRecord("s4", "acme", "c1", "relay-b", time.time()))  # back
    sent = await _drain_outbox(store)
    assert [(event, line) for event, line, _ in sent["wh_c"]] == [
        ("connector.online", "connector:c1"),
        ("connector.offline", "connector:c1"),
        ("connector.online", "connector:c1"),
    ]
    online = sent["wh_c"][0][2]
    assert online["connector_id"] == "c1" and online["online"] and online["last_seen"].endswith("Z")
    assert not sent["wh_c"][1][2]["online"]
