"""People over IPP: holding and releasing jobs (job-hold-until, Hold-Job, Release-Job), only by a job's
owner or a tenant admin, pull printers' jobs released over IPP; and credentials in printer-uri, which is
how CUPS's scheduler asks for a printer's attributes, without revealing any tenant's printers.

ipptool is the client (as Ann, Bob and Ada, the tenant admin), an ippeveprinter behind a connector the
printer, so a released job is seen to print."""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinter, run_ipptool
from fixtures_relay import RelayStack
from test_ipp_conformance import pdf
from test_ipp_endpoint import OP, PRINTER, offline_printer
from test_users import ADA, ANN, BOB, PASSWORD, as_user, make_users

from ipp import Message, Operation, Status, ValueTag, decode, encode, new_request

HEAD = """
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
"""


def job_test(name: str, operation: str, status: str, *lines: str, job: str = "$job") -> str:
    body = "\n".join(f"    {line}" for line in lines)
    head = f'    NAME "{name}"\n    OPERATION {operation}{HEAD}    ATTR integer job-id {job}\n'
    return f"{{\n{head}{body}\n    STATUS {status}\n}}\n"


def print_test(name: str, status: str, hold: str | None, *lines: str, fidelity: bool = False) -> str:
    template = f"    GROUP job-attributes-tag\n    ATTR keyword job-hold-until {hold}\n" if hold else ""
    body = "\n".join(f"    {line}" for line in lines)
    return (
        f'{{\n    NAME "{name}"\n    OPERATION Print-Job{HEAD}    ATTR name job-name "{name}"\n'
        f"    ATTR mimeMediaType document-format application/pdf\n"
        f"    ATTR boolean ipp-attribute-fidelity {'true' if fidelity else 'false'}\n"
        f"{template}    FILE document.pdf\n    STATUS {status}\n{body}\n}}\n"
    )


def person_uri(stack: RelayStack, email: str, printer: str = "eve") -> str:
    port = stack.api_url.rsplit(":", 1)[1]
    return f"ipp://{quote(email, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/ipp/print/{printer}"


async def run_as(
    stack: RelayStack, email: str, tests: str, workdir: Path, printer: str = "eve", **values: str
) -> str:
    """Run ipptool ``tests`` as ``email``; every test must pass. Returns the report."""
    path = workdir / f"{email}-{trio.current_time()}.test"
    await trio.Path(path).write_text(tests)
    code, report = await trio.to_thread.run_sync(
        partial(run_ipptool, person_uri(stack, email, printer), path, workdir, **values)
    )
    assert code == 0 and "[FAIL]" not in report, report
    return report


def job_id(report: str, test: str) -> str:
    """The job-id in the answer to ``test`` (ipptool -v shows each answer after its test's line)."""
    found = re.search(
        rf"^ {{4}}{re.escape(test)} +\[PASS\]$.*?job-id \(integer\) = (\d+)", report, re.M | re.S
    )
    assert found is not None, report
    return found.group(1)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    directory = tmp_path / "ipptool"
    directory.mkdir()
    (directory / "document.pdf").write_bytes(pdf(595, 842))
    return directory


HELD = ("EXPECT job-state WITH-VALUE 4", "EXPECT job-state-reasons WITH-VALUE job-hold-until-specified")
NOT_HELD = ("EXPECT job-state WITH-VALUE 3,5,6,9",)

ANN_PRINTS = "".join(
    [
        print_test("held", "successful-ok", "indefinite", *HELD),
        print_test(
            "evening", "successful-ok-ignored-or-substituted-attributes", "evening", *HELD,
            "EXPECT job-hold-until IN-GROUP unsupported-attributes-tag WITH-VALUE evening",
        ),
        print_test(
            "evening, fidelity", "client-error-attributes-or-values-not-supported", "evening", fidelity=True
        ),
        print_test("no-hold", "successful-ok", "no-hold", *NOT_HELD),
        """{
    NAME "the printer says what it holds"
    OPERATION Get-Printer-Attributes""" + HEAD + """    STATUS successful-ok
    EXPECT operations-supported WITH-VALUE 12
    EXPECT operations-supported WITH-VALUE 13
    EXPECT job-hold-until-default OF-TYPE keyword COUNT 1 WITH-VALUE no-hold
    EXPECT job-hold-until-supported OF-TYPE keyword COUNT 2 WITH-VALUE no-hold
    EXPECT job-hold-until-supported WITH-VALUE indefinite
    EXPECT job-creation-attributes-supported WITH-VALUE job-hold-until
}
""",
    ]
)  # fmt: skip

