"""The scale-out store: PostgreSQL shared by relay replicas.

psycopg 3's connections are blocking (its async classes are asyncio-only), so every batch runs in a
worker thread (``trio.to_thread``) on a connection of a ``psycopg_pool`` pool, group-committed like SQLite
(service/groupcommit.py). The SQL is relay/store/sql.py; what PostgreSQL adds:

* claims take rows with ``FOR UPDATE ... SKIP LOCKED``, so replicas claiming at once never take the same
  job; lease expiry, heartbeats and duties run on the database's clock;
* every notice a write makes is also a ``NOTIFY printrelay`` in the same transaction; one connection per
  replica ``LISTEN``s, read without a thread (``trio.lowlevel.wait_readable`` on its socket), and turns the
  notices of other replicas and of the CLI into notices here. A lost listener reconnects and says
  ``resync``: whatever it missed is looked up again;
* the schema is versioned (``schema_migrations``); missing versions are applied at open under an advisory
  lock, so replicas starting together migrate once, and a database newer than the code is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import outcome
import psycopg
import psycopg.errors
import psycopg_pool
import trio
from psycopg.rows import dict_row

from relay.store.base import Notice, StoreError, StoreUnavailable
from relay.store.sql import Dialect, SqlStore, Tx
from service.groupcommit import Call, GroupCommit, run_writes_in_transaction

log = logging.getLogger("printrelay.relay.store")

CHANNEL = "printrelay"
NOTIFY_LIMIT = 7_000  # PostgreSQL refuses payloads of 8,000 bytes and more; messages are cut to fit
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 5.0  # a call waits this long for a connection while the database is away (then 503)
RECONNECT_GIVE_UP = 10.0
POOL_SIZE = 4
LISTEN_RETRY = (0.5, 10.0)  # a lost listener reconnects after this (doubling up to the second figure)
MIGRATION_LOCK = 0x7072696E7472  # pg_advisory_lock key: "printr"

SCHEMA = [
    # version 1: what the SQLite store reached at its version 6, in PostgreSQL's types
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL DEFAULT '', connector_id TEXT, label TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION
    );
    CREATE TABLE connectors (
        tenant TEXT NOT NULL, id TEXT NOT NULL, public_key BYTEA NOT NULL, key_id TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '', version TEXT NOT NULL DEFAULT '',
        last_seen DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, id)
    );
    CREATE TABLE printers (
        tenant TEXT NOT NULL, id TEXT NOT NULL, connector_id TEXT NOT NULL,
        uri TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'unknown',
        reasons TEXT NOT NULL DEFAULT '[]', capabilities TEXT NOT NULL DEFAULT '{}',
        updated_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, id)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, printer_id TEXT NOT NULL, state TEXT NOT NULL,
        title TEXT NOT NULL, document_format TEXT NOT NULL, copies INTEGER NOT NULL, "user" TEXT NOT NULL,
        size BIGINT NOT NULL, sealed_size BIGINT NOT NULL, sha256 TEXT NOT NULL,
        wrapped_key BYTEA NOT NULL, key_id TEXT NOT NULL, connector_id TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
        idempotency_key TEXT, options TEXT NOT NULL DEFAULT '{}',
        unknown_outcomes INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        completed_at DOUBLE PRECISION, expires_at DOUBLE PRECISION
    );
    CREATE INDEX jobs_queue ON jobs (tenant, connector_id, state, next_attempt_at);
    CREATE INDEX jobs_printer ON jobs (tenant, printer_id, created_at);
    CREATE INDEX jobs_claim ON jobs (tenant, connector_id, state, created_at);
    CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE state IN ('sending', 'printing');
    CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE state IN ('held', 'queued');
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE job_events (
        seq BIGSERIAL PRIMARY KEY, job_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events (job_id, at);
    CREATE TABLE payloads (job_id TEXT PRIMARY KEY, sealed BYTEA NOT NULL);
    CREATE TABLE ipp_jobs (
        tenant TEXT NOT NULL, number INTEGER NOT NULL, printer_id TEXT NOT NULL, job_id TEXT,
        state TEXT NOT NULL, ticket TEXT NOT NULL DEFAULT '{}',
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, number)
    );
    CREATE UNIQUE INDEX ipp_jobs_job ON ipp_jobs (tenant, job_id) WHERE job_id IS NOT NULL;
    CREATE INDEX ipp_jobs_printer ON ipp_jobs (tenant, printer_id, state, number);
    CREATE TABLE ipp_counters (tenant TEXT PRIMARY KEY, last INTEGER NOT NULL);
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL,
        events TEXT NOT NULL, secret TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX webhooks_tenant ON webhooks (tenant, created_at);
    CREATE TABLE webhook_deliveries (
        seq BIGSERIAL PRIMARY KEY, id TEXT NOT NULL UNIQUE,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        tenant TEXT NOT NULL, job_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL, job TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE PRECISION NOT NULL,
        last_error TEXT NOT NULL DEFAULT '', claimed_by TEXT, claimed_until DOUBLE PRECISION
    );
    CREATE INDEX webhook_deliveries_line ON webhook_deliveries (webhook_id, job_id, seq);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at);
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE connector_sessions (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, connector_id TEXT NOT NULL, replica_id TEXT NOT NULL,
        opened_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX connector_sessions_connector ON connector_sessions (tenant, connector_id);
    CREATE INDEX connector_sessions_replica ON connector_sessions (replica_id);
    CREATE TABLE tenant_usage (
        tenant TEXT PRIMARY KEY, bytes BIGINT NOT NULL DEFAULT 0, jobs BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE duties (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until DOUBLE PRECISION NOT NULL);
    CREATE TABLE relay_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE candidates (
        tenant TEXT NOT NULL, connector_id TEXT NOT NULL, uri TEXT NOT NULL, data TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant, connector_id, uri)
    );
    CREATE TABLE connector_requests (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, connector_id TEXT NOT NULL, method TEXT NOT NULL,
        path TEXT NOT NULL, body BYTEA, claimed_by TEXT, status INTEGER, answer BYTEA,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE payload_chunks (
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, data BYTEA NOT NULL, written_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    -- sealed bytes are random: compressing them is wasted work
    ALTER TABLE payload_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    """,
    # version 2: people: users of a tenant, their own tokens, and the jobs they own
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT 'user', state TEXT NOT NULL DEFAULT 'active',
        password_hash TEXT NOT NULL DEFAULT '', created_at DOUBLE PRECISION NOT NULL,
        disabled_at DOUBLE PRECISION
    );
    CREATE INDEX users_tenant ON users (tenant, email);
    ALTER TABLE tokens ADD COLUMN user_id TEXT;
    CREATE INDEX tokens_user ON tokens (user_id) WHERE user_id IS NOT NULL;
    ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_owner ON jobs (tenant, owner, created_at) WHERE owner != '';
    """,
    # version 3: pull printers (jobs held until released at the printer), the portal's sessions, and
    # the tenants' OpenID Connect providers
    """
    ALTER TABLE printers ADD COLUMN pull INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE web_sessions (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        last_seen_at DOUBLE PRECISION NOT NULL DEFAULT 0, revoked_at DOUBLE PRECISION,
        via TEXT NOT NULL DEFAULT 'password'
    );
    CREATE INDEX web_sessions_user ON web_sessions (user_id);
    CREATE TABLE oidc_providers (
        tenant TEXT PRIMARY KEY, issuer TEXT NOT NULL, client_id TEXT NOT NULL,
        client_secret_sealed BYTEA NOT NULL, email_claim TEXT NOT NULL DEFAULT 'email',
        create_users INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL
    );
    """,
    # version 4: a webhook's last outcome, kept after its delivery left the outbox
    """
    ALTER TABLE webhooks ADD COLUMN last_error TEXT NOT NULL DEFAULT '';
    ALTER TABLE webhooks ADD COLUMN last_error_at DOUBLE PRECISION;
    ALTER TABLE webhooks ADD COLUMN last_delivered_at DOUBLE PRECISION;
    """,
    # version 5: child tenants (the integrator API); usage over a period reads a tenant's jobs by time
    """
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX tenants_parent ON tenants (parent, created_at, id);
    CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);
    """,
    # version 6: device events: the outbox carries connector and printer events too (``event``; their
    # line, "connector:ID" or "printer:ID", in job_id and their data in job), and what was last announced
    # of each connector and printer, so that restarts and replicas neither repeat nor lose one
    """
    ALTER TABLE webhook_deliveries ADD COLUMN event TEXT NOT NULL DEFAULT '';
    ALTER TABLE connectors ADD COLUMN announced TEXT NOT NULL DEFAULT '';
    ALTER TABLE printers ADD COLUMN announced TEXT NOT NULL DEFAULT '';
    UPDATE printers SET announced = state WHERE state <> 'unknown';
    """,
    # version 7: what a printer says of its state for people (IPP printer-state-message, the Printer MIB's
    # alerts), and a completed job's pages by the printer's page counter (RAW and LPD printers with SNMP)
    """
    ALTER TABLE printers ADD COLUMN message TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN pages INTEGER;
    """,
]
SCHEMA_VERSION = len(SCHEMA)


def redacted(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _payload(notice: Notice, origin: str, at: float) -> str:
    data = dict(notice.data)
    if isinstance(data.get("message"), str):
        data["message"] = data["message"][:1000]
    # "t": when the sender sent it, for the receivers' notice lag (it includes the hosts' clock difference)
    head = {"o": origin, "k": notice.kind, "key": notice.key, "t": round(at, 4)}
    payload = json.dumps({**head, "d": data}, separators=(",", ":"))
    if len(payload.encode()) > NOTIFY_LIMIT:
        payload = json.dumps({**head, "d": {}})
    return payload


def _notify(conn: Any, notices: Sequence[Notice], origin: str) -> None:
    """One statement for a batch's notices (delivered in this order, once it commits)."""
    at = time.time()
    conn.execute(
        "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) WITH ORDINALITY AS n(p, i) ORDER BY i",
        (CHANNEL, [_payload(notice, origin, at) for notice in notices]),
    )


