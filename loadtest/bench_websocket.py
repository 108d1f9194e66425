"""The tunnel's WebSocket layer against trio-websocket, and against no WebSocket at all.

    python loadtest/bench_websocket.py --out bench-results

Both ends of a tunnel run in this one process over loopback TCP: the relay's HTTP/2 session (the client)
and the connector's (the server), as in the product, over three layers:

* ``printrelay``: tunnel/wsstream.py (wsproto's frames read by the HTTP/2 session's own reader);
* ``trio-websocket``: trio-websocket's connection with a reader task and a message queue per connection,
  behind the message-to-byte-stream adapter the tunnel used before (kept here as the baseline);
* ``tcp``: the HTTP/2 sessions straight on the socket, no WebSocket (the ceiling).

Cases, the layers alternating round by round so that a busy minute hits each: ``bulk`` (one stream of
``--bulk-mib`` relay → connector, as a large job), ``small`` (``--streams`` streams of 4 KiB, 16 at a time,
each answered with a status line, as small jobs) and ``idle`` (``--sessions`` idle session pairs: Python
memory per pair, both ends, from tracemalloc). The figures are this process's CPU (user + system) per
GiB and per 1,000 streams, medians of the rounds, and their ratio to trio-websocket's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream, wrap_server_stream

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.stack import machine, own_cpu_seconds, write_json
from relay.tunnel import read_request_head
from tunnel.session import H2Session, H2Stream
from tunnel.wsstream import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, SUBPROTOCOL, UpgradeRequest, connect

LAYERS = ("printrelay", "trio-websocket", "tcp")
STATUS = b'{"state":"completed","message":"printed"}\n'


class MessageStream(trio.abc.Stream):
    """trio-websocket's messages as a byte stream: the tunnel's adapter before tunnel/wsstream.py."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_BATCH_BYTES):
            await self._ws.send_message(bytes(view[start : start + MAX_BATCH_BYTES]))

    async def wait_send_all_might_not_block(self) -> None:
        return None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._pending:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed:
                return b""
            assert isinstance(message, bytes)
            self._pending = message
        if max_bytes is None or max_bytes >= len(self._pending):
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def aclose(self) -> None:
        await self._ws.aclose()


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        dialled = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return accepted[0], dialled


async def _transports(layer: str, nursery: trio.Nursery) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(the relay's end, the connector's end) of one tunnel over ``layer``."""
    relay_tcp, connector_tcp = await _tcp_pair()
    if layer == "tcp":
        return relay_tcp, connector_tcp
    ends: list[trio.abc.Stream] = []
    async with trio.open_nursery() as handshake:
        if layer == "printrelay":

            async def relay_side() -> None:
                received = await read_request_head(relay_tcp)
                assert received is not None
                ends.append(await UpgradeRequest.parse(*received).upgrade(relay_tcp, SUBPROTOCOL, []))

            handshake.start_soon(relay_side)
            connector_end: trio.abc.Stream = await connect(
                connector_tcp, "relay", "/v1/tunnel", subprotocols=[SUBPROTOCOL], headers=[]
            )
        else:

            async def relay_side() -> None:
                request = await wrap_server_stream(
                    nursery, relay_tcp, max_message_size=MAX_MESSAGE_BYTES, receive_buffer_size=None
                )
                ends.append(MessageStream(await request.accept(subprotocol=SUBPROTOCOL)))

            handshake.start_soon(relay_side)
            ws = await wrap_client_stream(
                nursery, connector_tcp, "relay", "/v1/tunnel", subprotocols=[SUBPROTOCOL],
                max_message_size=MAX_MESSAGE_BYTES, receive_buffer_size=None,
            )  # fmt: skip
            connector_end = MessageStream(ws)
    return ends[0], connector_end


@asynccontextmanager
async def _sessions(
    layer: str, handler: Callable[[H2Stream], Awaitable[None]], count: int = 1
) -> AsyncIterator[list[H2Session]]:
    """``count`` tunnels over ``layer``; yields the relay ends (the connectors serve ``handler``)."""
    async with trio.open_nursery() as nursery:
        relays = []
        for _ in range(count):
            relay_end, connector_end = await _transports(layer, nursery)
            connector = H2Session(connector_end, client_side=False, handler=handler, name="connector")
            relay = H2Session(relay_end, client_side=True, name="relay")
            await nursery.start(connector.run)
            await nursery.start(relay.run)
            relays.append(relay)
        yield relays
        nursery.cancel_scope.cancel()


async def _answer(stream: H2Stream) -> None:
    """The connector's handler: read the body, answer with its size, then a status line."""
    size = 0
    async for chunk in stream.iter_data():
        size += len(chunk)
    await stream.send_response(200, [("x-size", str(size))])
    await stream.send_data(STATUS, end_stream=True)


