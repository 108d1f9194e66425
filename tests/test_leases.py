"""A claimed job never stays ``sending``: its dispatcher settles it however its stream ends, and a lease
that is not renewed lapses and queues it again (relay/dispatch.py, relay/leases.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio
from fixtures_relay import RelayStack
from test_ipp_endpoint import offline_printer
from test_store_contract import new_job

from relay.dispatch import STREAM_ENDED, Dispatcher, DispatchSettings, Drain
from relay.jobs import JobState
from relay.leases import LAPSED, LeaseKeeper
from relay.store.base import Lease
from service.signal import Signal


async def test_the_keeper_renews_what_is_held_and_queues_again_what_lapsed(relay_stack: RelayStack) -> None:
    relay = relay_stack.relay
    await offline_printer(relay_stack, "p")
    held, lost = new_job(), new_job()
    for job in (held, lost):
        job.printer_id, job.connector_id = "p", "site-9"
        await relay.store.insert_job(job, "accepted")
    await relay.store.claim_jobs_and_next_due("acme", "site-9", time.time(), 2, Lease(relay.replica_id, -1.0))
    lapsed: list[int] = []
    keeper = LeaseKeeper(
        relay.store, relay.jobs, Lease(relay.replica_id, 15.0), lambda: {held.id}, on_lapsed=lapsed.append
    )
    assert await keeper.round() == 1
    assert lapsed == [1]
    still = await relay.store.get_job("acme", held.id)
    again = await relay.store.get_job("acme", lost.id)
    assert still is not None and still.state is JobState.SENDING
    assert again is not None and again.state is JobState.QUEUED and again.attempts == 0
    assert (await relay.store.job_history(lost.id))[-1].message == LAPSED
    assert again.last_error == LAPSED
    assert await keeper.round() == 0

    (reclaimed,), _ = await relay.store.claim_jobs_and_next_due(
        "acme", "site-9", time.time(), 1, Lease(relay.replica_id, 15.0)
    )
    relay.metrics.job_dispatched(reclaimed, time.time())
    relay.metrics.job_dispatched(still, time.time())
    assert relay.metrics.registry.get_sample_value("printrelay_job_leases_reclaimed_total") == 1


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
    relay = relay_stack.relay
    dispatcher = Dispatcher(
        FakeSession(h2),  # type: ignore[arg-type]
        store=relay.store, spool=relay.spool, jobs=relay.jobs, metrics=relay.metrics,
        settings=DispatchSettings(max_streams=4, retry_base=1, retry_cap=1, lease=relay.lease),
        wakeup=Signal(), drain=Drain(),
    )  # fmt: skip
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
