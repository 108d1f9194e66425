"""Relays and connectors as real processes (``printrelay serve`` / ``printrelay connector``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from fixtures_printers import free_port

STARTUP_TIMEOUT = 20.0


def printrelay(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short printrelay command (token create, submit) to completion; ``input`` is its stdin."""
    return subprocess.run(
        [sys.executable, "-m", "printrelay.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


@dataclass
class Service:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} is already running (pid {self.process.pid})")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "printrelay.cli", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PRINTRELAY_LOG_FORMAT": "json", **self.env},
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class ProcessStack:
    tmp_path: Path
    http_port: int
    tunnel_port: int
    services: list[Service] = field(default_factory=list)
    api_token: str = ""
    database_url: str = ""  # PostgreSQL (pg_process_stack); else SQLite in data_dir

    def store_args(self) -> list[str]:
        return (
            ["--database-url", self.database_url] if self.database_url else ["--data-dir", str(self.data_dir)]
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "relay-data"

    def start_relay(self, *extra: str) -> Service:
        relay = Service(
            "relay",
            ["serve", "--listen", f"127.0.0.1:{self.http_port}", "--tunnel-listen",
             f"127.0.0.1:{self.tunnel_port}", "--data-dir", str(self.data_dir),
             *(["--database-url", self.database_url] if self.database_url else []), *extra],
            self.tmp_path / "relay.log",
        )  # fmt: skip
        relay.start()
        self.services.append(relay)
        return relay

    def token(self, kind: str, tenant: str = "acme", *extra: str) -> str:
        result = printrelay("token", "create", *self.store_args(), "--tenant", tenant, "--kind", kind, *extra)
        return result.stdout.strip()

    def start_connector(
        self, printers: dict[str, str], *, connector_id: str = "site-1", extra: tuple[str, ...] = ()
    ) -> Service:
        """A connector process serving ``printers``; ``extra``: more of its flags."""
        token_file = self.tmp_path / f"connector-{connector_id}.token"  # as a unit or a Secret gives it
        token_file.write_text(self.token("connector", "acme", "--connector", connector_id) + "\n")
        token_file.chmod(0o600)
        args = ["connector", "--relay", f"ws://127.0.0.1:{self.tunnel_port}/v1/tunnel",
                "--state-dir", str(self.tmp_path / f"connector-{connector_id}"),
                "--token-file", str(token_file)]  # fmt: skip
        for printer_id, uri in printers.items():
            args += ["--printer", f"{printer_id}={uri}"]
        args += extra
        log_path = self.tmp_path / f"connector-{connector_id}.log"
        connector = Service(f"connector {connector_id}", args, log_path)
        connector.start()
        self.services.append(connector)
        return connector

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.api_url, headers={"authorization": f"Bearer {self.api_token}"}, timeout=30
        )

    async def wait_ready(self) -> None:
        """Poll /readyz until the relay process answers (an external process: nothing else to wait on)."""
        async with httpx.AsyncClient(base_url=self.api_url, timeout=2) as client:
            with trio.fail_after(STARTUP_TIMEOUT):
                while True:
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    async def wait_printers_online(self, *printer_ids: str, within: float = STARTUP_TIMEOUT) -> None:
        async with self.client() as client:
            with trio.fail_after(within):
                while True:
                    try:
                        listed = (await client.get("/v1/printers")).json()["printers"]
                        online = {p["id"] for p in listed if p["online"]}
                        if online >= set(printer_ids):
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log()[-4000:]}" for s in self.services)


@pytest.fixture
def process_stack(tmp_path: Path) -> Iterator[ProcessStack]:
    yield from _process_stack(ProcessStack(tmp_path, free_port(), free_port()))


@pytest.fixture
def pg_process_stack(tmp_path: Path, postgres_url: str) -> Iterator[ProcessStack]:
    """The same, with the relay on PostgreSQL."""
    yield from _process_stack(ProcessStack(tmp_path, free_port(), free_port(), database_url=postgres_url))


def _process_stack(stack: ProcessStack) -> Iterator[ProcessStack]:
    stack.data_dir.mkdir()
    stack.api_token = stack.token("api", "acme", "--scopes", "admin")
    yield stack
    for service in reversed(stack.services):
        service.stop()