DIALECT = Dialect(
    name="postgresql",
    clock="extract(epoch from clock_timestamp())::float8",
    skip_locked=" FOR UPDATE OF j SKIP LOCKED",
    event_order="seq",
    integrity_errors=(psycopg.errors.IntegrityError,),
    combines_sends=True,
    translate=lambda sql: sql.replace("?", "%s"),
    notify=_notify,
)


class SchemaTooNew(StoreError):
    pass


def _unavailable(url: str, exc: BaseException) -> StoreUnavailable:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreUnavailable(f"database {redacted(url)} unavailable: {reason}")


def connect(url: str, *, timeout: float = CONNECT_TIMEOUT) -> psycopg.Connection[Any]:
    """One connection in autocommit mode, rows as dicts; StoreUnavailable with the reason if it fails
    (a wrong password says so, an unreachable host too)."""
    try:
        return psycopg.connect(
            url, autocommit=True, row_factory=dict_row, connect_timeout=max(1, int(timeout))
        )
    except psycopg.Error as exc:
        raise _unavailable(url, exc) from exc


def schema_version(conn: psycopg.Connection[Any]) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ "
        "NOT NULL DEFAULT now())"
    )
    row = conn.execute("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations").fetchone()
    return int(row["version"]) if row else 0


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the versions this database lacks, under an advisory lock (replicas starting together wait
    for the first, then find nothing to do); the versions applied."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        version = schema_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the database is at schema version {version}, newer than this printrelay's "
                f"{SCHEMA_VERSION}: run the newer printrelay, or restore a backup made for this one"
            )
        applied = []
        for number, script in enumerate(SCHEMA[version:], start=version + 1):
            with conn.transaction():
                conn.execute(script)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
            log.info("database migrated to schema version %d", number)
            applied.append(number)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