NOT_FOUND = "".join(
    job_test(f"{operation} of another's job", operation, "client-error-not-found")
    for operation in ("Get-Job-Attributes", "Hold-Job", "Release-Job", "Cancel-Job")
)

ANN_RELEASES = "".join(
    [
        job_test(
            "still held", "Get-Job-Attributes", "successful-ok", *HELD,
            "EXPECT job-hold-until OF-TYPE keyword WITH-VALUE indefinite",
        ),
        job_test("Release-Job", "Release-Job", "successful-ok"),
        job_test("released", "Get-Job-Attributes", "successful-ok", *NOT_HELD, "EXPECT !job-hold-until"),
        job_test("Release-Job of a job not held", "Release-Job", "client-error-not-possible"),
    ]
)  # fmt: skip


async def test_job_hold_until_and_release_job_by_the_owner_or_a_tenant_admin_only(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter, workdir: Path
) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter.uri})
    report = await run_as(stack, ANN, ANN_PRINTS, workdir)
    held, evening = job_id(report, "held"), job_id(report, "evening")
    (no_hold,) = await ippeveprinter.wait_for_documents(1)  # the no-hold job printed; the others wait
    assert no_hold.name.split("-", 1)[1].startswith("no-hold"), no_hold
    for job in (held, evening):
        await run_as(stack, BOB, NOT_FOUND, workdir, job=job)
    await run_as(stack, ANN, ANN_RELEASES, workdir, job=held)
    await run_as(
        stack,
        ADA,
        job_test("an admin releases Ann's job", "Release-Job", "successful-ok"),
        workdir,
        job=evening,
    )
    printed = await ippeveprinter.wait_for_documents(3)
    assert sorted(path.name.split("-", 1)[1].split(".")[0] for path in printed) == [
        "evening", "held", "no-hold",
    ]  # fmt: skip
    async with as_user(stack, ANN) as ann:
        jobs = (await ann.get("/v1/jobs")).json()["jobs"]
    assert len(jobs) == 3 and all(job["user"] == ANN for job in jobs), jobs
    for job in jobs:
        assert (await stack.wait_job(job["id"]))["state"] == "completed", job


HOLD_QUEUED = print_test("waits for its connector", "successful-ok", None, "EXPECT job-state WITH-VALUE 3")


def hold_tests(who: str) -> str:
    return "".join(
        [
            job_test(f"Hold-Job by {who}", "Hold-Job", "successful-ok"),
            job_test(f"held by {who}", "Get-Job-Attributes", "successful-ok", *HELD),
            job_test(f"Hold-Job of a held job by {who}", "Hold-Job", "successful-ok"),
            job_test(
                f"Hold-Job until evening by {who}", "Hold-Job",
                "successful-ok-ignored-or-substituted-attributes", "ATTR keyword job-hold-until evening",
                "EXPECT job-hold-until IN-GROUP unsupported-attributes-tag WITH-VALUE evening",
            ),
            job_test(f"Release-Job by {who}", "Release-Job", "successful-ok"),
            job_test(
                f"pending again, {who}", "Get-Job-Attributes", "successful-ok",
                "EXPECT job-state WITH-VALUE 3",
            ),
        ]
    )  # fmt: skip


