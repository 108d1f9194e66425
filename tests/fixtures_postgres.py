"""A real PostgreSQL for tests (Debian ``postgresql``): one server per test session, a database per test.

``initdb`` refuses root, so as root the cluster belongs to user ``postgres``; otherwise to the user running
the tests. The server listens on 127.0.0.1 on a free port, with ``fsync=off`` (durability is PostgreSQL's
business; the tests check ours). Each test gets a fresh database, dropped afterwards.

Fixtures:

* ``postgres_server`` -> :class:`PostgresServer` (session): ``stop()``/``start()`` for restart tests;
* ``postgres_url`` -> the URL of a new, empty database.
"""

from __future__ import annotations

__all__ = ["PostgresServer", "postgres_bin", "postgres_server", "postgres_url"]

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fixtures_printers import free_port

READY_TIMEOUT = 30.0


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (``/usr/lib/postgresql/N/bin``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (Debian package postgresql): scripts/install-system-deps.sh "
            "installs it"
        )
    return Path(found[-1]).parent


class PostgresServer:
    def __init__(self, root: Path) -> None:
        self.bin = postgres_bin()
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else None
        self.role = "postgres" if self.user else pwd.getpwuid(os.geteuid()).pw_name

    def _run_as(self) -> dict[str, str]:
        return {"user": self.user} if self.user else {}

    def init(self) -> None:
        if self.user:
            record = pwd.getpwnam(self.user)
            os.chown(self.root, record.pw_uid, record.pw_gid)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.role, "-A", "trust", "--no-sync"],
            check=True, capture_output=True, **self._run_as(),  # type: ignore[call-overload]
        )  # fmt: skip

    def start(self) -> None:
        log = (self.root / "postgres.log").open("ab")
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=300",
             "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT, **self._run_as(),  # type: ignore[call-overload]
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"], check=False
            )
            if ready.returncode == 0:
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log()}")
            time.sleep(0.05)  # an external process: polled, as pg_isready itself does

    def stop(self) -> None:
        """Fast shutdown (SIGINT), as a restart does it: clients are disconnected, not waited for."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        try:
            return (self.root / "postgres.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.role}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(), autocommit=True)

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


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
