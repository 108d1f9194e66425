"""Small jobs: 5,000 documents of 4 KiB through relay + connector to RAW printers, next to CUPS.

    python loadtest/bench_small_jobs.py --out bench-results

Both sides get the same clients (``--concurrency`` keep-alive HTTP/1.1 connections from this process,
each sending one job after another) and the same kind of printers (``--printers`` RAW sinks in this
process):

* ``printrelay``: ``printrelay serve`` and ``printrelay connector`` processes; each job is a REST
  ``POST /v1/printers/{id}/jobs``, durable (fsynced) before the 201;
* ``cups``: a private ``cupsd`` with one raw queue per printer (``lpadmin -m raw``); each job is an IPP
  Print-Job to the queue (what ``lp`` sends, without spawning ``lp``).

A job counts as done when the sink has its last byte; jobs/s is jobs / (first submit → last arrival).
A second, open-loop run paces submissions at ``--paced-rate`` jobs/s and reports latency percentiles
(accepted → printed).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipp import Operation, ValueTag, encode, new_request
from loadtest.report import percentile
from loadtest.sink import Arrival, RawSink, tagged
from loadtest.stack import (
    Monitor,
    Relay,
    Service,
    connector_service,
    create_tokens,
    free_port,
    machine,
    stopping,
    wait_printers_online,
    write_json,
)

RUN_TIMEOUT = 600.0
MAX_RESPONSE = 64 * 1024

CUPSD_CONF = """\
Listen 127.0.0.1:{port}
Browsing No
WebInterface No
DefaultAuthType None
LogLevel warn
MaxJobs 0
PreserveJobHistory No
<Policy default>
  <Limit All>
    Order deny,allow
  </Limit>
</Policy>
"""
CUPS_FILES_CONF = """\
ServerRoot {root}
RequestRoot {root}/spool
TempDir {root}/tmp
StateDir {root}/state
CacheDir {root}/cache
AccessLog {root}/log/access_log
ErrorLog {root}/log/error_log
PageLog {root}/log/page_log
Printcap {root}/printcap
DataDir /usr/share/cups
ServerBin /usr/lib/cups
SystemGroup root
Sandboxing Relaxed
"""


class HttpConnection:
    """A minimal keep-alive HTTP/1.1 client: the load generator must cost less than what it measures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stream: trio.SocketStream | None = None
        self.buffer = b""

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self.stream is None:
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.buffer = b""
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        with trio.fail_after(60):
            await self.stream.send_all(head.encode() + body)
            while b"\r\n\r\n" not in self.buffer:
                await self._fill()
            header, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            lines = header.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                    if length > MAX_RESPONSE:
                        raise ValueError(f"response of {length} bytes exceeds MAX_RESPONSE={MAX_RESPONSE}")
            while len(self.buffer) < length:
                await self._fill()
            payload, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, payload

    async def _fill(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buffer += data
        if len(self.buffer) > MAX_RESPONSE * 2:
            raise ValueError("response headers too large")

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


@dataclass
class Tracker:
    """Submission and arrival times by tag."""

    accepted: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def record(self, arrival: Arrival) -> None:
        self.arrived.setdefault(arrival.tag, arrival.done_at)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_all(self) -> None:
        with trio.fail_after(RUN_TIMEOUT):
            while not set(self.accepted) <= set(self.arrived):
                await self.changed.wait()

    def latencies(self) -> list[float]:
        return [self.arrived[t] - a for t, a in self.accepted.items() if t in self.arrived]


Submit = Any  # async (connection, printer index, tag, body) -> bool


async def drive(
    tracker: Tracker, submit: Submit, ports: Sequence[int], printers: int, jobs: int, concurrency: int,
    size: int, pace: float = 0.0,
) -> None:  # fmt: skip
    """Send ``jobs`` tagged documents from ``concurrency`` connections, spread over ``ports`` (several
    relay replicas); ``pace`` jobs/s (0: flat out)."""
    counter = itertools.count()
    payload = os.urandom(size)
    start = trio.current_time()

    async def worker(port: int) -> None:
        connection = HttpConnection(port)
        try:
            while (n := next(counter)) < jobs:
                if pace:
                    await trio.sleep_until(start + n / pace)
                tag = uuid.uuid4().hex
                body = tagged(tag, payload[: size - len(tag) - 8])
                if await submit(connection, n % printers, tag, body):
                    tracker.accepted[tag] = time.time()
                else:
                    tracker.failures += 1
        finally:
            await connection.aclose()

    with trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for n in range(concurrency):
                nursery.start_soon(worker, ports[n % len(ports)])


def figures(tracker: Tracker, started: float) -> dict[str, Any]:
    done = max(tracker.arrived.values(), default=started)
    lat = tracker.latencies()
    return {
        "jobs": len(tracker.accepted),
        "failures": tracker.failures,
        "jobs_per_s": round(len(tracker.arrived) / (done - started), 1) if done > started else 0.0,
        "latency_ms": {
            q: round(1000 * percentile(lat, p), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))
        }
        | {"max": round(1000 * max(lat, default=0.0), 1)},
    }


