"""Tunnel throughput and memory: big jobs relay → connector → RAW sink, next to two baselines.

    python loadtest/bench_tunnel.py --out bench-results

Cases, each carried three ways to the same sink (an in-process RAW server that counts bytes):

* ``direct``: a loopback TCP copy of the same bytes (this machine's ceiling);
* ``websockify``: Debian's websockify (a Python WebSocket-to-TCP bridge: no multiplexing, no encryption)
  fed 256 KiB binary messages, the tunnel's batch size;
* ``printrelay``: the job is uploaded held (not timed), then released; timed from the release to the
  sink's EOF. ``printrelay serve`` and ``printrelay connector`` run as processes. Two phases are reported:
  the *tunnel* phase (release → the sink's first byte: the sealed payload crosses the tunnel and the
  connector verifies it into its incoming file, as it does for every RAW job) and the whole job.

Cases: one 1 GiB job; 32 jobs of 64 MiB at once (32 printers). While the 1 GiB job streams, the RSS of the
relay and of the connector are sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.sink import Arrival, RawSink
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

MiB = 1024 * 1024
GiB = 1024 * MiB
BATCH = 256 * 1024
CASE_TIMEOUT = 600.0


@dataclass(frozen=True)
class Case:
    name: str
    jobs: int
    size: int


class Sink:
    """One RAW server for every path; remembers when each connection ended."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self.changed = trio.Event()
        self.server = RawSink("sink", self._record, digest=False)

    def _record(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, count: int) -> list[Arrival]:
        with trio.fail_after(CASE_TIMEOUT):
            while len(self.arrivals) < count:
                await self.changed.wait()
        return self.arrivals[:count]

    def reset(self) -> None:
        self.arrivals = []


async def _chunks(path: Path, size: int = BATCH) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb", buffering=0) as file:
        while chunk := await file.read(size):
            yield chunk


