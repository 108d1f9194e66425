"""A real PostgreSQL for tests (loadtest/postgres.py): one server per test session, a database per test.

The server listens on 127.0.0.1 on a free port, with ``fsync=off`` (durability is PostgreSQL's business;
the tests check ours). Each test gets a fresh database, dropped afterwards.

Fixtures:

* ``postgres_server`` -> :class:`PostgresServer` (session): ``stop()``/``start()`` for restart tests;
* ``postgres_url`` -> the URL of a new, empty database.
"""

from __future__ import annotations

__all__ = ["PostgresServer", "postgres_bin", "postgres_server", "postgres_url"]

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadtest/ is tooling, not installed

from loadtest.postgres import PostgresServer, postgres_bin


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="printrelay-pg-"))
    os.chmod(root, 0o755)
    server = PostgresServer(root)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    if postgres_server.process is None:  # a test stopped it and failed before starting it again
        postgres_server.start()
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    if postgres_server.process is None:
        postgres_server.start()
    postgres_server.drop_database(name)
