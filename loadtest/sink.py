"""Sink printers for load tests: RAW (port 9100 style) servers that record every job they receive.

A sink reads each connection to its end, optionally no faster than ``rate`` bytes/s (a real printer
takes data at its own pace, and HTTP/2 flow control must carry that back to the relay), and records the
job's tag, size, SHA-256 and arrival times as one NDJSON line. Load-test documents start with a tag line
(``PRLOAD <tag>\\n``), so arrivals can be matched to submissions without trusting the relay's word.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO

import trio

TAG_PREFIX = b"PRLOAD "
MAX_TAG_LINE = 128
READ_SIZE = 256 * 1024


def tagged(tag: str, payload: bytes | memoryview) -> bytes:
    """A load-test document: the tag line, then ``payload``."""
    return TAG_PREFIX + tag.encode() + b"\n" + bytes(payload)


@dataclass(frozen=True)
class Arrival:
    printer: str
    tag: str  # "" when the document carried no tag line
    size: int
    sha256: str  # "" when the sink was told not to hash
    first_at: float  # time.time() of the first byte
    done_at: float  # time.time() of EOF


class RawSink:
    """A TCP server on 127.0.0.1 for one printer. ``record`` gets every non-empty job."""

    def __init__(
        self, printer: str, record: Callable[[Arrival], None], *, rate: float = 0.0, digest: bool = True
    ) -> None:
        self.printer = printer
        self.record = record
        self.rate = rate  # bytes/s per connection; 0: as fast as the sender goes
        self.digest = digest
        self.port = 0
        self.jobs = 0
        self.bytes = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        digest = hashlib.sha256() if self.digest else None
        head = b""
        size = 0
        first_at = first_wall = 0.0
        clock_start = trio.current_time()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(READ_SIZE)
                except trio.BrokenResourceError:
                    return  # the sender gave up mid-job: nothing was printed
                if not data:
                    break
                if not size:
                    first_at = trio.current_time() - clock_start
                    first_wall = time.time()
                size += len(data)
                if len(head) < MAX_TAG_LINE:
                    head += data[: MAX_TAG_LINE - len(head)]
                if digest is not None:
                    digest.update(data)
                if self.rate:
                    # Pace reads: the kernel buffer fills and TCP pushes back on the connector.
                    due = clock_start + first_at + size / self.rate
                    await trio.sleep_until(due)
        if not size:
            return  # a reachability probe, not a job
        self.jobs += 1
        self.bytes += size
        tag = ""
        if head.startswith(TAG_PREFIX) and b"\n" in head:
            tag = head[len(TAG_PREFIX) : head.index(b"\n")].decode(errors="replace")
        self.record(
            Arrival(self.printer, tag, size, digest.hexdigest() if digest else "", first_wall, time.time())
        )


class ArrivalLog:
    """Appends arrivals to an NDJSON file, one flushed line each, so another process can follow it."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self.count = 0

    def __call__(self, arrival: Arrival) -> None:
        self.file.write(json.dumps(asdict(arrival), separators=(",", ":")) + "\n")
        self.file.flush()
        self.count += 1
