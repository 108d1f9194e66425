"""Abuse storms against a real relay process, and what they leave behind in its memory.

Clients misbehave on both listeners at once (partial bodies then a reset, SSE streams closed mid-way,
pipelining behind a streamed answer, slowloris heads, garbage, oversized heads, HTTP/2 prefaces, heads
split over reads, plain requests and bad tokens on the tunnel port), ``--clients`` at a time for
``--seconds``; the relay's RSS is read from /proc before the first storm and after each one, once the
relay has closed every connection. Run several storms: memory that is held for good grows with each, memory
the allocator merely keeps for reuse does not.

    python loadtest/abuse_storm.py --storms 4 --seconds 120 --clients 40 --settle 40 --out bench-results
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.stack import Relay, create_tokens, machine, sample, write_json

Attack = Callable[["Target"], Awaitable[None]]


class Target:
    def __init__(self, relay: Relay, token: str, held_job: str) -> None:
        self.http = relay.http_port
        self.tunnel = relay.tunnel_port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.held_job = held_job

    async def connect(self, port: int) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", port)


async def reset(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def read_some(stream: trio.SocketStream, within: float = 2.0) -> bytes:
    with trio.move_on_after(within):
        try:
            return await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return b""
    return b""


async def partial_body_then_reset(t: Target) -> None:
    s = await t.connect(t.http)
    await s.send_all(
        b"POST /v1/printers/p/jobs HTTP/1.1\r\nHost: r\r\n" + t.auth + b"Content-Length: 1000000\r\n\r\n"
    )
    await s.send_all(os.urandom(random.randint(1, 200_000)))
    await reset(s)


async def sse_closed_midway(t: Target) -> None:
    s = await t.connect(t.http)
    await s.send_all(f"GET /v1/jobs/{t.held_job}/watch HTTP/1.1\r\nHost: r\r\n".encode() + t.auth + b"\r\n")
    await read_some(s)
    await (reset(s) if random.random() < 0.5 else s.aclose())


async def pipelined_behind_a_stream(t: Target) -> None:
    s = await t.connect(t.http)
    watch = f"GET /v1/jobs/{t.held_job}/watch HTTP/1.1\r\nHost: r\r\n".encode() + t.auth + b"\r\n"
    await s.send_all(watch + b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n" + t.auth + b"\r\n" * 2)
    await read_some(s)
    await s.aclose()


async def slowloris(t: Target) -> None:
    s = await t.connect(t.http)
    head = b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n" + b"X-Slow: 1\r\n" * 40
    try:
        for i in range(0, len(head), 7):
            await s.send_all(head[i : i + 7])
            await trio.sleep(0.2)
    except trio.BrokenResourceError:
        pass  # the relay's header_timeout
    await s.aclose()


async def garbage(t: Target) -> None:
    s = await t.connect(random.choice((t.http, t.tunnel)))
    try:
        await s.send_all(os.urandom(random.randint(1, 4096)) + b"\r\n\r\n")
        await read_some(s, 0.5)
    except trio.BrokenResourceError:
        pass
    await reset(s)


async def oversized_head(t: Target) -> None:
    s = await t.connect(t.http)
    try:
        await s.send_all(b"GET /v1/printers HTTP/1.1\r\nHost: r\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        await read_some(s)
    except trio.BrokenResourceError:
        pass
    await s.aclose()


async def http2_preface(t: Target) -> None:
    s = await t.connect(random.choice((t.http, t.tunnel)))
    rst = struct.pack(">I", 4)[1:] + b"\x03\x00" + struct.pack(">I", 1) + struct.pack(">I", 8)
    try:
        await s.send_all(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + rst * 500
        )
        await read_some(s, 0.5)
    except trio.BrokenResourceError:
        pass
    await reset(s)


async def split_head(t: Target) -> None:
    s = await t.connect(t.http)
    request = b"GET /v1/printers HTTP/1.1\r\nHost: r\r\n" + t.auth + b"\r\n"
    at = random.randint(1, len(request) - 1)
    await s.send_all(request[:at])
    await trio.sleep(0.01)
    await s.send_all(request[at:])
    await read_some(s)
    await s.aclose()


async def tunnel_plain_request(t: Target) -> None:
    s = await t.connect(t.tunnel)
    await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await (reset(s) if random.random() < 0.7 else s.aclose())


async def tunnel_bad_token(t: Target) -> None:
    s = await t.connect(t.tunnel)
    await s.send_all(
        b"GET /v1/tunnel HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: printrelay.h2.v1\r\nAuthorization: Bearer prc_nobody_x\r\n\r\n"
    )
    await read_some(s, 0.5)
    await reset(s)


ATTACKS: tuple[Attack, ...] = (
    partial_body_then_reset, sse_closed_midway, pipelined_behind_a_stream, slowloris, garbage,
    oversized_head, http2_preface, split_head, tunnel_plain_request, tunnel_bad_token,
)  # fmt: skip


async def storm(target: Target, seconds: float, clients: int, counts: Counter[str]) -> None:
    deadline = trio.current_time() + seconds

    async def client() -> None:
        while trio.current_time() < deadline:
            attack = random.choice(ATTACKS)
            try:
                with trio.fail_after(15):
                    await attack(target)
                counts[attack.__name__] += 1
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                counts[f"{attack.__name__} (refused)"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)


async def settled_rss(relay: Relay, client: httpx.AsyncClient, quiet: float) -> int:
    """RSS once the relay has been idle for ``quiet`` seconds (its deadlines closed every connection, and
    its memory return ran: every 30 s)."""
    await trio.sleep(quiet)
    assert relay.service is not None
    found = sample(relay.service.pid)
    assert found is not None, relay.service.tail()
    assert (await client.get("/healthz")).status_code == 200
    return found.rss


async def main(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-storm-"))
    tokens = create_tokens(work / "relay", [])
    relay = Relay(work / "relay", work / "relay.log", extra=tuple(args.relay_arg))
    relay.start()
    try:
        await relay.wait_ready()
        async with httpx.AsyncClient(
            base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}, timeout=30
        ) as client:
            # A printer whose connector is away, and a held job to watch.
            await client.post("/v1/printers", json={"uri": "socket://192.0.2.1:9100", "id": "p"})
            held = await client.post("/v1/printers/p/jobs?hold=true", content=b"x")
            held_job = held.json().get("id", "none")
            target = Target(relay, tokens.api, held_job)
            rss = [await settled_rss(relay, client, args.settle)]
            counts: Counter[str] = Counter()
            for number in range(1, args.storms + 1):
                started = time.monotonic()
                await storm(target, args.seconds, args.clients, counts)
                rss.append(await settled_rss(relay, client, args.settle))
                print(f"storm {number}: {time.monotonic() - started:.0f} s, relay RSS "
                      f"{rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB", flush=True)  # fmt: skip
    finally:
        relay.stop()
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine(),
        "storms": args.storms,
        "seconds": args.seconds,
        "clients": args.clients,
        "settle_seconds": args.settle,
        "relay_args": args.relay_arg,
        "rss_mib": [round(r / 2**20, 1) for r in rss],
        "attacks": dict(sorted(counts.items())),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--storms", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--settle", type=float, default=40.0, help="quiet seconds before each RSS reading")
    parser.add_argument("--relay-arg", action="append", default=[], help="passed to printrelay serve")
    parser.add_argument("--out", type=Path, help="directory for abuse_storm.json")
    args = parser.parse_args()
    result = trio.run(main, args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "abuse_storm.json", result)


if __name__ == "__main__":
    cli()
