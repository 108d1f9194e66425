"""A swarm of simulated connectors in one trio process, for load tests and capacity benchmarks.

Each simulated connector is the real :class:`connector.app.Connector` (tunnel client, HTTP/2 session,
ledger, decryption, RAW delivery) with its own state directory, serving M printers that are
:class:`~loadtest.sink.RawSink` servers. Only the printers are simulated. Every job a sink receives is
appended to ``--arrivals`` (NDJSON); ``--status`` is rewritten twice a second with how many connectors
are connected, deliveries still running and sink connections still open, so a driver in another process
can wait for the swarm (to be up, or to have settled) without polling the relay.

    python loadtest/swarm.py --relay ws://127.0.0.1:8081/v1/tunnel --connectors tokens.json \\
        --printers-per-connector 4 --state-dir swarm-state --arrivals arrivals.ndjson

``tokens.json`` maps connector ids to connector tokens. Printer ids are ``<connector id>-p<n>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connector.app import Connector
from connector.config import ConnectorConfig, PrinterSpec
from loadtest.sink import ArrivalLog, RawSink
from relay.runtime import tune_gc

STATUS_INTERVAL = 0.5


def printer_ids(connector_id: str, count: int) -> list[str]:
    return [f"{connector_id}-p{n}" for n in range(count)]


class Swarm:
    """Owns every simulated connector and sink; :meth:`run` runs them until cancelled."""

    def __init__(self, args: argparse.Namespace, tokens: dict[str, str], arrivals: ArrivalLog) -> None:
        self.args = args
        self.tokens = tokens
        self.arrivals = arrivals
        self.connectors: list[Connector] = []
        self.sinks: list[RawSink] = []
        self.exited = 0  # connectors whose run() returned or failed: "gave up"
        self.started_at = time.time()

    async def run(self) -> None:
        args = self.args
        async with trio.open_nursery() as nursery:
            shared: RawSink | None = None
            if args.shared_sink:
                shared = RawSink("shared", self.arrivals, rate=args.sink_rate, digest=not args.no_digest)
                await nursery.start(shared.serve)
                self.sinks.append(shared)
            nursery.start_soon(self._report)
            build = trio.CapacityLimiter(8)  # key files are fsynced: overlap a few
            spread = args.start_spread / max(1, len(self.tokens))
            for connector_id, token in sorted(self.tokens.items()):
                printers = []
                for printer_id in printer_ids(connector_id, args.printers_per_connector):
                    sink = shared
                    if sink is None:
                        sink = RawSink(
                            printer_id, self.arrivals, rate=args.sink_rate, digest=not args.no_digest
                        )
                        await nursery.start(sink.serve)
                        self.sinks.append(sink)
                    printers.append(PrinterSpec(printer_id, f"socket://127.0.0.1:{sink.port}"))
                config = ConnectorConfig(
                    relay=[args.relay], token=token, printer=printers, name=connector_id,
                    state_dir=Path(args.state_dir) / connector_id, max_jobs=args.max_jobs,
                    status_interval=args.status_interval, log_level="warning",
                )  # fmt: skip
                connector = await trio.to_thread.run_sync(Connector, config, limiter=build)
                self.connectors.append(connector)
                nursery.start_soon(self._run_connector, connector)
                if spread:
                    await trio.sleep(spread)

    async def _run_connector(self, connector: Connector) -> None:
        try:
            await connector.run()
        finally:
            self.exited += 1

    def status(self) -> dict[str, object]:
        connected = sum(1 for c in self.connectors if c.tunnel.session is not None)
        return {
            "at": time.time(),
            "pid": os.getpid(),
            "connectors": len(self.tokens),
            "started": len(self.connectors),
            "connected": connected,
            "sessions_opened": sum(c.tunnel.sessions_opened for c in self.connectors),
            "exited": self.exited,
            "deliveries": sum(c.deliveries for c in self.connectors),
            # Both 0: nothing is on its way to a printer, and whatever reached one is in --arrivals.
            "deliveries_in_progress": sum(c.deliveries_in_progress for c in self.connectors),
            "sink_connections": sum(s.open for s in self.sinks),
            "arrivals": self.arrivals.count,
            "sink_bytes": sum(s.bytes for s in self.sinks),
        }

    async def _report(self) -> None:
        path = Path(self.args.status)
        temp = path.with_suffix(".tmp")
        while True:
            temp.write_text(json.dumps(self.status()))
            temp.replace(path)
            await trio.sleep(STATUS_INTERVAL)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--relay", required=True, help="the relay's tunnel URL")
    parser.add_argument("--connectors", required=True, help="JSON file: {connector id: token}")
    parser.add_argument("--printers-per-connector", type=int, default=1)
    parser.add_argument("--shared-sink", action="store_true", help="one sink port for every printer")
    parser.add_argument("--sink-rate", type=float, default=0.0, help="bytes/s each sink connection reads")
    parser.add_argument("--no-digest", action="store_true", help="count bytes only (no SHA-256)")
    parser.add_argument("--max-jobs", type=int, default=8, help="jobs each connector delivers at once")
    parser.add_argument("--status-interval", type=float, default=300.0, help="printer status polls")
    parser.add_argument("--start-spread", type=float, default=0.0, help="seconds over which to start all")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--arrivals", required=True, help="NDJSON file of received jobs (appended)")
    parser.add_argument("--status", required=True, help="JSON file rewritten with the swarm's state")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tokens: dict[str, str] = json.loads(Path(args.connectors).read_text())
    tune_gc()  # thousands of connectors in one process: a heap as large as a busy relay's

    async def serve(file: IO[str]) -> None:
        swarm = Swarm(args, tokens, ArrivalLog(file))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swarm.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
        await trio.Path(args.status).write_text(json.dumps(swarm.status()))

    # Appends of whole lines from one thread: the file is the swarm's only output besides its status.
    with Path(args.arrivals).open("a") as file:
        trio.run(serve, file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
