"""CUPS's own IPP conformance suites (ipptool ipp-1.1.test, ipp-2.0.test) against the relay's endpoint,
with every job printing through a connector to a real ippeveprinter: with an API token, and as a person,
compared test by test with the same suite run against an ippeveprinter itself."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from fixtures_peers import DocumentServer
from fixtures_printers import IPPTOOL_SUITES, IppEvePrinter, IppEvePrinterFactory, run_ipptool
from fixtures_relay import RelayStack
from test_users import ANN, PASSWORD

from printrelay.demo import one_page_pdf

#: the suites' tests of fetching a document-uri; they run when the suite is given one
URI_TESTS = ("Print-URI", "Send-URI")


def pdf(width: int, height: int) -> bytes:
    return one_page_pdf(width, height)


# A 1x1 baseline JPEG (the smallest that decoders accept).
JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912"
    "130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b0800"
    "01000101011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b5100002"
    "010303020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f024"
    "33627282090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768"
    "696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3"
    "c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00fb"
    "d3ffd9"
)


def sample_documents(directory: Path) -> None:
    """Debian ships the suites without the documents they print: small stand-ins of the same types."""
    (directory / "document-a4.pdf").write_bytes(pdf(595, 842))
    (directory / "document-letter.pdf").write_bytes(pdf(612, 792))
    for name in ("document-a4.ps", "document-letter.ps"):
        (directory / name).write_bytes(b"%!PS-Adobe-3.0\nshowpage\n")
    for name in ("color.jpg", "gray.jpg"):
        (directory / name).write_bytes(JPEG)


def results(report: str) -> list[tuple[str, str]]:
    """(test name, PASS | FAIL | SKIP) for each test of an ipptool -t report, in order."""
    return re.findall(r"^ {4}(\S.*?) +\[(PASS|FAIL|SKIP)\]$", report, re.MULTILINE)


@pytest.fixture
def relay_overrides() -> dict[str, Any]:
    return {"fetch_allow_private": True}  # Print-URI and Send-URI fetch from a server on loopback


@pytest.fixture
async def relay_printer(relay_stack: RelayStack, ippeveprinter: IppEvePrinter, tmp_path: Path) -> str:
    """The relay's IPP URI (with credentials) of an ippeveprinter behind a connector."""
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    await relay_stack.start_connector({"eve": ippeveprinter.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    return f"ipp://acme:{relay_stack.api_token}@127.0.0.1:{port}/ipp/print/eve"


async def test_cups_ipp_1_1_suite_with_an_api_token(
    relay_printer: str, documents: DocumentServer, tmp_path: Path
) -> None:
    workdir = tmp_path / "ipptool"
    workdir.mkdir()
    sample_documents(workdir)
    document = f"http://127.0.0.1:{documents.port}/doc"
    code, report = await trio.to_thread.run_sync(
        lambda: run_ipptool(relay_printer, "ipp-1.1.test", workdir, **{"document-uri": document})
    )
    outcomes = results(report)
    assert code == 0 and ("PASS" in dict(outcomes).values()), report
    assert not [name for name, outcome in outcomes if outcome == "FAIL"], report
    # the relay fetched the document for Print-URI and Send-URI, and refused a bogus scheme
    fetched = [outcome for name, outcome in outcomes if any(op in name for op in URI_TESTS)]
    assert len(fetched) >= 6 and set(fetched) == {"PASS"}, report
    assert documents.paths().count("/doc") >= 2


def quick_retry_suites(directory: Path) -> Path:
    """ipp-2.0.test and the ipp-1.1.test it includes, written to ``directory`` as CUPS ships them but for
    how soon ipptool asks again: 0.2 s after server-error-busy (-R), not 5 s (an ippeveprinter is busy
    for the moment between two jobs, and the printer's run spent 40 s waiting), and every 0.5 s for a
    job's end (REPEAT-NO-MATCH) with ten times the tries, the same 150 s."""

    def quicker(test: str) -> str:
        if "REPEAT-NO-MATCH" in test.split("\n}")[0]:
            tries = re.sub(r"REPEAT-LIMIT (\d+)", lambda limit: f"REPEAT-LIMIT {int(limit[1]) * 10}", test)
            return '{\n\tDELAY "0,0.5"\n' + tries
        return '{\n\tDELAY "0,0.2"\n' + test

    for name in ("ipp-1.1.test", "ipp-2.0.test"):
        head, *tests = re.split(r"(?m)^\{\n", (IPPTOOL_SUITES / name).read_text())
        (directory / name).write_text(head + "".join(quicker(test) for test in tests))
    return directory / "ipp-2.0.test"


#: Tests the printer itself passes that ipptool skips against the relay, and why. Each is skipped by
#: ipptool's own rule, not failed: the assertions below hold the relay to that.
SKIPPED_FOR_THE_RELAY = {
    # SKIP-IF-DEFINED uriuser: with credentials in the URI (the only way ipptool authenticates) the
    # authenticated user is the requesting user, whatever requesting-user-name says (RFC 8011 §9.3).
    # The test itself runs below, as written, with an API token.
    "RFC 8011 section 4.2.6: Get-Jobs Operation (my-jobs different user)",
}
#: what the relay runs that the printer does not claim
RELAY_ONLY = ("Print-Job with job-hold-until", "Release-Job")


async def test_cups_ipp_2_0_suite_as_a_person_passes_what_the_printer_itself_passes(
    relay_stack: RelayStack, ippeveprinter_factory: IppEvePrinterFactory, tmp_path: Path
) -> None:
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    behind_relay, alone = ippeveprinter_factory("behind-relay"), ippeveprinter_factory("alone")
    async with relay_stack.client() as admin:
        made = await admin.post("/v1/users", json={"email": ANN, "role": "user", "password": PASSWORD})
        assert made.status_code == 201, made.text
    await relay_stack.start_connector({"eve": behind_relay.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    as_ann = f"ipp://{quote(ANN, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/ipp/print/eve"
    workdir = tmp_path / "ipptool"
    workdir.mkdir()
    sample_documents(workdir)
    suite = quick_retry_suites(workdir)
    reports: dict[str, str] = {}

    async def run(name: str, uri: str) -> None:
        # -R: ippeveprinter answers server-error-busy while it prints; ipptool then asks again
        code, reports[name] = await trio.to_thread.run_sync(run_ipptool, uri, suite, workdir, "-R")
        assert code in (0, 1), reports[name]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "relay", as_ann)
        nursery.start_soon(run, "printer", alone.uri)
    relay, printer = results(reports["relay"]), results(reports["printer"])
    assert [name for name, _ in relay] == [name for name, _ in printer], reports
    assert not [name for name, outcome in printer if outcome == "FAIL"], reports["printer"]
    missed = {
        name
        for (name, mine), (_, its) in zip(relay, printer, strict=True)
        if its == "PASS" and mine != "PASS"
    }
    assert missed == SKIPPED_FOR_THE_RELAY, reports["relay"]
    skipped = {name for name, outcome in relay if outcome == "SKIP"}
    assert skipped >= SKIPPED_FOR_THE_RELAY, reports["relay"]
    assert not [name for name, outcome in relay if outcome == "FAIL"], reports["relay"]
    assert [outcome for name, outcome in relay if name in RELAY_ONLY] == ["PASS", "PASS"], reports["relay"]
    # Ann's jobs are hers: the suite's requesting-user-name (root) named none of them
    async with relay_stack.client() as admin:
        jobs = (await admin.get("/v1/jobs")).json()["jobs"]
    assert jobs and {job["user"] for job in jobs} == {ANN}


MY_JOBS_SETUP = """
{
    NAME "a held job of alice"
    OPERATION Print-Job
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name alice
    ATTR mimeMediaType document-format application/pdf
    GROUP job-attributes-tag
    ATTR keyword job-hold-until indefinite
    FILE document-a4.pdf
    STATUS successful-ok
}
{
    NAME "my-jobs of alice lists it"
    OPERATION Get-Jobs
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name alice
    ATTR boolean my-jobs true
    STATUS successful-ok
    EXPECT job-id COUNT 1
}
"""


def suite_test(suite: str, name: str) -> str:
    """One test of CUPS's suite file, less its SKIP-IF lines."""
    text = (IPPTOOL_SUITES / suite).read_text()
    at = text.index(f'NAME "{name}"')
    start, end = text.rindex("{", 0, at), text.index("\n}", at) + 2
    return "\n".join(line for line in text[start:end].splitlines() if "SKIP-IF" not in line) + "\n"


async def test_the_suites_my_jobs_of_a_different_user_passes_with_an_api_token(
    relay_printer: str, tmp_path: Path
) -> None:
    """ipptool skips this test of the suite whenever the URI carries credentials (the only way it
    authenticates), so it never runs against the relay in the suites above. Run as it is written, with
    an API token, for which requesting-user-name names the user (an application prints for its users):
    my-jobs of another name lists none of alice's jobs. ($user is alice: ipptool's own $user changes
    to the URI's user once it has authenticated.)"""
    name = "RFC 8011 section 4.2.6: Get-Jobs Operation (my-jobs different user)"
    test = tmp_path / "my-jobs.test"
    test.write_text(MY_JOBS_SETUP + suite_test("ipp-1.1.test", name).replace("$user", "alice"))
    sample_documents(tmp_path)
    code, report = await trio.to_thread.run_sync(run_ipptool, relay_printer, str(test), tmp_path)
    assert code == 0 and report.count("[PASS]") == 3 and name in report, report
