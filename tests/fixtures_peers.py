"""More real peers for tests: an LPD receiver (RFC 1179) and a private cupsd with queues.

Fixtures:

* ``lpd_receiver`` -> :class:`LpdReceiver`, an LPD server in the test's nursery that stores each job's
  control and data file. It can refuse a queue, and be stopped and started again on the same port
  (a printer that goes offline and comes back).
* ``documents`` -> :class:`DocumentServer`, an HTTP server of a document to print from a URL, with
  redirects and misbehaviours; ``ftp_server`` -> (port, directory), pyftpdlib serving a directory.
* ``cupsd`` -> :class:`Cupsd`, a private ``cupsd`` (Debian ``cups``) on a free port, everything under a
  temporary directory; ``cupsd.add_queue(name, device_uri)`` makes a queue with ``lpadmin``.

Test modules import the fixtures they use by name from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from fixtures_printers import free_port

from service.http.message import Request, Response
from service.http.server import HttpServer

__all__ = [
    "DOCUMENT", "Cupsd", "DocumentServer", "LpdJob", "LpdReceiver", "cupsd", "documents", "ftp_server",
    "lpd_receiver",
]  # fmt: skip

#: a command or subcommand line longer than this is a broken client, not a long queue name
MAX_LINE = 1024
MAX_CONTROL_FILE = 64 * 1024

# --------------------------------------------------------------------------------------------
# LPD receiver


@dataclass
class LpdJob:
    queue: str
    control_name: str
    control: bytes
    data_name: str
    data_path: Path
    size: int
    sha256: str

    @property
    def lines(self) -> list[str]:
        return self.control.decode("ascii").splitlines()

    def line(self, code: str) -> str | None:
        """The first control line starting with ``code`` (its text after the code)."""
        return next((line[1:] for line in self.lines if line.startswith(code)), None)


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ValueError("line too long")
            if not await self._fill():
                return None
        end = self.buffer.index(b"\n")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return line

    async def exactly(self, count: int) -> AsyncIterator[bytes]:
        while count > 0:
            if not self.buffer and not await self._fill():
                raise EOFError(f"connection closed with {count} bytes still expected")
            take = bytes(self.buffer[:count])
            del self.buffer[: len(take)]
            count -= len(take)
            yield take


class LpdReceiver:
    """An RFC 1179 server on 127.0.0.1 that accepts 'receive a printer job' and stores what it gets."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.jobs: list[LpdJob] = []
        self.refuse_queues: set[str] = set()
        self.connections = 0
        self._changed = trio.Event()
        self._counter = itertools.count(1)
        self._scope: trio.CancelScope | None = None

    def uri(self, queue: str = "lp") -> str:
        return f"lpd://127.0.0.1:{self.port}/{queue}"

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (again) on ``port``, or on a free one the first time."""
        self._scope = trio.CancelScope()
        listeners = await nursery.start(self._serve, self._scope)
        self.port = listeners[0].socket.getsockname()[1]

    async def _serve(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[list[trio.SocketListener]]
    ) -> None:
        with scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            async with trio.open_nursery() as nursery:
                task_status.started(listeners)
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def stop(self) -> None:
        """Close the listener and every open connection: the printer is gone."""
        if self._scope is not None:
            self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        # RFC 1179 §6.2: a job whose connection ends early is dropped, not printed
        with contextlib.suppress(EOFError, trio.BrokenResourceError):
            await self._receive(stream)

    async def _receive(self, stream: trio.SocketStream) -> None:
        async with stream:
            reader = _Reader(stream)
            command = await reader.line()
            if command is None or not command:
                return  # a reachability probe
            if command[0] != 2:
                await stream.send_all(b"\x01")
                return
            queue = command[1:].decode("ascii", "replace").strip()
            if queue in self.refuse_queues:
                await stream.send_all(b"\x01")
                return
            await stream.send_all(b"\x00")
            control: tuple[str, bytes] | None = None
            data: tuple[str, Path, int, str] | None = None
            while (line := await reader.line()) is not None:
                code = line[0]
                count_text, _, name = line[1:].decode("ascii").partition(" ")
                count = int(count_text)
                await stream.send_all(b"\x00")
                if code == 2:
                    if count > MAX_CONTROL_FILE:
                        raise ValueError("control file too large")
                    body = b"".join([chunk async for chunk in reader.exactly(count + 1)])
                    control = (name, body[:-1])
                elif code == 3:
                    path = self.directory / f"{next(self._counter)}-{name}"
                    digest = hashlib.sha256()
                    with path.open("wb") as file:
                        async for chunk in reader.exactly(count):
                            digest.update(chunk)
                            file.write(chunk)
                        async for end in reader.exactly(1):
                            assert end == b"\x00", "data file must end with an octet of zero"
                    data = (name, path, count, digest.hexdigest())
                else:
                    return
                await stream.send_all(b"\x00")
                if control is not None and data is not None:
                    self.jobs.append(
                        LpdJob(queue, control[0], control[1], data[0], data[1], data[2], data[3])
                    )
                    self._changed.set()
                    self._changed = trio.Event()
                    control = data = None

    async def wait_for(self, count: int, within: float = 10.0) -> list[LpdJob]:
        with trio.fail_after(within):
            while len(self.jobs) < count:
                await self._changed.wait()
        return self.jobs[:count]


@pytest.fixture
async def lpd_receiver(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[LpdReceiver]:
    directory = tmp_path / "lpd-receiver"
    directory.mkdir()
    receiver = LpdReceiver(directory)
    await receiver.start(nursery)
    yield receiver
    receiver.stop()


# --------------------------------------------------------------------------------------------
# private cupsd

CUPSD_CONF = """\
Listen 127.0.0.1:{port}
Browsing No
WebInterface No
DefaultAuthType None
LogLevel info
MaxJobs 0
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


