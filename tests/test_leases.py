"""A claimed job never stays ``sending``: its dispatcher settles it however its stream ends, and a lease
that is not renewed lapses and queues it again (relay/dispatch.py, relay/leases.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fixtures_relay import RelayStack
from test_ipp_endpoint import offline_printer
from test_store import new_job

from relay.dispatch import STREAM_ENDED, Dispatcher
from relay.jobs import JobEvent, JobState
from relay.leases import LAPSED, LeaseKeeper
from relay.lifecycle import JobLifecycle
from relay.store.base import Lease, Printer
from relay.store.sqlite import SqliteStore

OWNER = "relay-test"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "relay.sqlite3")
    await store.open()
    await store.replace_printers("acme", "c1", [Printer("acme", "p1", "c1", state="idle")])
    try:
        yield store
    finally:
        await store.close()


async def test_claims_are_leases_that_renew_lapse_and_end_with_the_flight(store: SqliteStore) -> None:
    jobs = [new_job() for _ in range(3)]
    for job in jobs:
        await store.insert_job(job, "accepted")
    now = time.time()
    claimed = await store.claim_jobs("acme", "c1", now, 3, Lease(OWNER, 10.0))
    assert len(claimed) == 3
    assert await store.lapsed_leases(now + 9, 10) == []
    assert {j.id for j in await store.lapsed_leases(now + 11, 10)} == {j.id for j in jobs}

    await store.renew_leases(Lease(OWNER, 10.0), [jobs[0].id], now + 5)  # until now + 15
    await store.renew_leases(Lease("another-relay", 100.0), [jobs[1].id], now + 5)  # not its claim
    await store.transition(jobs[2].id, JobEvent.COMPLETE, "printed", now + 1)  # no longer in flight
    assert [j.id for j in await store.lapsed_leases(now + 11, 10)] == [jobs[1].id]
    assert await store.lapsed_leases(now + 16, 10) != []


async def test_the_keeper_renews_what_is_held_and_queues_again_what_lapsed(store: SqliteStore) -> None:
    held, lost = new_job(), new_job()
    for job in (held, lost):
        await store.insert_job(job, "accepted")
    await store.claim_jobs("acme", "c1", time.time(), 2, Lease(OWNER, 0.0))  # lapsed at once

    class Relay:  # what JobLifecycle reaches for on a transition to queued
        class registry:
            @staticmethod
            def wake(tenant: str, connector_id: str) -> None:
                pass

    lifecycle = JobLifecycle(Relay)  # type: ignore[arg-type]
    lifecycle.relay.store = store  # type: ignore[attr-defined]
    lapsed: list[int] = []
    keeper = LeaseKeeper(store, lifecycle, Lease(OWNER, 15.0), lambda: {held.id}, on_lapsed=lapsed.append)
    assert await keeper.round() == 1
    assert lapsed == [1]
    still = await store.get_job("acme", held.id)
    again = await store.get_job("acme", lost.id)
    assert still is not None and still.state is JobState.SENDING
    assert again is not None and again.state is JobState.QUEUED and again.attempts == 0
    assert (await store.job_history(lost.id))[-1].message == LAPSED
    assert await keeper.round() == 0


@dataclass
class BlockedH2:
    """A session whose job streams never open: the dispatcher waits inside open_stream."""

    is_open: bool = True
    opening: trio.Event = field(default_factory=trio.Event)

    async def open_stream(self, *args: object, **kw: object) -> None:
        self.opening.set()
        await trio.sleep_forever()


@dataclass
class FakeSession:
    h2: BlockedH2
    tenant: str = "acme"
    connector_id: str = "site-9"


async def test_a_dispatcher_cancelled_mid_stream_queues_its_jobs_again(relay_stack: RelayStack) -> None:
    """The probe's case: the session ended (its dispatcher cancelled) just after a claim. Four of 800
    jobs stayed `sending` until the relay restarted."""
    await offline_printer(relay_stack, "p")
    async with relay_stack.client() as client:
        job_id = (await client.post("/v1/printers/p/jobs", content=b"%PDF-1.4 x")).json()["id"]
    h2 = BlockedH2()
    dispatcher = Dispatcher(relay_stack.relay, FakeSession(h2))  # type: ignore[arg-type]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dispatcher.run)
            await h2.opening.wait()
            assert dispatcher.claimed == {job_id}
            nursery.cancel_scope.cancel()
    job = await relay_stack.relay.store.get_job("acme", job_id)
    assert job is not None and job.state is JobState.QUEUED and job.attempts == 0
    assert dispatcher.claimed == set()
    assert (await relay_stack.relay.store.job_history(job_id))[-1].message == STREAM_ENDED