async def _post(relay: H2Session, body: bytes, piece: int) -> None:
    stream = await relay.open_stream("POST", "/v1/jobs/bench")
    view = memoryview(body)
    for start in range(0, len(view), piece):
        await stream.send_data(view[start : start + piece])
    await stream.end()
    await stream.receive_response()
    assert stream.header("x-size", stream.response_headers) == str(len(body))
    async for _ in stream.iter_data(open_window=False):
        pass


async def bulk(layer: str, mib: int) -> dict[str, float]:
    body = bytes(1024 * 1024) * mib
    async with _sessions(layer, _answer) as (relay,):
        cpu, wall = own_cpu_seconds(), time.perf_counter()
        with trio.fail_after(600):
            await _post(relay, body, 1024 * 1024)
        cpu, wall = own_cpu_seconds() - cpu, time.perf_counter() - wall
    return {"cpu_seconds_per_gib": round(cpu * 1024 / mib, 3), "mb_s": round(len(body) / wall / 1e6, 1)}


async def small(layer: str, streams: int) -> dict[str, float]:
    body = b"x" * 4096
    async with _sessions(layer, _answer) as (relay,):
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < streams:
                sent += 1
                await _post(relay, body, len(body))

        cpu, wall = own_cpu_seconds(), time.perf_counter()
        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(worker)
        cpu, wall = own_cpu_seconds() - cpu, time.perf_counter() - wall
    return {"cpu_ms_per_1000_streams": round(cpu * 1e6 / streams, 1), "streams_per_s": round(streams / wall)}


async def idle(layer: str, sessions: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    async with _sessions(layer, _answer, sessions):
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tasks = len(_tasks(trio.lowlevel.current_root_task()))
    tracemalloc.stop()
    return {
        "kib_per_session_pair": round(held / sessions / 1024, 1),
        "tasks_per_session_pair": tasks / sessions,
    }


def _tasks(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = [task]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found += _tasks(child)
    return found


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        case: {layer: [] for layer in LAYERS} for case in args.cases
    }
    for round_ in range(args.rounds):
        for layer in LAYERS if round_ % 2 == 0 else reversed(LAYERS):
            if "bulk" in args.cases:
                runs["bulk"][layer].append(await bulk(layer, args.bulk_mib))
            if "small" in args.cases:
                runs["small"][layer].append(await small(layer, args.streams))
            if "idle" in args.cases:
                runs["idle"][layer].append(await idle(layer, args.sessions))
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "cases": {}}
    for case, by_layer in runs.items():
        results["cases"][case] = {
            layer: {key: statistics.median(run[key] for run in rounds) for key in rounds[0]}
            | {"rounds": rounds}
            for layer, rounds in by_layer.items()
        }
    return results


FIGURES = {"bulk": "cpu_seconds_per_gib", "small": "cpu_ms_per_1000_streams", "idle": "kib_per_session_pair"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--cases", type=lambda text: text.split(","), default=["bulk", "small", "idle"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "websocket.json", results)
    print(f"\n$ {results['command']}")
    for case, by_layer in results["cases"].items():
        figure = FIGURES[case]
        baseline = by_layer["trio-websocket"][figure]
        line = ", ".join(
            f"{layer} {entry[figure]} ({entry[figure] / baseline:.2f}x)" for layer, entry in by_layer.items()
        )
        extra = {
            layer: {k: v for k, v in entry.items() if k not in (figure, "rounds")}
            for layer, entry in by_layer.items()
        }
        print(f"{case}: {figure} (median of {args.rounds}): {line}; {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
