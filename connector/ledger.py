"""The connector's durable record of what it handed to printers: no duplicate prints.

A relay resends a job whenever it cannot be sure the job was delivered (a tunnel dropped, the relay
restarted). Before delivering, the connector looks the job up here:

* no entry, or ``started`` — the printer never took the whole job: deliver it (again);
* ``created`` — an IPP printer holds a job made with Create-Job whose document may or may not have
  arrived: the backend asks the printer (Get-Job-Attributes) and either follows that job to its end or
  cancels it and delivers anew;
* ``feeding`` — a RAW or LPD printer was being fed the job when the connector stopped: it may have
  printed all of it, some of it or none, and cannot be asked. The printer's ``uncertain_delivery``
  decides: ``hold`` (the job is held at the relay for a person) or ``reprint``. A resend whose ticket
  counts more unknown outcomes than the entry recorded was released by a person: it prints again;
* ``handed`` — the printer took the job but we did not learn its end (the connector restarted):
  do not print again; report it delivered;
* ``completed`` / ``failed`` — answer with the recorded result, print nothing.

Every write is committed with ``synchronous=FULL`` before the job moves on (the writes of concurrent
deliveries share one transaction and one fsync, group commit; each caller still waits for its commit).
For IPP printers that take Create-Job + Send-Document (IPP Everywhere printers do) no window is left:
the printer job id is on disk before the first document byte leaves. For RAW and LPD, ``feeding`` is on
disk before the first byte leaves and ``handed`` the moment the last one has, so a connector that dies
in between never prints the job again blindly (their ``completed`` that follows ``handed`` goes with the
next batch without being waited for: see :meth:`Ledger.note_completed`). The window left is for IPP
printers without Create-Job:
the printer has answered Print-Job and the connector dies before ``handed`` is on disk; the resend then
prints a second copy. That window is one round trip.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from service.groupcommit import GroupCommit
from service.sqlite import SqliteBatcher, open_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY, printer_id TEXT NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL,
    printer_job_id INTEGER, started_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_updated ON deliveries (updated_at);
"""
SCHEMA_VERSION = 1  # 1: unknown_outcomes

FINAL = ("completed", "failed")


@dataclass(frozen=True)
class LedgerEntry:
    job_id: str
    printer_id: str
    state: str  # started | created | feeding | handed | completed | failed | canceled
    message: str
    printer_job_id: int | None
    updated_at: float
    unknown_outcomes: int = 0  # the ticket's count when this entry was written (see ``feeding``)


RECORD = (
    "INSERT INTO deliveries (job_id, printer_id, state, message, printer_job_id, started_at, updated_at, "
    "unknown_outcomes) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
    "state = excluded.state, message = excluded.message, "
    "printer_job_id = COALESCE(excluded.printer_job_id, printer_job_id), updated_at = excluded.updated_at, "
    "unknown_outcomes = MAX(unknown_outcomes, excluded.unknown_outcomes)"
)


def _record_args(
    job_id: str, printer_id: str, state: str, message: str, printer_job_id: int | None, unknown_outcomes: int
) -> tuple[Any, ...]:
    now = time.time()
    return (job_id, printer_id, state, message, printer_job_id, now, now, unknown_outcomes)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(deliveries)")}
        if "unknown_outcomes" not in columns:
            conn.execute("ALTER TABLE deliveries ADD COLUMN unknown_outcomes INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class Ledger:
    def __init__(self, path: Path, *, keep_days: float = 30.0) -> None:
        self.path = path
        self.keep_seconds = keep_days * 86400
        self._conn: sqlite3.Connection | None = None
        self._commits: GroupCommit[sqlite3.Connection] | None = None

    @property
    def batches(self) -> int:
        """Committed write batches (tests look at it)."""
        return self._commits.batches if self._commits is not None else 0

    async def open(self) -> None:
        def _open() -> sqlite3.Connection:
            conn = open_sqlite(self.path)  # 0600 in a 0700 state dir, whatever the umask
            _migrate(conn)
            return conn

        self._conn = await trio.to_thread.run_sync(_open)
        self._commits = GroupCommit(SqliteBatcher(self._conn))

    async def close(self) -> None:
        if self._commits is not None:
            await self._commits.flush()  # queued notes (``note_started``) go to disk too
        if self._conn is not None and self._commits is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._commits.limiter)

    async def _run(self, sql: str, args: tuple[Any, ...], *, write: bool = False) -> list[Any]:
        """Run one statement with the next batch (group commit); a write returns once committed."""
        if self._commits is None or self._conn is None:
            raise RuntimeError("ledger is not open")

        def statement(c: sqlite3.Connection) -> list[Any]:
            return c.execute(sql, args).fetchall()

        return await (self._commits.write(statement) if write else self._commits.read(statement))

    async def get(self, job_id: str) -> LedgerEntry | None:
        rows = await self._run(
            "SELECT job_id, printer_id, state, message, printer_job_id, updated_at, unknown_outcomes "
            "FROM deliveries WHERE job_id = ?",
            (job_id,),
        )
        return LedgerEntry(*rows[0]) if rows else None

    async def record(
        self,
        job_id: str,
        printer_id: str,
        state: str,
        message: str = "",
        printer_job_id: int | None = None,
        *,
        unknown_outcomes: int = 0,
    ) -> None:
        """Record the job's state; returns once it is on disk."""
        args = _record_args(job_id, printer_id, state, message, printer_job_id, unknown_outcomes)
        await self._run(RECORD, args, write=True)

    def note_started(self, job_id: str, printer_id: str, message: str) -> None:
        """Record ``started`` with the next batch, without waiting for it (no fsync on the job's path).

        ``started`` may skip the wait: the ledger treats it like no entry at all (deliver again), so a
        crash that loses it changes nothing. The next write (this delivery's ``feeding`` or ``handed``, or
        another delivery's) commits it first, batches run their writes in order; a lookup does not.
        """
        self._note(job_id, printer_id, "started", message)

    def note_completed(self, job_id: str, printer_id: str, message: str) -> None:
        """Record ``completed`` with the next batch, without waiting for it; only once ``handed`` is on disk.

        A resend already finds ``handed`` and is answered "completed" without printing, so a crash that
        loses this write loses only the printer's last words (the message); the next write, or
        :meth:`close`, commits it (a lookup does not: it would make the next job's lookup wait on an
        fsync).
        """
        self._note(job_id, printer_id, "completed", message)

    def _note(self, job_id: str, printer_id: str, state: str, message: str) -> None:
        args = _record_args(job_id, printer_id, state, message, None, 0)
        if self._commits is None:
            raise RuntimeError("ledger is not open")
        self._commits.enqueue(lambda c: c.execute(RECORD, args))

    async def size(self) -> int:
        rows = await self._run("SELECT COUNT(*) FROM deliveries", ())
        return int(rows[0][0])

    async def prune(self) -> int:
        """Forget final entries older than ``keep_days``: the relay stops resending long before. ``handed``
        is as final (what follows it may not have reached the disk)."""
        cutoff = time.time() - self.keep_seconds
        rows = await self._run(
            "DELETE FROM deliveries WHERE updated_at < ? AND state IN ('handed', 'completed', 'failed') "
            "RETURNING 1",
            (cutoff,),
            write=True,
        )
        return len(rows)