async def test_hold_job_holds_a_pending_job_and_release_job_queues_it_again(
    relay_stack: RelayStack, workdir: Path
) -> None:
    stack = relay_stack
    await make_users(stack)
    await offline_printer(stack, "away")  # its connector is away: jobs stay pending
    report = await run_as(stack, ANN, HOLD_QUEUED, workdir, printer="away")
    job = job_id(report, "waits for its connector")
    await run_as(stack, ANN, hold_tests("Ann"), workdir, printer="away", job=job)
    await run_as(stack, BOB, NOT_FOUND, workdir, printer="away", job=job)
    await run_as(stack, ADA, hold_tests("Ada"), workdir, printer="away", job=job)
    async with stack.client() as app:
        (listed,) = (await app.get("/v1/jobs")).json()["jobs"]
        history = (await app.get(f"/v1/jobs/{listed['id']}/events")).json()["events"]
    assert [event["state"] for event in history] == ["queued", *["held", "queued"] * 2], history
    assert [event["message"] for event in history[1:3]] == [
        f"held by {ANN} (IPP Hold-Job)", f"released by {ANN} (IPP Release-Job)",
    ]  # fmt: skip
    # a job on its way cannot be held, nor one that is done
    await run_as(
        stack, ANN,
        job_test("Cancel-Job", "Cancel-Job", "successful-ok")
        + job_test("Hold-Job of a canceled job", "Hold-Job", "client-error-not-possible")
        + job_test("Release-Job of a canceled job", "Release-Job", "client-error-not-possible"),
        workdir, printer="away", job=job,
    )  # fmt: skip


CREATE_HELD = """{
    NAME "Create-Job held until released"
    OPERATION Create-Job""" + HEAD + """    ATTR name job-name created-held
    GROUP job-attributes-tag
    ATTR keyword job-hold-until indefinite
    STATUS successful-ok
    EXPECT job-id OF-TYPE integer DEFINE-VALUE created
}
""" + job_test(
    "Release-Job before its document", "Release-Job", "client-error-not-possible", job="$created"
) + job_test(
    "Send-Document, more to come", "Send-Document", "successful-ok",
    "ATTR boolean last-document false", "ATTR mimeMediaType document-format application/pdf",
    "FILE document.pdf", job="$created",
) + job_test("Close-Job", "Close-Job", "successful-ok", *HELD, job="$created") + job_test(
    "held after Close-Job", "Get-Job-Attributes", "successful-ok", *HELD, job="$created"
)  # fmt: skip


async def test_a_create_job_held_with_job_hold_until_stays_held_after_close_job(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter, workdir: Path
) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter.uri})
    report = await run_as(stack, ANN, CREATE_HELD, workdir)
    job = job_id(report, "Create-Job held until released")
    async with as_user(stack, ANN) as ann:
        (held,) = (await ann.get("/v1/jobs")).json()["jobs"]
    assert held["state"] == "held", held
    await run_as(stack, ANN, job_test("Release-Job", "Release-Job", "successful-ok"), workdir, job=job)
    (printed,) = await ippeveprinter.wait_for_documents(1)
    assert printed.read_bytes() == (workdir / "document.pdf").read_bytes()
    assert (await stack.wait_job(held["id"]))["state"] == "completed"


PULL = "".join(
    [
        """{
    NAME "a pull printer holds every job"
    OPERATION Get-Printer-Attributes""" + HEAD + """    STATUS successful-ok
    EXPECT job-hold-until-default OF-TYPE keyword COUNT 1 WITH-VALUE indefinite
    EXPECT job-hold-until-supported OF-TYPE keyword COUNT 1 WITH-VALUE indefinite
}
""",
        print_test("pulled", "successful-ok", None, *HELD),
        print_test(
            "no-hold at a pull printer", "successful-ok-ignored-or-substituted-attributes", "no-hold", *HELD,
            "EXPECT job-hold-until IN-GROUP unsupported-attributes-tag WITH-VALUE no-hold",
        ),
    ]
)  # fmt: skip


async def test_release_job_releases_a_pull_printers_job_to_its_printer(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter, workdir: Path
) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter.uri})
    assert await stack.relay.store.set_printer_pull("acme", "eve", True)
    report = await run_as(stack, ANN, PULL, workdir)
    job = job_id(report, "pulled")
    await run_as(stack, BOB, NOT_FOUND, workdir, job=job)
    await run_as(
        stack, ANN,
        job_test("Release-Job at the printer", "Release-Job", "successful-ok")
        + job_test("released to its printer", "Get-Job-Attributes", "successful-ok", *NOT_HELD),
        workdir, job=job,
    )  # fmt: skip
    (printed,) = await ippeveprinter.wait_for_documents(1)
    assert printed.name.split("-", 1)[1].startswith("pulled"), printed
    async with as_user(stack, ANN) as ann:
        jobs = {job["title"]: job for job in (await ann.get("/v1/jobs")).json()["jobs"]}
    assert (await stack.wait_job(jobs["pulled"]["id"]))["state"] == "completed"
    assert jobs["no-hold at a pull printer"]["state"] == "held", jobs


