"""Real printers for tests: ippeveprinter processes and a RAW (port 9100 style) sink.

Fixtures:

* ``ippeveprinter`` -> :class:`IppEvePrinter`, a printer that completes jobs at once;
  ``ippeveprinter_factory(name=..., slow=True)`` for one that simulates printing (5-15 s per job,
  one job at a time, others answered server-error-busy), ``held=True`` for one that prints each job until
  the test calls :meth:`IppEvePrinter.release`.
* ``raw_sink`` -> :class:`RawSink`, a TCP server that stores each connection's bytes.
* ``free_port()``.

Processes are started on free ports and stopped by their process handle at teardown.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_FORMATS",
    "IppEvePrinter",
    "IppEvePrinterFactory",
    "RawDocument",
    "RawSink",
    "dns_sd",
    "ensure_dns_sd",
    "free_port",
    "ippeveprinter",
    "ippeveprinter_factory",
    "raw_sink",
]

import hashlib
import http.client
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from ipp import DelimiterTag, IPPError, JobState, Operation, ValueTag, decode, encode, new_request
from printrelay.dnssd import ensure_dns_sd

DEFAULT_FORMATS = (
    "application/pdf",
    "image/jpeg",
    "image/pwg-raster",
    "text/plain",
    "application/octet-stream",
)
#: ippeveprinter reports printer-up-time 0 during its first second; clients that check it fail then
STARTUP_TIMEOUT = 15.0


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A TCP (or, with SOCK_DGRAM, UDP) port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# system D-Bus and avahi: ippeveprinter will not start without them ("Unable to initialize DNS-SD")
@pytest.fixture(scope="session")
def dns_sd() -> None:
    ensure_dns_sd()


# --------------------------------------------------------------------------------------------
# ippeveprinter


def _ipp_post_sync(port: int, body: bytes, timeout: float) -> bytes:
    conn = http.client.HTTPConnection("localhost", port, timeout=timeout)
    try:
        conn.request("POST", "/ipp/print", body=body, headers={"Content-Type": "application/ipp"})
        return conn.getresponse().read()
    finally:
        conn.close()


@dataclass
class IppEvePrinter:
    name: str
    port: int
    spool_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    tls: bool = False
    release_file: Path | None = None  # held=True: jobs print until it exists
    _request_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def uri(self) -> str:
        """``ipps://`` when started with ``tls=True`` (plain IPP is served on the same port too)."""
        return f"{'ipps' if self.tls else 'ipp'}://localhost:{self.port}/ipp/print"

    @property
    def plain_uri(self) -> str:
        return f"ipp://localhost:{self.port}/ipp/print"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def documents(self) -> list[Path]:
        """Received documents (kept with -k as ``JOBID-NAME.ext``), in job order."""
        found = [
            path
            for path in self.spool_dir.iterdir()
            if path.is_file() and path.name.split("-", 1)[0].isdigit() and path.suffix != ".prn"
        ]  # .prn files hold the print command's output, not what was sent
        return sorted(found, key=lambda path: int(path.name.split("-", 1)[0]))

    def _printer_attributes_request(self) -> bytes:
        request = new_request(
            Operation.GET_PRINTER_ATTRIBUTES, next(self._request_ids), printer_uri=self.plain_uri
        )
        request.operation.add("requested-attributes", ValueTag.KEYWORD, "printer-up-time", "printer-state")
        return encode(request)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll Get-Printer-Attributes until printer-up-time >= 1 (bounded)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ippeveprinter exited {self.process.returncode}:\n{self.log()}")
            try:
                response, _ = decode(_ipp_post_sync(self.port, self._printer_attributes_request(), 2))
                up = response.value(DelimiterTag.PRINTER_ATTRIBUTES, "printer-up-time")
                if isinstance(up, int) and up >= 1:
                    return
                last = f"printer-up-time={up!r}"
            except (OSError, http.client.HTTPException, IPPError) as exc:
                last = repr(exc)
            time.sleep(0.1)  # polling an external process: there is no event to wait on
        raise RuntimeError(f"ippeveprinter not ready within {timeout} s ({last}):\n{self.log()}")

    async def completed_jobs(self) -> int:
        request = new_request(Operation.GET_JOBS, next(self._request_ids), printer_uri=self.plain_uri)
        request.operation.add("which-jobs", ValueTag.KEYWORD, "completed")
        request.operation.add("requested-attributes", ValueTag.KEYWORD, "job-id", "job-state")
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.post(
                f"http://localhost:{self.port}/ipp/print",
                content=encode(request),
                headers={"Content-Type": "application/ipp"},
            )
        response, _ = decode(reply.content)
        return sum(
            1
            for group in response.groups_of(DelimiterTag.JOB_ATTRIBUTES)
            if group.get("job-state") is not None
            and group["job-state"].value in (JobState.COMPLETED, JobState.ABORTED, JobState.CANCELED)
        )

    def release(self) -> None:
        """Let a printer started with ``held=True`` finish the job it prints, and every later one at once."""
        assert self.release_file is not None, "started without held=True"
        self.release_file.touch()

    async def job_states(self) -> list[int]:
        """job-state of every job the printer knows, oldest first (Get-Jobs which-jobs=all)."""
        return [state for state, _ in await self.jobs()]

    async def jobs(self) -> list[tuple[int, set[str]]]:
        """(job-state, job-state-reasons) of every job the printer knows, oldest first."""
        request = new_request(Operation.GET_JOBS, next(self._request_ids), printer_uri=self.plain_uri)
        request.operation.add("which-jobs", ValueTag.KEYWORD, "all")
        request.operation.add(
            "requested-attributes", ValueTag.KEYWORD, "job-id", "job-state", "job-state-reasons"
        )
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.post(
                f"http://localhost:{self.port}/ipp/print",
                content=encode(request),
                headers={"Content-Type": "application/ipp"},
            )
        response, _ = decode(reply.content)
        jobs = [
            (group["job-id"].value, group["job-state"].value, set(reasons.values) if reasons else set())
            for group in response.groups_of(DelimiterTag.JOB_ATTRIBUTES)
            if group.get("job-id") is not None and group.get("job-state") is not None
            for reasons in [group.get("job-state-reasons")]
        ]
        return [(state, reasons) for _, state, reasons in sorted(jobs)]

    async def wait_for_documents(self, count: int, within: float = 30.0) -> list[Path]:
        """Wait until ``count`` jobs have finished, then return their documents."""
        with trio.fail_after(within):
            while True:
                if await self.completed_jobs() >= count:
                    break
                await trio.sleep(0.05)  # polling an external process: there is no event to wait on
        return self.documents()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


