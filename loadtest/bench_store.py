"""The store's share of a small job, without HTTP or the tunnel: CPU per job of the relay's SQLite store.

    python loadtest/bench_store.py --jobs 3200

Each job makes the store calls the relay makes for it, in the same order and with the same concurrency as
``bench_small_jobs.py`` (32 submitters, 16 streams at a time): the submit's lookups and its insert (with a
4 KiB sealed payload and the quota check), the dispatcher's claim and payload read, then ``printing`` and
``completed``. Every write is fsynced (``synchronous=FULL``). The figure is this process's CPU (both the
event loop and the worker thread) per job; run it twice in a row, the machine's noise is larger than a
run's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.stack import own_cpu_seconds
from relay.jobs import Job, JobEvent, JobState, new_job_id
from relay.store import store_for
from relay.store.base import ConnectorRecord, Lease, Printer, Quota

SEALED_SIZE = 4096 + 104  # a 4 KiB document sealed: one record's header and tag


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="printrelay-bench-store-"))
    store: Any = store_for(work, "")
    await store.open()
    try:
        await store.replace_printers("acme", "c1", [Printer("acme", "p1", "c1", state="idle")])
        await store.upsert_connector(ConnectorRecord("acme", "c1", public_key=b"k" * 32, key_id="k1"))
        quota = Quota(max_bytes=2**62, max_jobs=2**31)
        lease = Lease("bench", 60.0)
        per_submitter = args.jobs // args.concurrency
        total = per_submitter * args.concurrency
        done = 0

        async def submitter() -> None:
            for _ in range(per_submitter):
                now = time.time()
                job = Job(
                    id=new_job_id(), tenant="acme", printer_id="p1", state=JobState.QUEUED, title="bench",
                    size=4096, sealed_size=SEALED_SIZE, sha256="0" * 64, wrapped_key=b"w" * 93, key_id="k1",
                    connector_id="c1", max_attempts=5, options={"sides": "one-sided"}, created_at=now,
                    updated_at=now, expires_at=now + 3600,
                )  # fmt: skip
                await store.submit_lookups("acme", "p1")
                await store.insert_job(
                    job, "accepted 4096 bytes", payload=os.urandom(SEALED_SIZE), quota=quota
                )
                wake.fire()

        async def deliver(job: Job) -> None:
            nonlocal done
            await store.get_payload(job.id)
            await store.transition(job.id, JobEvent.ACCEPTED, "printer accepted the job", time.time())
            await store.transition(job.id, JobEvent.COMPLETE, "printed", time.time())
            done += 1
            wake.fire()

        class Wake:
            def __init__(self) -> None:
                self.event = trio.Event()

            def fire(self) -> None:
                self.event.set()

            async def wait(self) -> None:
                await self.event.wait()
                self.event = trio.Event()

        wake = Wake()
        started_cpu, started = own_cpu_seconds(), time.perf_counter()
        with trio.fail_after(args.timeout):
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency):
                    nursery.start_soon(submitter)
                in_flight = 0
                while done < total:
                    free = args.streams - (in_flight - done)
                    jobs: list[Job] = []
                    if free > 0:
                        jobs, _ = await store.claim_jobs_and_next_due("acme", "c1", time.time(), free, lease)
                    for job in jobs:
                        in_flight += 1
                        nursery.start_soon(deliver, job)
                    if not jobs:
                        await wake.wait()  # a submit or a delivery ended
        cpu, elapsed = own_cpu_seconds() - started_cpu, time.perf_counter() - started
        return {
            "jobs": total,
            "jobs_per_s": round(total / elapsed, 1),
            "cpu_ms_per_job": round(1000 * cpu / total, 3),
            "write_batches": store.batches,
            "writes": store.batched_writes,
        }
    finally:
        await store.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3200)
    parser.add_argument("--concurrency", type=int, default=32, help="submitters")
    parser.add_argument("--streams", type=int, default=16, help="jobs delivered at once")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    result = trio.run(bench, args)
    print(
        f"store: {result['jobs']} jobs, {result['jobs_per_s']} jobs/s, {result['cpu_ms_per_job']} ms CPU "
        f"per job ({result['writes']} writes in {result['write_batches']} batches)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