@dataclass
class Cupsd:
    root: Path
    port: int
    process: subprocess.Popen[bytes]
    queues: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, queue: str) -> str:
        """The connector's printer URI for ``queue`` on this cupsd."""
        return f"cups://127.0.0.1:{self.port}/{queue}"

    def log(self) -> str:
        path = self.root / "log" / "error_log"
        return path.read_text(errors="replace") if path.exists() else ""

    def add_queue(self, name: str, device_uri: str, *, model: str = "raw") -> None:
        # "raw" queues are deprecated but still work, and need no driver or printer to talk to
        result = subprocess.run(
            ["lpadmin", "-h", self.server, "-p", name, "-E", "-v", device_uri, "-m", model],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"lpadmin -p {name} failed: {result.stderr}\n{self.log()}")
        self.queues.append(name)

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cupsd exited {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)  # polling an external process: there is no event to wait on
        raise RuntimeError(f"cupsd not listening on {self.port} within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def cupsd() -> Iterator[Cupsd]:
    if shutil.which("cupsd") is None or shutil.which("lpadmin") is None:
        pytest.fail("cupsd/lpadmin are not installed (Debian package cups)")
    # not under pytest's tmp_path: that is mode 0700, and CUPS runs its backends as user lp
    root = Path(tempfile.mkdtemp(prefix="printrelay-cupsd-"))
    try:
        root.chmod(0o755)
        for sub in ("spool", "tmp", "state", "cache", "log"):
            (root / sub).mkdir(mode=0o755)
            (root / sub).chmod(0o755)
        (root / "tmp").chmod(0o1777)
        port = free_port()
        (root / "cupsd.conf").write_text(CUPSD_CONF.format(port=port))
        (root / "cups-files.conf").write_text(CUPS_FILES_CONF.format(root=root))
        process = subprocess.Popen(
            ["cupsd", "-f", "-c", str(root / "cupsd.conf"), "-s", str(root / "cups-files.conf")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        server = Cupsd(root, port, process)
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# sources of documents printed from a URL

DOCUMENT = b"%!PS-Adobe-3.0\n" + os.urandom(48 * 1024) + b"\nshowpage\n"


@dataclass
class DocumentServer:
    """An HTTP server on loopback: /doc (the document), /redirect?to=URL, /stall, /big, /missing."""

    port: int = 0
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.seen.append(
            (request.target, {k.decode(): v.decode("latin-1") for k, v in request.headers.raw()})
        )
        if request.path == "/doc":
            return Response(200, [("content-type", "application/postscript")], DOCUMENT)
        if request.path == "/redirect":
            return Response(302, [("location", request.query["to"][0])])
        if request.path == "/big":
            return Response(200, [("content-type", "application/octet-stream")], b"x" * (256 * 1024))
        if request.path == "/stall":

            async def stall() -> AsyncIterator[bytes]:
                yield b"a beginning"
                await trio.sleep_forever()

            return Response(200, [], stall())
        return Response(404, [], b"no such document")

    def paths(self) -> list[str]:
        return [target for target, _ in self.seen]


@pytest.fixture
async def documents(nursery: trio.Nursery) -> DocumentServer:
    server = DocumentServer()
    server.port = await nursery.start(HttpServer(server.handle).serve, "127.0.0.1", 0)
    return server


@pytest.fixture
def ftp_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """pyftpdlib, anonymous and read-only, serving a directory on loopback."""
    root = tmp_path / "ftp"
    root.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-d", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # another process: polled until it listens, bounded
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail("pyftpdlib did not start")
                time.sleep(0.1)
        yield port, root
    finally:
        process.terminate()
        process.wait(timeout=10)
