"""End to end with real processes: relay and connector as `printrelay` commands, real printers."""

from __future__ import annotations

import hashlib
import os
import random
import signal
from pathlib import Path

import pytest
import trio
from fixtures_printers import IppEvePrinter, RawSink
from fixtures_processes import ProcessStack, printrelay

# Above the 120 s default: the inner waits (up to 240 s) must fire first, with their log dumps.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PDF_HEADER = b"%PDF-1.4\n"  # ippeveprinter sniffs formats; a PDF header keeps random bytes acceptable


def pdf_like(size: int) -> bytes:
    return PDF_HEADER + os.urandom(max(0, size - len(PDF_HEADER)))


async def wait_completed(
    stack: ProcessStack, job_ids: list[str], within: float
) -> dict[str, dict[str, object]]:
    done: dict[str, dict[str, object]] = {}
    async with stack.client() as client:
        with trio.fail_after(within):
            while len(done) < len(job_ids):
                for job_id in job_ids:
                    if job_id in done:
                        continue
                    response = await client.get(f"/v1/jobs/{job_id}")
                    if response.status_code == 429:  # polling faster than the token's rate_limit
                        await trio.sleep(float(response.headers.get("retry-after", "0.1")) or 0.1)
                        continue
                    job = response.json()
                    if job["state"] in ("completed", "failed", "canceled", "expired"):
                        done[job_id] = job
                await trio.sleep(0.1)
    return done


async def test_submit_cli_prints_on_a_real_ipp_printer(
    process_stack: ProcessStack, ippeveprinter: IppEvePrinter, tmp_path: Path
) -> None:
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    stack.start_connector({"office": ippeveprinter.uri})
    await stack.wait_printers_online("office")
    document = tmp_path / "report.pdf"
    document.write_bytes(pdf_like(200_000))
    result = await trio.to_thread.run_sync(
        lambda: printrelay(
            "submit", "--relay", stack.api_url, "--token", stack.api_token, "--printer", "office", "--wait",
            str(document), check=False,
        )
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + stack.logs()
    assert len(result.stdout.strip()) > 10  # the job id
    [printed] = await ippeveprinter.wait_for_documents(1)
    assert printed.read_bytes() == document.read_bytes()


async def test_submit_cli_errors_are_one_line(process_stack: ProcessStack, tmp_path: Path) -> None:
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    document = tmp_path / "a.txt"
    document.write_text("hello")
    result = await trio.to_thread.run_sync(
        lambda: printrelay(
            "submit",
            "--relay",
            stack.api_url,
            "--token",
            stack.api_token,
            "--printer",
            "p9",
            str(document),
            check=False,
        )
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "printrelay: printer p9 not found"
    result = await trio.to_thread.run_sync(
        lambda: printrelay(
            "submit",
            "--relay",
            "http://127.0.0.1:9",
            "--token",
            "x",
            "--printer",
            "p",
            str(document),
            check=False,
        )
    )
    assert result.stderr.strip() == "printrelay: relay unreachable at http://127.0.0.1:9"


async def test_twenty_concurrent_jobs_up_to_20_mib_arrive_intact(
    process_stack: ProcessStack, ippeveprinter: IppEvePrinter
) -> None:
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    stack.start_connector({"office": ippeveprinter.uri})
    await stack.wait_printers_online("office")
    sizes = [1024, 20 * 1024 * 1024] + [random.randint(1024, 4 * 1024 * 1024) for _ in range(18)]
    bodies = [pdf_like(size) for size in sizes]
    ids: list[str] = []
    async with stack.client() as client, trio.open_nursery() as nursery:
        for body in bodies:

            async def submit(body: bytes = body) -> None:
                response = await client.post(
                    "/v1/printers/office/jobs", content=body, headers={"content-type": "application/pdf"}
                )
                assert response.status_code == 201, response.text
                ids.append(response.json()["id"])

            nursery.start_soon(submit)
    done = await wait_completed(stack, ids, within=180)
    assert all(job["state"] == "completed" for job in done.values()), done
    printed = await ippeveprinter.wait_for_documents(len(bodies))
    assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in printed) == sorted(
        hashlib.sha256(b).hexdigest() for b in bodies
    )


class SlowSink(RawSink):
    """A RAW printer that reads slowly, so jobs are still queued or in flight when the relay dies."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        await trio.sleep(0.2)
        await super()._handle(stream)


async def test_relay_killed_and_restarted_every_job_is_delivered_once(
    process_stack: ProcessStack, nursery: trio.Nursery, tmp_path: Path
) -> None:
    from functools import partial

    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()
    sink = SlowSink(sink_dir)
    listeners = await nursery.start(partial(trio.serve_tcp, sink._handle, 0, host="127.0.0.1"))
    sink.port = listeners[0].socket.getsockname()[1]

    stack = process_stack
    relay = stack.start_relay()
    await stack.wait_ready()
    stack.start_connector({"labels": sink.uri})
    await stack.wait_printers_online("labels")
    bodies = [os.urandom(random.randint(1000, 300_000)) for _ in range(12)]
    for i, b in enumerate(bodies):
        (tmp_path / f"body{i}").write_bytes(b)
    ids = []
    async with stack.client() as client:
        for body in bodies:
            response = await client.post("/v1/printers/labels/jobs", content=body)
            assert response.status_code == 201
            ids.append(response.json()["id"])
    relay.kill(signal.SIGKILL)  # jobs are queued and in flight
    assert len(sink.documents) < len(bodies)
    relay.start()
    await stack.wait_ready()
    done = await wait_completed(stack, ids, within=120)
    assert all(job["state"] == "completed" for job in done.values()), (done, stack.logs())
    await sink.wait_for(len(bodies), within=30)
    # Exactly once each: same multiset of checksums, no extra documents.
    expected = {hashlib.sha256(b).hexdigest(): len(b) for b in bodies}
    unexpected = [(d.size, d.sha256 in expected) for d in sink.documents if d.sha256 not in expected]
    assert sorted(d.sha256 for d in sink.documents) == sorted(expected), (
        unexpected,
        sorted(expected.values()),
    )