def make_payload(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data: a 64 MiB random block, repeated."""
    block = os.urandom(min(size, 64 * MiB))
    with path.open("wb") as file:
        written = 0
        while written < size:
            piece = block[: size - written]
            file.write(piece)
            written += len(piece)


def rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


async def direct(sink: Sink, files: list[Path]) -> float:
    sink.reset()
    started = time.time()

    async def one(path: Path) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", sink.server.port)
        async with stream:
            async for chunk in _chunks(path):
                await stream.send_all(chunk)
            await stream.send_eof()
            await stream.receive_some(1)  # the sink closes after EOF

    async with trio.open_nursery() as nursery:
        for path in files:
            nursery.start_soon(one, path)
    done = await sink.wait(len(files))
    return max(a.done_at for a in done) - started


async def websockify(sink: Sink, files: list[Path], port: int) -> float:
    sink.reset()
    started = time.time()

    async def one(path: Path) -> None:
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}/", subprotocols=["binary"], max_message_size=2 * BATCH,
            receive_buffer_size=None,
        ) as ws:  # fmt: skip
            async for chunk in _chunks(path):
                await ws.send_message(chunk)

    async with trio.open_nursery() as nursery:
        for path in files:
            nursery.start_soon(one, path)
    done = await sink.wait(len(files))
    return max(a.done_at for a in done) - started


async def printrelay(
    sink: Sink, files: list[Path], client: httpx.AsyncClient, printers: list[str], monitor: Monitor
) -> dict[str, float]:
    """Upload every file held (untimed), release them together, time release → sink EOF."""
    job_ids = []
    for path, printer in zip(files, printers, strict=False):
        upload_started = time.time()
        response = await client.post(
            f"/v1/printers/{printer}/jobs?hold=true",
            content=_chunks(path, MiB),
            headers={"content-type": "application/octet-stream", "content-length": str(path.stat().st_size)},
        )
        response.raise_for_status()
        job_ids.append(response.json()["id"])
    upload_seconds = time.time() - upload_started
    sink.reset()
    monitor.take()
    released = time.time()
    async with trio.open_nursery() as nursery:
        for job_id in job_ids:
            nursery.start_soon(_release, client, job_id)
    done = await sink.wait(len(files))
    monitor.take()
    return {
        "tunnel_seconds": max(a.first_at for a in done) - released,
        "seconds": max(a.done_at for a in done) - released,
        "released_at": released,
        "done_at": max(a.done_at for a in done),
        "last_upload_seconds": upload_seconds,
    }


async def _release(client: httpx.AsyncClient, job_id: str) -> None:
    (await client.post(f"/v1/jobs/{job_id}/release")).raise_for_status()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-bench-tunnel-"))
    sink = Sink()
    results: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/bench_tunnel.py", *sys.argv[1:]]),
        "machine": machine(),
        "cases": {},
    }
    cases = [Case("1 x 1 GiB", 1, args.big_mib * MiB), Case("32 x 64 MiB", 32, args.many_mib * MiB)]
    try:
        big = work / "big.bin"
        make_payload(big, cases[0].size)
        small = work / "medium.bin"
        make_payload(small, cases[1].size)
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.server.serve)
            sink_uri = f"socket://127.0.0.1:{sink.server.port}"
            printers = [f"p{n}" for n in range(32)]
            tokens = create_tokens(work / "relay-data", ["bench"])
            relay = Relay(work / "relay-data", work / "relay.log", extra=("--max-job-bytes", "2GiB"))
            ws_port = free_port()
            services: list[Service] = []
            with stopping(services):
                websockify_argv = [shutil.which("websockify") or "websockify", f"127.0.0.1:{ws_port}"]
                websockify_argv.append(f"127.0.0.1:{sink.server.port}")
                services.append(Service("websockify", websockify_argv, work / "websockify.log"))
                services[-1].start()
                services.append(relay.start())
                await relay.wait_ready()
                connector = connector_service(
                    "bench", relay, tokens.connectors["bench"], {p: sink_uri for p in printers},
                    work / "connector", work / "connector.log", "--max-jobs", "32",
                )  # fmt: skip
                services.append(connector)
                connector.start()
                async with httpx.AsyncClient(
                    base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}, timeout=300
                ) as client:
                    await wait_printers_online(client, set(printers), within=60)
                    monitor = Monitor({"relay": relay.service.pid, "connector": connector.pid}, 0.1)  # type: ignore[union-attr]
                    nursery.start_soon(monitor.run)
                    for case in cases:
                        files = [big if case.jobs == 1 else small] * case.jobs
                        total = case.size * case.jobs
                        d = await direct(sink, files)
                        w = await websockify(sink, files, ws_port)
                        p = await printrelay(sink, files, client, printers, monitor)
                        entry: dict[str, Any] = {
                            "bytes": total,
                            "direct_mb_s": rate(total, d),
                            "websockify_mb_s": rate(total, w),
                            "printrelay_tunnel_mb_s": rate(total, p["tunnel_seconds"]),
                            "printrelay_job_mb_s": rate(total, p["seconds"]),
                        }
                        entry["tunnel_vs_websockify"] = round(
                            entry["printrelay_tunnel_mb_s"] / entry["websockify_mb_s"], 2
                        )
                        entry["tunnel_vs_direct"] = round(
                            entry["printrelay_tunnel_mb_s"] / entry["direct_mb_s"], 2
                        )
                        entry["job_vs_websockify"] = round(
                            entry["printrelay_job_mb_s"] / entry["websockify_mb_s"], 2
                        )
                        if case.jobs == 1:
                            window = (p["released_at"], p["done_at"])
                            entry["relay_streaming"] = monitor.summary("relay", *window)
                            entry["connector_streaming"] = monitor.summary("connector", *window)
                        results["cases"][case.name] = entry
                        print(f"{case.name}: {json.dumps(entry)}", flush=True)
                    results["relay_overall"] = monitor.summary("relay")
                    results["connector_overall"] = monitor.summary("connector")
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the single job")
    parser.add_argument("--many-mib", type=int, default=64, help="size of each of the 32 jobs")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tunnel.json", results)
    print(f"\n$ {results['command']}")
    for name, entry in results["cases"].items():
        print(
            f"{name}: direct TCP {entry['direct_mb_s']} MB/s, websockify {entry['websockify_mb_s']} MB/s, "
            f"printrelay tunnel {entry['printrelay_tunnel_mb_s']} MB/s "
            f"({entry['tunnel_vs_websockify']}x websockify, {entry['tunnel_vs_direct']}x direct), "
            f"whole RAW job {entry['printrelay_job_mb_s']} MB/s"
        )
        if "relay_streaming" in entry:
            print(
                f"  RSS while streaming: relay peak {entry['relay_streaming']['max_sampled_rss_mib']} MiB, "
                f"connector peak {entry['connector_streaming']['max_sampled_rss_mib']} MiB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