async def run_case(
    name: str, submit: Submit, ports: Sequence[int], sinks: list[RawSink], args: argparse.Namespace, *,
    pace: float,
) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    for label, jobs, rate in (("saturated", args.jobs, 0.0), ("paced", int(pace * args.paced_seconds), pace)):
        tracker = Tracker()
        for sink in sinks:
            sink.record = tracker.record
        started = time.time()
        await drive(tracker, submit, ports, len(sinks), jobs, args.concurrency, args.size, rate)
        await tracker.wait_all()
        results[label] = figures(tracker, started) | {"target_jobs_per_s": rate or None}
        print(f"{name} {label}: {results[label]}", flush=True)
    return results


def relay_submitter(token: str, printers: list[str]) -> Submit:
    async def submit(connection: HttpConnection, printer: int, tag: str, body: bytes) -> bool:
        status, _ = await connection.post(
            f"/v1/printers/{printers[printer]}/jobs",
            {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
            body,
        )
        return status == 201

    return submit


def cups_submitter(port: int, queues: list[str]) -> Submit:
    request_ids = itertools.count(1)

    async def submit(connection: HttpConnection, printer: int, tag: str, body: bytes) -> bool:
        uri = f"ipp://127.0.0.1:{port}/printers/{queues[printer]}"
        request = new_request(Operation.PRINT_JOB, next(request_ids), printer_uri=uri)
        request.operation.add("requesting-user-name", ValueTag.NAME, "bench")
        request.operation.add("job-name", ValueTag.NAME, tag)
        request.operation.add("document-format", ValueTag.MIME_MEDIA_TYPE, "application/vnd.cups-raw")
        status, answer = await connection.post(
            f"/printers/{queues[printer]}", {"Content-Type": "application/ipp"}, encode(request) + body
        )
        return status == 200 and len(answer) >= 4 and int.from_bytes(answer[2:4], "big") < 0x100

    return submit


def start_cupsd(root: Path, port: int, queues: dict[str, int]) -> Service:
    root.chmod(0o755)
    for sub in ("spool", "tmp", "state", "cache", "log"):
        (root / sub).mkdir(mode=0o755)
        (root / sub).chmod(0o755)
    (root / "tmp").chmod(0o1777)
    (root / "cupsd.conf").write_text(CUPSD_CONF.format(port=port))
    (root / "cups-files.conf").write_text(CUPS_FILES_CONF.format(root=root))
    service = Service(
        "cupsd",
        [shutil.which("cupsd") or "cupsd", "-f", "-c", str(root / "cupsd.conf"), "-s",
         str(root / "cups-files.conf")],
        root / "cupsd.out",
    )  # fmt: skip
    service.start()
    return service


def add_queues(port: int, queues: dict[str, int]) -> None:
    for name, sink_port in queues.items():
        subprocess.run(
            ["lpadmin", "-h", f"127.0.0.1:{port}", "-p", name, "-E", "-v",
             f"socket://127.0.0.1:{sink_port}/?snmp=false", "-m", "raw"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip


async def wait_listening(port: int, service: Service) -> None:
    with trio.fail_after(20):
        while True:
            if not service.running():
                raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-bench-small-"))
    results: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/bench_small_jobs.py", *sys.argv[1:]]),
        "machine": machine(),
    }
    try:
        async with trio.open_nursery() as nursery:
            sinks = [RawSink(f"p{n}", lambda a: None, digest=False) for n in range(args.printers)]
            for sink in sinks:
                await nursery.start(sink.serve)
            services: list[Service] = []
            with stopping(services):
                # printrelay
                printers = [s.printer for s in sinks]
                tokens = create_tokens(work / "relay-data", ["bench"])
                relay = Relay(work / "relay-data", work / "relay.log")
                services.append(relay.start())
                await relay.wait_ready()
                connector = connector_service(
                    "bench", relay, tokens.connectors["bench"],
                    {s.printer: f"socket://127.0.0.1:{s.port}" for s in sinks}, work / "connector",
                    work / "connector.log", "--max-jobs", str(args.printers),
                )  # fmt: skip
                services.append(connector)
                connector.start()
                import httpx

                async with httpx.AsyncClient(
                    base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}
                ) as client:
                    await wait_printers_online(client, set(printers), within=60)
                assert relay.service is not None
                monitor = Monitor({"relay": relay.service.pid, "connector": connector.pid})
                nursery.start_soon(monitor.run)
                started = time.time()
                results["printrelay"] = await run_case(
                    "printrelay", relay_submitter(tokens.api, printers), [relay.http_port], sinks, args,
                    pace=args.paced_rate,
                )  # fmt: skip
                results["printrelay"]["relay"] = monitor.summary("relay", started)
                results["printrelay"]["connector"] = monitor.summary("connector", started)
                relay.stop()
                connector.stop()
                # CUPS
                port = free_port()
                cups_root = Path(tempfile.mkdtemp(prefix="printrelay-bench-cups-"))
                queues = {f"q{n}": s.port for n, s in enumerate(sinks)}
                cupsd = start_cupsd(cups_root, port, queues)
                services.append(cupsd)
                try:
                    await wait_listening(port, cupsd)
                    await trio.to_thread.run_sync(add_queues, port, queues)
                    monitor.pids = {"cupsd": cupsd.pid}
                    started = time.time()
                    results["cups"] = await run_case(
                        "cups", cups_submitter(port, list(queues)), [port], sinks, args,
                        pace=args.cups_paced_rate,
                    )  # fmt: skip
                    results["cups"]["cupsd"] = monitor.summary("cupsd", started)
                finally:
                    cupsd.stop()
                    shutil.rmtree(cups_root, ignore_errors=True)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = results["printrelay"]["saturated"], results["cups"]["saturated"]
    results["ratio_jobs_per_s"] = (
        round(ours["jobs_per_s"] / theirs["jobs_per_s"], 2) if theirs["jobs_per_s"] else None
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--printers", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="jobs/s of the latency run")
    parser.add_argument("--cups-paced-rate", type=float, default=50.0, help="CUPS cannot keep 200/s")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "small_jobs.json", results)
    print(f"\n$ {results['command']}")
    for name in ("printrelay", "cups"):
        sat, paced = results[name]["saturated"], results[name]["paced"]
        print(
            f"{name}: {sat['jobs']} x {args.size} B: {sat['jobs_per_s']} jobs/s, "
            f"p99 {sat['latency_ms']['p99']} ms "
            f"(failures {sat['failures']}); paced {paced['target_jobs_per_s']} jobs/s: "
            f"p50 {paced['latency_ms']['p50']} ms, p99 {paced['latency_ms']['p99']} ms"
        )
    print(f"printrelay / CUPS jobs/s: {results['ratio_jobs_per_s']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