class PostgresBatcher:
    """Runs a batch on a pooled connection: reads, then the writes in one transaction."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], url: str, origin: str) -> None:
        self._pool = pool
        self._url = url
        self._origin = origin

    def run_batch(self, reads: Sequence[Call[Tx, Any]], writes: Sequence[Call[Tx, Any]]) -> None:
        try:
            with self._pool.connection() as conn:
                tx = Tx(conn, DIALECT, self._origin)
                for call in reads:
                    call.result = outcome.capture(call.fn, tx)
                if writes:
                    run_writes_in_transaction(
                        writes, tx, optimistic=tx.pipelined, before_commit=tx.before_commit, begin=tx.begin,
                        commit=lambda: conn.execute("COMMIT"),
                        rollback=lambda: conn.execute("ROLLBACK") if not conn.closed else None,
                        savepoint=lambda: conn.execute("SAVEPOINT call"),
                        rollback_to_savepoint=lambda: conn.execute("ROLLBACK TO SAVEPOINT call"),
                        release_savepoint=lambda: conn.execute("RELEASE SAVEPOINT call"),
                    )  # fmt: skip
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as exc:
            error = _unavailable(self._url, exc)
            for call in (*reads, *writes):
                if call.result is None or _lost(call.result):
                    call.result = outcome.Error(error)
            return
        for call in (*reads, *writes):
            if isinstance(call.result, outcome.Error) and _lost(call.result):
                call.result = outcome.Error(_unavailable(self._url, call.result.error))


def _lost(result: outcome.Outcome[Any]) -> bool:
    """A call that failed because the connection did (PostgreSQL restarting), not because of its SQL."""
    return isinstance(result, outcome.Error) and isinstance(result.error, psycopg.OperationalError)


class PostgresStore(SqlStore):
    def __init__(self, url: str, replica_id: str | None = None, *, pool_size: int = POOL_SIZE) -> None:
        super().__init__(DIALECT, replica_id)
        self.url = url
        self.pool_size = pool_size
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({redacted(self.url)!r})"

    async def open(self) -> None:
        def _open() -> psycopg_pool.ConnectionPool[Any]:
            with connect(self.url) as conn:  # the reason of a failure, said plainly, before the pool retries
                migrate(conn)
            pool = psycopg_pool.ConnectionPool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": int(CONNECT_TIMEOUT)},
                check=psycopg_pool.ConnectionPool.check_connection,
                timeout=CALL_TIMEOUT,
                # The pool backs off between reconnections without a cap until it gives up: giving up soon
                # makes the next call start afresh (at 1 s), so a restarted database is found within seconds
                # however long it was away.
                reconnect_timeout=RECONNECT_GIVE_UP,
                name="printrelay",
            )
            pool.open(wait=True, timeout=CONNECT_TIMEOUT)
            return pool

        self._pool = await trio.to_thread.run_sync(_open)
        self._commits = GroupCommit(PostgresBatcher(self._pool, self.url, self.replica_id))
        # Reads need not wait for the writes' commit (its fsync): they run beside them.
        self._reads = GroupCommit(PostgresBatcher(self._pool, self.url, self.replica_id))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # Holding both pipelines' limiters: no batch runs on the pool while it closes.
            async with contextlib.AsyncExitStack() as held:
                for pipeline in (self._commits, self._reads):
                    if pipeline is not None:
                        await held.enter_async_context(pipeline.limiter)
                await trio.to_thread.run_sync(pool.close, limiter=trio.CapacityLimiter(1))
            self._commits = self._reads = None

    async def follow_other_processes(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN on a connection of its own; what other processes NOTIFY becomes notices here (started once
        it listens)."""
        delay = LISTEN_RETRY[0]
        first = True
        while True:
            try:
                conn = await trio.to_thread.run_sync(connect, self.url)
            except StoreUnavailable as exc:
                log.warning("cannot listen for other replicas' changes: %s; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY[1])
                continue
            delay = LISTEN_RETRY[0]
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                if first:
                    task_status.started()
                else:
                    # Whatever was said while nobody listened is looked up again.
                    self.deliver([Notice("resync", "")])
                first = False
                await self._listen(conn)
            except psycopg.OperationalError as exc:
                log.warning("lost the database connection that listens for other replicas: %s", exc)
            finally:
                conn.close()

    async def _listen(self, conn: psycopg.Connection[Any]) -> None:
        pgconn = conn.pgconn
        while True:
            await trio.lowlevel.wait_readable(conn.fileno())
            pgconn.consume_input()  # OperationalError when the connection is gone
            notices = []
            while (raw := pgconn.notifies()) is not None:
                notice = self._decode(raw.extra.decode(errors="replace"))
                if notice is not None:
                    notices.append(notice)
            self.deliver(notices)

    def _decode(self, payload: str) -> Notice | None:
        try:
            obj = json.loads(payload)
            if obj.get("o") == self.replica_id:
                return None  # our own: heard once already, when it committed
            data = obj.get("d") if isinstance(obj.get("d"), dict) else {}
            sent = obj.get("t")
            if self.observer is not None and isinstance(sent, (int, float)):
                self.observer.notice_heard(max(0.0, time.time() - sent))
            return Notice(str(obj["k"]), str(obj.get("key", "")), data)
        except (ValueError, KeyError, AttributeError):
            log.warning("ignored a malformed notice on channel %s: %.200s", CHANNEL, payload)
            return None

    async def schema_status(self) -> tuple[int, int]:
        """(the database's schema version, this code's)."""

        def read() -> int:
            with connect(self.url) as conn:
                return schema_version(conn)

        return await trio.to_thread.run_sync(read), SCHEMA_VERSION
