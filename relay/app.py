"""The relay process: builds each part with the collaborators it needs and runs them in one nursery."""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from relay.adoption import Adoption
from relay.api.ipp import IppEndpoint
from relay.api.rest import RestApi
from relay.auth import Principal, TokenCache, TokenLookup
from relay.config import RelayConfig
from relay.credentials import Credentials
from relay.dispatch import Dispatcher, DispatchSettings, Drain
from relay.fetch import Fetcher, FetchLimits
from relay.jobs import Job, JobState
from relay.leases import LeaseKeeper
from relay.lifecycle import JobLifecycle
from relay.metrics import RelayMetrics
from relay.ops import RelayHealth
from relay.portal import Portal
from relay.ratelimit import TokenRateLimiter
from relay.secretbox import SecretBox
from relay.spool import DatabaseSpool, PayloadSpool, Spool
from relay.store import store_for
from relay.store.base import Lease, Store, StoreError, StoreUnavailable
from relay.submit import Intake, SubmitLimits
from relay.tls import ServerTls
from relay.tunnel import ConnectorRegistry, ConnectorSession, TunnelListener
from relay.users import People
from relay.webhooks import WebhookSender
from service.http.server import HttpServer
from service.listen import start_listener
from service.signal import Signal
from tunnel.session import H2Session

log = logging.getLogger("printrelay.relay")

EXPIRY_INTERVAL = 60.0
# Connectors past connector_offline_grace are looked for every quarter of it, within these bounds (s):
# announced offline at most grace + 5 s after their session ended (30 s + 5 s by default).
OFFLINE_SWEEP = (0.1, 5.0)
HEARTBEAT_INTERVAL = 5.0  # a replica says it is alive this often
SILENT_REPLICA = 30.0  # a replica silent this long is gone: its sessions are forgotten


@dataclass(frozen=True)
class RelayAddresses:
    http_port: int
    tunnel_port: int
    metrics_port: int | None = None  # with --metrics-listen


