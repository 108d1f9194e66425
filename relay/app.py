"""The relay process: wires store, spool, public HTTP API and tunnel listener into one nursery."""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass

import trio

from relay.api.rest import RestApi
from relay.config import RelayConfig
from relay.jobs import Job, JobEvent, JobHistoryEntry, JobState
from relay.leases import LeaseKeeper
from relay.lifecycle import JobLifecycle
from relay.metrics import RelayMetrics
from relay.ops import ops_listener
from relay.ratelimit import TokenRateLimiter
from relay.secretbox import SecretBox
from relay.spool import Spool
from relay.store.base import Lease, Store
from relay.store.sqlite import SqliteStore
from relay.tls import ServerTls
from relay.tunnel import ConnectorRegistry, TunnelListener
from relay.webhooks import WebhookSender
from service.http.server import HttpServer
from service.signal import Signal

log = logging.getLogger("printrelay.relay")

EXPIRY_INTERVAL = 60.0


@dataclass(frozen=True)
class RelayAddresses:
    http_port: int
    tunnel_port: int
    metrics_port: int | None = None  # with --metrics-listen


class Relay:
    """Everything one relay process runs; :meth:`run` owns all of its tasks."""

    def __init__(self, config: RelayConfig, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store or SqliteStore(config.database_path)
        self.spool = Spool(config.spool_dir)
        self.registry = ConnectorRegistry()
        self.metrics = RelayMetrics(per_printer=config.metrics_per_printer)
        self.jobs = JobLifecycle(self)
        # Claims on jobs in flight are leases held by this process (relay/leases.py).
        self.lease = Lease(owner=f"relay-{secrets.token_hex(6)}", seconds=config.job_lease)
        self.leases = LeaseKeeper(
            self.store, self.jobs, self.lease, self.jobs_claimed, on_lapsed=self.metrics.leases_lapsed.inc
        )
        self.secrets_at_rest = SecretBox.load_or_create(config.secret_key_path)
        self.webhooks = WebhookSender(
            self.store,
            secrets_at_rest=self.secrets_at_rest,
            max_attempts=config.webhook_max_attempts,
            retry_base=config.webhook_retry_base,
            allow_private=config.webhook_allow_private,
        )
        self.jobs.listeners.append(self.webhooks.notify)
        self._expiry_wakeup = Signal()
        self._next_sweep_at = math.inf  # when the expiry sweep plans to look again
        self.draining = False
        self.streams_changed = Signal()
        self.rate_limiter = TokenRateLimiter(config.rate_limit, config.rate_burst)
        self.tls = ServerTls(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        self.api = RestApi(self)
        self.http = HttpServer(
            self.metrics.instrument_http(self.api.handle, self.api.routes),
            ssl_context=self.tls.context if self.tls else None,
        )
        self.accepting = False

    async def run(self, *, task_status: trio.TaskStatus[RelayAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        await self.store.open()
        try:
            await self._recover()
            async with trio.open_nursery() as nursery:
                host, port = config.listen
                http_port = await nursery.start(self.http.serve, host, port)
                thost, tport = config.tunnel_listen
                listener = TunnelListener(self, ssl_context=self.tls.context if self.tls else None)
                tunnel_port = await nursery.start(listener.serve, thost, tport)
                nursery.start_soon(self._expire_jobs)
                nursery.start_soon(self.leases.run)
                await nursery.start(self.webhooks.run)
                nursery.start_soon(self.registry.watch_tokens, self.store)
                if self.tls and threading.current_thread() is threading.main_thread():
                    await nursery.start(self.tls.reload_on_sighup)
                metrics_port = None
                if config.metrics_listen is not None:
                    mhost, mport = config.metrics_listen
                    metrics_port = await nursery.start(ops_listener(self).serve, mhost, mport)
                self.accepting = True
                log.info("relay ready: API on %s:%d, tunnel on %s:%d", host, http_port, thost, tunnel_port)
                task_status.started(RelayAddresses(http_port, tunnel_port, metrics_port))
        finally:
            self.accepting = False
            with trio.CancelScope(shield=True):
                await self.store.close()

    async def _recover(self) -> None:
        """After a restart (or crash): no sessions are held, in-flight jobs queue again, and spool files
        without a live job are removed."""
        await self.spool.prepare()
        if sealed := await self.webhooks.seal_stored_secrets():
            log.info("sealed %d webhook secrets stored in clear by an older version", sealed)
        await self.store.reset_sessions()
        requeued = await self.store.requeue_interrupted(time.time())
        if requeued:
            log.info("queued %d interrupted jobs again", len(requeued))
        removed = await self.spool.remove_orphans(await self.store.all_job_ids_with_payload())
        if removed:
            log.info("removed %d orphaned spool files", removed)

    async def job_finished(self, job: Job) -> None:
        """A job reached a final state through the store directly: apply the consequences."""
        await self.jobs.changed(job, JobHistoryEntry(job.id, job.updated_at, job.state, str(job.state)))

    def jobs_claimed(self) -> set[str]:
        """Jobs this relay's dispatchers hold (claimed and not yet settled)."""
        return {j for s in self.registry.sessions() if s.dispatcher is not None for j in s.dispatcher.claimed}

    def jobs_in_flight(self) -> int:
        return sum(s.dispatcher.in_flight for s in self.registry.sessions() if s.dispatcher is not None)

    async def drain(self, grace: float) -> None:
        """Before stopping: report not ready (load balancers move away), start no new job streams, and
        let the ones in flight finish for up to ``grace`` seconds. Whatever is still in flight after that
        is queued again at the next start; the connector's ledger keeps it from printing twice."""
        self.draining = True
        self.accepting = False
        for session in self.registry.sessions():
            self.registry.wake(session.tenant, session.connector_id)
        with trio.move_on_after(grace):
            while self.jobs_in_flight():
                await self.streams_changed.wait()
        log.info("drained; %d job streams still in flight", self.jobs_in_flight())

    def job_queued(self, job: Job) -> None:
        self.registry.wake(job.tenant, job.connector_id)

    def job_accepted(self, job: Job) -> None:
        if job.state is JobState.QUEUED:
            self.job_queued(job)
        if job.expires_at is not None and job.expires_at < self._next_sweep_at:
            self._expiry_wakeup.fire()  # it expires before the sweep planned to wake

    async def cancel_job(self, job: Job, reason: str = "canceled") -> bool:
        return await self.jobs.cancel(job, reason) is not None

    def metrics_registration_failed(self, reason: str) -> None:
        self.metrics.registration_failed(reason)

    async def _expire_jobs(self) -> None:
        while True:
            # A job accepted while we look wakes the next round at once; afterwards only one that
            # expires before the planned round does (not every submit: each round is two queries).
            self._next_sweep_at = math.inf
            woken = self._expiry_wakeup.next_firing()
            for job in await self.store.expired_jobs(time.time(), 500):
                await self.jobs.transition(job.id, JobEvent.EXPIRE, "not delivered before expires_at")
            soonest = await self.store.next_expiry()
            delay = EXPIRY_INTERVAL if soonest is None else min(EXPIRY_INTERVAL, soonest - time.time())
            self._next_sweep_at = time.time() + max(0.05, delay)
            with trio.move_on_after(max(0.05, delay)):
                await woken.wait()
