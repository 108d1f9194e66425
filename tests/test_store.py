"""What only the embedded SQLite store does (tests/test_store_contract.py holds both backends to the rest):
its claim's query plan, schema versions, and one process owning the database."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.store.base import Lease, Printer, SessionRecord
from relay.store.sqlite import SCHEMA_VERSION, SchemaTooNew, SqliteStore, open_connection
from service.sqlite import open_sqlite

LEASE = Lease("relay-test", 15.0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "relay.sqlite3")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_the_claim_walks_the_queue_in_order_without_sorting(store: SqliteStore) -> None:
    """A claim of one job must not sort the whole backlog (it runs every time a stream ends)."""
    statements: list[str] = []
    conn = store._conn
    assert conn is not None
    conn.set_trace_callback(statements.append)  # the SQL with its values bound
    await store.claim_jobs_and_next_due("acme", "c1", time.time(), 1, LEASE)
    conn.set_trace_callback(None)
    [claim] = [s for s in statements if s.startswith("UPDATE jobs SET state = 'sending'")]
    plan = " / ".join(str(row[3]) for row in conn.execute(f"EXPLAIN QUERY PLAN {claim}"))
    assert "jobs_claim" in plan and "TEMP B-TREE" not in plan, plan


async def test_one_process_owns_the_database_so_a_new_one_forgets_the_old_sessions(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "relay.sqlite3")
    await first.open()
    await first.replace_printers("acme", "c1", [Printer("acme", "p1", "c1")])
    await first.register_replica(first.replica_id, "old")
    await first.session_opened(SessionRecord("s1", "acme", "c1", first.replica_id, time.time()))
    await first.close()  # a crash, as far as the database knows: nothing retired
    second = SqliteStore(tmp_path / "relay.sqlite3")
    await second.open()
    try:
        printer = await second.get_printer("acme", "p1")
        assert printer is not None and printer.online  # until the new process registers
        await second.register_replica(second.replica_id, "new")
        printer = await second.get_printer("acme", "p1")
        assert printer is not None and not printer.online
    finally:
        await second.close()


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.sqlite3"
    open_connection(path).close()
    conn = open_sqlite(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(
        SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}, newer than this printrelay's"
    ):
        open_connection(path)


def test_an_older_database_is_migrated_with_its_data(tmp_path: Path) -> None:
    """A database made at version 5 gains replicas, usage counted from its jobs, and IPP counters."""
    from relay.store.sqlite import SCHEMA, migrate

    path = tmp_path / "relay.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(SCHEMA[:5], start=1):
        conn.executescript(f"{script}; PRAGMA user_version={number};".replace(";;", ";"))
    conn.execute(
        "INSERT INTO jobs (id, tenant, printer_id, state, title, document_format, copies, user, size, "
        "sealed_size, sha256, wrapped_key, key_id, connector_id, max_attempts, created_at, updated_at) "
        "VALUES ('j1', 'acme', 'p1', 'queued', 't', 'x/y', 1, 'u', 10, 300, '', x'00', 'k', 'c1', 5, 1, 1)"
    )
    conn.execute(
        "INSERT INTO ipp_jobs (tenant, number, printer_id, job_id, state, created_at, updated_at) "
        "VALUES ('acme', 41, 'p1', 'j1', 'attached', 1, 1)"
    )
    conn.row_factory = sqlite3.Row
    assert migrate(conn) == list(range(6, SCHEMA_VERSION + 1))
    assert tuple(conn.execute("SELECT bytes, jobs FROM tenant_usage WHERE tenant = 'acme'").fetchone()) == (
        300,
        1,
    )
    assert conn.execute("SELECT last FROM ipp_counters WHERE tenant = 'acme'").fetchone()[0] == 41
    conn.close()


def _open_and_report(path: str) -> int:
    """In a child process: open the relay's database, the version it ends at."""
    conn = open_connection(Path(path))
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_processes_opening_a_new_database_together_all_get_it_migrated(tmp_path: Path) -> None:
    """`printrelay serve` and `printrelay token create` started at once on a new data directory: both
    used to find version 0, and the second failed on "table tokens already exists" (or, switching to WAL,
    on "database is locked")."""
    context = multiprocessing.get_context("spawn")
    for round_ in range(4):
        path = str(tmp_path / f"relay-{round_}.sqlite3")
        with context.Pool(4) as pool:
            assert pool.map(_open_and_report, [path] * 4, chunksize=1) == [SCHEMA_VERSION] * 4


def test_a_version_that_fails_half_way_leaves_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash (here an error) between two statements of a version: the next start applies it whole
    (``executescript`` committed each statement; a half-applied version then failed every start)."""
    from relay.store import sqlite as relay_sqlite

    path = tmp_path / "relay.sqlite3"
    broken = [*relay_sqlite.SCHEMA[:-1], relay_sqlite.SCHEMA[-1] + "; CREATE TABLE no_such_syntax ("]
    monkeypatch.setattr(relay_sqlite, "SCHEMA", broken)
    with pytest.raises(sqlite3.OperationalError):
        open_connection(path)
    conn = open_sqlite(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION - 1
    conn.close()
    monkeypatch.undo()
    conn = open_connection(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_schema_version_is_split_into_whole_statements() -> None:
    from relay.store.sqlite import SCHEMA, statements

    [trigger] = [s for s in statements(SCHEMA[2]) if s.startswith("CREATE TRIGGER")]
    assert trigger.endswith("END;")  # its body's semicolons did not split it
    split = statements("INSERT INTO t VALUES ('a;b'); SELECT 1")
    assert split == ["INSERT INTO t VALUES ('a;b');", "SELECT 1;"]
    with pytest.raises(ValueError, match="unfinished SQL statement"):
        statements("CREATE TABLE a (x); INSERT INTO a VALUES ('unterminated); ")
