"""Tunnel throughput and memory: big jobs relay → connector → RAW sink, next to two baselines.

    python loadtest/bench_tunnel.py --out bench-results

Cases, each carried three ways to the same sink (an in-process RAW server that checks the size and
SHA-256 of every job it receives, hashing in a worker thread so that it is not the bottleneck):

* ``direct``: a loopback TCP copy of the same bytes (``socket.sendfile``, from a separate process);
* ``websockify``: Debian's websockify (a Python WebSocket-to-TCP bridge: no multiplexing, no encryption),
  fed by a separate process with masked binary messages of ``--ws-message-kib`` (64 KiB by default: websockify
  reads its socket 4 KiB at a time and appends to a bytes buffer, so its cost per byte grows with the message
  size; 64 KiB was its fastest here, 256 KiB — the tunnel's batch — ran at about 0.7x of that);
* ``printrelay``: the job is uploaded held (not timed), then released; timed from the release to the
  sink's EOF. ``printrelay serve`` and ``printrelay connector`` run as processes. Two phases are reported:
  the *tunnel* phase (release → the sink's first byte: the sealed payload crosses the tunnel and the
  connector verifies it into its incoming file, as it does for every RAW job) and the whole job.

``direct (sink not hashing)`` is the same copy into a sink that only counts bytes: the machine's ceiling,
not a baseline (every other path is verified).

Cases: one 1 GiB job; 32 jobs of 64 MiB at once (32 printers). While the jobs stream, the CPU and RSS of the
relay and of the connector are sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shlex
import shutil
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import httpx
import trio

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
SEND_BLOCK = 4 * MiB  # what a baseline sender reads from its file at a time
SELF = Path(__file__).resolve()


@dataclass(frozen=True)
class Case:
    name: str
    jobs: int
    size: int


class Sink:
    """One RAW server for every path; remembers when each connection ended and checks what it got."""

    def __init__(self, spool_dir: Path) -> None:
        self.arrivals: list[Arrival] = []
        self.changed = trio.Event()
        self.server = RawSink("sink", self._record, spool_dir=spool_dir)

    def _record(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, count: int, expected: Payload | None = None) -> list[Arrival]:
        with trio.fail_after(CASE_TIMEOUT):
            while len(self.arrivals) < count:
                await self.changed.wait()
        done = self.arrivals[:count]
        if expected is not None and self.server.digest:
            for arrival in done:
                if (arrival.size, arrival.sha256) != (expected.size, expected.sha256):
                    raise AssertionError(
                        f"the sink got {arrival.size} bytes with SHA-256 {arrival.sha256}, "
                        f"expected {expected.size} bytes with {expected.sha256}"
                    )
        return done

    def reset(self) -> None:
        self.arrivals = []


@dataclass(frozen=True)
class Payload:
    path: Path
    size: int
    sha256: str


async def _chunks(path: Path, size: int = BATCH) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb", buffering=0) as file:
        while chunk := await file.read(size):
            yield chunk


def make_payload(path: Path, size: int) -> Payload:
    """``size`` bytes of incompressible data: a 64 MiB random block, repeated."""
    block = os.urandom(min(size, 64 * MiB))
    digest = hashlib.sha256()
    with path.open("wb") as file:
        written = 0
        while written < size:
            piece = block[: size - written]
            file.write(piece)
            digest.update(piece)
            written += len(piece)
    return Payload(path, size, digest.hexdigest())


def _size(mib: int) -> str:
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def rate(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


async def run_senders(
    sink: Sink, mode: str, port: int, files: list[Path], message_size: int = BATCH
) -> float:
    """Send ``files`` at once from a separate process (so the sender and the sink do not share one Python
    thread); returns the time.time() at which that process began sending.

    websockify drops what it has not yet forwarded when its client closes, so the WebSocket sender closes
    only once the sink has every byte (we tell it on its stdin).
    """
    argv = [sys.executable, str(SELF), "--send", mode, "--port", str(port)]
    argv += ["--message-size", str(message_size), *map(str, files)]
    total = sum(path.stat().st_size for path in files)
    with trio.fail_after(CASE_TIMEOUT):
        process = await trio.lowlevel.open_process(argv, stdin=PIPE, stdout=PIPE)
        try:
            assert process.stdout is not None and process.stdin is not None
            line = b""
            while not line.endswith(b"\n"):
                more = await process.stdout.receive_some(64)
                if not more:
                    raise RuntimeError(f"the {mode} sender ended before it started")
                line += more
            await sink.server.wait_received(sink.server.received + total)
            await process.stdin.send_all(b"close\n")
            if await process.wait():
                raise RuntimeError(f"the {mode} sender failed ({process.returncode})")
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        await pipe.aclose()
    return float(line)


async def direct(sink: Sink, files: list[Path], payload: Payload) -> float:
    sink.reset()
    started = await run_senders(sink, "direct", sink.server.port, files)
    done = await sink.wait(len(files), payload)
    return max(a.done_at for a in done) - started


async def websockify(sink: Sink, files: list[Path], payload: Payload, port: int, message_size: int) -> float:
    sink.reset()
    started = await run_senders(sink, "websockify", port, files, message_size)
    done = await sink.wait(len(files), payload)
    return max(a.done_at for a in done) - started


# --- the baseline senders (run in their own process by run_senders) ----------------------------------------


def send_direct(port: int, path: Path, message_size: int) -> socket.socket:
    """The whole file over one TCP connection with sendfile(2): the kernel copies, Python does nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    with path.open("rb") as file:
        sock.sendfile(file)
    sock.shutdown(socket.SHUT_WR)
    return sock


