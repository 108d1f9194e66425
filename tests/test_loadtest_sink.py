"""loadtest/sink.py: the benchmarks' RAW printers check the size and SHA-256 of every job, whether they hash
while data arrives or spool it and hash after the last byte."""

from __future__ import annotations

import hashlib
import os
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
