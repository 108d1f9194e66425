"""Relay replicas on PostgreSQL with real processes: the database restarting under them, replicas killed and
drained while jobs stream, connectors holding sessions to several replicas. Every job that got a 201
prints exactly once."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpx
import psycopg
import pytest
import trio
from fixtures_postgres import PostgresServer
from fixtures_printers import RawSink, free_port
from fixtures_processes import ProcessStack, Service, printrelay
from test_crash_connector import RecordingPrinter

pytestmark = pytest.mark.e2e


async def submit(client: httpx.AsyncClient, printer: str, body: bytes) -> httpx.Response:
    return await client.post(f"/v1/printers/{printer}/jobs", content=body)


async def wait_all_completed(client: httpx.AsyncClient, ids: set[str], within: float = 120) -> None:
    with trio.fail_after(within):
        while True:
            jobs = (await client.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
            states = {job["id"]: job["state"] for job in jobs if job["id"] in ids}
            bad = {i: s for i, s in states.items() if s in ("failed", "canceled", "expired")}
            assert not bad, bad
            if len(states) == len(ids) and set(states.values()) == {"completed"}:
                return
            await trio.sleep(0.2)  # another process: polled


async def test_a_relay_rides_out_a_database_restart(
    pg_process_stack: ProcessStack, postgres_server: PostgresServer, raw_sink: RawSink
) -> None:
    stack = pg_process_stack
    # A job whose outcome the stopped database missed goes out again once its claim lapses: 6 s, not 15.
    stack.start_relay("--job-lease", "6s")
    await stack.wait_ready()
    stack.start_connector({"p": raw_sink.uri})
    await stack.wait_printers_online("p")
    bodies = {}
    async with stack.client() as client:
        for n in range(5):
            body = f"before {n} ".encode() + os.urandom(100_000)
            response = await submit(client, "p", body)
            assert response.status_code == 201, response.text
            bodies[response.json()["id"]] = body
        postgres_server.stop()
        try:
            answers: dict[str, httpx.Response] = {}

            async def ask(name: str, method: str, url: str, content: bytes | None = None) -> None:
                answers[name] = await client.request(method, url, content=content)

            # Each waits out the relay's wait for a database connection (5 s a store call): asked at once.
            async with trio.open_nursery() as asking:
                asking.start_soon(ask, "submit", "POST", "/v1/printers/p/jobs", b"while the database is down")
                asking.start_soon(ask, "readyz", "GET", "/readyz")
            refused = answers["submit"]
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            assert "database is unavailable" in refused.json()["error"]
            assert answers["readyz"].status_code == 503
        finally:
            postgres_server.start()
        with trio.fail_after(60):  # the relay comes back by itself: no restart
            while (await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110  (another process)
                await trio.sleep(0.2)
        for n in range(5):
            body = f"after {n} ".encode() + os.urandom(100_000)
            response = await submit(client, "p", body)
            assert response.status_code == 201, response.text
            bodies[response.json()["id"]] = body
        await wait_all_completed(client, set(bodies))
    printed = Counter(d.sha256 for d in await raw_sink.wait_for(len(bodies), within=60))
    assert printed == Counter(hashlib.sha256(b).hexdigest() for b in bodies.values())


class Replicas:
    """``count`` relay processes on one PostgreSQL, each on its own ports and data dir, one secret key."""

    def __init__(self, tmp_path: Path, url: str, count: int) -> None:
        self.url = url
        self.key = tmp_path / "secret.key"
        self.relays = []
        for n in range(count):
            http, tunnel = free_port(), free_port()
            service = Service(
                f"relay {n}",
                ["serve", "--listen", f"127.0.0.1:{http}", "--tunnel-listen", f"127.0.0.1:{tunnel}",
                 "--data-dir", str(tmp_path / f"relay-{n}"), "--database-url", url,
                 "--secret-key-file", str(self.key), "--job-lease", "6s", "--drain-grace", "20s"],
                tmp_path / f"relay-{n}.log",
            )  # fmt: skip
            self.relays.append((service, http, tunnel))

    def api(self, n: int) -> str:
        return f"http://127.0.0.1:{self.relays[n][1]}"

    def tunnel(self, n: int) -> str:
        return f"ws://127.0.0.1:{self.relays[n][2]}/v1/tunnel"

    def service(self, n: int) -> Service:
        return self.relays[n][0]

    async def wait_ready(self, n: int) -> None:
        last = "no answer"
        async with httpx.AsyncClient(timeout=2) as client:
            with trio.move_on_after(30):
                while True:
                    try:
                        response = await client.get(f"{self.api(n)}/readyz")
                    except httpx.TransportError as exc:
                        last = repr(exc)
                    else:
                        if response.status_code == 200:
                            return
                        last = f"{response.status_code} {response.text}"
                    await trio.sleep(0.05)  # another process: polled
        raise AssertionError(f"relay {n} not ready within 30 s ({last}):\n{self.service(n).log()[-4000:]}")

    def replica_id(self, n: int) -> str:
        """From the relay's "ready" line (the log is JSON, one object a line)."""
        for line in self.service(n).log().splitlines():
            if line.startswith("{") and "relay ready" in line:
                return str(json.loads(line)["replica"])
        raise AssertionError(f"relay {n} is not ready")

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{s.log()[-3000:]}" for s, _, _ in self.relays)

    def stop_all(self) -> None:
        for service, _, _ in self.relays:
            service.stop()