def close_direct(sock: socket.socket) -> None:
    with sock:
        sock.recv(1)  # the sink closes after EOF


def send_websocket(port: int, path: Path, message_size: int) -> socket.socket:
    """The file as masked binary WebSocket messages of ``message_size`` bytes (RFC 6455 §5.3: a client
    masks every frame with a fresh random key; numpy does the XOR)."""
    import numpy  # the plots' dependency; only the websockify baseline needs it

    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n\r\n".encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        more = sock.recv(4096)
        if not more:
            raise ConnectionError("websockify closed the connection during the handshake")
        response += more
    if not response.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"websockify refused the upgrade: {response[:200]!r}")
    with path.open("rb") as file:
        while block := file.read(SEND_BLOCK):
            frames = []
            for start in range(0, len(block), message_size):
                payload = numpy.frombuffer(block, numpy.uint8, min(message_size, len(block) - start), start)
                mask = os.urandom(4)
                pattern = numpy.frombuffer(mask * (len(payload) // 4 + 1), numpy.uint8, len(payload))
                frames += [_ws_header(len(payload)), mask, (payload ^ pattern).tobytes()]
            sock.sendall(b"".join(frames))
    return sock


def close_websocket(sock: socket.socket) -> None:
    with sock:
        sock.sendall(_ws_header(2, opcode=0x8) + b"\0\0\0\0" + struct.pack(">H", 1000))
        while sock.recv(65536):  # websockify answers the close, then closes
            pass


def _ws_header(length: int, opcode: int = 0x2) -> bytes:
    first = bytes([0x80 | opcode])
    if length < 126:
        return first + bytes([0x80 | length])
    if length < 65536:
        return first + bytes([0x80 | 126]) + struct.pack(">H", length)
    return first + bytes([0x80 | 127]) + struct.pack(">Q", length)


async def senders_main(args: argparse.Namespace) -> None:
    send, close = (send_direct, close_direct) if args.send == "direct" else (send_websocket, close_websocket)
    sockets: list[socket.socket] = []

    async def one(path: Path) -> None:
        sockets.append(await trio.to_thread.run_sync(send, args.port, path, args.message_size))

    print(time.time(), flush=True)
    async with trio.open_nursery() as nursery:
        for path in args.files:
            nursery.start_soon(one, path)
    await trio.to_thread.run_sync(sys.stdin.readline)  # the sink has every byte: close
    async with trio.open_nursery() as nursery:
        for sock in sockets:
            nursery.start_soon(trio.to_thread.run_sync, close, sock)


async def printrelay(
    sink: Sink,
    files: list[Path],
    client: httpx.AsyncClient,
    printers: list[str],
    monitor: Monitor,
    expected: Payload | None = None,
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
    done = await sink.wait(len(files), expected)
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
    sink = Sink(work)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/bench_tunnel.py", *sys.argv[1:]]),
        "machine": machine(),
        "cases": {},
    }
    cases = [
        Case(f"1 x {_size(args.big_mib)}", 1, args.big_mib * MiB),
        Case(f"32 x {_size(args.many_mib)}", 32, args.many_mib * MiB),
    ]
    cases = [case for case in cases if ("single" if case.jobs == 1 else "many") in args.cases]
    try:
        big = make_payload(work / "big.bin", args.big_mib * MiB) if "single" in args.cases else None
        medium = make_payload(work / "medium.bin", args.many_mib * MiB) if "many" in args.cases else None
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
                        payload = big if case.jobs == 1 else medium
                        assert payload is not None
                        files = [payload.path] * case.jobs
                        total = case.size * case.jobs
                        sink.server.digest = False
                        ceiling = await direct(sink, files, payload)
                        sink.server.digest = True
                        d = await direct(sink, files, payload)
                        w = await websockify(sink, files, payload, ws_port, args.ws_message_kib * 1024)
                        p = await printrelay(sink, files, client, printers, monitor, payload)
                        entry: dict[str, Any] = {
                            "bytes": total,
                            "load_average_1m": round(os.getloadavg()[0], 2),
                            "direct_unhashed_mb_s": rate(total, ceiling),
                            "direct_mb_s": rate(total, d),
                            "websockify_mb_s": rate(total, w),
                            "printrelay_tunnel_mb_s": rate(total, p["tunnel_seconds"]),
                            "printrelay_job_mb_s": rate(total, p["seconds"]),
                        }
                        # after the tunnel phase: the connector sending its verified copy to the printer
                        entry["printrelay_replay_mb_s"] = rate(total, p["seconds"] - p["tunnel_seconds"])
                        entry["tunnel_vs_websockify"] = round(
                            entry["printrelay_tunnel_mb_s"] / entry["websockify_mb_s"], 2
                        )
                        entry["tunnel_vs_direct"] = round(
                            entry["printrelay_tunnel_mb_s"] / entry["direct_mb_s"], 2
                        )
                        entry["job_vs_websockify"] = round(
                            entry["printrelay_job_mb_s"] / entry["websockify_mb_s"], 2
                        )
                        window = (p["released_at"], p["done_at"])
                        entry["relay_streaming"] = monitor.summary("relay", *window)
                        entry["connector_streaming"] = monitor.summary("connector", *window)
                        # CPU per GiB moved: steadier than the rates on a shared machine
                        for side in ("relay", "connector"):
                            entry[f"{side}_cpu_seconds_per_gib"] = round(
                                entry[f"{side}_streaming"]["cpu_seconds"] * GiB / total, 2
                            )
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
    parser.add_argument(
        "--cases",
        type=lambda text: set(text.split(",")),
        default={"single", "many"},
        help="which cases to run: single (the one big job), many (32 jobs at once), or single,many (default)",
    )
    parser.add_argument(
        "--ws-message-kib", type=int, default=64, help="message size of the websockify baseline's sender"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    # Internal: the baseline senders, run by the benchmark in a process of their own.
    parser.add_argument("--send", choices=["direct", "websockify"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--message-size", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send:
        trio.run(senders_main, args)
        return 0
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tunnel.json", results)
    print(f"\n$ {results['command']}")
    for name, entry in results["cases"].items():
        print(
            f"{name} (load {entry['load_average_1m']}): direct TCP {entry['direct_mb_s']} MB/s "
            f"(sink not hashing: {entry['direct_unhashed_mb_s']}), "
            f"websockify {entry['websockify_mb_s']} MB/s, "
            f"printrelay tunnel {entry['printrelay_tunnel_mb_s']} MB/s "
            f"({entry['tunnel_vs_websockify']}x websockify, {entry['tunnel_vs_direct']}x direct), "
            f"whole RAW job {entry['printrelay_job_mb_s']} MB/s ({entry['job_vs_websockify']}x websockify; "
            f"the replay after the tunnel phase {entry['printrelay_replay_mb_s']} MB/s)"
        )
        relay, connector = entry["relay_streaming"], entry["connector_streaming"]
        print(
            f"  while streaming: relay {relay['cpu_percent']} % CPU, "
            f"peak RSS {relay['max_sampled_rss_mib']} MiB; "
            f"connector {connector['cpu_percent']} % CPU, peak RSS {connector['max_sampled_rss_mib']} MiB; "
            f"CPU per GiB: relay {entry['relay_cpu_seconds_per_gib']} s, "
            f"connector {entry['connector_cpu_seconds_per_gib']} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