IppEvePrinterFactory = Callable[..., IppEvePrinter]


@pytest.fixture
def ippeveprinter_factory(dns_sd: None, tmp_path: Path) -> Iterator[IppEvePrinterFactory]:
    """``factory(name="printrelay-test", *, slow=False, held=False, command="/bin/true", formats=...,
    tls=False, extra_args=())``.

    ``command`` is run per job (``-c``); jobs complete at once with ``/bin/true`` and abort with
    ``/bin/false``. ``slow=True`` runs none: ippeveprinter then simulates printing each job for
    5-15 s, one at a time. ``held=True`` runs one that prints until :meth:`IppEvePrinter.release`: the
    printer is busy (one job at a time) and a canceled job stays processing-to-stop-point until then.
    ``tls=True`` adds a self-signed certificate and an ``ipps://`` uri.
    """
    if shutil.which("ippeveprinter") is None:
        pytest.fail("ippeveprinter is not installed (Debian package cups-ipp-utils)")
    printers: list[IppEvePrinter] = []
    counter = itertools.count()

    def start(
        name: str = "printrelay-test",
        *,
        slow: bool = False,
        held: bool = False,
        command: str | None = "/bin/true",
        formats: tuple[str, ...] = DEFAULT_FORMATS,
        tls: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> IppEvePrinter:
        base = tmp_path / f"ippeveprinter-{next(counter)}"
        spool = base / "spool"
        spool.mkdir(parents=True)
        port = free_port()
        release_file: Path | None = None
        if held:  # polls: a file is all a shell script and the test share
            release_file = base / "release"
            command = str(base / "print-until-released")
            Path(command).write_text(f"#!/bin/sh\nwhile [ ! -e '{release_file}' ]; do sleep 0.05; done\n")
            Path(command).chmod(0o755)
        args = ["ippeveprinter", "-n", "localhost", "-p", str(port), "-r", "off"]
        args += ["-d", str(spool), "-k", "-2", "-f", ",".join(formats)]
        if command is not None and not slow:
            args += ["-c", command]
        if tls:  # ippeveprinter writes a self-signed "localhost" certificate into this directory
            (base / "keys").mkdir()
            args += ["-K", str(base / "keys")]
        args += [*extra_args, name]
        log_path = base / "ippeveprinter.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=base,
                env={**os.environ, "HOME": str(base)},
            )
        printer = IppEvePrinter(name, port, spool, process, log_path, tls, release_file)
        printers.append(printer)
        printer.wait_ready()
        return printer

    yield start
    for printer in printers:
        if printer.release_file is not None:
            printer.release()  # its print command is a process of its own: let it end too
        printer.stop()


