"""The processes a load test or benchmark runs: a relay, connectors, and what they cost.

Everything here starts real ``printrelay`` processes (the same command users run) on free loopback ports,
and reads their CPU time and memory from ``/proc`` so figures describe the product, not the harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from relay.auth import new_token
from relay.store.sql import Tx, add_token
from relay.store.sqlite import DIALECT, open_connection

TENANT = "load"
STARTUP_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def own_cpu_seconds() -> float:
    """This process's CPU time so far, user and system, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        # Other work on the machine skews every figure; the baselines of the same run share it.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


@dataclass(frozen=True)
class ProcSample:
    at: float  # time.time()
    cpu_seconds: float  # user + system, since the process started
    rss: int  # bytes now
    peak_rss: int  # VmHWM: the most this process ever held


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (so ``[0]`` is the state, ``[1]`` the ppid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children, those still running and those it reaped (PostgreSQL runs a
    process per connection)."""
    root = _stat(pid)
    if root is None:
        return 0.0
    ticks = sum(int(root[n]) for n in (11, 12, 13, 14))  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (child := _stat(int(entry.name))) is not None and child[1] == str(pid):
            ticks += int(child[11]) + int(child[12])
    return ticks / CLOCK_TICKS


def sample(pid: int, *, tree: bool = False) -> ProcSample | None:
    """CPU time and memory of ``pid`` (None once it is gone); with ``tree``, CPU of its children too."""
    fields = _stat(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    if fields is None:
        return None
    cpu = tree_cpu(pid) if tree else (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if "kB" in v}
    return ProcSample(time.time(), cpu, kib.get("VmRSS", 0) * 1024, kib.get("VmHWM", 0) * 1024)


@dataclass
class Monitor:
    """Samples processes every ``interval`` seconds while :meth:`run` runs."""

    pids: dict[str, int]
    interval: float = 0.5
    samples: dict[str, list[ProcSample]] = field(default_factory=dict)
    trees: set[str] = field(default_factory=set)  # names whose children's CPU counts too (PostgreSQL)

    async def run(self) -> None:
        while True:
            self.take()
            await trio.sleep(self.interval)

    def take(self) -> None:
        for name, pid in self.pids.items():
            found = sample(pid, tree=name in self.trees)
            if found is not None:
                self.samples.setdefault(name, []).append(found)

    def summary(self, name: str, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        """CPU (% of one core) between the first and last sample in the window, and RSS peaks."""
        window = [s for s in self.samples.get(name, []) if since <= s.at <= until]
        if len(window) < 2:
            return {"cpu_percent": 0.0, "cpu_seconds": 0.0, "peak_rss_mib": 0.0, "max_sampled_rss_mib": 0.0}
        first, last = window[0], window[-1]
        return {
            "cpu_seconds": round(last.cpu_seconds - first.cpu_seconds, 2),
            "cpu_percent": round(100 * (last.cpu_seconds - first.cpu_seconds) / (last.at - first.at), 1),
            "peak_rss_mib": round(max(s.peak_rss for s in window) / 2**20, 1),
            "max_sampled_rss_mib": round(max(s.rss for s in window) / 2**20, 1),
            "end_rss_mib": round(last.rss / 2**20, 1),
        }


@dataclass
class Service:
    """One long-running process, its output in ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, **self.env},
            )  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if not self.running():
            return
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def printrelay_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "printrelay.cli", *args]


@dataclass
class Tokens:
    api: str
    connectors: dict[str, str]  # connector id -> token


def create_tokens(data_dir: Path, connector_ids: Sequence[str], tenant: str = TENANT) -> Tokens:
    """An admin API token and one connector token per id, written in one transaction (10,000 in ~1 s)."""
    conn = open_connection(data_dir / "relay.sqlite3")
    try:
        tx = Tx(conn, DIALECT, "load test")
        api, record = new_token(tenant, "api", scopes=("admin",), label="load test")
        conn.execute("BEGIN")
        add_token(tx, record)
        connectors: dict[str, str] = {}
        for connector_id in connector_ids:
            secret, record = new_token(tenant, "connector", connector_id=connector_id, label="load test")
            add_token(tx, record)
            connectors[connector_id] = secret
        conn.execute("COMMIT")
    finally:
        conn.close()
    return Tokens(api, connectors)


@dataclass
class Relay:
    """A ``printrelay serve`` process."""

    data_dir: Path
    log_path: Path
    extra: Sequence[str] = ()
    http_port: int = field(default_factory=free_port)
    tunnel_port: int = field(default_factory=free_port)
    service: Service | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def tunnel_url(self) -> str:
        return f"ws://127.0.0.1:{self.tunnel_port}/v1/tunnel"

    def start(self) -> Service:
        argv = printrelay_argv(
            "serve", "--listen", f"127.0.0.1:{self.http_port}", "--tunnel-listen",
            f"127.0.0.1:{self.tunnel_port}", "--data-dir", str(self.data_dir),
            "--rate-limit", "0",  # the load generator is one token; per-token limits are not under test
            "--log-level", "warning", "--log-format", "json", *self.extra,
        )  # fmt: skip
        self.service = Service("relay", argv, self.log_path)
        self.service.start()
        return self.service

    async def wait_ready(self, within: float = STARTUP_TIMEOUT) -> None:
        """Poll /readyz: the relay is another process, there is nothing else to wait on."""
        async with httpx.AsyncClient(base_url=self.api_url, timeout=2) as client:
            with trio.fail_after(within):
                while True:
                    if self.service is not None and not self.service.running():
                        raise RuntimeError(f"relay exited:\n{self.service.tail()}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/readyz")).status_code == 200:
                            return
                    await trio.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.service is not None:
            self.service.stop(sig)


def connector_service(
    name: str, relay: Relay, token: str, printers: dict[str, str], state_dir: Path, log_path: Path,
    *extra: str,
) -> Service:  # fmt: skip
    """A ``printrelay connector`` process serving ``printers`` (id -> URI)."""
    argv = printrelay_argv(
        "connector", "--relay", relay.tunnel_url, "--state-dir", str(state_dir), "--name", name,
        "--status-interval", "300", "--log-level", "warning", "--log-format", "json", *extra,
    )  # fmt: skip
    for printer_id, uri in printers.items():
        argv += ["--printer", f"{printer_id}={uri}"]
    return Service(name, argv, log_path, env={"PRINTRELAY_TOKEN": token})


async def wait_printers_online(
    client: httpx.AsyncClient, printer_ids: set[str], within: float = STARTUP_TIMEOUT
) -> float:
    """Wait until the relay lists every printer online; seconds it took."""
    started = time.monotonic()
    with trio.fail_after(within):
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await client.get("/v1/printers")
                if response.status_code == 200:
                    online = {p["id"] for p in response.json()["printers"] if p["online"]}
                    if online >= printer_ids:
                        return time.monotonic() - started
            await trio.sleep(0.1)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def stopping(services: list[Service]) -> Iterator[list[Service]]:
    """Stop every service started in the block, newest first, however the block ends."""
    try:
        yield services
    finally:
        for service in reversed(services):
            service.stop()
