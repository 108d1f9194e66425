"""The embedded store: one SQLite database in WAL mode, for a relay that runs as one process.

One connection, used from worker threads one batch at a time (group commit, service/groupcommit.py):
SQLite serialises writers anyway, and a single connection keeps transactions simple. ``synchronous=FULL``
makes every commit durable before we answer 201. Other processes (``printrelay token``) may write the same
file at the same time; WAL plus a busy timeout lets them, and ``PRAGMA data_version`` tells the relay that
they did. The SQL itself is relay/store/sql.py, shared with PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from relay.store.base import Notice, StoreError
from relay.store.sql import Dialect, SqlStore, Tx, retire_replicas
from service.groupcommit import GroupCommit
from service.sqlite import SqliteBatcher, open_sqlite

__all__ = ["SCHEMA_VERSION", "SqliteStore", "migrate", "open_connection", "open_sqlite", "schema_version"]

# Other processes (the CLI revoking a token) are noticed this often.
OUTSIDE_WRITES_INTERVAL = 2.0

SCHEMA = [
    # version 1
    """
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, secret_hash TEXT NOT NULL,
        scopes TEXT NOT NULL DEFAULT '', connector_id TEXT, label TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL, expires_at REAL, revoked_at REAL
    );
    CREATE TABLE connectors (
        tenant TEXT NOT NULL, id TEXT NOT NULL, public_key BLOB NOT NULL, key_id TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '', version TEXT NOT NULL DEFAULT '',
        sessions INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, id)
    );
    CREATE TABLE printers (
        tenant TEXT NOT NULL, id TEXT NOT NULL, connector_id TEXT NOT NULL,
        uri TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT '', state TEXT NOT NULL DEFAULT 'unknown',
        reasons TEXT NOT NULL DEFAULT '[]', capabilities TEXT NOT NULL DEFAULT '{}',
        updated_at REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, id)
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, printer_id TEXT NOT NULL, state TEXT NOT NULL,
        title TEXT NOT NULL, document_format TEXT NOT NULL, copies INTEGER NOT NULL, user TEXT NOT NULL,
        size INTEGER NOT NULL, sealed_size INTEGER NOT NULL, sha256 TEXT NOT NULL,
        wrapped_key BLOB NOT NULL, key_id TEXT NOT NULL, connector_id TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
        next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
        idempotency_key TEXT, options TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL, updated_at REAL NOT NULL, completed_at REAL, expires_at REAL
    );
    CREATE INDEX jobs_queue ON jobs (tenant, connector_id, state, next_attempt_at);
    CREATE INDEX jobs_printer ON jobs (tenant, printer_id, created_at);
    CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE job_events (
        job_id TEXT NOT NULL, at REAL NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events (job_id, at);
    """,
    # version 2: IPP job numbers, and Create-Job jobs waiting for their document
    """
    CREATE TABLE ipp_jobs (
        tenant TEXT NOT NULL, number INTEGER NOT NULL, printer_id TEXT NOT NULL, job_id TEXT,
        state TEXT NOT NULL, ticket TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL, updated_at REAL NOT NULL,
        PRIMARY KEY (tenant, number)
    );
    CREATE UNIQUE INDEX ipp_jobs_job ON ipp_jobs (tenant, job_id) WHERE job_id IS NOT NULL;
    CREATE INDEX ipp_jobs_printer ON ipp_jobs (tenant, printer_id, state, number);
    """,
    # version 3: webhooks, and their outbox, filled by a trigger in the same transaction as each job event
    # (so no committed change can miss its deliveries), with the job as it is at that moment
    """
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL,
        events TEXT NOT NULL, secret TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE INDEX webhooks_tenant ON webhooks (tenant, created_at);
    CREATE TABLE webhook_deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
        tenant TEXT NOT NULL, job_id TEXT NOT NULL,
        at REAL NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL, job TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX webhook_deliveries_line ON webhook_deliveries (webhook_id, job_id, seq);
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at);
    CREATE TRIGGER job_events_webhooks AFTER INSERT ON job_events BEGIN
        INSERT INTO webhook_deliveries (id, webhook_id, tenant, job_id, at, state, message, job,
                                        next_attempt_at)
        SELECT 'whd_' || lower(hex(randomblob(12))), w.id, w.tenant, NEW.job_id, NEW.at, NEW.state,
            NEW.message,
            json_object(
                'id', j.id, 'tenant', j.tenant, 'printer_id', j.printer_id, 'state', j.state,
                'title', j.title, 'document_format', j.document_format, 'copies', j.copies,
                'user', j.user, 'size', j.size, 'attempts', j.attempts, 'max_attempts', j.max_attempts,
                'last_error', j.last_error, 'options', json(j.options), 'created_at', j.created_at,
                'updated_at', j.updated_at, 'completed_at', j.completed_at, 'expires_at', j.expires_at
            ),
            NEW.at
        FROM jobs j JOIN webhooks w ON w.tenant = j.tenant
        WHERE j.id = NEW.job_id
        AND (instr(w.events, ' job.state_changed ') > 0 OR instr(w.events, ' job.' || NEW.state || ' ') > 0);
    END;
    """,
    # version 4: small sealed payloads, committed with their job row instead of a spool file; the claim
    # walks a connector's queue in submission order and stops at its LIMIT (no sort of the whole backlog)
    """
    CREATE TABLE payloads (job_id TEXT PRIMARY KEY, sealed BLOB NOT NULL);
    CREATE INDEX jobs_claim ON jobs (tenant, connector_id, state, created_at);
    """,
    # version 5: claims are leases (owner and expiry, renewed while the job streams; a lapsed one is
    # queued again), and jobs held because the connector could not know whether the printer took them
    """
    ALTER TABLE jobs ADD COLUMN unknown_outcomes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
    CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE state IN ('sending', 'printing');
    """,
    # version 6: replicas, and the connector sessions each holds (a counter per connector was one process's
    # view); quotas counted in the database (atomic with the insert); IPP numbers from a counter per tenant
    # (MAX + 1 raced between replicas); the webhook outbox filled by the store (a trigger cannot see the
    # job's JSON the same way on PostgreSQL) and claimed by one sender at a time; duties one replica does
    """
    DROP TRIGGER job_events_webhooks;
    ALTER TABLE connectors DROP COLUMN sessions;
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    CREATE TABLE connector_sessions (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, connector_id TEXT NOT NULL, replica_id TEXT NOT NULL,
        opened_at REAL NOT NULL
    );
    CREATE INDEX connector_sessions_connector ON connector_sessions (tenant, connector_id);
    CREATE INDEX connector_sessions_replica ON connector_sessions (replica_id);
    CREATE TABLE tenant_usage (
        tenant TEXT PRIMARY KEY, bytes INTEGER NOT NULL DEFAULT 0, jobs INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO tenant_usage (tenant, bytes, jobs)
        SELECT tenant, COALESCE(SUM(sealed_size), 0), COUNT(*) FROM jobs
        WHERE state IN ('held', 'queued', 'sending', 'printing') GROUP BY tenant;
    CREATE TABLE ipp_counters (tenant TEXT PRIMARY KEY, last INTEGER NOT NULL);
    INSERT INTO ipp_counters (tenant, last) SELECT tenant, MAX(number) FROM ipp_jobs GROUP BY tenant;
    ALTER TABLE webhook_deliveries ADD COLUMN claimed_by TEXT;
    ALTER TABLE webhook_deliveries ADD COLUMN claimed_until REAL;
    CREATE TABLE duties (name TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
    CREATE TABLE relay_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE candidates (
        tenant TEXT NOT NULL, connector_id TEXT NOT NULL, uri TEXT NOT NULL, data TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (tenant, connector_id, uri)
    );
    CREATE TABLE connector_requests (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, connector_id TEXT NOT NULL, method TEXT NOT NULL,
        path TEXT NOT NULL, body BLOB, claimed_by TEXT, status INTEGER, answer BLOB,
        created_at REAL NOT NULL
    );
    CREATE TABLE payload_chunks (
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, written_at REAL NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    """,
    # version 7: people: users of a tenant, their own tokens, and the jobs they own
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT 'user', state TEXT NOT NULL DEFAULT 'active',
        password_hash TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, disabled_at REAL
    );
    CREATE INDEX users_tenant ON users (tenant, email);
    ALTER TABLE tokens ADD COLUMN user_id TEXT;
    CREATE INDEX tokens_user ON tokens (user_id) WHERE user_id IS NOT NULL;
    ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_owner ON jobs (tenant, owner, created_at) WHERE owner != '';
    """,
    # version 8: pull printers (jobs held until released at the printer), the portal's sessions, and
    # the tenants' OpenID Connect providers
    """
    ALTER TABLE printers ADD COLUMN pull INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE web_sessions (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, user_id TEXT NOT NULL, created_at REAL NOT NULL,
        expires_at REAL NOT NULL, last_seen_at REAL NOT NULL DEFAULT 0, revoked_at REAL,
        via TEXT NOT NULL DEFAULT 'password'
    );
    CREATE INDEX web_sessions_user ON web_sessions (user_id);
    CREATE TABLE oidc_providers (
        tenant TEXT PRIMARY KEY, issuer TEXT NOT NULL, client_id TEXT NOT NULL,
        client_secret_sealed BLOB NOT NULL, email_claim TEXT NOT NULL DEFAULT 'email',
        create_users INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
    );
    """,
    # version 9: a webhook's last outcome, kept after its delivery left the outbox
    """
    ALTER TABLE webhooks ADD COLUMN last_error TEXT NOT NULL DEFAULT '';
    ALTER TABLE webhooks ADD COLUMN last_error_at REAL;
    ALTER TABLE webhooks ADD COLUMN last_delivered_at REAL;
    """,
    # version 10: child tenants (the integrator API); usage over a period reads a tenant's jobs by time
    """
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL
    );
    CREATE INDEX tenants_parent ON tenants (parent, created_at, id);
    CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);
    """,
    # version 11: device events: the outbox carries connector and printer events too (``event``; their
    # line, "connector:ID" or "printer:ID", in job_id and their data in job), and what was last announced
    # of each connector and printer, so that restarts and replicas neither repeat nor lose one
    """
    ALTER TABLE webhook_deliveries ADD COLUMN event TEXT NOT NULL DEFAULT '';
    ALTER TABLE connectors ADD COLUMN announced TEXT NOT NULL DEFAULT '';
    ALTER TABLE printers ADD COLUMN announced TEXT NOT NULL DEFAULT '';
    UPDATE printers SET announced = state WHERE state <> 'unknown';
    """,
    # version 12: what a printer says of its state for people (IPP printer-state-message, the Printer MIB's
    # alerts), and a completed job's pages by the printer's page counter (RAW and LPD printers with SNMP)
    """
    ALTER TABLE printers ADD COLUMN message TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN pages INTEGER;
    """,
]

# The current version: what `printrelay db status` reports and what newer code refuses to run under.
SCHEMA_VERSION = len(SCHEMA)

DIALECT = Dialect(
    name="sqlite",
    clock="((julianday('now') - 2440587.5) * 86400.0)",
    skip_locked="",  # one connection, one writer: nothing to skip
    event_order="rowid",
    integrity_errors=(sqlite3.IntegrityError,),
    probes_webhooks=True,
)


class SchemaTooNew(StoreError):
    pass


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def statements(script: str) -> list[str]:
    """A script's statements, one by one (a trigger's body, or a ``;`` in a string, stays whole)."""
    found, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                found.append(pending.strip())
            pending = ""
    if rest := pending.strip(" \n;"):
        raise ValueError(f"unfinished SQL statement: {rest[:80]!r}")
    return found


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply the versions this database lacks, each in its own transaction; the ones applied.

    Each version is read under the write lock: of two processes opening a new database together, the
    second finds the first's versions applied. Statements are run one by one, as ``executescript`` would
    commit first: a crash in the middle of a version leaves none of it.
    """
    applied: list[int] = []
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the database is at schema version {version}, newer than this printrelay's "
                    f"{SCHEMA_VERSION}: run the newer printrelay, or restore a backup made for this one"
                )
            if version < SCHEMA_VERSION:
                for statement in statements(SCHEMA[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if version == SCHEMA_VERSION:
            return applied
        applied.append(version + 1)


def open_connection(path: Path) -> sqlite3.Connection:
    """A connection to the relay's database (rows by column name), migrated to this version."""
    conn = open_sqlite(path, row_factory=sqlite3.Row)
    migrate(conn)
    return conn


class SqliteStore(SqlStore):
    def __init__(self, path: Path, replica_id: str | None = None) -> None:
        super().__init__(DIALECT, replica_id)
        self.path = path
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._conn = await trio.to_thread.run_sync(open_connection, self.path)
        conn = self._conn
        self._commits = GroupCommit(
            SqliteBatcher(
                conn,
                wrap=lambda c: Tx(c, DIALECT, self.replica_id),
                on_begin=Tx.forget_webhooks,
                optimistic=True,  # the store's writes are safe to run twice (PostgreSQL does too)
            )
        )

    async def close(self) -> None:
        if self._conn is not None and self._commits is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._commits.limiter)
            self._commits = None

    async def register_replica(self, replica_id: str, name: str) -> None:
        """One process owns an SQLite database: every other replica recorded in it has stopped."""

        def register(tx: Tx) -> None:
            others = [r["id"] for r in tx.all("SELECT id FROM replicas WHERE id <> ?", (replica_id,))]
            retire_replicas(tx, others)

        await self._write(register)
        await super().register_replica(replica_id, name)

    async def follow_other_processes(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Tokens are revoked and deleted by the CLI, another process: ``PRAGMA data_version`` changes when
        one commits, and a change becomes a ``tokens`` notice (for any token: the relay reads again)."""
        version: int | None = None
        while True:
            current = await self._read(lambda tx: int(tx.conn.execute("PRAGMA data_version").fetchone()[0]))
            if version is None:
                task_status.started()
            elif current != version:
                self.deliver([Notice("tokens", "")])
            version = current
            await trio.sleep(OUTSIDE_WRITES_INTERVAL)
