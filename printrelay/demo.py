"""``printrelay demo``: a relay, a connector and a printer in one command, and a job through the tunnel.

The printer is a real ``ippeveprinter`` (Debian ``cups-ipp-utils``) when it is installed and D-Bus/avahi can
run, otherwise a built-in RAW (port 9100 style) sink that writes each job to a folder. The demo prints a
test page through the relay → WebSocket/HTTP/2 tunnel → connector → printer path, shows the job's progress,
then stays up with the URLs and tokens to try by hand, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio

from connector.app import Connector
from connector.config import ConnectorConfig, parse_printer
from connector.delivery.ipp import IppBackend
from printrelay import program
from printrelay.dnssd import DnsSdUnavailable, ensure_dns_sd
from relay.app import Relay
from relay.auth import new_token
from relay.config import RelayConfig
from service.logs import setup_logging
from service.settings import parse_hostport

PRINTER_START_TIMEOUT = 20.0
FORMATS = "application/pdf,image/jpeg,image/pwg-raster,text/plain,application/octet-stream"


def add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--data-dir", type=Path, default=Path("printrelay-demo"), help="default: %(default)s")
    demo.add_argument(
        "--listen",
        type=parse_hostport,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="relay API (default 127.0.0.1:8080)",
    )
    demo.add_argument(
        "--tunnel-listen",
        type=parse_hostport,
        default=("127.0.0.1", 8081),
        metavar="HOST:PORT",
        help="relay tunnel listener (default 127.0.0.1:8081)",
    )
    demo.add_argument(
        "--metrics-listen",
        type=parse_hostport,
        default=("127.0.0.1", 9464),
        metavar="HOST:PORT",
        help="relay /metrics, /healthz, /readyz (default 127.0.0.1:9464)",
    )
    demo.add_argument(
        "--printer",
        choices=("auto", "ippeveprinter", "raw"),
        default="auto",
        help="which printer to start (default: ippeveprinter when installed)",
    )
    demo.add_argument("--once", action="store_true", help="exit after the test print instead of staying up")
    demo.add_argument("--log-level", default="warning")
    demo.set_defaults(run=run_demo)


def say(text: str) -> None:
    print(text, flush=True)


def one_page_pdf(width: int = 612, height: int = 792, content: bytes = b"") -> bytes:
    """A one-page PDF with a valid xref table (offsets computed, not guessed); no PDF library needed."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>" % (width, height),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_page() -> bytes:
    """The demo's page, saying what it is and when it was printed."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    text = f"BT /F1 24 Tf 72 720 Td (printrelay test page) Tj 0 -36 Td /F1 12 Tf ({stamp}) Tj ET".encode()
    return one_page_pdf(content=text)


@dataclass
class DemoPrinter:
    uri: str
    description: str
    output: Path


class RawFolderSink:
    """A RAW/AppSocket printer stand-in: every connection's bytes become one file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._numbers = itertools.count(1)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        async with stream:
            with trio.move_on_after(60):
                async for chunk in stream:
                    data += chunk
        if data:  # an empty connection is the connector checking that the printer is reachable
            path = self.folder / f"job-{next(self._numbers):04d}.bin"
            await trio.Path(path).write_bytes(bytes(data))


