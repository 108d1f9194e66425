"""A private PostgreSQL server (Debian ``postgresql``) on a free loopback port, for tests and benchmarks.

``initdb`` refuses root, so as root the cluster belongs to user ``postgres``; otherwise to the user running
it. ``durable=False`` turns fsync off (tests: durability is PostgreSQL's business, the tests check ours);
benchmarks keep it on, as production does, to compare fairly with SQLite's fsynced commits.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    def __init__(self, root: Path, *, durable: bool = False) -> None:
        self.bin = postgres_bin()
        self.root = root
        self.data = root / "data"
        self.durable = durable
        self.port = _free_port()
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
        settings = ["listen_addresses=127.0.0.1", "max_connections=300"]
        if not self.durable:
            settings += ["fsync=off", "full_page_writes=off"]
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
             *(arg for setting in settings for arg in ("-c", setting))],
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

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

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
