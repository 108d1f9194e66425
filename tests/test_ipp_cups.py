"""A real CUPS prints to the relay as to any IPP printer: a private cupsd makes a queue with
``lpadmin -m everywhere`` whose device URI carries a person's email and password (or a tenant and an API
token); the queue gets the printer's own options (CUPS makes its PPD from the relay's answer: duplex,
media, colour), and ``lp`` prints through it to an ippeveprinter behind a connector.

CUPS's scheduler asks for the printer's attributes with the credentials in printer-uri rather than in an
Authorization header, and quietly makes a queue without options when answered 401 (relay/api/ipp.py,
``uri_credentials``).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import trio
from fixtures_peers import Cupsd
from fixtures_printers import IppEvePrinterFactory
from fixtures_relay import RelayStack
from test_ipp_conformance import pdf
from test_users import ANN, PASSWORD, as_user, make_users

#: ippeveprinter prints in colour when given a colour speed (-s ppm,color-ppm); -2: two-sided
COLOUR_DUPLEX = ("-s", "10,5")


def wait_for_ppd(cupsd: Cupsd, queue: str, within: float = 30.0) -> None:
    """CUPS makes an "everywhere" queue's PPD in a thread after lpadmin returns: wait until it says how
    that went (its error_log is the only place it does)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        log = cupsd.log()
        if f'Printer "{queue}" is now available.' in log:
            return
        if f"{queue}: PPD creation failed" in log:
            raise AssertionError(f"CUPS made no PPD for {queue}:\n{log}")
        time.sleep(0.05)  # polling an external process: there is no event to wait on
    raise AssertionError(f"CUPS did not finish the PPD of {queue} within {within} s:\n{cupsd.log()}")


def queue_options(cupsd: Cupsd, queue: str) -> dict[str, list[str]]:
    """The queue's PPD options as ``lpoptions -l`` lists them: option keyword -> its choices."""
    listed = subprocess.run(
        ["lpoptions", "-h", cupsd.server, "-p", queue, "-l"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    options = {}
    for line in listed.stdout.splitlines():
        name, _, choices = line.partition(":")
        options[name.split("/")[0]] = [choice.lstrip("*") for choice in choices.split()]
    return options


def lp(cupsd: Cupsd, queue: str, document: Path, *options: str) -> None:
    result = subprocess.run(
        ["lp", "-h", cupsd.server, "-d", queue, *options, str(document)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("who", ["person", "api-token"])
async def test_lpadmin_everywhere_makes_a_queue_with_the_printers_options_and_lp_prints_through_it(
    relay_stack: RelayStack,
    ippeveprinter_factory: IppEvePrinterFactory,
    cupsd: Cupsd,
    tmp_path: Path,
    who: str,
) -> None:
    printer = ippeveprinter_factory("colour-duplex", extra_args=COLOUR_DUPLEX)
    await make_users(relay_stack)
    await relay_stack.start_connector({"eve": printer.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    credentials = (
        f"{quote(ANN, safe='')}:{quote(PASSWORD, safe='')}"
        if who == "person"
        else f"acme:{relay_stack.api_token}"
    )
    device = f"ipp://{credentials}@127.0.0.1:{port}/ipp/print/eve"
    await trio.to_thread.run_sync(lambda: cupsd.add_queue("relay", device, model="everywhere"))
    await trio.to_thread.run_sync(wait_for_ppd, cupsd, "relay")

    options = await trio.to_thread.run_sync(queue_options, cupsd, "relay")
    assert {"DuplexNoTumble", "DuplexTumble"} <= set(options.get("Duplex", [])), (options, cupsd.log())
    assert {"A4", "Letter"} <= set(options["PageSize"]), options
    assert "RGB" in options["ColorModel"], options

    document = tmp_path / "a4.pdf"
    document.write_bytes(pdf(595, 842))
    await trio.to_thread.run_sync(
        lambda: lp(
            cupsd, "relay", document, "-t", "two-sided", "-o", "sides=two-sided-long-edge", "-o", "media=A4"
        )
    )
    # -o raw: CUPS hands the file on unfiltered, so the printer gets exactly these bytes
    await trio.to_thread.run_sync(lambda: lp(cupsd, "relay", document, "-t", "raw", "-o", "raw"))

    arrived = await printer.wait_for_documents(2, within=60)
    assert arrived[0].read_bytes().startswith(b"%PDF"), arrived  # what CUPS's filters made of it
    assert hashlib.sha256(arrived[1].read_bytes()).digest() == hashlib.sha256(document.read_bytes()).digest()
    async with relay_stack.client() as rest:
        jobs = (await rest.get("/v1/jobs")).json()["jobs"]
    by_title = {job["title"]: job for job in jobs}
    assert set(by_title) >= {"two-sided", "raw"}, jobs
    for job in by_title.values():
        assert (await relay_stack.wait_job(job["id"]))["state"] == "completed", job
    sided = by_title["two-sided"]
    assert sided["options"].get("sides") == "two-sided-long-edge", sided
    assert sided["document_format"] == "application/pdf", sided
    # a person owns the jobs (CUPS's requesting-user-name, the local user, does not decide);
    # with an API token, requesting-user-name is the job's user
    assert sided["user"] == (ANN if who == "person" else "root"), sided
    if who == "person":
        async with as_user(relay_stack, ANN) as ann:
            assert {job["id"] for job in (await ann.get("/v1/jobs")).json()["jobs"]} == {
                job["id"] for job in jobs
            }