Faults = Callable[[Replicas, Callable[[int], Awaitable[None]]], Awaitable[None]]


async def print_through_faults(
    tmp_path: Path, postgres_url: str, nursery: trio.Nursery, count: int, faults: Faults, jobs: int = 90
) -> None:
    """``count`` replicas, one connector keeping sessions to two of them, at least ``jobs`` jobs submitted
    round robin while ``faults`` runs (given the replicas and a wait for a job streaming through replica n).
    Every job that got a 201 reaches the printer exactly once, whole."""
    printer = RecordingPrinter()  # about 8 MB/s, like a real one: jobs spend time streaming
    listeners = await nursery.start(partial(trio.serve_tcp, printer.handle, 0, host="127.0.0.1"))
    printer_uri = f"socket://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    replicas = Replicas(tmp_path, postgres_url, count)
    api_token = printrelay(
        "token", "create", "--database-url", postgres_url, "--tenant", "acme", "--kind", "api",
        "--scopes", "admin",
    ).stdout.strip()  # fmt: skip
    connector_token = printrelay(
        "token", "create", "--database-url", postgres_url, "--tenant", "acme", "--kind", "connector",
        "--connector", "site-1",
    ).stdout.strip()  # fmt: skip
    connector = Service(
        "connector",
        ["connector", *[a for n in range(count) for a in ("--relay", replicas.tunnel(n))], "--sessions", "2",
         "--state-dir", str(tmp_path / "connector"), "--printer", f"p={printer_uri}"],
        tmp_path / "connector.log", env={"PRINTRELAY_TOKEN": connector_token},
    )  # fmt: skip

    async def in_flight_on(n: int) -> None:
        replica = replicas.replica_id(n)

        def streaming() -> bool:
            with psycopg.connect(postgres_url) as db:
                found = db.execute(
                    "SELECT 1 FROM jobs WHERE lease_owner = %s AND state IN ('sending', 'printing')",
                    (replica,),
                ).fetchone()
                return found is not None

        with trio.fail_after(60):
            # In a thread: this process runs the printer too, which must keep reading meanwhile.
            while not await trio.to_thread.run_sync(streaming):  # noqa: ASYNC110  (another process)
                await trio.sleep(0.02)

    try:
        for n in range(count):
            replicas.service(n).start()
        for n in range(count):
            await replicas.wait_ready(n)
        connector.start()
        headers = {"authorization": f"Bearer {api_token}"}
        async with httpx.AsyncClient(base_url=replicas.api(0), headers=headers, timeout=10) as client:
            with trio.fail_after(30):
                while True:
                    printers = (await client.get(f"{replicas.api(0)}/v1/printers")).json()["printers"]
                    if printers and printers[0]["online"]:
                        break
                    await trio.sleep(0.1)  # another process: polled

            bodies: list[bytes] = []
            accepted: dict[str, bytes] = {}

            async def submit_somewhere(n: int, body: bytes) -> None:
                """Round robin over the replicas, the next one when a replica is down (one Idempotency-Key:
                a 201 lost with a dying replica is not a second job)."""
                with trio.fail_after(90):
                    for attempt in itertools.count():
                        api = replicas.api((n + attempt) % count)
                        try:
                            response = await client.post(
                                f"{api}/v1/printers/p/jobs",
                                content=body,
                                headers={"idempotency-key": f"k{n}"},
                            )
                        except httpx.TransportError:
                            continue
                        if response.status_code in (200, 201):
                            accepted[response.json()["id"]] = body
                            return
                        assert response.status_code in (429, 503), response.text
                        await trio.sleep(0.1)

            faults_done = trio.Event()

            async def run_faults() -> None:
                await faults(replicas, in_flight_on)
                faults_done.set()

            async with trio.open_nursery() as submitters:
                submitters.start_soon(run_faults)
                limiter = trio.CapacityLimiter(6)
                # At least ``jobs``, and on until the faults are done: they wait for jobs streaming through
                # a given replica, which a slow restart on a loaded machine must not leave without any.
                for n in itertools.count():
                    if n >= jobs and faults_done.is_set():
                        break
                    body = f"job {n:03d}\n".encode() + os.urandom(random.randint(1_000, 200_000))
                    bodies.append(body)

                    async def one(n: int = n, body: bytes = body) -> None:
                        async with limiter:
                            await submit_somewhere(n, body)

                    submitters.start_soon(one)
                    await trio.sleep(0.05)
            assert len(accepted) == len(bodies)
            for n in range(count):
                await replicas.wait_ready(n)
            try:
                await wait_all_completed(client, set(accepted), within=120)
            except BaseException:
                print(replicas.logs())
                print(connector.log()[-4000:])
                raise
    finally:
        connector.stop()
        replicas.stop_all()
    # Each job reached the printer once, whole: no fragments (a RAW job is received whole before it is
    # fed), no second copy.
    assert Counter(printer.received) == Counter(accepted.values())


