"""Sink printers for load tests: RAW (port 9100 style) servers that record every job they receive.

A sink reads each connection to its end, optionally no faster than ``rate`` bytes/s (a real printer
takes data at its own pace, and HTTP/2 flow control must carry that back to the relay), and records the
job's tag, size, SHA-256 and arrival times as one NDJSON line. Load-test documents start with a tag line
(``PRLOAD <tag>\\n``, see ``documents.py``), so arrivals can be matched to submissions without trusting the
relay's word. A connection the sender broke mid-job is recorded too (``broken``): a real printer would have
printed what it got.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import trio

from loadtest.documents import TAG_PREFIX
from loadtest.documents import tagged as tagged  # where the benchmarks import it from

MAX_TAG_LINE = 128
READ_SIZE = 1024 * 1024
CONSUME_QUEUE = 4  # received pieces waiting to be hashed or spooled (<= 4 x READ_SIZE bytes)
CONSUME_IN_THREAD = 64 * 1024  # below this a worker-thread hop costs more than hashing inline
HASH_BLOCK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Arrival:
    printer: str
    tag: str  # "" when the document carried no tag line
    size: int
    sha256: str  # "" when the sink was told not to hash
    first_at: float  # time.time() of the first byte
    done_at: float  # time.time() of the last byte
    broken: bool = False  # the sender reset the connection instead of ending it: what came is what printed
    head: str = ""  # hex of the first bytes when they hold no whole tag line (a delivery cut that early)


class RawSink:
    """A TCP server on 127.0.0.1 for one printer. ``record`` gets every non-empty job."""

    def __init__(
        self,
        printer: str,
        record: Callable[[Arrival], None],
        *,
        rate: float = 0.0,
        digest: bool = True,
        spool_dir: Path | None = None,
    ) -> None:
        self.printer = printer
        self.record = record
        self.rate = rate  # bytes/s per connection; 0: as fast as the sender goes
        self.digest = digest
        # With a spool_dir, a job is written to an unnamed file there and hashed after its last byte: the
        # sink then takes data as fast as the disk cache does (SHA-256 alone runs at ~250 MB/s per core
        # here), for throughput benchmarks. Without one, it is hashed while it arrives.
        self.spool_dir = spool_dir
        self.port = 0
        self.jobs = 0
        self.bytes = 0
        self.received = 0  # bytes received so far, jobs not yet finished included
        # Connections being read or not yet recorded: 0 (with no delivery running) means every job that
        # reached this printer is in the record. A load test waits for that before it judges.
        self.open = 0
        self._awaited: tuple[int, trio.Event] | None = None

    async def wait_received(self, total: int) -> None:
        """Until ``received`` reaches ``total``."""
        if self.received < total:
            self._awaited = (total, trio.Event())
            await self._awaited[1].wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.open += 1
        try:
            arrival = await self._receive(stream)
            if arrival is not None:  # None: a reachability probe, not a job
                self.record(arrival)
        finally:
            self.open -= 1

    async def _receive(self, stream: trio.SocketStream) -> Arrival | None:
        digest = hashlib.sha256() if self.digest else None
        head = b""
        size = 0
        broken = False
        first_at = first_wall = last_wall = 0.0
        clock_start = trio.current_time()
        # SHA-256 runs at ~250 MB/s per core here: hashing in the receive loop would make the sink the
        # slowest part of every benchmark. Received data goes to a task that hands it to a worker thread
        # (hashlib releases the GIL), a few MiB behind at most: to be hashed, or to be written to a spool file
        # that is hashed after the last byte. The job is recorded once its digest is complete, with the time
        # its last byte arrived.
        spool: IO[bytes] | None = None
        consume: Callable[[list[bytes]], None] | None = None
        if digest is not None:
            if self.spool_dir is not None:
                spool = await trio.to_thread.run_sync(_spool_file, self.spool_dir)
                consume = spool.writelines
            else:
                consume = functools.partial(_update, digest)
        to_consume, consuming = trio.open_memory_channel[bytes](CONSUME_QUEUE)
        try:
            async with stream, trio.open_nursery() as nursery:
                if consume is not None:
                    nursery.start_soon(_consume, consuming, consume, spool is not None)
                async with to_consume:
                    while True:
                        try:
                            data = await stream.receive_some(READ_SIZE)
                        except trio.BrokenResourceError:
                            broken = True  # a reset mid-job: a printer prints what it got
                            break
                        if not data:
                            break
                        last_wall = time.time()
                        if not size:
                            first_at = trio.current_time() - clock_start
                            first_wall = last_wall
                        size += len(data)
                        self.received += len(data)
                        if self._awaited is not None and self.received >= self._awaited[0]:
                            self._awaited[1].set()
                        if len(head) < MAX_TAG_LINE:
                            head += data[: MAX_TAG_LINE - len(head)]
                        if consume is not None:
                            await to_consume.send(data)
                        if self.rate:
                            # Pace reads: the kernel buffer fills and TCP pushes back on the connector.
                            due = clock_start + first_at + size / self.rate
                            await trio.sleep_until(due)
            if spool is not None and size:
                await trio.to_thread.run_sync(_hash_file, spool, digest)
        finally:
            if spool is not None:
                spool.close()
        if not size:
            return None
        if not broken:
            self.jobs += 1
            self.bytes += size
        tag = ""
        if head.startswith(TAG_PREFIX) and b"\n" in head:
            tag = head[len(TAG_PREFIX) : head.index(b"\n")].decode(errors="replace")
        return Arrival(
            self.printer, tag, size, digest.hexdigest() if digest else "", first_wall, last_wall,
            broken=broken, head="" if tag else head.hex(),
        )  # fmt: skip


async def _consume(
    pieces: trio.MemoryReceiveChannel[bytes], consume: Callable[[list[bytes]], None], always_thread: bool
) -> None:
    """Pass everything sent on ``pieces`` to ``consume``, in one worker-thread call per batch of whatever
    queued up meanwhile (small batches inline, unless ``always_thread``: file writes)."""
    async with pieces:
        async for piece in pieces:
            batch = [piece]
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    batch.append(pieces.receive_nowait())
            if always_thread or sum(len(b) for b in batch) >= CONSUME_IN_THREAD:
                await trio.to_thread.run_sync(consume, batch)
            else:
                consume(batch)


def _spool_file(directory: Path) -> IO[bytes]:
    return tempfile.TemporaryFile(dir=directory)  # unnamed (O_TMPFILE): gone when closed


def _update(digest: Any, batch: list[bytes]) -> None:
    for piece in batch:
        digest.update(piece)


def _hash_file(file: IO[bytes], digest: Any) -> None:
    file.seek(0)
    while block := file.read(HASH_BLOCK):
        digest.update(block)


class ArrivalLog:
    """Appends arrivals to an NDJSON file, one flushed line each, so another process can follow it."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.count = 0

    def __call__(self, arrival: Arrival) -> None:
        self.file.write(json.dumps(asdict(arrival), separators=(",", ":")) + "\n")
        self.file.flush()
        self.count += 1
