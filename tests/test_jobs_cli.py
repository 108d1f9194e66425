"""``printrelay jobs ...`` and ``submit``'s print options against a real relay, connector and RAW printer:
what a script or a person at a terminal sees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from fixtures_printers import IppEvePrinter, RawSink
from fixtures_processes import printrelay
from fixtures_relay import RelayStack


async def cli(stack: RelayStack, *args: str, check: bool = True) -> Any:
    where = ("--relay", stack.api_url, "--token", stack.api_token)
    return await trio.to_thread.run_sync(lambda: printrelay(*args, *where, check=check))


async def test_jobs_list_show_release_watch_cancel(
    relay_stack: RelayStack, raw_sink: RawSink, ippeveprinter: IppEvePrinter, tmp_path: Path
) -> None:
    stack = relay_stack
    await stack.start_connector({"label": raw_sink.uri, "eve": ippeveprinter.uri})
    document = tmp_path / "label.txt"
    document.write_bytes(b"two-sided, held, then released\n")
    # a RAW printer takes no options: the relay names the one it cannot honour
    raw = await cli(stack, "submit", "--printer", "label", "--sides", "two-sided-long-edge", str(document),
                    check=False)  # fmt: skip
    assert raw.returncode == 1 and "does not support the option sides" in raw.stderr
    submitted = await cli(stack, "submit", "--printer", "eve", "--hold", "--sides", "two-sided-long-edge",
                          "--format", "text/plain", str(document))  # fmt: skip
    job_id = submitted.stdout.strip()
    other = (await cli(stack, "submit", "--printer", "label", "--hold", str(document))).stdout.strip()

    table = (await cli(stack, "jobs", "list")).stdout.splitlines()
    assert table[0].split()[:5] == ["JOB", "STATE", "PRINTER", "USER", "CREATED"]
    assert [line.split()[0] for line in table[1:]] == [other, job_id]  # newest first
    listed = json.loads(
        (await cli(stack, "jobs", "list", "--json", "--state", "held", "--limit", "1")).stdout
    )
    assert [j["id"] for j in listed] == [other]  # a page of one
    everything = json.loads((await cli(stack, "jobs", "list", "--json", "--all")).stdout)
    assert {j["id"] for j in everything} == {job_id, other}

    shown = json.loads((await cli(stack, "jobs", "show", job_id, "--json")).stdout)
    assert shown["options"] == {"sides": "two-sided-long-edge"}
    assert [e["state"] for e in shown["events"]] == ["held"]
    text = (await cli(stack, "jobs", "show", job_id)).stdout
    assert f"id:            {job_id}" in text and "history:" in text

    released = await cli(stack, "jobs", "release", job_id)
    assert released.stdout.strip() == f"job {job_id} released: queued"
    watched = await cli(stack, "jobs", "watch", job_id)
    states = [line.split()[1] for line in watched.stdout.splitlines()]
    assert states[0] == "held" and states[-1] == "completed" and watched.returncode == 0

    canceled = json.loads((await cli(stack, "jobs", "cancel", other, "--json")).stdout)
    assert canceled["state"] == "canceled"
    again = await cli(stack, "jobs", "cancel", other, check=False)
    assert again.returncode == 1 and again.stderr.strip() == f"printrelay: job {other} is already canceled"
    missing = await cli(stack, "jobs", "show", "nope", check=False)
    assert missing.returncode == 1 and "job nope not found" in missing.stderr
    bad = await cli(stack, "submit", "--printer", "eve", "--sides", "sideways", str(document), check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr  # argparse refuses before the relay