async def drain(replicas: Replicas, n: int) -> None:
    """SIGTERM replica n and wait for it to exit (not Service.kill: its wait would block our printer)."""
    draining = replicas.service(n).process
    assert draining is not None
    draining.send_signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(draining.wait, 60) == 0


async def test_three_replicas_lose_one_and_drain_one_and_print_every_job_once(
    tmp_path: Path, postgres_url: str, nursery: trio.Nursery
) -> None:
    async def faults(replicas: Replicas, in_flight_on: Callable[[int], Awaitable[None]]) -> None:
        # SIGKILL a replica while it streams jobs: its leases lapse, its jobs go elsewhere.
        await in_flight_on(0)
        replicas.service(0).kill()
        # SIGTERM another while it streams: a drain (streams finish, the sessions move).
        await in_flight_on(1)
        await drain(replicas, 1)
        replicas.service(1).start()
        replicas.service(0).start()

    await print_through_faults(tmp_path, postgres_url, nursery, 3, faults)


async def test_a_rolling_restart_of_two_replicas_loses_and_duplicates_nothing(
    tmp_path: Path, postgres_url: str, nursery: trio.Nursery
) -> None:
    """An upgrade as Kubernetes or an operator does it: one replica at a time is stopped with SIGTERM while
    it streams jobs, its successor started and ready, then the next."""

    async def faults(replicas: Replicas, in_flight_on: Callable[[int], Awaitable[None]]) -> None:
        for n in (0, 1):
            await in_flight_on(n)
            await drain(replicas, n)
            replicas.service(n).start()
            await replicas.wait_ready(n)

    await print_through_faults(tmp_path, postgres_url, nursery, 2, faults)