async def start_printer(kind: str, folder: Path, nursery: trio.Nursery) -> DemoPrinter:
    await trio.Path(folder).mkdir(parents=True, exist_ok=True)
    if kind in ("auto", "ippeveprinter"):
        reason = "ippeveprinter is not installed (Debian package cups-ipp-utils)"
        if shutil.which("ippeveprinter"):
            try:
                return await start_ippeveprinter(folder, nursery)
            except (DnsSdUnavailable, RuntimeError, OSError) as exc:
                reason = str(exc)
        if kind == "ippeveprinter":
            raise RuntimeError(f"cannot start ippeveprinter: {reason}")
        say(f"  (no ippeveprinter: {reason}; using the built-in RAW printer)")
    sink = RawFolderSink(folder)
    listeners = await nursery.start(partial(trio.serve_tcp, sink.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return DemoPrinter(f"socket://127.0.0.1:{port}", f"built-in RAW printer on port {port}", folder)


async def start_ippeveprinter(folder: Path, nursery: trio.Nursery) -> DemoPrinter:
    await trio.to_thread.run_sync(ensure_dns_sd)
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        "ippeveprinter", "-n", "localhost", "-p", str(port), "-r", "off", "-d", str(folder), "-k",
        "-c", "/bin/true", "-f", FORMATS, "printrelay-demo",
    ]  # fmt: skip
    process: trio.Process = await nursery.start(
        partial(trio.run_process, command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    )
    uri = f"ipp://localhost:{port}/ipp/print"
    backend = IppBackend(uri)
    with trio.move_on_after(PRINTER_START_TIMEOUT):
        while not await backend.probe():
            if process.returncode is not None:
                raise RuntimeError(f"ippeveprinter exited with {process.returncode}")
            await trio.sleep(0.2)  # an external process: nothing to wait on but its port
        await trio.sleep(1)  # printer-up-time is 0 during its first second
        return DemoPrinter(uri, f"ippeveprinter on port {port}", folder)
    process.terminate()
    raise RuntimeError(f"ippeveprinter did not answer within {PRINTER_START_TIMEOUT:.0f} s")


def run_demo(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "text")
    return trio.run(demo, args)


async def demo(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    config = RelayConfig(
        listen=args.listen,
        tunnel_listen=args.tunnel_listen,
        metrics_listen=args.metrics_listen,
        data_dir=data_dir / "relay",
    )
    async with trio.open_nursery() as nursery:
        say("printrelay demo")
        relay = Relay(config)
        addresses = await nursery.start(relay.run)
        api = f"http://{config.listen[0]}:{addresses.http_port}"
        tunnel = f"ws://{config.tunnel_listen[0]}:{addresses.tunnel_port}/v1/tunnel"
        say(f"  relay:     API {api}   tunnel {tunnel}")
        say(f"  metrics:   http://{args.metrics_listen[0]}:{addresses.metrics_port}/metrics")
        api_token, record = new_token("demo", "api", scopes=("admin",), label="demo")
        await relay.store.add_token(record)
        connector_token, record = new_token("demo", "connector", connector_id="demo-site", label="demo")
        await relay.store.add_token(record)

        printer = await start_printer(args.printer, data_dir / "printed", nursery)
        say(f"  printer:   {printer.description}, documents land in {printer.output}")
        connector = Connector(
            ConnectorConfig(
                relay=[tunnel],
                token=connector_token,
                printer=[parse_printer(f"demo-printer={printer.uri}")],
                state_dir=data_dir / "connector",
                name="demo-site",
            )
        )
        await nursery.start(connector.run)
        with trio.fail_after(15):
            await connector.tunnel.connected.wait()
            while not relay.registry.sessions():
                await relay.registry.changed.wait()
        say("  connector: demo-site, connected over WebSocket + HTTP/2, serving printer demo-printer")

        ok = await print_test_page(api, api_token, printer)
        say("")
        say("Try it yourself (Ctrl-C stops the demo):")
        say(f"  export PRINTRELAY_API_TOKEN={api_token}")
        say(f"  {shlex.quote(program())} submit --relay {api} --printer demo-printer --wait FILE")
        say(f"  curl -H 'Authorization: Bearer {api_token}' {api}/v1/printers")
        say(f"  curl -H 'Authorization: Bearer {api_token}' {api}/v1/jobs")
        if args.once:
            nursery.cancel_scope.cancel()
            return 0 if ok else 1
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                say("\nstopping")
                nursery.cancel_scope.cancel()
                break
    return 0


async def print_test_page(api: str, token: str, printer: DemoPrinter) -> bool:
    document = test_page()
    say(f"\nprinting a {len(document)}-byte test page through the tunnel ...")
    async with httpx.AsyncClient(
        base_url=api, headers={"authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        response = await client.post(
            "/v1/printers/demo-printer/jobs?title=printrelay%20test%20page",
            content=document,
            headers={"content-type": "application/pdf"},
        )
        if response.status_code != 201:
            say(f"  submit failed: {response.status_code} {response.text}")
            return False
        job = response.json()
        say(f"  job {job['id']}: {job['state']}")
        state = job["state"]
        with trio.move_on_after(60):
            while state not in ("completed", "failed", "canceled", "expired"):
                await trio.sleep(0.1)
                job = (await client.get(f"/v1/jobs/{job['id']}")).json()
                if job["state"] != state:
                    state = job["state"]
                    say(f"  job {job['id']}: {state}")
    if state != "completed":
        say(f"  the job did not complete: {job.get('last_error') or state}")
        return False
    digest = hashlib.sha256(document).hexdigest()
    for path in sorted(printer.output.iterdir()):
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            say(f"  printed: {path} (byte-identical to what was submitted)")
            return True
    say(f"  completed, but no identical document found in {printer.output}")
    return False


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace()))
