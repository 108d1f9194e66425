"""One load test, end to end: a relay, a connector swarm, Locust headless, then the report.

    python loadtest/run.py --users 50 --spawn-rate 10 --duration 60s --connectors 20 \\
        --printers-per-connector 5 --out loadtest-results

Starts ``printrelay serve`` on free loopback ports with fresh tokens, ``loadtest/swarm.py`` with the
connectors and their sink printers, waits until the relay lists every printer online, runs
``locust --headless -u -r -t --csv``, then waits (bounded by ``--drain-timeout``) until the run has
settled: every job the relay lists rests (completed, failed, canceled, expired, or held and never
released) and the swarm has no delivery running and no sink connection open, twice in a row with nothing
changed. Only then does it stop everything and judge each job by its final state, what the harness did to
it and what the printers received (``verdict.py``), so the verdict does not depend on how a race went.
Writes ``report.json`` (with ``verdict``), ``verdict.json``, ``report.md`` and PNG plots to ``--out``,
prints one ``verdict:`` line with the count of every outcome, and exits 1 unless the verdict passed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.report import plot, read_ndjson, summarize, timeline
from loadtest.stack import Monitor, Relay, Service, create_tokens, machine, wait_printers_online
from loadtest.verdict import RESTING_STATES, Received, RelayJob, Submission, judge

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
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0,
        help="seconds to wait, after Locust, for every job to rest and every delivery to end",
    )  # fmt: skip
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


LIST_PAGE = 500  # the relay's largest page of GET /v1/jobs
REQUEST_TIMEOUT = 30.0


async def list_jobs(client: httpx.AsyncClient) -> list[RelayJob]:
    """Every job of the tenant, page by page."""
    jobs: list[RelayJob] = []
    params: dict[str, str | int] = {"limit": LIST_PAGE}
    while True:
        with trio.fail_after(REQUEST_TIMEOUT):
            response = await client.get("/v1/jobs", params=params)
        response.raise_for_status()
        page = response.json()
        jobs += [RelayJob.from_api(job) for job in page["jobs"]]
        if not page["next"]:
            return jobs
        params["after"] = page["next"]


async def swarm_status_after(status_path: Path, at: float, swarm: Service) -> dict[str, Any]:
    """The swarm's first status written after ``at`` (time.time()); it rewrites it every 0.5 s."""
    while True:
        if not swarm.running():
            raise RuntimeError(f"swarm exited:\n{swarm.tail()}")
        try:
            status: dict[str, Any] = json.loads(await trio.Path(status_path).read_text())
            if status["at"] > at:
                return status
        except (OSError, ValueError):
            pass  # being replaced
        await trio.sleep(0.1)


@dataclass
class Settled:
    jobs: list[RelayJob]  # the relay's list at the last look
    settled: bool
    seconds: float
    note: str  # what was still moving, when not settled


async def settle(client: httpx.AsyncClient, status_path: Path, swarm: Service, within: float) -> Settled:
    """Wait, at most ``within`` seconds, until every job rests at the relay and, in a swarm status written
    after that was seen, no delivery runs and no sink connection is open; then look once more and require
    the same job states and arrival count (a request still in flight when Locust stopped, say a release,
    would show up as a change). The relay and the swarm are other processes: polling is all there is."""
    started = time.monotonic()
    jobs: list[RelayJob] = []
    note = "nothing looked at yet"
    previous: tuple[dict[str, str], int] | None = None
    with trio.move_on_after(within):
        while True:
            jobs = await list_jobs(client)
            looked = time.time()
            moving = [j for j in jobs if j.state not in RESTING_STATES]
            if moving:
                note = f"{len(moving)} jobs not final, e.g. {moving[0].id} {moving[0].state}"
                previous = None
            else:
                status = await swarm_status_after(status_path, looked, swarm)
                current = ({j.id: j.state for j in jobs}, int(status["arrivals"]))
                if status["deliveries_in_progress"] or status["sink_connections"]:
                    note = (
                        f"{status['deliveries_in_progress']} deliveries running, "
                        f"{status['sink_connections']} sink connections open"
                    )
                    previous = None
                elif current == previous:
                    return Settled(jobs, True, time.monotonic() - started, "")
                else:
                    note = "changed between two quiet looks"
                    previous = current
            await trio.sleep(0.25)
    return Settled(jobs, False, time.monotonic() - started, f"after {within:g} s: {note}")


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
            async with httpx.AsyncClient(
                base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}, timeout=30
            ) as client:
                settled = await settle(client, status, swarm, args.drain_timeout)
            drain_end = time.time()
            monitor.take()
            nursery.cancel_scope.cancel()
    finally:
        locust.stop()
        swarm.stop()
        relay.stop()

    subs = Submission.from_record(read_ndjson(record))
    verdict = judge(
        subs, settled.jobs, [Received.from_row(row) for row in read_ndjson(arrivals)],
        settled=settled.settled, settle_note=settled.note,
    )  # fmt: skip
    summary = summarize(verdict, subs)
    totals = locust_totals(csv_prefix)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/run.py", *sys.argv[1:]]),
        "machine": machine(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_seconds": round(load_end - load_start, 1),
        "drain_seconds": round(settled.seconds, 1),
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
        report["plots"] = [p.name for p in plot(timeline(verdict, subs, load_start), resources, out)]
    report["verdict_line"] = verdict.line()
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "verdict.json").write_text(json.dumps(report["verdict"], indent=2) + "\n")
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
        f"| canceled (held / queued) | {report['canceled_held']} / {report['canceled_queued']}; held jobs "
        f"printed: {report['canceled_printed']}; canceled during delivery: partial "
        f"{report['canceled_partial']}, whole (cancel too late) {report['canceled_raced_printed']} |",
        f"| failed / unsettled / still held | {report['failed']} / {report['unsettled']} / "
        f"{report['still_held']} |",
        f"| HTTP requests / failures | {report['locust'].get('requests')} / "
        f"{report['locust'].get('failures')} ({report['locust'].get('requests_per_s')} req/s) |",
        f"| relay CPU / peak RSS | {relay['cpu_percent']} % of one core / {relay['peak_rss_mib']} MiB |",
        "",
    ]
    lines += [f"`{report['verdict_line']}`", ""]
    lines += [f"![{name}]({name})" for name in report.get("plots", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = trio.run(run, args)
    print((args.out / "report.md").read_text())
    print(report["verdict_line"])
    return 0 if report["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
