"""Claims on jobs in flight are leases: renewed while their stream lives, queued again when they lapse.

A dispatcher claims a job (``queued → sending``) for a lease of ``job_lease`` seconds and settles it when
its stream ends, whatever ends it (relay/dispatch.py). This is the net under that: every third of the
lease, the keeper renews the leases of the jobs its dispatchers still hold, then queues again every job
in flight whose lease has lapsed. Such a job has no stream any more: its dispatcher is gone without
settling it, or the replica that held it died (with several relays on one database: each keeper sweeps
them all, and the store's compare-and-set lets only one requeue each). Expiry is on the database's clock,
so replicas whose clocks disagree still agree on who holds what.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import trio

from relay.jobs import LEASE_LAPSED, JobEvent
from relay.lifecycle import JobLifecycle
from relay.store.base import JobStore, Lease, StoreUnavailable

log = logging.getLogger("printrelay.relay.leases")

SWEEP_BATCH = 500  # lapsed jobs queued again per round; more wait for the next one
LAPSED = LEASE_LAPSED


class LeaseKeeper:
    def __init__(
        self,
        store: JobStore,
        jobs: JobLifecycle,
        lease: Lease,
        held: Callable[[], Collection[str]],
        *,
        on_lapsed: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._lease = lease
        self._held = held  # ids of the jobs this relay's dispatchers hold
        self._on_lapsed = on_lapsed

    async def run(self) -> None:
        while True:
            await trio.sleep(self._lease.seconds / 3)
            try:
                await self.round()
            except StoreUnavailable as exc:
                # The leases lapse meanwhile (on the database's clock, so nothing is lost): the next round
                # after the outage renews what is still streaming and queues the rest again.
                log.warning("lease round skipped: %s", exc)

    async def round(self) -> int:
        """Renew, then sweep; returns how many jobs were queued again."""
        held = set(self._held())
        now = time.time()
        await self._store.renew_leases(self._lease, sorted(held))
        requeued = 0
        for job in await self._store.lapsed_leases(SWEEP_BATCH):
            if job.id in held:
                continue  # claimed since we renewed: its lease is fresh
            log.warning(
                "job %s: %s", job.id, LAPSED,
                extra={"job_id": job.id, "tenant": job.tenant, "connector_id": job.connector_id},
            )  # fmt: skip
            # Not the job's fault: the attempt is given back, as for a lost tunnel.
            done = await self._jobs.transition(
                job.id, JobEvent.RETRY, LAPSED, next_attempt_at=now, attempts=max(0, job.attempts - 1),
                last_error=LAPSED,
            )  # fmt: skip
            requeued += done is not None
        if requeued:
            self._on_lapsed(requeued)
        return requeued
