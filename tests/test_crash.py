"""Crash safety with real processes: the relay is SIGKILLed at random moments and restarted while 200
jobs are submitted and delivered, and the connector is SIGKILLed and restarted too. At the end the printer
has received every accepted job exactly once (count and checksum of each)."""

from __future__ import annotations

import hashlib
import os
import random
import signal

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinter
from fixtures_processes import ProcessStack, Service

# Above the 120 s default: the inner waits (up to 240 s) must fire first, with their log dumps.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

JOBS = 200


async def submit_until_accepted(stack: ProcessStack, key: str, body: bytes, printer: str = "office") -> str:
    """Submit with an Idempotency-Key until the relay answers: a 201 lost in a crash is not a second job."""
    headers = {"authorization": f"Bearer {stack.api_token}", "content-type": "application/pdf",
               "idempotency-key": key}  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as client:
        with trio.fail_after(120):
            while True:
                try:
                    response = await client.post(
                        f"/v1/printers/{printer}/jobs", content=body, headers=headers
                    )
                except httpx.TransportError:
                    await trio.sleep(0.1)  # the relay is down: try again, as a client would
                    continue
                if response.status_code in (200, 201):
                    job_id: str = response.json()["id"]
                    return job_id
                # 5xx while the relay restarts, 429 when we are going faster than its rate limit
                assert response.status_code >= 500 or response.status_code == 429, response.text
                await trio.sleep(0.1)


async def crash_repeatedly(service: Service, count: int, earliest: float, latest: float) -> None:
    """SIGKILL and restart ``service`` ``count`` times at random moments, one crash after the other: two
    overlapping restarts would start a second process and leave the first one running."""
    started = trio.current_time()
    for moment in sorted(random.uniform(earliest, latest) for _ in range(count)):
        await trio.sleep_until(started + moment)  # at once if the previous crash ran late
        service.kill(signal.SIGKILL)
        await trio.sleep(random.uniform(0.1, 0.8))
        service.start()


async def test_every_accepted_job_is_printed_exactly_once_across_crashes(
    process_stack: ProcessStack, ippeveprinter: IppEvePrinter
) -> None:
    stack = process_stack
    relay = stack.start_relay()
    await stack.wait_ready()
    connector = stack.start_connector({"office": ippeveprinter.uri})
    await stack.wait_printers_online("office")
    bodies = [b"%PDF-1.4\n" + os.urandom(random.randint(500, 60_000)) for _ in range(JOBS)]
    accepted: dict[str, bytes] = {}

    async with trio.open_nursery() as crashes:
        # Crashes at random moments while jobs are being submitted and delivered.
        crashes.start_soon(crash_repeatedly, relay, 4, 0.5, 12)
        crashes.start_soon(crash_repeatedly, connector, 2, 1, 12)
        limiter = trio.CapacityLimiter(8)
        async with trio.open_nursery() as submitters:
            for index, body in enumerate(bodies):

                async def one(index: int = index, body: bytes = body) -> None:
                    async with limiter:
                        accepted[await submit_until_accepted(stack, f"crash-{index}", body)] = body

                submitters.start_soon(one)
                await trio.sleep(0.03)
    assert len(accepted) == JOBS

    # Everything settles: all jobs complete, and the printer holds each document exactly once.
    await stack.wait_ready()
    async with stack.client() as client:
        with trio.fail_after(240):
            while True:
                jobs = (await client.get("/v1/jobs", params={"limit": 500})).json()["jobs"]
                states = {job["id"]: job["state"] for job in jobs}
                assert set(states) == set(accepted)
                bad = [job for job in jobs if job["state"] in ("failed", "canceled", "expired")]
                if bad:
                    print(stack.logs())
                    raise AssertionError([(j["id"], j["state"], j["attempts"], j["last_error"]) for j in bad])
                if all(state == "completed" for state in states.values()):
                    break
                await trio.sleep(0.5)
    printed = await ippeveprinter.wait_for_documents(JOBS, within=60)
    digests = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in printed)
    expected = sorted(hashlib.sha256(body).hexdigest() for body in accepted.values())
    duplicates = len(digests) - len(set(digests))
    assert duplicates == 0, f"{duplicates} documents printed twice"
    assert digests == expected
