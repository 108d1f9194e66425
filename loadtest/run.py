"""One load test, end to end: a relay, a connector swarm, Locust headless, then the report.

    python loadtest/run.py --users 50 --spawn-rate 10 --duration 60s --connectors 20 \\
        --printers-per-connector 5 --out loadtest-results

Starts ``printrelay serve`` on free loopback ports with fresh tokens, ``loadtest/swarm.py`` with the
connectors and their sink printers, waits until the relay lists every printer online, runs
``locust --headless -u -r -t --csv``, waits (bounded by ``--drain-timeout``) until every accepted job has
reached a printer, stops everything and writes ``report.json``, ``report.md`` and PNG plots to ``--out``.
Exits 1 when a job was lost, printed twice, corrupted, or printed after its cancel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.report import Matching, plot, read_ndjson, summarize, timeline
from loadtest.stack import Monitor, Relay, Service, create_tokens, machine, wait_printers_online

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", "-u", type=int, default=50, help="Locust users")
    parser.add_argument("--spawn-rate", "-r", type=float, default=10, help="users started per second")
    parser.add_argument("--duration", "-t", default="60s", help="Locust run time (30s, 5m, ...)")
    parser.add_argument("--connectors", type=int, default=20)
    parser.add_argument("--printers-per-connector", type=int, default=5)
    parser.add_argument("--sink-rate", type=float, default=0, help="bytes/s each printer reads (0: no cap)")
    parser.add_argument("--large-ratio", type=float, default=0.05, help="share of 1 MiB+ documents")
    parser.add_argument("--max-large-mib", type=float, default=20.0)
    parser.add_argument("--think-min", type=float, default=0.1, help="seconds between a user's tasks")
    parser.add_argument("--think-max", type=float, default=1.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="wait for the last jobs")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"))
    return parser.parse_args(argv)


async def wait_swarm(status_path: Path, connectors: int, swarm: Service, within: float = 120.0) -> None:
    with trio.fail_after(within):
        while True:
            if not swarm.running():
                raise RuntimeError(f"swarm exited:\n{swarm.tail()}")
            try:
                status = json.loads(await trio.Path(status_path).read_text())
                if status["connected"] >= connectors:
                    return
            except (OSError, ValueError):
                pass
            await trio.sleep(0.1)


async def wait_drained(record: Path, arrivals: Path, within: float) -> float:
    """Wait until every expected job has arrived intact (or ``within`` seconds); seconds waited.
    The files are written by other processes: polling them is all there is."""
    started = time.monotonic()
    with trio.move_on_after(within):
        while True:
            if not Matching.of(read_ndjson(record), read_ndjson(arrivals)).missing():
                break
            await trio.sleep(0.25)
    return time.monotonic() - started


def locust_totals(csv_prefix: Path) -> dict[str, Any]:
    path = Path(f"{csv_prefix}_stats.csv")
    if not path.exists():
        return {}
    import csv

    with path.open() as file:
        for row in csv.DictReader(file):
            if row["Name"] == "Aggregated":
                return {
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                    "requests_per_s": round(float(row["Requests/s"]), 1),
                    "response_ms_p50": float(row["50%"] or 0),
                    "response_ms_p99": float(row["99%"] or 0),
                }
    return {}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs.ndjson", "arrivals.ndjson"):
        (work / stale).unlink(missing_ok=True)
    connector_ids = [f"c{n:03d}" for n in range(args.connectors)]
    tokens = create_tokens(work / "relay-data", connector_ids)
    (work / "tokens.json").write_text(json.dumps(tokens.connectors))
    relay = Relay(work / "relay-data", work / "relay.log")
    record, arrivals, status = work / "jobs.ndjson", work / "arrivals.ndjson", work / "swarm-status.json"
    swarm = Service(
        "swarm",
        [sys.executable, str(HERE / "swarm.py"), "--relay", relay.tunnel_url,
         "--connectors", str(work / "tokens.json"), "--printers-per-connector",
         str(args.printers_per_connector), "--sink-rate", str(args.sink_rate),
         "--state-dir", str(work / "swarm"), "--arrivals", str(arrivals), "--status", str(status)],
        work / "swarm.log",
    )  # fmt: skip
    csv_prefix = out / "locust"
    locust_argv = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
        "--host", relay.api_url, "--csv", str(csv_prefix), "--only-summary", "--loglevel", "WARNING",
        "--stop-timeout", "10", "--api-token", tokens.api, "--record", str(record),
        "--large-ratio", str(args.large_ratio), "--max-large-mib", str(args.max_large_mib),
        "--think-min", str(args.think_min), "--think-max", str(args.think_max),
    ]  # fmt: skip
    locust = Service("locust", locust_argv, work / "locust.log")
    try:
        relay.start()
        await relay.wait_ready()
        swarm.start()
        await wait_swarm(status, args.connectors, swarm)
        printers = {f"{c}-p{n}" for c in connector_ids for n in range(args.printers_per_connector)}
        async with httpx.AsyncClient(
            base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}, timeout=30
        ) as client:
            await wait_printers_online(client, printers, within=120)
        assert relay.service is not None
        monitor = Monitor({"relay": relay.service.pid, "swarm": swarm.pid})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            load_start = time.time()
            locust.start()
            assert locust.process is not None
            with trio.fail_after(_seconds(args.duration) + 120):
                while True:
                    if locust.process.poll() is not None:
                        break
                    await trio.sleep(0.2)
            load_end = time.time()
            drained = await wait_drained(record, arrivals, args.drain_timeout)
            drain_end = time.time()
            monitor.take()
            nursery.cancel_scope.cancel()
    finally:
        locust.stop()
        swarm.stop()
        relay.stop()

    matching = Matching.of(read_ndjson(record), read_ndjson(arrivals))
    summary = summarize(matching)
    totals = locust_totals(csv_prefix)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/run.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_seconds": round(load_end - load_start, 1),
        "drain_seconds": round(drained, 1),
        "locust": totals,
        "locust_exit_code": locust.process.returncode if locust.process else None,
        **summary,
        "relay": monitor.summary("relay", load_start, drain_end),
        "swarm": monitor.summary("swarm", load_start, drain_end),
    }
    if not args.no_plots:
        resources = {
            name: [
                (b.at - load_start, 100 * (b.cpu_seconds - a.cpu_seconds) / (b.at - a.at), b.rss / 2**20)
                for a, b in itertools.pairwise(samples)
                if b.at > a.at
            ]
            for name, samples in monitor.samples.items()
        }
        report["plots"] = [p.name for p in plot(timeline(matching, load_start), resources, out)]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = duration.strip()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def markdown(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]
    relay = report["relay"]
    lines = [
        "# printrelay load test",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}), "
        f"{report['machine']['memory_gib']} GiB, Python {report['machine']['python']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| load / drain | {report['load_seconds']} s / {report['drain_seconds']} s |",
        f"| jobs expected to print | {report['expected']} ({report['submitted']} submitted) |",
        f"| delivered | {report['delivered']} ({report['delivered_mib']} MiB), "
        f"{report['jobs_per_s']} jobs/s |",
        f"| latency accepted → printed | p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms, "
        f"max {lat['max']} ms |",
        f"| lost / duplicates / corrupt | {report['lost']} / {report['duplicates']} / {report['corrupt']} |",
        f"| canceled (held / queued) | {report['canceled_held']} / {report['canceled_queued']}; printed "
        f"after cancel: {report['canceled_printed']} (raced: {report['canceled_raced_printed']}) |",
        f"| HTTP requests / failures | {report['locust'].get('requests')} / "
        f"{report['locust'].get('failures')} ({report['locust'].get('requests_per_s')} req/s) |",
        f"| relay CPU / peak RSS | {relay['cpu_percent']} % of one core / {relay['peak_rss_mib']} MiB |",
        "",
    ]
    lines += [f"![{name}]({name})" for name in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def failed(report: dict[str, Any]) -> list[str]:
    problems = [
        f"{report[k]} {k.replace('_', ' ')}"
        for k in ("lost", "duplicates", "corrupt", "canceled_printed", "unknown_arrivals")
        if report[k]
    ]
    if not report["delivered"]:
        problems.append("no job was delivered")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = trio.run(run, args)
    print((args.out / "report.md").read_text())
    problems = failed(report)
    if problems:
        print("FAILED: " + ", ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
