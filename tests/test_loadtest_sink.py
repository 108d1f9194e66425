"""loadtest/sink.py: the benchmarks' RAW printers check the size and SHA-256 of every job, whether they hash
while data arrives or spool it and hash after the last byte; a job cut by a reset is recorded as broken."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
from pathlib import Path

import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # loadtest/ is tooling next to the packages, not an installed package

from loadtest.sink import Arrival, RawSink, tagged  # noqa: E402


@pytest.mark.parametrize("spool", [False, True])
@pytest.mark.parametrize("size", [0, 5, 3 * 1024 * 1024 + 7])
async def test_every_job_is_recorded_with_its_size_and_digest(tmp_path: Path, spool: bool, size: int) -> None:
    arrivals: list[Arrival] = []
    recorded = trio.Event()

    def record(arrival: Arrival) -> None:
        arrivals.append(arrival)
        recorded.set()

    sink = RawSink("p", record, spool_dir=tmp_path if spool else None)
    document = tagged("job-1", os.urandom(size))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.serve)
            probe = await trio.open_tcp_stream("127.0.0.1", sink.port)
            await probe.aclose()  # a reachability probe: not a job
            stream = await trio.open_tcp_stream("127.0.0.1", sink.port)
            async with stream:
                for start in range(0, len(document), 100_000):
                    await stream.send_all(document[start : start + 100_000])
                await sink.wait_received(len(document))
                await stream.send_eof()
                await recorded.wait()
            nursery.cancel_scope.cancel()
    [arrival] = arrivals
    assert (arrival.tag, arrival.size) == ("job-1", len(document))
    assert arrival.sha256 == hashlib.sha256(document).hexdigest()
    assert arrival.first_at <= arrival.done_at
    assert (sink.jobs, sink.bytes, sink.received) == (1, len(document), len(document))
    assert not os.listdir(tmp_path)  # the spool file is unnamed and gone


async def test_a_reset_mid_job_is_recorded_as_broken_and_open_counts_until_recorded() -> None:
    """A real printer prints what reached it before a reset: the harness must see it. ``open`` stays above 0
    until the arrival is recorded, so a load test that waits for 0 judges with every arrival in hand."""
    arrivals: list[Arrival] = []
    recorded = trio.Event()
    open_when_recorded: list[int] = []

    def record(arrival: Arrival) -> None:
        open_when_recorded.append(sink.open)
        arrivals.append(arrival)
        recorded.set()

    sink = RawSink("p", record)
    document = tagged("job-2", os.urandom(200_000))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", sink.port)
            await stream.send_all(document[:50_000])
            await sink.wait_received(50_000)
            assert sink.open == 1
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # linger 0: RST, not FIN
            await recorded.wait()
            nursery.cancel_scope.cancel()
    [arrival] = arrivals
    assert (arrival.tag, arrival.size, arrival.broken) == ("job-2", 50_000, True)
    assert arrival.sha256 == hashlib.sha256(document[:50_000]).hexdigest()
    assert open_when_recorded == [1] and sink.open == 0
    assert (sink.jobs, sink.bytes) == (0, 0)  # not a finished job


async def test_a_job_cut_inside_its_tag_line_keeps_its_bytes() -> None:
    arrivals: list[Arrival] = []
    recorded = trio.Event()

    def record(arrival: Arrival) -> None:
        arrivals.append(arrival)
        recorded.set()

    sink = RawSink("p", record)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.serve)
            stream = await trio.open_tcp_stream("127.0.0.1", sink.port)
            async with stream:
                await stream.send_all(b"PRLOAD jo")
                await stream.send_eof()
                await recorded.wait()
            nursery.cancel_scope.cancel()
    [arrival] = arrivals
    assert (arrival.tag, arrival.size, arrival.head, arrival.broken) == ("", 9, b"PRLOAD jo".hex(), False)