# --- credentials in printer-uri ------------------------------------------------------------------------


async def get_printer_attributes(
    stack: RelayStack, path: str, printer_uri: str, **headers: str
) -> httpx.Response:
    request = new_request(Operation.GET_PRINTER_ATTRIBUTES, 7, printer_uri=printer_uri)
    request.operation.add("requested-attributes", ValueTag.KEYWORD, "all", "media-col-database")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        return await http.post(
            path, content=encode(request), headers={"content-type": "application/ipp", **headers}
        )


def ipp_answer(reply: httpx.Response) -> Message:
    assert reply.status_code == 200, reply.text
    message, _ = decode(reply.content)
    return message


async def test_credentials_in_printer_uri_answer_get_printer_attributes_and_reveal_no_printer(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter
) -> None:
    """What CUPS's scheduler sends for ``lpadmin -m everywhere``: Get-Printer-Attributes, no Authorization
    header, the device URI with its credentials as printer-uri."""
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"eve": ippeveprinter.uri})
    async with stack.client(await stack.token("api", "other", scopes=("admin",))) as other:
        made = await other.post("/v1/users", json={"email": "olga@example.org", "password": PASSWORD})
        assert made.status_code == 201, made.text
    host = stack.api_url.removeprefix("http://")
    ann = f"ipp://{quote(ANN, safe='')}:{quote(PASSWORD, safe='')}@{host}"

    answer = ipp_answer(await get_printer_attributes(stack, "/ipp/print/eve", f"{ann}/ipp/print/eve"))
    assert answer.code == Status.SUCCESSFUL_OK, answer
    assert (
        answer.value(PRINTER, "sides-supported") is not None
        and answer.value(PRINTER, "printer-name") == "eve"
    )

    # Without credentials, or with wrong ones: 401 whether or not any tenant has such a printer.
    refusals = []
    for path, uri in [
        ("/ipp/print/eve", f"ipp://{host}/ipp/print/eve"),
        ("/ipp/print/nope", f"ipp://{host}/ipp/print/nope"),
        ("/ipp/print/eve", f"ipp://{quote(ANN, safe='')}:wrong-password@{host}/ipp/print/eve"),
        ("/ipp/print/nope", f"ipp://{quote(ANN, safe='')}:wrong-password@{host}/ipp/print/nope"),
    ]:
        reply = await get_printer_attributes(stack, path, uri)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == 'Basic realm="printrelay"'
        refusals.append(reply.text)
    assert refusals[0] == refusals[1] and refusals[2] == refusals[3], refusals

    # Another tenant's person: acme's printer is as unknown to them as one nobody has.
    olga = f"ipp://{quote('olga@example.org', safe='')}:{quote(PASSWORD, safe='')}@{host}"
    unknown = [
        ipp_answer(await get_printer_attributes(stack, f"/ipp/print/{name}", f"{olga}/ipp/print/{name}"))
        for name in ("eve", "nope")
    ]
    assert [a.code for a in unknown] == [Status.CLIENT_ERROR_NOT_FOUND] * 2, unknown
    assert [a.value(OP, "status-message") for a in unknown] == [
        "printer eve not found",
        "printer nope not found",
    ]

    # Only Get-Printer-Attributes takes them, and only from a small request.
    job = new_request(Operation.GET_JOBS, 8, printer_uri=f"{ann}/ipp/print/eve")
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        reply = await http.post(
            "/ipp/print/eve", content=encode(job), headers={"content-type": "application/ipp"}
        )
        assert reply.status_code == 401, reply.text
        large = new_request(Operation.GET_PRINTER_ATTRIBUTES, 9, printer_uri=f"{ann}/ipp/print/eve")
        large.operation.add("requested-attributes", ValueTag.KEYWORD, *[f"x-{n:05d}" for n in range(1000)])
        reply = await http.post(
            "/ipp/print/eve", content=encode(large), headers={"content-type": "application/ipp"}
        )
        assert reply.status_code == 401, reply.text
    # A header, when there is one, decides.
    wrong_header = await get_printer_attributes(
        stack, "/ipp/print/eve", f"{ann}/ipp/print/eve", authorization="Basic " + "bm9ib2R5Ondyb25n"
    )
    assert wrong_header.status_code == 401