class Relay:
    """Everything one relay process runs; :meth:`run` owns all of its tasks."""

    def __init__(self, config: RelayConfig, store: Store | None = None) -> None:
        self.config = config
        self.store: Store = store or store_for(config.data_dir, config.database_url)
        self.replica_id = self.store.replica_id
        # With PostgreSQL, payloads live in the database too: any replica streams any job, no shared disk.
        self.spool: PayloadSpool = (
            DatabaseSpool(self.store) if config.database_url else Spool(config.spool_dir)
        )
        self.registry = ConnectorRegistry()
        self.metrics = RelayMetrics(per_printer=config.metrics_per_printer)
        self.jobs = JobLifecycle(
            self.store, self.store, self.store, self.spool, self.metrics, job_ttl=config.job_ttl,
            held_job_ttl=config.held_job_ttl,
        )  # fmt: skip
        self.drain_state = Drain()
        # Claims on jobs in flight are leases held by this replica (relay/leases.py).
        self.lease = Lease(owner=self.replica_id, seconds=config.job_lease)
        self.leases = LeaseKeeper(
            self.store,
            self.jobs,
            self.lease,
            self.registry.claimed_jobs,
            on_lapsed=self.metrics.leases_lapsed.inc,
        )
        self.secrets_at_rest = SecretBox.load_or_create(config.secret_key_path)
        self.webhooks = WebhookSender(
            self.store,
            secrets_at_rest=self.secrets_at_rest,
            owner=self.replica_id,
            max_attempts=config.webhook_max_attempts,
            retry_base=config.webhook_retry_base,
            allow_private=config.webhook_allow_private,
        )
        # Every change, here or on another replica, reaches watchers, webhooks, dispatchers, token checks.
        self.store.on_notice(self.webhooks.notify)  # job changes and device events
        self.store.observe(self.metrics)
        self.store.on_notice(self.jobs.heard)
        self.store.on_notice(self.registry.heard)
        self._expiry_wakeup = Signal()
        self._next_sweep_at = math.inf  # when the expiry sweep plans to look again
        self.intake = Intake(
            self.store,
            self.spool,
            self.metrics,
            SubmitLimits(
                max_job_bytes=config.max_job_bytes,
                tenant_max_jobs=config.tenant_max_jobs,
                tenant_max_spool_bytes=config.tenant_max_spool_bytes,
                max_attempts=config.max_attempts,
                job_ttl=config.job_ttl,
                held_job_ttl=config.held_job_ttl,
            ),
            on_accepted=self._job_accepted,
            on_replayed=self._job_replayed,
        )
        self.rate_limiter = TokenRateLimiter(config.rate_limit, config.rate_burst)
        self.tls = ServerTls(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        self.accepting = False
        self.replicas_alive = 1  # replicas sharing the store, as the last heartbeat counted them
        self.health = RelayHealth(
            self.store, self.spool, self.registry, self.metrics, config.data_dir, lambda: self.accepting
        )
        # With PostgreSQL, API tokens as requests check them are kept a moment: a revocation anywhere is a
        # NOTIFY that drops them at once. SQLite hears the CLI's revocations only by polling (2 s), and its
        # reads cost little: there every request reads its token.
        self.tokens: TokenLookup = self.store
        self.people = People(self.store, cache_ttl=5.0 if config.database_url else 0.0)
        self.store.on_notice(self.people.heard)
        if config.database_url:
            cache = TokenCache(self.store)
            self.store.on_notice(cache.heard)
            self.tokens = cache
        credentials = Credentials(self.tokens, self.people)
        fetcher = Fetcher(
            FetchLimits(
                max_bytes=config.max_job_bytes,
                timeout=config.fetch_timeout,
                allow_private=config.fetch_allow_private,
            )
        )
        ipp = IppEndpoint(
            self.store,
            self.jobs,
            self.intake,
            self.rate_limiter,
            credentials=credentials,
            public_url=config.public_url,
            tls=self.tls is not None,
            fetcher=fetcher,
        )
        self.adoption = Adoption(self.store, self.registry, self.replica_id)
        self.store.on_notice(self.adoption.heard)
        self._replicas_changed = Signal()  # a replica joined or left: count again, tell the connectors
        self.store.on_notice(
            lambda notice: self._replicas_changed.fire() if notice.kind in ("replicas", "resync") else None
        )
        # The portal (/portal, /release/...): people's pages, signed in with a session cookie.
        self.portal = Portal(
            self.store, self.people, self.jobs, self.intake, self.secrets_at_rest,
            public_url=config.public_url, tls=self.tls is not None, session_ttl=config.portal_session_ttl,
            max_upload=config.portal_max_upload_bytes,
        )  # fmt: skip
        self.store.on_notice(self.portal.heard)  # job changes for live pages; users disabled
        self.api = RestApi(
            self.store,
            self.jobs,
            self.intake,
            self.adoption,
            self.rate_limiter,
            self.secrets_at_rest,
            ipp=ipp,
            readiness=self.health.readiness,
            credentials=credentials,
            webhook_allow_private=config.webhook_allow_private,
            portal=self.portal.handle,
            public_url=config.public_url,
            tls=self.tls is not None,
            max_child_tenants=config.max_child_tenants,
            fetcher=fetcher,
        )
        self.store.on_notice(self.api.events.heard)  # GET /v1/events: job changes and device events
        self.http = HttpServer(
            self.metrics.instrument_http(self.api.handle, self.api.routes),
            ssl_context=self.tls.context if self.tls else None,
        )
        self._dispatch = DispatchSettings(
            max_streams=config.max_streams_per_connector,
            retry_base=config.retry_base,
            retry_cap=config.retry_cap,
            lease=self.lease,
        )

    # --- wiring of a tunnel session ---------------------------------------------------------------

    def _new_session(
        self, principal: Principal, h2: H2Session, remote: str, registered: Callable[[], None]
    ) -> ConnectorSession:
        def dispatcher(session: ConnectorSession) -> Dispatcher:
            return Dispatcher(
                session, store=self.store, spool=self.spool, jobs=self.jobs, metrics=self.metrics,
                settings=self._dispatch, wakeup=self.registry.wakeup(session.tenant, session.connector_id),
                drain=self.drain_state,
            )  # fmt: skip

        return ConnectorSession(
            principal, h2, remote, store=self.store, registry=self.registry, metrics=self.metrics,
            dispatcher=dispatcher, replica_id=self.replica_id, on_registered=registered,
        )  # fmt: skip

    # --- running ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[RelayAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        await self.store.open()
        try:
            await self._recover()
            async with trio.open_nursery() as nursery:
                host, port = config.listen
                http_port = await start_listener(nursery, self.http.serve, host, port, "--listen")
                thost, tport = config.tunnel_listen
                listener = TunnelListener(
                    self.registry, self.store, self.metrics, self._new_session,
                    replica=lambda: (self.replica_id, self.replicas_alive),
                    draining=lambda: self.drain_state.draining,
                    ssl_context=self.tls.context if self.tls else None,
                )  # fmt: skip
                tunnel_port = await start_listener(nursery, listener.serve, thost, tport, "--tunnel-listen")
                nursery.start_soon(self._expire_jobs)
                nursery.start_soon(self._announce_offline)
                nursery.start_soon(self.leases.run)
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self.store.follow_other_processes)
                nursery.start_soon(self.adoption.run)
                await nursery.start(self.webhooks.run)
                nursery.start_soon(self.registry.watch_tokens, self.store)
                if self.tls and threading.current_thread() is threading.main_thread():
                    await nursery.start(self.tls.reload_on_sighup)
                metrics_port = None
                if config.metrics_listen is not None:
                    mhost, mport = config.metrics_listen
                    serve = self.health.listener().serve
                    metrics_port = await start_listener(nursery, serve, mhost, mport, "--metrics-listen")
                self.accepting = True
                log.info(
                    "relay ready (replica %s): API on %s:%d, tunnel on %s:%d", self.replica_id, host,
                    http_port, thost, tunnel_port, extra={"replica": self.replica_id},
                )  # fmt: skip
                task_status.started(RelayAddresses(http_port, tunnel_port, metrics_port))
        finally:
            self.accepting = False
            with trio.CancelScope(shield=True):
                try:
                    with trio.move_on_after(5):
                        await self.store.retire_replica(self.replica_id)
                finally:
                    await self.store.close()

    async def _recover(self) -> None:
        """After a restart (or crash): this replica joins, jobs in flight on replicas that are gone queue
        again, and spool files without a live job are removed."""
        await self.spool.prepare()
        await self.store.register_replica(self.replica_id, platform.node())
        mine = self.secrets_at_rest.fingerprint
        agreed = await self.store.agree("secret_key_fingerprint", mine)
        if agreed != mine:
            # Webhook secrets sealed by the others would not open here (nor ours there).
            raise StoreError(
                f"secret_key_file {self.config.secret_key_path} is not the key the database's other relays "
                f"use (fingerprint {mine}, theirs {agreed}): give every relay sharing a database the same "
                "--secret-key-file"
            )
        self.replicas_alive = max(1, await self.store.live_replicas(SILENT_REPLICA))
        requeued = await self.store.requeue_orphaned(time.time())
        if requeued:
            log.info("queued %d interrupted jobs again", len(requeued))
        if sealed := await self.webhooks.seal_stored_secrets():
            log.info("sealed %d webhook secrets stored in clear by an older version", sealed)
        removed = await self.spool.remove_orphans(await self.store.all_job_ids_with_payload())
        if removed:
            log.info("removed %d orphaned spool files", removed)

    async def _heartbeat(self) -> None:
        while True:
            with trio.move_on_after(HEARTBEAT_INTERVAL):
                await self._replicas_changed.wait()
            try:
                await self.store.heartbeat(self.replica_id)
                await self.store.retire_silent_replicas(SILENT_REPLICA)
                await self.registry.write_pending_closes(self.store)
                alive = max(1, await self.store.live_replicas(SILENT_REPLICA))
            except StoreUnavailable as exc:
                log.warning("heartbeat skipped: %s", exc)
                continue
            if alive != self.replicas_alive:
                self.replicas_alive = alive
                # Connectors learnt the count when they connected: one that met a lone replica opens
                # its other sessions now.
                async with trio.open_nursery() as nursery:
                    for session in self.registry.sessions():
                        nursery.start_soon(session.tell_replicas, alive)

    def jobs_in_flight(self) -> int:
        return self.registry.jobs_in_flight()

    @property
    def draining(self) -> bool:
        return self.drain_state.draining

    async def drain(self, grace: float) -> None:
        """Before stopping: report not ready (load balancers move away), start no new job streams, and
        let the ones in flight finish for up to ``grace`` seconds. Whatever is still in flight after that
        is queued again; the connector's ledger keeps it from printing twice."""
        self.drain_state.draining = True
        self.accepting = False
        sessions = self.registry.sessions()
        for session in sessions:
            self.registry.wake(session.tenant, session.connector_id)
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for session in sessions:  # connectors move their sessions to other replicas
                    nursery.start_soon(session.ask_to_drain)
            while self.jobs_in_flight():
                await self.drain_state.streams_changed.wait()
        log.info("drained; %d job streams still in flight", self.jobs_in_flight())

    def _job_accepted(self, job: Job) -> None:
        if job.expires_at is not None and job.expires_at < self._next_sweep_at:
            self._expiry_wakeup.fire()  # it expires before the sweep planned to wake

    def _job_replayed(self, job: Job) -> None:
        """As if accepted now: its acceptance may not have been heard here (see below)."""
        self._job_accepted(job)
        if job.state is JobState.QUEUED:
            # The store's notice woke the dispatcher when the job was committed, but not if that commit's
            # answer was lost with the connection (this replay follows its 503): PostgreSQL drops our own
            # NOTIFY, and nothing else would wake it.
            self.registry.wake(job.tenant, job.connector_id)

    async def _expire_jobs(self) -> None:
        while True:
            # A job accepted while we look wakes the next round at once; afterwards only one that
            # expires before the planned round does (not every submit: each round is two queries).
            self._next_sweep_at = math.inf
            woken = self._expiry_wakeup.next_firing()
            try:
                # One replica sweeps at a time (the duty outlives a round, so it stays with one replica).
                if await self.store.take_duty("expiry", self.replica_id, 3 * EXPIRY_INTERVAL):
                    for job in await self.store.expired_jobs(time.time(), 500):
                        await self.jobs.expire(job)
                soonest = await self.store.next_expiry()
            except StoreUnavailable as exc:
                log.warning("expiry sweep skipped: %s", exc)
                soonest = None
            delay = EXPIRY_INTERVAL if soonest is None else min(EXPIRY_INTERVAL, soonest - time.time())
            self._next_sweep_at = time.time() + max(0.05, delay)
            with trio.move_on_after(max(0.05, delay)):
                await woken.wait()

    async def _announce_offline(self) -> None:
        """Connectors without a session on any replica for ``connector_offline_grace`` are announced
        offline (connector.offline), by one replica at a time, each once (the store's compare-and-set)."""
        grace = self.config.connector_offline_grace
        # A relay that just started gives the connectors of the sessions it lost the grace to come back:
        # after a crash, their last_seen is when their sessions opened, not when they ended.
        await trio.sleep(grace)
        interval = min(max(grace / 4, OFFLINE_SWEEP[0]), OFFLINE_SWEEP[1])
        while True:
            try:
                if await self.store.take_duty("connector-offline", self.replica_id, 3 * interval):
                    for tenant, connector_id in await self.store.announce_offline(time.time() - grace):
                        log.info("connector %s/%s announced offline", tenant, connector_id,
                                 extra={"tenant": tenant, "connector_id": connector_id})  # fmt: skip
            except StoreUnavailable as exc:
                log.warning("offline sweep skipped: %s", exc)
            await trio.sleep(interval)  # a timer: the next round


__all__ = ["JobState", "Relay", "RelayAddresses"]
