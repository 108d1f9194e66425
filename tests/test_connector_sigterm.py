"""SIGTERM on a connector process whose tunnel died under a delivery: it drains and exits at once, not after
the drain grace (the stream of the dead session used to stay "unreported" forever)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from functools import partial

import pytest
import trio
from fixtures_processes import ProcessStack
from fixtures_relay import job_states

pytestmark = pytest.mark.e2e


class HoldingPrinter:
    """A RAW printer that takes a job to EOF, then keeps the connection open until ``release`` is set: the
    connector's delivery runs until then."""

    def __init__(self) -> None:
        self.port = 0
        self.took_it = trio.Event()
        self.release = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b"".join([chunk async for chunk in stream])
            if data:  # connections that send nothing are reachability probes
                self.took_it.set()
                await self.release.wait()


async def wait_for_state(stack: ProcessStack, job_id: str, state: str, times: int = 1) -> None:
    """Until the job's history holds ``state`` ``times`` times."""
    seen = 0
    async with stack.client() as client:
        with trio.fail_after(30):
            async for current in job_states(client, job_id):
                seen += current == state
                if seen == times:
                    return
    raise AssertionError(f"job {job_id} ended before reaching {state} {times} times")


async def test_sigterm_after_a_relay_crash_under_a_delivery_exits_at_once(
    process_stack: ProcessStack, nursery: trio.Nursery
) -> None:
    stack = process_stack
    printer = HoldingPrinter()
    listeners = await nursery.start(partial(trio.serve_tcp, printer.handle, 0, host="127.0.0.1"))
    printer.port = listeners[0].socket.getsockname()[1]
    relay = stack.start_relay()
    await stack.wait_ready()
    connector = stack.start_connector({"raw": f"socket://127.0.0.1:{printer.port}"})
    await stack.wait_printers_online("raw")
    async with stack.client() as client:
        response = await client.post("/v1/printers/raw/jobs", content=b"one page")
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
    with trio.fail_after(30):
        await printer.took_it.wait()
    await wait_for_state(stack, job_id, "printing")

    # The relay dies while the printer holds the job; the delivery goes on without its stream.
    relay.kill(signal.SIGKILL)
    relay.start()
    await stack.wait_ready()
    # Sent again on the connector's new session (so the old one is gone): the resend waits for the first
    # delivery, which then completes, and the relay hears it from the ledger.
    await wait_for_state(stack, job_id, "sending", times=2)
    printer.release.set()
    await wait_for_state(stack, job_id, "completed")

    assert connector.process is not None
    started = time.monotonic()
    connector.process.send_signal(signal.SIGTERM)
    try:
        # Nothing is in flight: well inside the drain grace (60 s); about a second, 15 s for a loaded machine.
        code = await trio.to_thread.run_sync(partial(connector.process.wait, timeout=15))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within 15 s of SIGTERM:\n{connector.log()}") from None
    took = time.monotonic() - started
    assert code == 0, connector.log()
    messages = [json.loads(line)["msg"] for line in connector.log().splitlines() if line.startswith("{")]
    assert any(m.startswith("stopping: taking no new jobs; 0 in flight, 0 final statuses") for m in messages)
    assert messages[-1] == "connector stopped", messages[-5:]
    print(f"the connector exited {took:.2f} s after SIGTERM")
