"""SQLite as both programs use it: one connection in WAL mode, commits durable (``synchronous=FULL``),
files private, and batches of calls group-committed (:mod:`service.groupcommit`)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import outcome

from service.groupcommit import Call, run_writes_in_transaction
from service.private_files import private_database

C = TypeVar("C")

BUSY_TIMEOUT_MS = 30_000  # another process (the CLI) may hold the write lock for a moment


def open_sqlite(path: Path, *, row_factory: Any = None) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, durable commits, 0600 files."""
    private_database(path)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    if row_factory is not None:
        conn.row_factory = row_factory
    _use_wal(conn)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch a database to WAL, once. The switch needs the database to itself, and SQLite does not wait
    for that as it waits for a write lock: two processes opening a new database together retry here."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)  # called in a worker thread (trio.to_thread) or before trio runs


class SqliteBatcher(Generic[C]):
    """Runs a group-commit batch on one SQLite connection: reads, then ``BEGIN IMMEDIATE`` ... ``COMMIT``.
    Calls get the connection itself, or what ``wrap`` makes of it (the relay store's ``Tx``)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        wrap: Callable[[sqlite3.Connection], C] | None = None,
        *,
        on_begin: Callable[[C], object] | None = None,
        optimistic: bool = False,
    ) -> None:
        self.conn = conn
        self._view: Any = wrap(conn) if wrap is not None else conn
        self._on_begin = on_begin  # told each time a write transaction begins
        # First without a savepoint per write (two statements each), again with them only if a write
        # failed: for writes that are safe to run twice (service/groupcommit.py).
        self._optimistic = optimistic

    def run_batch(self, reads: Sequence[Call[C, Any]], writes: Sequence[Call[C, Any]]) -> None:
        conn, view = self.conn, self._view
        for call in reads:
            call.result = outcome.capture(call.fn, view)
        if not writes:
            return

        def rollback() -> None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

        def begin() -> None:
            conn.execute("BEGIN IMMEDIATE")
            if self._on_begin is not None:
                self._on_begin(view)

        run_writes_in_transaction(
            writes, view,
            begin=begin,
            optimistic=contextlib.nullcontext if self._optimistic else None,
            commit=lambda: conn.execute("COMMIT"),
            rollback=rollback,
            savepoint=lambda: conn.execute("SAVEPOINT call"),
            rollback_to_savepoint=lambda: conn.execute("ROLLBACK TO call"),
            release_savepoint=lambda: conn.execute("RELEASE call"),
        )  # fmt: skip