@pytest.fixture
def ippeveprinter(ippeveprinter_factory: IppEvePrinterFactory) -> IppEvePrinter:
    return ippeveprinter_factory()


# --------------------------------------------------------------------------------------------
# RAW sink


@dataclass(frozen=True)
class RawDocument:
    path: Path
    size: int
    sha256: str


class RawSink:
    """A TCP server on 127.0.0.1 storing each connection's bytes as one document.

    ``close_after_eof=False`` makes it keep connections open after the sender's EOF, like printers
    that never close their side.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.documents: list[RawDocument] = []
        self.close_after_eof = True
        self._changed = trio.Event()
        self._counter = itertools.count(1)

    @property
    def uri(self) -> str:
        return f"socket://127.0.0.1:{self.port}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        path = self.directory / f"{next(self._counter)}.raw"
        digest = hashlib.sha256()
        size = 0
        async with stream, await trio.open_file(path, "wb") as file:
            async for data in stream:
                digest.update(data)
                size += len(data)
                await file.write(data)
            if size == 0:
                # A connection that sends nothing is a reachability probe, not a print job.
                path.unlink()
                return
            self.documents.append(RawDocument(path, size, digest.hexdigest()))
            self._changed.set()
            self._changed = trio.Event()
            if not self.close_after_eof:
                await trio.sleep_forever()

    async def wait_for(self, count: int, within: float = 10.0) -> list[RawDocument]:
        """Wait until ``count`` connections have sent EOF; their documents in arrival order."""
        with trio.fail_after(within):
            while len(self.documents) < count:
                await self._changed.wait()
        return self.documents[:count]


@pytest.fixture
async def raw_sink(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RawSink]:
    directory = tmp_path / "raw-sink"
    directory.mkdir()
    sink = RawSink(directory)
    listeners = await nursery.start(partial(trio.serve_tcp, sink._handle, 0, host="127.0.0.1"))
    sink.port = listeners[0].socket.getsockname()[1]
    yield sink


# --- ipptool, CUPS's IPP test client ------------------------------------------------------------------

IPPTOOL_SUITES = Path("/usr/share/cups/ipptool")


def run_ipptool(uri: str, test: str | Path, workdir: Path, *extra: str, **variables: str) -> tuple[int, str]:
    """Run ``test`` (a file of CUPS's suite directory, or a path) against ``uri``; (exit code, report).
    ``variables`` become ``-d NAME=VALUE``. Run from ``workdir`` so the tests' FILE names resolve there."""
    defines = [arg for name, value in variables.items() for arg in ("-d", f"{name}={value}")]
    completed = subprocess.run(
        # -t: a test report; -v: show why a test failed
        ["ipptool", "-t", "-v", *extra, *defines, "-T", "30", "-f", "document-a4.pdf", uri,
         str(IPPTOOL_SUITES / test)],
        cwd=workdir, capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(workdir)},
    )  # fmt: skip
    return completed.returncode, completed.stdout + completed.stderr
