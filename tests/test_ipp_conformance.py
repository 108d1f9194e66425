"""CUPS's own IPP conformance suites (ipptool ipp-1.1.test, ipp-2.0.test) against the relay's endpoint,
with every job printing through a connector to a real ippeveprinter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from fixtures_printers import IppEvePrinter
from fixtures_relay import RelayStack

from printrelay.demo import one_page_pdf

SUITES = Path("/usr/share/cups/ipptool")
#: operations the relay does not claim; their tests must be skipped, never failed
UNCLAIMED = ("Print-URI", "Send-URI")


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


def run_ipptool(uri: str, suite: str, workdir: Path) -> tuple[int, str]:
    """``suite``: a file name in CUPS's suite directory, or a path."""
    # -t: a test report; -v: show why a test failed. Run from workdir so FILE names resolve there.
    completed = subprocess.run(
        ["ipptool", "-t", "-v", "-T", "30", "-f", "document-a4.pdf", uri, str(SUITES / suite)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HOME": str(workdir)},
    )
    return completed.returncode, completed.stdout + completed.stderr


@pytest.fixture
async def relay_printer(relay_stack: RelayStack, ippeveprinter: IppEvePrinter, tmp_path: Path) -> str:
    """The relay's IPP URI (with credentials) of an ippeveprinter behind a connector."""
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    await relay_stack.start_connector({"eve": ippeveprinter.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    return f"ipp://acme:{relay_stack.api_token}@127.0.0.1:{port}/ipp/print/eve"


@pytest.mark.parametrize("suite", ["ipp-1.1.test", "ipp-2.0.test"])
async def test_cups_conformance_suite(relay_printer: str, tmp_path: Path, suite: str) -> None:
    workdir = tmp_path / "ipptool"
    workdir.mkdir()
    sample_documents(workdir)
    code, report = await trio.to_thread.run_sync(run_ipptool, relay_printer, suite, workdir)
    failed = [line for line in report.splitlines() if re.search(r"\[FAIL\]", line)]
    assert code == 0 and not failed, report
    assert re.search(r"\[PASS\]", report), report
    results = [line for line in report.splitlines() if re.search(r"\[(PASS|FAIL|SKIP)\]$", line)]
    unclaimed = [line for line in results if any(op in line for op in UNCLAIMED)]
    assert unclaimed and all(line.endswith("[SKIP]") for line in unclaimed), report


# Print-URI and Send-URI are refused as unsupported, as RFC 8011 §4.1.8 says, not as bad requests.
UNCLAIMED_TEST = """
{
    NAME "Print-URI is not supported"
    OPERATION Print-URI
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name $user
    ATTR uri document-uri "http://example.com/document.pdf"
    STATUS server-error-operation-not-supported
}
{
    NAME "Send-URI is not supported"
    OPERATION Send-URI
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR integer job-id 1
    ATTR name requesting-user-name $user
    ATTR boolean last-document true
    ATTR uri document-uri "http://example.com/document.pdf"
    STATUS server-error-operation-not-supported
}
{
    NAME "operations-supported leaves them out"
    OPERATION Get-Printer-Attributes
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR keyword requested-attributes operations-supported
    STATUS successful-ok
    EXPECT operations-supported WITH-VALUE 2
    EXPECT operations-supported WITH-ALL-VALUES 2,4,5,6,8,9,10,11,59
}
"""


async def test_uri_operations_are_reported_unsupported(relay_printer: str, tmp_path: Path) -> None:
    test = tmp_path / "unclaimed.test"
    test.write_text(UNCLAIMED_TEST)
    code, report = await trio.to_thread.run_sync(run_ipptool, relay_printer, str(test), tmp_path)
    assert code == 0 and "[FAIL]" not in report, report
    assert report.count("[PASS]") == 3, report
