"""A real CUPS prints to the relay as to any IPP printer: a private cupsd, a queue made with
``lpadmin -m everywhere`` whose device URI carries the tenant and an API token, ``lp`` of a PDF.

CUPS's ipp backend answers the relay's 401 (``WWW-Authenticate: Basic``) with the URI's credentials.
CUPS's PPD generator for ``-m everywhere`` does not use them (cupsd logs "PPD creation failed"), so the
queue has no PPD and hands the PDF on unchanged: the bytes at the printer are the bytes given to lp.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import trio
from fixtures_peers import Cupsd
from fixtures_printers import IppEvePrinter
from fixtures_relay import RelayStack
from test_ipp_conformance import pdf


async def test_lp_through_cups_reaches_the_printer_behind_the_connector(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter, cupsd: Cupsd, tmp_path: Path
) -> None:
    await relay_stack.start_connector({"eve": ippeveprinter.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    device = f"ipp://acme:{relay_stack.api_token}@127.0.0.1:{port}/ipp/print/eve"
    await trio.to_thread.run_sync(lambda: cupsd.add_queue("relay", device, model="everywhere"))

    document = tmp_path / "letter.pdf"
    document.write_bytes(pdf(612, 792))
    result = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            ["lp", "-h", cupsd.server, "-d", "relay", "-t", "from-cups", str(document)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    )
    assert result.returncode == 0, result.stderr

    [arrived] = await ippeveprinter.wait_for_documents(1, within=40)
    assert hashlib.sha256(arrived.read_bytes()).digest() == hashlib.sha256(document.read_bytes()).digest()
    async with relay_stack.client() as rest:
        [job] = (await rest.get("/v1/jobs")).json()["jobs"]
    job = await relay_stack.wait_job(job["id"])
    assert job["state"] == "completed", job
    assert job["document_format"] == "application/pdf" and "from-cups" in job["title"], job
    assert job["user"] == "root", job  # CUPS's job owner, sent as requesting-user-name
