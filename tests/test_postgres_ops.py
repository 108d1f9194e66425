"""PostgreSQL as operators meet it: migrations (once, however many replicas start together), schema status,
and the errors of a database that is unreachable, refuses the password, or is newer than the code."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest
import trio
from fixtures_postgres import PostgresServer
from fixtures_printers import free_port
from fixtures_processes import ProcessStack, printrelay

from relay.store.postgres import SCHEMA_VERSION

pytestmark = pytest.mark.e2e


def versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_db_status_and_migrate(postgres_url: str) -> None:
    status = printrelay("db", "status", "--database-url", postgres_url, check=False)
    assert status.returncode == 1
    assert (
        f"schema version 0, this printrelay needs {SCHEMA_VERSION}: run 'printrelay db migrate'"
        in status.stdout
    )
    migrated = printrelay("db", "migrate", "--database-url", postgres_url)
    assert f"migrated to schema version {SCHEMA_VERSION}" in migrated.stdout
    assert printrelay("db", "migrate", "--database-url", postgres_url).stdout.strip().endswith("up to date")
    assert printrelay("db", "status", "--database-url", postgres_url).returncode == 0
    assert versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


def test_db_status_and_migrate_on_sqlite(tmp_path: object) -> None:
    data = f"{tmp_path}/data"
    assert printrelay("db", "status", "--data-dir", data, check=False).returncode == 1
    assert "migrated to schema version" in printrelay("db", "migrate", "--data-dir", data).stdout
    assert printrelay("db", "status", "--data-dir", data).stdout.strip().endswith("up to date")


def test_replicas_starting_together_migrate_once(postgres_url: str) -> None:
    starts = [
        subprocess.Popen(
            [sys.executable, "-m", "printrelay.cli", "db", "migrate", "--database-url", postgres_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in starts]
    assert [p.returncode for p in starts] == [0] * 4, outputs
    assert sum("migrated to schema version" in out for out, _ in outputs) == 1  # the others found it done
    assert versions(postgres_url) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_database_newer_than_the_code_is_refused(
    process_stack: ProcessStack, postgres_url: str
) -> None:
    printrelay("db", "migrate", "--database-url", postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    relay = process_stack.start_relay("--database-url", postgres_url)
    assert relay.process is not None
    assert await trio.to_thread.run_sync(relay.process.wait, 60) == 1
    assert (
        f"the database is at schema version {SCHEMA_VERSION + 1}, newer than this printrelay's "
        f"{SCHEMA_VERSION}" in relay.log()
    )


async def test_an_unreachable_database_names_itself_without_its_password(process_stack: ProcessStack) -> None:
    port = free_port()  # nothing listens there
    relay = process_stack.start_relay("--database-url", f"postgresql://relay:s3cret@127.0.0.1:{port}/print")
    assert relay.process is not None
    assert await trio.to_thread.run_sync(relay.process.wait, 60) == 1
    log = relay.log()
    assert f"database postgresql://relay:***@127.0.0.1:{port}/print unavailable" in log
    assert "Connection refused" in log or "connection refused" in log.lower()
    assert "s3cret" not in log


async def test_a_wrong_password_says_so(
    process_stack: ProcessStack, postgres_server: PostgresServer, postgres_url: str
) -> None:
    hba = postgres_server.data / "pg_hba.conf"
    original = hba.read_text()
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute("CREATE ROLE guarded LOGIN PASSWORD 'right'")
        hba.write_text("host all guarded 127.0.0.1/32 scram-sha-256\n" + original)
        admin.execute("SELECT pg_reload_conf()")
    try:
        url = postgres_url.replace(f"{postgres_server.role}@", "guarded:wrong@")
        relay = process_stack.start_relay("--database-url", url)
        assert relay.process is not None
        assert await trio.to_thread.run_sync(relay.process.wait, 60) == 1
        assert "password authentication failed for user" in relay.log()
        assert "wrong" not in relay.log().replace("password authentication", "")
    finally:
        hba.write_text(original)
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_reload_conf()")
            admin.execute("DROP ROLE guarded")
