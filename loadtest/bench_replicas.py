"""Relay replicas on PostgreSQL, next to the SQLite relay and CUPS in the same run.

    python loadtest/bench_replicas.py --out bench-results

Four throughput cases share the clients, printers and job mix of ``bench_small_jobs.py`` (``--jobs``
documents of 4 KiB from ``--concurrency`` keep-alive connections, 16 RAW sinks, one connector):

* ``sqlite``: one ``printrelay serve`` on its embedded SQLite (the baseline);
* ``pg1``: one replica on a private PostgreSQL (fsync on, as in production);
* ``pg2``: two replicas on it, the connector holding a session to each, clients spread over both;
* ``cups``: a private ``cupsd`` with raw queues.

For each: jobs/s, latency at a paced rate, and CPU seconds per job of every relay replica, the connector
and PostgreSQL (all its processes). Then two failure timings, on PostgreSQL:

* ``failover``: a job streams to a slow printer from one replica, which is SIGKILLed; the time until
  another replica claims the job (its lease lapsed) and until it is completed, printed once. With the
  default lease (15 s) and a short one.
* ``rehome``: a connector keeping two sessions among three replicas (and one keeping one session among
  two) loses a replica to SIGKILL; the time until it again holds as many sessions on live replicas.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_small_jobs import (
    Tracker,
    add_queues,
    cups_submitter,
    drive,
    figures,
    relay_submitter,
    start_cupsd,
    wait_listening,
)
from loadtest.postgres import PostgresServer
from loadtest.sink import RawSink, tagged
from loadtest.stack import (
    TENANT,
    Monitor,
    Relay,
    Service,
    connector_service,
    create_tokens,
    free_port,
    machine,
    printrelay_argv,
    stopping,
    wait_printers_online,
    write_json,
)

TIMING_TIMEOUT = 120.0
CASES = ("sqlite", "pg1", "pg2", "cups", "failover", "rehome")


def pg_tokens(url: str) -> tuple[str, str]:
    """An admin API token and a connector token (connector ``bench``), through the CLI users run."""

    def create(*args: str) -> str:
        done = subprocess.run(
            printrelay_argv("token", "create", "--database-url", url, "--tenant", TENANT, *args),
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return done.stdout.strip()

    return create("--kind", "api", "--scopes", "admin"), create("--kind", "connector", "--connector", "bench")


def replicas(work: Path, url: str, count: int, *extra: str) -> list[Relay]:
    work.mkdir(parents=True, exist_ok=True)
    key = work / "secret.key"
    return [
        Relay(work / f"relay-{n}", work / f"relay-{n}.log",
              ("--database-url", url, "--secret-key-file", str(key), *extra))
        for n in range(count)
    ]  # fmt: skip


def connector_for(
    relays: list[Relay], token: str, printers: dict[str, str], state: Path, *extra: str
) -> Service:
    service = connector_service("bench", relays[0], token, printers, state, state.with_suffix(".log"), *extra)
    for relay in relays[1:]:
        service.argv += ["--relay", relay.tunnel_url]
    return service


def per_job(summary: dict[str, float], jobs: int) -> float:
    return round(1000 * summary["cpu_seconds"] / jobs, 2) if jobs else 0.0


async def throughput(
    name: str, submit: Any, ports: list[int], sinks: list[RawSink], monitor: Monitor, args: argparse.Namespace
) -> dict[str, Any]:
    """Saturated run (jobs/s, CPU per job of every monitored process), then a paced one (latency)."""
    result: dict[str, Any] = {}
    tracker = Tracker()
    for sink in sinks:
        sink.record = tracker.record
    monitor.take()
    started = time.time()
    await drive(tracker, submit, ports, len(sinks), args.jobs, args.concurrency, args.size)
    await tracker.wait_all()
    monitor.take()
    result["saturated"] = figures(tracker, started)
    jobs = len(tracker.accepted)
    result["cpu_ms_per_job"] = {
        process: per_job(monitor.summary(process, started), jobs) for process in monitor.pids
    }
    result["cpu_percent"] = {
        process: monitor.summary(process, started)["cpu_percent"] for process in monitor.pids
    }
    tracker = Tracker()
    for sink in sinks:
        sink.record = tracker.record
    started = time.time()
    paced = int(args.paced_rate * args.paced_seconds)
    await drive(tracker, submit, ports, len(sinks), paced, args.concurrency, args.size, args.paced_rate)
    await tracker.wait_all()
    result["paced"] = figures(tracker, started) | {"target_jobs_per_s": args.paced_rate}
    print(f"{name}: {result}", flush=True)
    return result


async def relay_case(
    name: str, work: Path, relays: list[Relay], api: str, connector_token: str, sinks: list[RawSink],
    args: argparse.Namespace, postgres: PostgresServer | None, url: str = "",
) -> dict[str, Any]:  # fmt: skip
    printers = [s.printer for s in sinks]
    services: list[Service] = []
    with stopping(services):
        for relay in relays:
            services.append(relay.start())
        for relay in relays:
            await relay.wait_ready()
        connector = connector_for(
            relays, connector_token, {s.printer: f"socket://127.0.0.1:{s.port}" for s in sinks},
            work / f"{name}-connector", "--max-jobs", str(len(sinks)), "--sessions", str(len(relays)),
        )  # fmt: skip
        services.append(connector)
        connector.start()
        async with httpx.AsyncClient(
            base_url=relays[0].api_url, headers={"authorization": f"Bearer {api}"}
        ) as c:
            await wait_printers_online(c, set(printers), within=60)
        pids = {f"relay {n}": r.service.pid for n, r in enumerate(relays) if r.service}
        pids["connector"] = connector.pid
        if postgres is not None:
            pids["postgres"] = postgres.pid
        monitor = Monitor(pids, trees={"postgres"})
        before = database_bytes(url) if postgres is not None and url else None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            result = await throughput(
                name, relay_submitter(api, printers), [r.http_port for r in relays], sinks, monitor, args
            )
            nursery.cancel_scope.cancel()
        if before is not None and postgres is not None and url:
            after = database_bytes(url)
            jobs = result["saturated"]["jobs"] + result["paced"]["jobs"]
            result["postgres_bytes_per_job"] = {
                "wal": round((after[0] - before[0]) / jobs), "database": round((after[1] - before[1]) / jobs)
            }  # fmt: skip
    return result


def database_bytes(url: str) -> tuple[int, int]:
    """WAL written so far (the server's) and the size of ``url``'s database."""
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, "
            "pg_database_size(current_database())"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --- failure timings ---------------------------------------------------------------------------------


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        return list(db.execute(sql, params).fetchall())


async def until(condition: Any, *, within: float = TIMING_TIMEOUT, every: float = 0.02) -> float:
    """Poll ``condition`` (a blocking function, run in a thread) until true; time.time() when it was."""
    with trio.fail_after(within):
        while True:
            if await trio.to_thread.run_sync(condition):
                return time.time()
            await trio.sleep(every)  # another process's state, in the database: polled


def holding(relays: list[Relay], replica_id: str | None) -> Relay:
    """The relay process whose replica id is ``replica_id`` (from its "relay ready" log line)."""
    return next(r for r in relays if r.service and f"replica {replica_id})" in r.service.log_path.read_text())


async def kill_while_streaming(url: str, relays: list[Relay], job_id: str) -> tuple[Relay, dict[str, float]]:
    """SIGKILL the replica that holds ``job_id``'s lease; seconds until another claims it, and until done."""

    def owner() -> str | None:
        found = query(url, "SELECT lease_owner, state FROM jobs WHERE id = %s", (job_id,))
        return str(found[0][0]) if found and found[0][1] in ("sending", "printing") else None

    def state() -> str:
        return str(query(url, "SELECT state FROM jobs WHERE id = %s", (job_id,))[0][0])

    await until(lambda: owner() is not None)
    holder = owner()
    victim = holding(relays, holder)
    assert victim.service is not None
    victim.service.stop(signal.SIGKILL)
    killed = time.time()
    reclaimed = await until(lambda: owner() not in (None, holder))
    completed = await until(lambda: state() == "completed")
    return victim, {
        "to_reclaim_s": round(reclaimed - killed, 2), "to_completed_s": round(completed - killed, 2)
    }  # fmt: skip


async def failover(work: Path, pg: PostgresServer, lease: float, trials: int) -> dict[str, Any]:
    """SIGKILL the replica streaming a job to a slow printer; time until another claims it, and until done."""
    url = pg.url(pg.create_database())
    api, connector_token = pg_tokens(url)
    arrivals: list[str] = []
    sink = RawSink("slow", lambda a: arrivals.append(a.tag), rate=2_000_000)  # 2 MB/s
    runs: list[dict[str, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.serve)
        relays = replicas(
            work / f"failover-{lease:g}", url, 2, "--job-lease", f"{lease:g}s", "--log-level", "info"
        )
        services: list[Service] = []
        with stopping(services):
            for relay in relays:
                services.append(relay.start())
            for relay in relays:
                await relay.wait_ready()
            connector = connector_for(
                relays, connector_token, {"slow": f"socket://127.0.0.1:{sink.port}"},
                work / f"failover-{lease:g}-connector", "--sessions", "2",
            )  # fmt: skip
            services.append(connector)
            connector.start()
            headers = {"authorization": f"Bearer {api}"}
            for trial in range(trials):
                live = [r for r in relays if r.service is not None and r.service.running()]
                async with httpx.AsyncClient(base_url=live[0].api_url, headers=headers, timeout=30) as c:
                    await wait_printers_online(c, {"slow"}, within=60)
                    tag = f"failover-{trial}"
                    body = tagged(tag, os.urandom(6_000_000))  # three seconds at the printer
                    reply = await c.post("/v1/printers/slow/jobs", content=body)
                    reply.raise_for_status()
                    job_id = reply.json()["id"]

                victim, timing = await kill_while_streaming(url, relays, job_id)
                runs.append(timing)
                print(f"failover lease {lease:g} s, trial {trial}: {runs[-1]}", flush=True)
                services.append(victim.start())
                await victim.wait_ready()
        nursery.cancel_scope.cancel()
    printed = {tag: arrivals.count(tag) for tag in set(arrivals)}
    return {
        "lease_s": lease,
        "trials": runs,
        "printed_once": all(printed.get(f"failover-{n}") == 1 for n in range(trials)),
        "printed": printed,
    }


async def rehome(work: Path, pg: PostgresServer, count: int, sessions: int, trials: int) -> dict[str, Any]:
    """A connector keeping ``sessions`` sessions among ``count`` replicas loses one of them (SIGKILL)."""
    url = pg.url(pg.create_database())
    _, connector_token = pg_tokens(url)
    relays = replicas(work / f"rehome-{count}-{sessions}", url, count, "--log-level", "info")
    times: list[float] = []
    services: list[Service] = []
    with stopping(services):
        for relay in relays:
            services.append(relay.start())
        for relay in relays:
            await relay.wait_ready()
        connector = connector_for(
            relays,
            connector_token,
            {},
            work / f"rehome-{count}-{sessions}-connector",
            "--sessions",
            str(sessions),
        )
        services.append(connector)
        connector.start()

        def holders(excluding: str = "") -> set[str]:
            found = query(url, "SELECT replica_id FROM connector_sessions WHERE connector_id = 'bench'")
            return {str(r[0]) for r in found} - {excluding}

        for trial in range(trials):
            await until(lambda: len(holders()) == sessions)
            lost = sorted(holders())[0]
            victim = holding(relays, lost)
            assert victim.service is not None
            victim.service.stop(signal.SIGKILL)
            killed = time.time()
            # The dead replica's rows stay until it is retired: count the live ones.
            back = await until(partial(lambda dead: len(holders(dead)) == sessions, lost))
            times.append(round(back - killed, 2))
            print(f"rehome {sessions} of {count}, trial {trial}: {times[-1]} s", flush=True)
            services.append(victim.start())
            await victim.wait_ready()
    return {"replicas": count, "sessions": sessions, "seconds": times}


# --- the run -----------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-bench-replicas-"))
    os.chmod(work, 0o755)
    results: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/bench_replicas.py", *sys.argv[1:]]),
        "machine": machine(),
    }
    pg = PostgresServer(work / "postgres", durable=True)
    (work / "postgres").mkdir(mode=0o755)
    pg.init()
    pg.start()
    try:
        async with trio.open_nursery() as nursery:
            sinks = [RawSink(f"p{n}", lambda a: None, digest=False) for n in range(args.printers)]
            for sink in sinks:
                await nursery.start(sink.serve)

            # Rounds interleave the cases: a quiet or busy minute of the machine falls on all of them.
            rounds: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.rounds):
                for name in (c for c in ("sqlite", "pg1", "pg2", "cups") if c in args.cases):
                    rounds.setdefault(name, []).append(await throughput_case(name, work, pg, sinks, args))
            for name, runs in rounds.items():
                by_rate = sorted(runs, key=lambda r: float(r["saturated"]["jobs_per_s"]))
                results[name] = by_rate[len(by_rate) // 2] | {
                    "rounds_jobs_per_s": [r["saturated"]["jobs_per_s"] for r in runs]
                }
            if "sqlite" in rounds:
                results["ratios_to_sqlite_by_round"] = {
                    name: [
                        round(r["saturated"]["jobs_per_s"] / base["saturated"]["jobs_per_s"], 2)
                        for r, base in zip(runs, rounds["sqlite"], strict=True)
                    ]
                    for name, runs in rounds.items()
                    if name != "sqlite"
                }
            nursery.cancel_scope.cancel()
        if "failover" in args.cases:
            results["failover"] = [
                await failover(work, pg, lease, args.failover_trials) for lease in (15.0, args.short_lease)
            ]
        if "rehome" in args.cases:
            results["rehome"] = [
                await rehome(work, pg, 3, 2, args.rehome_trials),
                await rehome(work, pg, 2, 1, args.rehome_trials),
            ]
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["ratio_to_sqlite"] = {
        name: sorted(ratios)[len(ratios) // 2]
        for name, ratios in results.get("ratios_to_sqlite_by_round", {}).items()
    }  # the median round's
    return results


async def throughput_case(
    name: str, work: Path, pg: PostgresServer, sinks: list[RawSink], args: argparse.Namespace
) -> dict[str, Any]:
    """One round of one throughput case, on fresh processes (and a fresh database)."""
    round_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    os.chmod(round_dir, 0o755)  # cupsd's and PostgreSQL's own users read below it
    if name == "cups":
        return await cups_case(round_dir, sinks, args)
    if name == "sqlite":
        tokens = create_tokens(round_dir / "relay-0", ["bench"])
        relay = Relay(round_dir / "relay-0", round_dir / "relay.log")
        return await relay_case(
            name, round_dir, [relay], tokens.api, tokens.connectors["bench"], sinks, args, None
        )
    count = int(name.removeprefix("pg"))
    url = pg.url(pg.create_database())
    api, connector_token = pg_tokens(url)
    return await relay_case(
        name, round_dir, replicas(round_dir, url, count), api, connector_token, sinks, args, pg, url
    )


async def cups_case(work: Path, sinks: list[RawSink], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    root = work / "cups"
    root.mkdir()
    queues = {f"q{n}": s.port for n, s in enumerate(sinks)}
    cupsd = start_cupsd(root, port, queues)
    try:
        await wait_listening(port, cupsd)
        await trio.to_thread.run_sync(add_queues, port, queues)
        monitor = Monitor({"cupsd": cupsd.pid})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            result = await throughput(
                "cups", cups_submitter(port, list(queues)), [port], sinks, monitor,
                argparse.Namespace(**{**vars(args), "paced_rate": args.cups_paced_rate}),
            )  # fmt: skip
            nursery.cancel_scope.cancel()
    finally:
        cupsd.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--printers", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--paced-rate", type=float, default=100.0, help="jobs/s of the latency run")
    parser.add_argument("--cups-paced-rate", type=float, default=50.0)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput cases")
    parser.add_argument("--short-lease", type=float, default=5.0, help="the failover's second lease, s")
    parser.add_argument("--failover-trials", type=int, default=3)
    parser.add_argument("--rehome-trials", type=int, default=3)
    parser.add_argument(
        "--cases", type=lambda text: set(text.split(",")), default=set(CASES),
        help=f"comma-separated, of {','.join(CASES)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.cases - set(CASES):
        parser.error(f"unknown cases {sorted(args.cases - set(CASES))}; known: {','.join(CASES)}")
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "replicas.json", results)
    print(f"\n$ {results['command']}")
    for name in (c for c in ("sqlite", "pg1", "pg2", "cups") if c in results):
        sat, paced = results[name]["saturated"], results[name]["paced"]
        cpu = ", ".join(f"{p} {ms} ms" for p, ms in results[name]["cpu_ms_per_job"].items())
        print(
            f"{name}: {sat['jobs']} x {args.size} B: {sat['jobs_per_s']} jobs/s "
            f"(failures {sat['failures']}); "
            f"paced {paced['target_jobs_per_s']}/s: p50 {paced['latency_ms']['p50']} ms, "
            f"p99 {paced['latency_ms']['p99']} ms; CPU per job: {cpu}"
        )
    print(f"jobs/s against the SQLite relay (median of the rounds): {results['ratio_to_sqlite']}")
    for name, ratios in results.get("ratios_to_sqlite_by_round", {}).items():
        print(f"  {name} / sqlite by round: {ratios}")
    for name in (c for c in ("pg1", "pg2") if c in results):
        print(f"{name}: PostgreSQL bytes per job: {results[name]['postgres_bytes_per_job']}")
    for run in results.get("failover", []):
        print(f"failover, lease {run['lease_s']:g} s: {run['trials']}; printed once: {run['printed_once']}")
    for run in results.get("rehome", []):
        print(f"re-home, {run['sessions']} session(s) among {run['replicas']} replicas: {run['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
