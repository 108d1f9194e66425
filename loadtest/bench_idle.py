"""Idle capacity: many connectors on one relay, what they cost at rest, and a relay restart.

    python loadtest/bench_idle.py --connectors 10000 --out bench-results

``--swarms`` swarm processes (``loadtest/swarm.py``: real Connectors, one RAW printer each, all on one
shared sink) connect ``--connectors`` connectors to one ``printrelay serve``. Then:

1. rest: relay RSS and CPU over ``--rest-seconds`` with every connector connected and nothing to do;
2. restart: ``--jobs`` jobs are submitted to random printers, the relay is stopped (SIGTERM) and started
   again on the same ports and data; measured is the time until every connector is connected and
   registered again (the relay lists all printers online). Every connector must still be running (none
   gave up) and every job must reach the sink exactly once.

The baseline is the same relay with no connectors (its RSS and CPU at rest).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.report import read_ndjson
from loadtest.sink import tagged
from loadtest.stack import Monitor, Relay, Service, create_tokens, machine, write_json

HERE = Path(__file__).resolve().parent


def swarm_status(paths: list[Path]) -> dict[str, int]:
    total = {"connected": 0, "started": 0, "exited": 0, "sessions_opened": 0, "arrivals": 0}
    for path in paths:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in total:
            total[key] += int(status[key])
    return total


async def wait_connected(
    paths: list[Path],
    swarms: list[Service],
    count: int,
    within: float,
    timeline: list[tuple[float, int]] | None = None,
    since: float | None = None,
) -> float:
    """Seconds until the swarms report ``count`` connected connectors (their status files); ``timeline``
    gets (seconds since ``since``, connected) at every change."""
    started = time.monotonic()
    since = started if since is None else since
    with trio.fail_after(within):
        while True:
            dead = [s for s in swarms if not s.running()]
            if dead:
                raise RuntimeError(f"swarm exited:\n{dead[0].tail()}")
            connected = swarm_status(paths)["connected"]
            if timeline is not None and (not timeline or timeline[-1][1] != connected):
                timeline.append((round(time.monotonic() - since, 1), connected))
            if connected >= count:
                return time.monotonic() - started
            await trio.sleep(0.2)


def swarms_cpu(monitor: Monitor, count: int, since: float) -> float:
    """CPU of all swarm processes together since ``since`` (% of one core)."""
    return round(sum(monitor.summary(f"swarm-{i}", since)["cpu_percent"] for i in range(count)), 1)


def reached(timeline: list[tuple[float, int]], count: int, share: float) -> float | None:
    """When the timeline first had ``share`` of ``count`` connected again, counted from its lowest point:
    before it, connectors that have not yet noticed the restart still count as connected."""
    if not timeline:
        return None
    trough = min(range(len(timeline)), key=lambda index: timeline[index][1])
    return next((t for t, n in timeline[trough:] if n >= share * count), None)


async def online_count(client: httpx.AsyncClient) -> int:
    response = await client.get("/v1/printers", timeout=60)
    return sum(1 for p in response.json()["printers"] if p["online"])


async def wait_online(client: httpx.AsyncClient, count: int, within: float) -> float:
    started = time.monotonic()
    with trio.fail_after(within):
        while True:
            try:
                if await online_count(client) >= count:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            await trio.sleep(1.0)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-bench-idle-"))
    results: dict[str, Any] = {
        "command": shlex.join(["python", "loadtest/bench_idle.py", *sys.argv[1:]]),
        "machine": machine(),
        "connectors": args.connectors,
    }
    ids = [f"i{n:05d}" for n in range(args.connectors)]
    tokens = create_tokens(work / "relay-data", ids)
    relay = Relay(work / "relay-data", work / "relay.log")
    swarms: list[Service] = []
    status_paths: list[Path] = []
    arrivals = work / "arrivals.ndjson"
    try:
        relay.start()
        await relay.wait_ready()
        assert relay.service is not None
        monitor = Monitor({"relay": relay.service.pid}, interval=1.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await trio.sleep(args.baseline_seconds)
            results["baseline_no_connectors"] = monitor.summary("relay")
            for index in range(args.swarms):
                part = dict(list(tokens.connectors.items())[index :: args.swarms])
                (work / f"tokens-{index}.json").write_text(json.dumps(part))
                status_paths.append(work / f"swarm-{index}.json")
                swarm = Service(
                    f"swarm {index}",
                    [sys.executable, str(HERE / "swarm.py"), "--relay", relay.tunnel_url,
                     "--connectors", str(work / f"tokens-{index}.json"), "--shared-sink", "--no-digest",
                     "--start-spread", str(args.ramp_seconds), "--state-dir", str(work / f"swarm-{index}"),
                     "--arrivals", str(arrivals), "--status", str(status_paths[-1])],
                    work / f"swarm-{index}.log",
                )  # fmt: skip
                swarm.start()
                swarms.append(swarm)
                monitor.pids[f"swarm-{index}"] = swarm.pid
            results["connect_seconds"] = round(
                await wait_connected(
                    status_paths, swarms, args.connectors, args.ramp_seconds + args.connect_limit
                ),
                1,
            )
            async with httpx.AsyncClient(
                base_url=relay.api_url, headers={"authorization": f"Bearer {tokens.api}"}, timeout=60
            ) as client:
                results["registered_seconds"] = round(await wait_online(client, args.connectors, 300), 1)
                rest_start = time.time()
                await trio.sleep(args.rest_seconds)
                results["rest"] = monitor.summary("relay", rest_start)
                base_rss = results["baseline_no_connectors"]["end_rss_mib"]
                results["rss_per_connector_kib"] = round(
                    (results["rest"]["end_rss_mib"] - base_rss) * 1024 / args.connectors, 1
                )
                results["rest_swarms_cpu_percent"] = swarms_cpu(monitor, len(swarms), rest_start)
                print(f"at rest: {results['rest']}", flush=True)

                tags = []
                printers = [f"{c}-p0" for c in ids]
                for _ in range(args.jobs):
                    tag = f"{random.getrandbits(64):016x}"
                    response = await client.post(
                        f"/v1/printers/{random.choice(printers)}/jobs", content=tagged(tag, b"x" * 4096)
                    )
                    response.raise_for_status()
                    tags.append(tag)
                relay.stop()
                restarted = time.monotonic()
                relay.start()
                await relay.wait_ready()
                results["relay_back_seconds"] = round(time.monotonic() - restarted, 1)
                monitor.pids["relay"] = relay.service.pid
                storm_start = time.time()
                # The swarms see the drop; wait until they notice before waiting for "all connected".
                with trio.move_on_after(30):
                    while True:
                        if swarm_status(status_paths)["connected"] < args.connectors:
                            break
                        await trio.sleep(0.1)
                timeline: list[tuple[float, int]] = []
                await wait_connected(
                    status_paths, swarms, args.connectors, args.reconnect_limit, timeline, since=restarted
                )
                results["reconnect_seconds"] = round(time.monotonic() - restarted, 1)
                results["reconnect_timeline"] = timeline
                results["reconnect_reached"] = {
                    f"{int(share * 100)}%": reached(timeline, args.connectors, share)
                    for share in (0.25, 0.5, 0.9, 0.99)
                }
                await wait_online(client, args.connectors, args.reconnect_limit)
                results["reregistered_seconds"] = round(time.monotonic() - restarted, 1)
                results["storm"] = monitor.summary("relay", storm_start)
                results["storm_swarms_cpu_percent"] = swarms_cpu(monitor, len(swarms), storm_start)
                with trio.move_on_after(120):
                    while True:
                        seen = [a["tag"] for a in read_ndjson(arrivals)]
                        if set(tags) <= set(seen):
                            break
                        await trio.sleep(0.5)
                seen = [a["tag"] for a in read_ndjson(arrivals)]
                results["restart_jobs"] = {
                    "submitted": len(tags),
                    "lost": len(set(tags) - set(seen)),
                    "duplicates": sum(1 for t in set(tags) if seen.count(t) > 1),
                }
                after = time.time()
                await trio.sleep(min(10.0, args.rest_seconds))
                results["rest_after_restart"] = monitor.summary("relay", after)
                status = swarm_status(status_paths)
                results["gave_up"] = status["exited"]
                results["sessions_opened"] = status["sessions_opened"]
            nursery.cancel_scope.cancel()
    finally:
        for swarm in swarms:
            swarm.stop()
        relay.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connectors", type=int, default=10000)
    parser.add_argument("--swarms", type=int, default=4, help="swarm processes (each under its fd limit)")
    parser.add_argument("--ramp-seconds", type=float, default=60.0, help="spread the first connects")
    parser.add_argument("--rest-seconds", type=float, default=30.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=200, help="jobs in flight across the restart")
    parser.add_argument(
        "--connect-limit",
        type=float,
        default=300.0,
        help="give up on the first connects this long after the ramp",
    )
    parser.add_argument("--reconnect-limit", type=float, default=300.0, help="give up measuring after")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    results = trio.run(bench, args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "idle.json", results)
    print(f"\n$ {results['command']}")
    rest, base = results["rest"], results["baseline_no_connectors"]
    print(
        f"{args.connectors} idle connectors: connected in {results['connect_seconds']} s; relay at rest "
        f"{rest['end_rss_mib']} MiB RSS (baseline {base['end_rss_mib']} MiB; "
        f"{results['rss_per_connector_kib']} KiB per connector), {rest['cpu_percent']} % CPU "
        f"(baseline {base['cpu_percent']} %)"
    )
    print(
        f"relay restart: all reconnected in {results['reconnect_seconds']} s, all registered in "
        f"{results['reregistered_seconds']} s; gave up: {results['gave_up']}; jobs {results['restart_jobs']}"
    )
    shares = ", ".join(f"{k} at {v} s" for k, v in results["reconnect_reached"].items())
    print(f"  relay ready again {results['relay_back_seconds']} s after the stop; connected: {shares}")
    storm = results["storm"]["cpu_percent"]
    print(
        f"  CPU (% of one core) at rest: relay {rest['cpu_percent']}, swarms "
        f"{results['rest_swarms_cpu_percent']}; during the reconnect: relay {storm}, swarms "
        f"{results['storm_swarms_cpu_percent']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
