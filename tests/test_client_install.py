"""``printrelay client add-printer`` against a private cupsd: one command makes a queue with the printer's
own options, signed in as a person whose token (not password) the queue keeps; ``lp`` prints through it to
an ippeveprinter behind a connector. Mistakes are one line each; asked for, the password is not echoed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from fixtures_peers import Cupsd
from fixtures_printers import IppEvePrinterFactory, free_port
from fixtures_relay import RelayStack
from test_ipp_conformance import pdf
from test_ipp_cups import COLOUR_DUPLEX, lp, queue_options
from test_users import ADA, ANN, PASSWORD, as_user, make_users

ADD = [sys.executable, "-m", "printrelay.cli", "client", "add-printer"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PRINTRELAY_RELAY_URL", "PRINTRELAY_USER")}


def add_printer(
    cupsd: Cupsd, *args: str, password: str | None = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """The command, with lpadmin talking to the private cupsd (CUPS_SERVER)."""
    return subprocess.run(
        [*ADD, *args, *(["--password-stdin"] if password is not None else [])],
        input=f"{password}\n" if password is not None else None, capture_output=True, text=True,
        timeout=120, env={**CLEAN_ENV, "CUPS_SERVER": cupsd.server},
    )  # fmt: skip


def queue_exists(cupsd: Cupsd, queue: str) -> bool:
    listed = subprocess.run(["lpstat", "-h", cupsd.server, "-p", queue], capture_output=True, timeout=30)
    return listed.returncode == 0


async def test_add_printer_makes_a_queue_with_the_printers_options_that_prints_as_the_person(
    relay_stack: RelayStack, ippeveprinter_factory: IppEvePrinterFactory, cupsd: Cupsd, tmp_path: Path
) -> None:
    stack = relay_stack
    ids = await make_users(stack)
    printer = ippeveprinter_factory("office", extra_args=COLOUR_DUPLEX)
    await stack.start_connector({"eve": printer.uri})
    added = await trio.to_thread.run_sync(
        lambda: add_printer(
            cupsd, "--relay", stack.api_url, "--printer", "eve", "--queue", "office", "--user", ANN
        )
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added queue office: printer eve (") and f" as {ANN}; " in added.stdout
    assert added.stdout.endswith("print with: lp -d office FILE\n"), added.stdout
    options = await trio.to_thread.run_sync(queue_options, cupsd, "office")
    assert {"DuplexNoTumble", "DuplexTumble"} <= set(options["Duplex"]), options
    assert {"A4", "Letter"} <= set(options["PageSize"]) and "RGB" in options["ColorModel"], options

    # The queue keeps a token of Ann's own: a new password does not stop it printing.
    async with as_user(stack, ANN) as ann:
        (token,) = (await ann.get("/v1/me/tokens")).json()["tokens"]
    assert token["label"].startswith("CUPS queue office on "), token
    async with as_user(stack, ADA) as ada:
        changed = await ada.post(f"/v1/users/{ids[ANN]}", json={"password": "a different password"})
        assert changed.status_code == 200, changed.text
    document = tmp_path / "letter.pdf"
    document.write_bytes(pdf(612, 792))
    await trio.to_thread.run_sync(
        lambda: lp(cupsd, "office", document, "-t", "from-office", "-o", "sides=two-sided-short-edge")
    )
    await printer.wait_for_documents(1, within=60)
    async with as_user(stack, ANN, "a different password") as ann:
        (job,) = (await ann.get("/v1/jobs")).json()["jobs"]
    job = await stack.wait_job(job["id"])
    assert job["state"] == "completed" and job["user"] == ANN and job["title"] == "from-office", job
    assert job["options"]["sides"] == "two-sided-short-edge", job


async def test_add_printer_says_what_is_wrong_in_one_line(
    relay_stack: RelayStack, ippeveprinter_factory: IppEvePrinterFactory, cupsd: Cupsd
) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter_factory().uri})
    relay = ("--relay", stack.api_url, "--user", ANN)
    nowhere = f"http://127.0.0.1:{free_port()}"
    cases = [
        ((*relay, "--printer", "eve"), "wrong", f"wrong email or password for {ANN} at {stack.api_url}"),
        ((*relay, "--printer", "nope"), PASSWORD, f"printer nope not found at {stack.api_url}"),
        (
            ("--relay", nowhere, "--user", ANN, "--printer", "eve"),
            PASSWORD,
            f"relay unreachable at {nowhere}: ",
        ),
        (("--printer", "eve", "--user", ANN), PASSWORD, "the relay's URL is required: --relay https://"),
        ((*relay, "--printer", "eve", "--queue", "a b"), PASSWORD, "'a b' cannot be a queue name"),
    ]
    for args, password, message in cases:
        result = await trio.to_thread.run_sync(partial(add_printer, cupsd, *args, password=password))
        assert result.returncode == 1, result
        assert result.stderr.startswith(f"printrelay: {message}") and result.stderr.count("\n") == 1, result
        assert not queue_exists(cupsd, "eve"), result
    async with as_user(stack, ANN) as ann:
        assert (await ann.get("/v1/me/tokens")).json()["tokens"] == []  # nothing made for a queue not added

    await trio.to_thread.run_sync(lambda: cupsd.add_queue("taken", "ipp://127.0.0.1:9/ipp/print"))
    taken = await trio.to_thread.run_sync(
        lambda: add_printer(cupsd, *relay, "--printer", "eve", "--queue", "taken")
    )
    assert taken.returncode == 1
    assert taken.stderr == (
        "printrelay: a queue named taken exists: choose another --queue, or remove it (lpadmin -x taken)\n"
    )


async def test_add_printer_asks_for_the_password_without_echoing_it(
    relay_stack: RelayStack, ippeveprinter_factory: IppEvePrinterFactory, cupsd: Cupsd
) -> None:
    if shutil.which("script") is None:
        pytest.fail("script is not installed (Debian package bsdutils)")
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter_factory().uri})
    command = shlex.join([*ADD, "--relay", stack.api_url, "--printer", "eve", "--user", ANN])
    # script(1) runs the command on a terminal of its own, which getpass needs; what we write is typed there
    process = await trio.lowlevel.open_process(
        ["script", "-q", "-e", "-c", command, "/dev/null"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**CLEAN_ENV, "CUPS_SERVER": cupsd.server, "SHELL": "/bin/sh"},
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    seen = b""
    prompt = f"Password for {ANN} at {stack.api_url.removeprefix('http://')}: ".encode()
    try:
        with trio.fail_after(60):
            while prompt not in seen:
                chunk = await process.stdout.receive_some()
                assert chunk, seen
                seen += chunk
            await process.stdin.send_all(f"{PASSWORD}\n".encode())
            while chunk := await process.stdout.receive_some():
                seen += chunk
            assert await process.wait() == 0, seen
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await process.wait()
    output = seen.decode()
    assert PASSWORD not in output, output
    assert "added queue eve: printer eve" in output, output
    assert queue_options(cupsd, "eve")["Duplex"], output
