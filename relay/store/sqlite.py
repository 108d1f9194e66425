"""The embedded store: one SQLite database in WAL mode.

One connection, used from worker threads one call at a time (``trio.to_thread`` with a limiter of one):
SQLite serialises writers anyway, and a single connection keeps transactions simple. ``synchronous=FULL``
makes every commit durable before we answer 201. Other processes (``printrelay token create``) may write
the same file at the same time; WAL plus a busy timeout lets them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome
import trio

from relay.jobs import Job, JobEvent, JobHistoryEntry, JobState, next_state
from relay.store.base import (
    Conflict,
    ConnectorRecord,
    IppJob,
    Lease,
    Printer,
    StoreError,
    StoreSample,
    TokenRecord,
    Webhook,
    WebhookDelivery,
)
from service.private_files import private_database

T = TypeVar("T")
MAX_SQL_VARIABLES = 500  # well under SQLite's oldest default limit of 999 bound parameters

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
]

JOB_COLUMNS = (
    "id, tenant, printer_id, state, title, document_format, copies, user, size, sealed_size, sha256, "
    "wrapped_key, key_id, connector_id, attempts, max_attempts, next_attempt_at, last_error, "
    "idempotency_key, options, created_at, updated_at, completed_at, expires_at"
)
# Fields a transition may change besides the state.
MUTABLE_JOB_FIELDS = {
    "attempts", "next_attempt_at", "last_error", "completed_at", "wrapped_key", "printer_id",
    "connector_id", "key_id", "expires_at", "unknown_outcomes",
}  # fmt: skip


def open_connection(path: Path) -> sqlite3.Connection:
    private_database(path)  # 0600 files in a 0700 directory, whatever the umask
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(SCHEMA[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executescript(f"{script}; PRAGMA user_version={number};".replace(";;", ";"))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if conn.in_transaction:
            conn.execute("COMMIT")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        printer_id=row["printer_id"],
        state=JobState(row["state"]),
        title=row["title"],
        document_format=row["document_format"],
        copies=row["copies"],
        user=row["user"],
        size=row["size"],
        sealed_size=row["sealed_size"],
        sha256=row["sha256"],
        wrapped_key=bytes(row["wrapped_key"]),
        key_id=row["key_id"],
        connector_id=row["connector_id"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        idempotency_key=row["idempotency_key"],
        options=json.loads(row["options"]),
        unknown_outcomes=row["unknown_outcomes"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        expires_at=row["expires_at"],
    )


def _printer(row: sqlite3.Row) -> Printer:
    return Printer(
        tenant=row["tenant"],
        id=row["id"],
        connector_id=row["connector_id"],
        uri=row["uri"],
        kind=row["kind"],
        state=row["state"],
        reasons=json.loads(row["reasons"]),
        capabilities=json.loads(row["capabilities"]),
        online=bool(row["sessions"]),
        updated_at=row["updated_at"],
    )


def _token(row: sqlite3.Row) -> TokenRecord:
    return TokenRecord(
        id=row["id"],
        tenant=row["tenant"],
        kind=row["kind"],
        secret_hash=row["secret_hash"],
        scopes=tuple(s for s in row["scopes"].split(",") if s),
        connector_id=row["connector_id"],
        label=row["label"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def _get_connector(c: sqlite3.Connection, tenant: str, connector_id: str) -> ConnectorRecord | None:
    row = c.execute("SELECT * FROM connectors WHERE tenant = ? AND id = ?", (tenant, connector_id)).fetchone()
    if row is None:
        return None
    return ConnectorRecord(
        tenant=row["tenant"], id=row["id"], public_key=bytes(row["public_key"]), key_id=row["key_id"],
        name=row["name"], version=row["version"], sessions=row["sessions"], last_seen=row["last_seen"],
    )  # fmt: skip


def _next_due(c: sqlite3.Connection, tenant: str, connector_id: str) -> float | None:
    row = c.execute(
        # the same held printers as claim_jobs: their jobs are not due, or the dispatcher would spin
        "SELECT MIN(j.next_attempt_at) FROM jobs j JOIN printers p "
        "ON p.tenant = j.tenant AND p.id = j.printer_id "
        "WHERE j.tenant = ? AND j.connector_id = ? AND j.state = 'queued' "
        "AND p.state NOT IN ('stopped', 'offline')",
        (tenant, connector_id),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


PRINTER_SELECT = (
    "SELECT p.*, COALESCE(c.sessions, 0) AS sessions FROM printers p "
    "LEFT JOIN connectors c ON c.tenant = p.tenant AND c.id = p.connector_id"
)


@dataclass(eq=False)
class _Call(Generic[T]):
    """One store call waiting for the next batch; ``result`` is set when its batch is done."""

    fn: Callable[[sqlite3.Connection], T]
    write: bool
    result: outcome.Outcome[T] | None = None
    usage: list[tuple[str, int, int]] = field(default_factory=list)  # (tenant, bytes, jobs) deltas


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._pending: list[_Call[Any]] = []  # calls waiting for the next batch
        self._running = False  # a batch is in its worker thread
        self._batch_done = trio.Event()
        self._usage: dict[str, tuple[int, int]] = {}  # tenant -> (spooled bytes, jobs not final)
        self._call_usage: list[tuple[str, int, int]] | None = None  # deltas of the write being run
        self.batches = 0  # batches run (tests and benchmarks look at these)
        self.batched_writes = 0

    # --- plumbing -------------------------------------------------------------------------------

    async def open(self) -> None:
        def _open() -> tuple[sqlite3.Connection, dict[str, tuple[int, int]]]:
            conn = open_connection(self.path)
            migrate(conn)
            usage = {
                r[0]: (int(r[1]), int(r[2]))
                for r in conn.execute(
                    "SELECT tenant, COALESCE(SUM(sealed_size), 0), COUNT(*) FROM jobs "
                    "WHERE state IN ('held', 'queued', 'sending', 'printing') GROUP BY tenant"
                )
            }
            return conn, usage

        self._conn, self._usage = await trio.to_thread.run_sync(_open)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read: runs with the next batch, outside its transaction."""
        return await self._call(_Call(fn, write=False))

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A write: runs inside the next batch's transaction, under a savepoint of its own (an error
        undoes this call only). Returns once the batch is committed — durable, ``synchronous=FULL``."""
        return await self._call(_Call(fn, write=True))

    async def _call(self, call: _Call[T]) -> T:
        """Group commit: calls made while a batch runs wait for the next one, which the first of them
        runs in one worker-thread hop and one transaction (one fsync) for all of them.

        There is no batching task: the caller that finds no batch running runs one, so every call has
        an owner and a store nobody calls costs nothing.
        """
        if self._conn is None:
            raise RuntimeError("store is not open")
        self._pending.append(call)
        while call.result is None:
            if not self._running:
                await self._run_batch()
                continue
            done = self._batch_done
            try:
                await done.wait()
            except trio.Cancelled:
                if call in self._pending:  # not started: drop it
                    self._pending.remove(call)
                    raise
                # Started: like a worker thread, it cannot be abandoned halfway; wait for its end and
                # return what it did, as trio.to_thread does. Raising Cancelled here would tell the
                # caller that a committed write did not happen (submit would then erase the payload of
                # a job it had just made durable). The scope stays cancelled: the caller's next
                # checkpoint raises.
                with trio.CancelScope(shield=True):
                    while call.result is None:
                        await self._batch_done.wait()
        return call.result.unwrap()

    async def _run_batch(self) -> None:
        batch, self._pending = self._pending, []
        self._running = True
        try:
            # Shielded: the calls of others are in this batch; a cancellation arrives after it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._execute, batch, limiter=self._limiter)
            for call in batch:
                if call.usage:
                    self._apply_usage(call.usage)
        finally:
            self._running = False
            done, self._batch_done = self._batch_done, trio.Event()
            done.set()

    def _execute(self, batch: list[_Call[Any]]) -> None:
        """In the worker thread: the reads, then the writes in one transaction."""
        conn = self._conn
        assert conn is not None
        writes = [c for c in batch if c.write]
        for call in batch:
            if not call.write:
                call.result = outcome.capture(call.fn, conn)
        if not writes:
            return
        self.batches += 1
        self.batched_writes += len(writes)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for call in writes:
                self._call_usage = call.usage
                if len(writes) == 1:
                    call.result = outcome.capture(call.fn, conn)
                    if isinstance(call.result, outcome.Error):
                        conn.execute("ROLLBACK")
                        call.usage.clear()
                        return
                    continue
                conn.execute("SAVEPOINT call")
                call.result = outcome.capture(call.fn, conn)
                if isinstance(call.result, outcome.Error):
                    conn.execute("ROLLBACK TO call")
                    call.usage.clear()
                conn.execute("RELEASE call")
            conn.execute("COMMIT")
        except BaseException as exc:
            # BEGIN, a savepoint or COMMIT failed (disk full, I/O error): nothing of the batch is kept.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for call in writes:
                call.result = outcome.Error(exc)
                call.usage.clear()
        finally:
            self._call_usage = None

    def _usage_changed(self, tenant: str, sealed_bytes: int, jobs: int) -> None:
        """From a write: the tenant's usage changes by this much once the write is committed."""
        assert self._call_usage is not None, "usage changes only inside a write"
        self._call_usage.append((tenant, sealed_bytes, jobs))

    def _apply_usage(self, deltas: list[tuple[str, int, int]]) -> None:
        for tenant, sealed_bytes, jobs in deltas:
            used_bytes, used_jobs = self._usage.get(tenant, (0, 0))
            used = (used_bytes + sealed_bytes, used_jobs + jobs)
            if used == (0, 0):
                self._usage.pop(tenant, None)
            else:
                self._usage[tenant] = used
        deltas.clear()

    async def check_writable(self) -> None:
        await self._write(lambda c: c.execute("CREATE TEMP TABLE IF NOT EXISTS ready_probe (x)"))

    # --- tokens ---------------------------------------------------------------------------------

    async def add_token(self, token: TokenRecord) -> None:
        await self._write(lambda c: add_token_sync(c, token))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        row = await self._run(
            lambda c: c.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        )
        return _token(row) if row else None

    async def get_tokens(self, token_ids: Sequence[str]) -> dict[str, TokenRecord]:
        def select(c: sqlite3.Connection) -> dict[str, TokenRecord]:
            found: dict[str, TokenRecord] = {}
            ids = list(token_ids)
            for start in range(0, len(ids), MAX_SQL_VARIABLES):
                batch = ids[start : start + MAX_SQL_VARIABLES]
                marks = ",".join("?" * len(batch))
                for row in c.execute(f"SELECT * FROM tokens WHERE id IN ({marks})", batch):
                    found[row["id"]] = _token(row)
            return found

        return await self._run(select)

    async def outside_writes(self) -> int:
        return await self._run(lambda c: int(c.execute("PRAGMA data_version").fetchone()[0]))

    async def list_tokens(self, tenant: str | None = None) -> list[TokenRecord]:
        return await self._run(lambda c: list_tokens_sync(c, tenant))

    async def revoke_token(self, token_id: str, at: float) -> bool:
        return await self._write(lambda c: revoke_token_sync(c, token_id, at))

    # --- connectors and printers ----------------------------------------------------------------

    async def upsert_connector(self, connector: ConnectorRecord) -> None:
        def upsert(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO connectors (tenant, id, public_key, key_id, name, version, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
                "public_key = excluded.public_key, key_id = excluded.key_id, name = excluded.name, "
                "version = excluded.version, last_seen = excluded.last_seen",
                (
                    connector.tenant, connector.id, connector.public_key, connector.key_id,
                    connector.name, connector.version, connector.last_seen,
                ),
            )  # fmt: skip

        await self._write(upsert)

    async def get_connector(self, tenant: str, connector_id: str) -> ConnectorRecord | None:
        return await self._run(lambda c: _get_connector(c, tenant, connector_id))

    async def printer_and_connector(
        self, tenant: str, printer_id: str
    ) -> tuple[Printer | None, ConnectorRecord | None]:
        def get(c: sqlite3.Connection) -> tuple[Printer | None, ConnectorRecord | None]:
            row = c.execute(
                f"{PRINTER_SELECT} WHERE p.tenant = ? AND p.id = ?", (tenant, printer_id)
            ).fetchone()
            if row is None:
                return None, None
            printer = _printer(row)
            return printer, _get_connector(c, tenant, printer.connector_id)

        return await self._run(get)

    async def connector_session_changed(self, tenant: str, connector_id: str, delta: int, at: float) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE connectors SET sessions = MAX(0, sessions + ?), last_seen = ? "
                "WHERE tenant = ? AND id = ?",
                (delta, at, tenant, connector_id),
            )
        )

    async def reset_sessions(self) -> None:
        await self._write(lambda c: c.execute("UPDATE connectors SET sessions = 0"))

    async def replace_printers(self, tenant: str, connector_id: str, printers: Sequence[Printer]) -> None:
        # Printer ids are per tenant. When another connector of the tenant reported the same id before,
        # the newest report wins; jobs queued for it stay sealed to the old connector (DESIGN §5).
        def replace(c: sqlite3.Connection) -> None:
            for printer in printers:
                _upsert_printer(c, printer)

        await self._write(replace)

    async def update_printer(self, printer: Printer) -> None:
        await self._write(lambda c: _upsert_printer(c, printer))

    async def get_printer(self, tenant: str, printer_id: str) -> Printer | None:
        row = await self._run(
            lambda c: c.execute(
                f"{PRINTER_SELECT} WHERE p.tenant = ? AND p.id = ?", (tenant, printer_id)
            ).fetchone()
        )
        return _printer(row) if row else None

    async def list_printers(self, tenant: str) -> list[Printer]:
        rows = await self._run(
            lambda c: c.execute(f"{PRINTER_SELECT} WHERE p.tenant = ? ORDER BY p.id", (tenant,)).fetchall()
        )
        return [_printer(r) for r in rows]

    # --- jobs -----------------------------------------------------------------------------------

    async def insert_job(self, job: Job, message: str, *, payload: bytes | None = None) -> Job:
        def insert(c: sqlite3.Connection) -> Job:
            try:
                c.execute(
                    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * 24)})",
                    (
                        job.id, job.tenant, job.printer_id, str(job.state), job.title, job.document_format,
                        job.copies, job.user, job.size, job.sealed_size, job.sha256, job.wrapped_key,
                        job.key_id, job.connector_id, job.attempts, job.max_attempts, job.next_attempt_at,
                        job.last_error, job.idempotency_key, json.dumps(job.options), job.created_at,
                        job.updated_at, job.completed_at, job.expires_at,
                    ),
                )  # fmt: skip
            except sqlite3.IntegrityError as exc:
                raise Conflict(str(exc)) from exc
            c.execute(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                (job.id, job.created_at, str(job.state), message),
            )
            if payload is not None:
                c.execute("INSERT INTO payloads (job_id, sealed) VALUES (?, ?)", (job.id, payload))
            if not job.state.final:
                self._usage_changed(job.tenant, job.sealed_size, 1)
            return job

        return await self._write(insert)

    async def get_payload(self, job_id: str) -> bytes | None:
        row = await self._run(
            lambda c: c.execute("SELECT sealed FROM payloads WHERE job_id = ?", (job_id,)).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def get_job(self, tenant: str, job_id: str) -> Job | None:
        row = await self._run(
            lambda c: c.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        )
        return _job(row) if row else None

    async def find_job_by_idempotency_key(self, tenant: str, key: str) -> Job | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, key)
            ).fetchone()
        )
        return _job(row) if row else None

    async def list_jobs(
        self, tenant: str, *, printer_id: str | None = None, state: JobState | None = None, limit: int = 100
    ) -> list[Job]:
        sql = "SELECT * FROM jobs WHERE tenant = ?"
        args: list[Any] = [tenant]
        if printer_id is not None:
            sql += " AND printer_id = ?"
            args.append(printer_id)
        if state is not None:
            sql += " AND state = ?"
            args.append(str(state))
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        rows = await self._run(lambda c: c.execute(sql, args).fetchall())
        return [_job(r) for r in rows]

    async def claim_jobs(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> list[Job]:
        """Move up to ``limit`` due queued jobs of this connector's printers to ``sending``."""
        jobs, _ = await self.claim_jobs_and_next_due(tenant, connector_id, now, limit, lease)
        return jobs

    async def claim_jobs_and_next_due(
        self, tenant: str, connector_id: str, now: float, limit: int, lease: Lease
    ) -> tuple[list[Job], float | None]:
        def claim(c: sqlite3.Connection) -> tuple[list[Job], float | None]:
            rows = c.execute(
                "UPDATE jobs SET state = 'sending', attempts = attempts + 1, updated_at = ?, "
                "lease_owner = ?, lease_expires_at = ? "
                "WHERE id IN (SELECT j.id FROM jobs j JOIN printers p "
                "ON p.tenant = j.tenant AND p.id = j.printer_id "
                "WHERE j.tenant = ? AND j.connector_id = ? AND p.connector_id = ? AND j.state = 'queued' "
                # a stopped or unreachable printer holds its jobs instead of spending their attempts;
                # its next state event wakes the dispatcher
                "AND p.state NOT IN ('stopped', 'offline') "
                # unary +: not an index term, so SQLite walks jobs_claim in created_at order
                "AND +j.next_attempt_at <= ? ORDER BY j.created_at LIMIT ?) RETURNING *",
                (now, lease.owner, now + lease.seconds, tenant, connector_id, connector_id, now, limit),
            ).fetchall()
            jobs = sorted((_job(r) for r in rows), key=lambda j: j.created_at)
            c.executemany(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, 'sending', ?)",
                [(j.id, now, f"attempt {j.attempts}: sending to connector {connector_id}") for j in jobs],
            )
            # A full claim may have left due jobs behind: the caller claims again, no need to look.
            return jobs, None if len(jobs) >= limit else _next_due(c, tenant, connector_id)

        return await self._write(claim)

    async def transition(
        self, job_id: str, event: JobEvent, message: str, at: float, **fields: Any
    ) -> Job | None:
        unknown = set(fields) - MUTABLE_JOB_FIELDS
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)} in a transition")

        def apply(c: sqlite3.Connection) -> Job | None:
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _job(row)
            state = next_state(job.state, event)
            values: dict[str, Any] = {**fields, "state": str(state), "updated_at": at}
            if state.final and "completed_at" not in fields:
                values["completed_at"] = at
            if state not in (JobState.SENDING, JobState.PRINTING):
                values["lease_owner"] = values["lease_expires_at"] = None  # nobody holds it any more
            assignments = ", ".join(f"{name} = ?" for name in values)
            c.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values.values(), job_id])
            c.execute(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, ?, ?)",
                (job_id, at, str(state), message),
            )
            if state.final and not job.state.final:
                self._usage_changed(job.tenant, -job.sealed_size, -1)
                c.execute("DELETE FROM payloads WHERE job_id = ?", (job_id,))  # erased with the final state
            return _job(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

        return await self._write(apply)

    async def job_history(self, job_id: str) -> list[JobHistoryEntry]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT * FROM job_events WHERE job_id = ? ORDER BY at, rowid", (job_id,)
            ).fetchall()
        )
        return [JobHistoryEntry(r["job_id"], r["at"], JobState(r["state"]), r["message"]) for r in rows]

    async def next_due(self, tenant: str, connector_id: str) -> float | None:
        return await self._run(lambda c: _next_due(c, tenant, connector_id))

    async def requeue_interrupted(self, at: float) -> list[str]:
        """After a restart: jobs this relay was sending go back to the queue (the connector's ledger
        stops a second print)."""

        def requeue(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "UPDATE jobs SET state = 'queued', updated_at = ? WHERE state IN ('sending', 'printing') "
                "RETURNING id",
                (at,),
            ).fetchall()
            ids = [r[0] for r in rows]
            c.executemany(
                "INSERT INTO job_events (job_id, at, state, message) VALUES (?, ?, 'queued', ?)",
                [(i, at, "relay restarted while the job was in flight; queued again") for i in ids],
            )
            return ids

        return await self._write(requeue)

    async def renew_leases(self, lease: Lease, job_ids: Sequence[str], now: float) -> None:
        """Extend this owner's claims on these jobs (those still in flight) to ``now + lease.seconds``."""

        def renew(c: sqlite3.Connection) -> None:
            for start in range(0, len(job_ids), MAX_SQL_VARIABLES):
                ids = list(job_ids[start : start + MAX_SQL_VARIABLES])
                c.execute(
                    "UPDATE jobs SET lease_expires_at = ? WHERE lease_owner = ? "
                    f"AND state IN ('sending', 'printing') AND id IN ({', '.join('?' * len(ids))})",
                    [now + lease.seconds, lease.owner, *ids],
                )

        await self._write(renew)

    async def lapsed_leases(self, now: float, limit: int) -> list[Job]:
        """Jobs in flight whose claim was not renewed in time: their stream is gone."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT * FROM jobs WHERE state IN ('sending', 'printing') AND lease_expires_at < ? LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [_job(r) for r in rows]

    async def expired_jobs(self, now: float, limit: int) -> list[Job]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT * FROM jobs WHERE state IN ('held', 'queued') AND expires_at IS NOT NULL "
                "AND expires_at <= ? LIMIT ?",
                (now, limit),
            ).fetchall()
        )
        return [_job(r) for r in rows]

    async def next_expiry(self) -> float | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT MIN(expires_at) FROM jobs WHERE state IN ('held', 'queued') "
                "AND expires_at IS NOT NULL"
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    async def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """Spooled bytes and number of jobs not yet final (what a quota counts).

        Kept in memory: counted once at open, then changed by each committed write that creates a job
        or makes one final (this relay is the only writer of jobs in its database).
        """
        return self._usage.get(tenant, (0, 0))

    async def all_job_ids_with_payload(self) -> set[str]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT id FROM jobs WHERE state IN ('held', 'queued', 'sending', 'printing')"
            ).fetchall()
        )
        return {r[0] for r in rows}

    async def sample(self, now: float) -> StoreSample:
        def read(c: sqlite3.Connection) -> StoreSample:
            states = c.execute(
                "SELECT state, COUNT(*) FROM jobs WHERE state IN ('held', 'queued', 'sending', 'printing') "
                "GROUP BY state"
            ).fetchall()
            oldest = c.execute("SELECT MIN(created_at) FROM jobs WHERE state = 'queued'").fetchone()[0]
            # A connector whose tokens are all revoked or expired is retired, not down.
            online, offline = c.execute(
                "SELECT COALESCE(SUM(sessions > 0), 0), COALESCE(SUM(sessions = 0), 0) FROM connectors c "
                "WHERE EXISTS (SELECT 1 FROM tokens t WHERE t.tenant = c.tenant AND t.kind = 'connector' "
                "AND t.connector_id = c.id AND t.revoked_at IS NULL "
                "AND (t.expires_at IS NULL OR t.expires_at > ?))",
                (now,),
            ).fetchone()
            return StoreSample({s: n for s, n in states}, oldest, int(online), int(offline))

        return await self._run(read)

    # --- IPP job numbers ------------------------------------------------------------------------

    async def ipp_job_numbers(
        self, tenant: str, printer_id: str, job_ids: Sequence[str], at: float
    ) -> dict[str, int]:
        def numbers(c: sqlite3.Connection) -> dict[str, int]:
            found: dict[str, int] = {}
            for start in range(0, len(job_ids), 500):  # SQLite's bound-parameter limit
                chunk = list(job_ids[start : start + 500])
                rows = c.execute(
                    f"SELECT job_id, number FROM ipp_jobs WHERE tenant = ? "
                    f"AND job_id IN ({', '.join('?' * len(chunk))})",
                    [tenant, *chunk],
                ).fetchall()
                found.update((r["job_id"], r["number"]) for r in rows)
            missing = [j for j in dict.fromkeys(job_ids) if j not in found]
            if missing:
                number = _last_ipp_number(c, tenant)
                for job_id in missing:
                    number += 1
                    c.execute(
                        "INSERT INTO ipp_jobs (tenant, number, printer_id, job_id, state, created_at, "
                        "updated_at) VALUES (?, ?, ?, ?, 'attached', ?, ?)",
                        (tenant, number, printer_id, job_id, at, at),
                    )
                    found[job_id] = number
            return found

        if not job_ids:
            return {}
        return await self._write(numbers)

    async def create_ipp_job(self, job: IppJob) -> IppJob:
        def create(c: sqlite3.Connection) -> IppJob:
            number = _last_ipp_number(c, job.tenant) + 1
            c.execute(
                "INSERT INTO ipp_jobs (tenant, number, printer_id, job_id, state, ticket, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.tenant, number, job.printer_id, job.job_id, job.state, json.dumps(job.ticket),
                    job.created_at, job.updated_at,
                ),
            )  # fmt: skip
            job.number = number
            return job

        return await self._write(create)

    async def get_ipp_job(self, tenant: str, number: int) -> IppJob | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT * FROM ipp_jobs WHERE tenant = ? AND number = ?", (tenant, number)
            ).fetchone()
        )
        return _ipp_job(row) if row else None

    async def set_ipp_job_state(
        self, tenant: str, number: int, expect: str, state: str, at: float, job_id: str | None = None
    ) -> bool:
        def update(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE ipp_jobs SET state = ?, job_id = COALESCE(?, job_id), updated_at = ? "
                "WHERE tenant = ? AND number = ? AND state = ?",
                (state, job_id, at, tenant, number, expect),
            )
            return cur.rowcount > 0

        return await self._write(update)

    async def list_ipp_jobs(
        self, tenant: str, printer_id: str, states: Sequence[str], limit: int
    ) -> list[IppJob]:
        if not states:
            return []
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT * FROM ipp_jobs WHERE tenant = ? AND printer_id = ? "
                f"AND state IN ({', '.join('?' * len(states))}) ORDER BY number DESC LIMIT ?",
                [tenant, printer_id, *states, limit],
            ).fetchall()
        )
        return [_ipp_job(r) for r in rows]

    # --- webhooks -------------------------------------------------------------------------------

    async def add_webhook(self, hook: Webhook, limit: int) -> bool:
        def add(c: sqlite3.Connection) -> bool:
            count = c.execute("SELECT COUNT(*) FROM webhooks WHERE tenant = ?", (hook.tenant,)).fetchone()[0]
            if count >= limit:
                return False
            c.execute(
                "INSERT INTO webhooks (id, tenant, url, events, secret, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                # spaces around each event: the outbox trigger matches ' job.<state> ' with instr()
                (hook.id, hook.tenant, hook.url, f" {' '.join(hook.events)} ", hook.secret, hook.created_at),
            )
            return True

        return await self._write(add)

    async def list_webhooks(self, tenant: str) -> list[Webhook]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT w.*, (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id) "
                "AS pending FROM webhooks w WHERE w.tenant = ? ORDER BY w.created_at, w.id",
                (tenant,),
            ).fetchall()
        )
        return [_webhook(r) for r in rows]

    async def rewrite_webhook_secrets(self, rewrite: Callable[[str, str], str]) -> int:
        def apply(c: sqlite3.Connection) -> int:
            changed = [
                (new, hook_id)
                for hook_id, stored in c.execute("SELECT id, secret FROM webhooks").fetchall()
                if (new := rewrite(hook_id, stored)) != stored
            ]
            c.executemany("UPDATE webhooks SET secret = ? WHERE id = ?", changed)
            return len(changed)

        return await self._write(apply)

    async def delete_webhook(self, tenant: str, webhook_id: str) -> Webhook | None:
        def delete(c: sqlite3.Connection) -> Webhook | None:
            row = c.execute(
                "DELETE FROM webhooks WHERE tenant = ? AND id = ? RETURNING *, 0 AS pending",
                (tenant, webhook_id),
            ).fetchone()
            return _webhook(row) if row else None  # its pending deliveries go with it (ON DELETE CASCADE)

        return await self._write(delete)

    async def due_webhook_deliveries(
        self, now: float, limit: int, *, per_webhook: int, skip: Sequence[int], skip_webhooks: Sequence[str]
    ) -> list[WebhookDelivery]:
        where, args = _webhook_heads(skip, skip_webhooks)
        rows = await self._run(
            lambda c: c.execute(
                "SELECT * FROM (SELECT d.*, w.url, w.secret, ROW_NUMBER() OVER "
                "(PARTITION BY d.webhook_id ORDER BY d.next_attempt_at, d.seq) AS n "
                f"FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE {where} "
                "AND d.next_attempt_at <= ?) WHERE n <= ? ORDER BY next_attempt_at, seq LIMIT ?",
                [*args, now, per_webhook, limit],
            ).fetchall()
        )
        return [_webhook_delivery(r) for r in rows]

    async def next_webhook_due(self, *, skip: Sequence[int], skip_webhooks: Sequence[str]) -> float | None:
        where, args = _webhook_heads(skip, skip_webhooks)
        row = await self._run(
            lambda c: c.execute(
                f"SELECT MIN(d.next_attempt_at) FROM webhook_deliveries d WHERE {where}", args
            ).fetchone()
        )
        return None if row is None or row[0] is None else float(row[0])

    async def webhook_delivery_failed(
        self, seq: int, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        await self._write(
            lambda c: c.execute(
                "UPDATE webhook_deliveries SET attempts = ?, next_attempt_at = ?, last_error = ? "
                "WHERE seq = ?",
                (attempts, next_attempt_at, error, seq),
            )
        )

    async def remove_webhook_delivery(self, seq: int) -> None:
        await self._write(lambda c: c.execute("DELETE FROM webhook_deliveries WHERE seq = ?", (seq,)))


def _webhook_heads(skip: Sequence[int], skip_webhooks: Sequence[str]) -> tuple[str, list[Any]]:
    """Outbox rows first in their (webhook, job) line — a job's next change waits for the one before —
    that are not in flight (``skip``) and whose webhook has a free slot."""
    where = (
        "d.seq = (SELECT MIN(e.seq) FROM webhook_deliveries e "
        "WHERE e.webhook_id = d.webhook_id AND e.job_id = d.job_id)"
    )
    if skip:
        where += f" AND d.seq NOT IN ({', '.join('?' * len(skip))})"
    if skip_webhooks:
        where += f" AND d.webhook_id NOT IN ({', '.join('?' * len(skip_webhooks))})"
    return where, [*skip, *skip_webhooks]


def _webhook(row: sqlite3.Row) -> Webhook:
    return Webhook(
        id=row["id"],
        tenant=row["tenant"],
        url=row["url"],
        events=tuple(row["events"].split()),
        secret=row["secret"],
        created_at=row["created_at"],
        pending=row["pending"],
    )


def _webhook_delivery(row: sqlite3.Row) -> WebhookDelivery:
    return WebhookDelivery(
        seq=row["seq"],
        id=row["id"],
        webhook_id=row["webhook_id"],
        tenant=row["tenant"],
        job_id=row["job_id"],
        at=row["at"],
        state=row["state"],
        message=row["message"],
        job=json.loads(row["job"]),
        url=row["url"],
        secret=row["secret"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
    )


# IPP job-id is a signed 32-bit integer (RFC 8011 §5.3.2: 1 to 2**31 - 1).
MAX_IPP_JOB_NUMBER = 2**31 - 1


def _last_ipp_number(c: sqlite3.Connection, tenant: str) -> int:
    last = int(
        c.execute("SELECT COALESCE(MAX(number), 0) FROM ipp_jobs WHERE tenant = ?", (tenant,)).fetchone()[0]
    )
    if last >= MAX_IPP_JOB_NUMBER:
        raise StoreError(f"tenant {tenant} used all {MAX_IPP_JOB_NUMBER} IPP job numbers")
    return last


def _ipp_job(row: sqlite3.Row) -> IppJob:
    return IppJob(
        tenant=row["tenant"],
        number=row["number"],
        printer_id=row["printer_id"],
        job_id=row["job_id"],
        state=row["state"],
        ticket=json.loads(row["ticket"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _upsert_printer(c: sqlite3.Connection, printer: Printer) -> None:
    c.execute(
        "INSERT INTO printers (tenant, id, connector_id, uri, kind, state, reasons, capabilities, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
        "connector_id = excluded.connector_id, uri = excluded.uri, kind = excluded.kind, "
        "state = excluded.state, reasons = excluded.reasons, capabilities = excluded.capabilities, "
        "updated_at = excluded.updated_at",
        (
            printer.tenant, printer.id, printer.connector_id, printer.uri, printer.kind, printer.state,
            json.dumps(printer.reasons), json.dumps(printer.capabilities), printer.updated_at or time.time(),
        ),
    )  # fmt: skip


# Synchronous token operations, shared with the CLI (which writes the same database while a relay runs).


def add_token_sync(c: sqlite3.Connection, token: TokenRecord) -> None:
    c.execute(
        "INSERT INTO tokens (id, tenant, kind, secret_hash, scopes, connector_id, label, created_at, "
        "expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            token.id, token.tenant, token.kind, token.secret_hash, ",".join(token.scopes),
            token.connector_id, token.label, token.created_at, token.expires_at, token.revoked_at,
        ),
    )  # fmt: skip


def list_tokens_sync(c: sqlite3.Connection, tenant: str | None) -> list[TokenRecord]:
    if tenant is None:
        rows = c.execute("SELECT * FROM tokens ORDER BY created_at").fetchall()
    else:
        rows = c.execute("SELECT * FROM tokens WHERE tenant = ? ORDER BY created_at", (tenant,)).fetchall()
    return [_token(r) for r in rows]


def revoke_token_sync(c: sqlite3.Connection, token_id: str, at: float) -> bool:
    cur = c.execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, token_id))
    return cur.rowcount > 0
