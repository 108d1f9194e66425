"""The relay's IPP endpoint over real HTTP, with a real connector and RAW printer where jobs must print."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

from ipp import (
    DelimiterTag,
    JobState,
    Message,
    Operation,
    PrinterState,
    Status,
    ValueTag,
    decode,
    encode,
    new_request,
)
from ipp.jsonattrs import attributes_to_json
from relay.store.base import ConnectorRecord, IppJob, Printer

OP = DelimiterTag.OPERATION_ATTRIBUTES
JOB = DelimiterTag.JOB_ATTRIBUTES
PRINTER = DelimiterTag.PRINTER_ATTRIBUTES
UNSUPPORTED = DelimiterTag.UNSUPPORTED_ATTRIBUTES
DATA = Path(__file__).parent / "data" / "ipp"


class Ipp:
    """A small IPP client for one relay printer."""

    def __init__(self, stack: RelayStack, printer: str, auth: Any = None) -> None:
        self.stack = stack
        self.path = f"/ipp/print/{printer}"
        self.uri = f"ipp://127.0.0.1:{stack.api_url.rsplit(':', 1)[1]}{self.path}"
        self.auth = auth if auth is not None else ("acme", stack.api_token)
        self.ids = iter(range(1, 1_000_000))

    def request(self, operation: int, **attrs: Any) -> Message:
        message = new_request(operation, next(self.ids), printer_uri=self.uri)
        for name, (tag, *values) in attrs.items():
            message.operation.add(name.replace("_", "-"), tag, *values)
        return message

    async def post_raw(self, body: bytes, **kw: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.stack.api_url, auth=self.auth, timeout=30) as client:
            return await client.post(
                self.path, content=body, headers={"content-type": "application/ipp", **kw}
            )

    async def send(self, message: Message | bytes, document: bytes = b"") -> Message:
        body = message if isinstance(message, bytes) else encode(message)
        reply = await self.post_raw(body + document)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/ipp"
        response, _ = decode(reply.content)
        return response

    async def print_job(self, document: bytes, **attrs: Any) -> Message:
        attrs.setdefault("requesting_user_name", (ValueTag.NAME, "alice"))
        attrs.setdefault("job_name", (ValueTag.NAME, "report"))
        attrs.setdefault("document_format", (ValueTag.MIME_MEDIA_TYPE, "application/pdf"))
        return await self.send(self.request(Operation.PRINT_JOB, **attrs), document)

    async def job_state(self, job_id: int) -> int:
        response = await self.send(
            self.request(Operation.GET_JOB_ATTRIBUTES, job_id=(ValueTag.INTEGER, job_id))
        )
        assert response.code == Status.SUCCESSFUL_OK, response
        state = response.value(JOB, "job-state")
        assert isinstance(state, int)
        return state

    async def wait_state(self, job_id: int, states: tuple[int, ...], within: float = 20) -> int:
        with trio.fail_after(within):
            while True:
                state = await self.job_state(job_id)
                if state in states:
                    return state
                await trio.sleep(0.05)  # polling: the relay sends no IPP notifications


def status(message: Message) -> str:
    return f"0x{message.code:04x} {message.value(OP, 'status-message')!r}"


async def offline_printer(stack: RelayStack, printer_id: str = "away", **kw: Any) -> None:
    """A printer whose connector registered a key but holds no session: jobs for it stay queued."""
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    await stack.relay.store.upsert_connector(
        ConnectorRecord(tenant="acme", id="site-9", public_key=public, key_id="k1")
    )
    await stack.relay.store.update_printer(
        Printer(tenant="acme", id=printer_id, connector_id="site-9", kind="ipp", **kw)
    )


# --- HTTP and authentication ----------------------------------------------------------------------


async def test_credentials_are_required_with_a_basic_challenge(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away", auth=httpx.BasicAuth("", ""))
    body = encode(client.request(Operation.GET_PRINTER_ATTRIBUTES))
    async with httpx.AsyncClient(base_url=relay_stack.api_url) as http:
        reply = await http.post(client.path, content=body, headers={"content-type": "application/ipp"})
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"] == 'Basic realm="printrelay"'
        wrong_tenant = await http.post(
            client.path,
            content=body,
            headers={"content-type": "application/ipp"},
            auth=("other", relay_stack.api_token),
        )
        assert wrong_tenant.status_code == 401
        bearer = await http.post(
            client.path,
            content=body,
            headers={"content-type": "application/ipp", "authorization": f"Bearer {relay_stack.api_token}"},
        )
        assert bearer.status_code == 200 and decode(bearer.content)[0].code == Status.SUCCESSFUL_OK
        assert (await http.get(client.path)).status_code == 405
        wrong_type = await http.post(client.path, content=body, auth=("acme", relay_stack.api_token))
        assert wrong_type.status_code == 415


async def test_a_read_only_token_cannot_print(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    reader = await relay_stack.token("api", scopes=("jobs:read",))
    client = Ipp(relay_stack, "away", auth=("acme", reader))
    assert (await client.send(client.request(Operation.GET_PRINTER_ATTRIBUTES))).code == Status.SUCCESSFUL_OK
    response = await client.print_job(b"%PDF-1.4")
    assert response.code == Status.CLIENT_ERROR_NOT_AUTHORIZED, status(response)


# --- printing through the relay -------------------------------------------------------------------


async def test_print_job_reaches_the_printer_and_is_a_relay_job(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    client = Ipp(relay_stack, "label")
    document = os.urandom(700_000)
    response = await client.print_job(
        document, document_format=(ValueTag.MIME_MEDIA_TYPE, "application/octet-stream")
    )
    assert response.code == Status.SUCCESSFUL_OK, status(response)
    job_id = response.value(JOB, "job-id")
    assert isinstance(job_id, int) and job_id > 0
    assert response.value(JOB, "job-uri") == f"{client.uri}/{job_id}"
    assert response.value(JOB, "job-state") in (JobState.PENDING, JobState.PROCESSING, JobState.COMPLETED)
    [arrived] = await raw_sink.wait_for(1)
    assert arrived.sha256 == hashlib.sha256(document).hexdigest()
    assert await client.wait_state(job_id, (JobState.COMPLETED,)) == JobState.COMPLETED

    async with relay_stack.client() as rest:
        [job] = (await rest.get("/v1/jobs")).json()["jobs"]
    assert (job["user"], job["title"], job["size"], job["state"]) == (
        "alice",
        "report",
        len(document),
        "completed",
    )

    attrs = await client.send(client.request(Operation.GET_JOB_ATTRIBUTES, job_id=(ValueTag.INTEGER, job_id)))
    assert attrs.value(JOB, "job-originating-user-name") == "alice"
    assert attrs.value(JOB, "job-name") == "report"
    assert attrs.value(JOB, "job-printer-uri") == client.uri
    assert attrs.value(JOB, "job-state-reasons") == "job-completed-successfully"
    created, processing, completed = (
        attrs.value(JOB, f"time-at-{n}") for n in ("creation", "processing", "completed")
    )
    assert isinstance(created, int) and isinstance(processing, int) and isinstance(completed, int)
    assert created <= processing <= completed <= time.time() + 1
    assert str(attrs.value(JOB, "job-more-info")).endswith(f"/v1/jobs/{job['id']}")

    cancel = await client.send(client.request(Operation.CANCEL_JOB, job_id=(ValueTag.INTEGER, job_id)))
    assert cancel.code == Status.CLIENT_ERROR_NOT_POSSIBLE, status(cancel)


async def test_create_job_then_send_document(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    client = Ipp(relay_stack, "label")
    created = await client.send(client.request(Operation.CREATE_JOB, job_name=(ValueTag.NAME, "two-step")))
    assert created.code == Status.SUCCESSFUL_OK, status(created)
    job_id = created.value(JOB, "job-id")
    assert isinstance(job_id, int)
    assert created.value(JOB, "job-state") == JobState.PENDING_HELD
    assert created.value(JOB, "job-state-reasons") == "job-incoming"

    missing_last = await client.send(
        client.request(Operation.SEND_DOCUMENT, job_id=(ValueTag.INTEGER, job_id)), b"data"
    )
    assert missing_last.code == Status.CLIENT_ERROR_BAD_REQUEST, status(missing_last)

    sent = await client.send(
        client.request(
            Operation.SEND_DOCUMENT,
            job_id=(ValueTag.INTEGER, job_id),
            last_document=(ValueTag.BOOLEAN, True),
            document_format=(ValueTag.MIME_MEDIA_TYPE, "text/plain"),
        ),
        b"hello over IPP\n",
    )
    assert sent.code == Status.SUCCESSFUL_OK, status(sent)
    assert sent.value(JOB, "job-id") == job_id
    [arrived] = await raw_sink.wait_for(1)
    assert arrived.sha256 == hashlib.sha256(b"hello over IPP\n").hexdigest()
    assert await client.wait_state(job_id, (JobState.COMPLETED,)) == JobState.COMPLETED

    again = await client.send(
        client.request(
            Operation.SEND_DOCUMENT, job_id=(ValueTag.INTEGER, job_id), last_document=(ValueTag.BOOLEAN, True)
        ),
        b"more",
    )
    assert again.code == Status.SERVER_ERROR_MULTIPLE_DOCUMENT_JOBS_NOT_SUPPORTED, status(again)


async def test_send_document_not_last_is_held_until_close_job(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    created = await client.send(client.request(Operation.CREATE_JOB))
    job_id = created.value(JOB, "job-id")
    assert isinstance(job_id, int)
    sent = await client.send(
        client.request(
            Operation.SEND_DOCUMENT,
            job_id=(ValueTag.INTEGER, job_id),
            last_document=(ValueTag.BOOLEAN, False),
        ),
        b"first part",
    )
    assert sent.code == Status.SUCCESSFUL_OK, status(sent)
    async with relay_stack.client() as rest:
        [job] = (await rest.get("/v1/jobs")).json()["jobs"]
        assert job["state"] == "held"
        closed = await client.send(client.request(Operation.CLOSE_JOB, job_id=(ValueTag.INTEGER, job_id)))
        assert closed.code == Status.SUCCESSFUL_OK, status(closed)
        assert (await rest.get(f"/v1/jobs/{job['id']}")).json()["state"] == "queued"
    assert await client.job_state(job_id) == JobState.PENDING


async def test_cancel_job_before_and_after_the_document(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    created = await client.send(client.request(Operation.CREATE_JOB))
    pending = created.value(JOB, "job-id")
    canceled = await client.send(client.request(Operation.CANCEL_JOB, job_id=(ValueTag.INTEGER, pending)))
    assert canceled.code == Status.SUCCESSFUL_OK, status(canceled)
    assert isinstance(pending, int) and await client.job_state(pending) == JobState.CANCELED
    late = await client.send(
        client.request(
            Operation.SEND_DOCUMENT,
            job_id=(ValueTag.INTEGER, pending),
            last_document=(ValueTag.BOOLEAN, True),
        ),
        b"too late",
    )
    assert late.code == Status.CLIENT_ERROR_NOT_POSSIBLE, status(late)

    printed = await client.print_job(b"%PDF-1.4 queued while the connector is away")
    queued = printed.value(JOB, "job-id")
    assert isinstance(queued, int) and printed.value(JOB, "job-state") == JobState.PENDING
    async with relay_stack.client() as rest:
        [job] = (await rest.get("/v1/jobs?state=queued")).json()["jobs"]
    assert await relay_stack.relay.store.get_payload(job["id"]) is not None  # small: kept with the job row
    by_uri = client.request(Operation.CANCEL_JOB)
    del by_uri.operation.attributes["printer-uri"]
    by_uri.operation.add("job-uri", ValueTag.URI, f"{client.uri}/{queued}")
    assert (await client.send(by_uri)).code == Status.SUCCESSFUL_OK
    assert await client.job_state(queued) == JobState.CANCELED
    assert await relay_stack.relay.store.get_payload(job["id"]) is None  # erased at once
    assert not relay_stack.relay.spool.path(job["id"]).exists()
    again = await client.send(client.request(Operation.CANCEL_JOB, job_id=(ValueTag.INTEGER, queued)))
    assert again.code == Status.CLIENT_ERROR_NOT_POSSIBLE


async def test_close_job_without_document_aborts_it(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    job_id = (await client.send(client.request(Operation.CREATE_JOB))).value(JOB, "job-id")
    closed = await client.send(client.request(Operation.CLOSE_JOB, job_id=(ValueTag.INTEGER, job_id)))
    assert closed.code == Status.SUCCESSFUL_OK and closed.value(JOB, "job-state") == JobState.ABORTED


async def test_get_jobs_which_jobs_and_my_jobs(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    first = (await client.print_job(b"one")).value(JOB, "job-id")
    second = (await client.print_job(b"two", requesting_user_name=(ValueTag.NAME, "bob"))).value(
        JOB, "job-id"
    )
    third = (await client.print_job(b"three")).value(JOB, "job-id")
    await client.send(client.request(Operation.CANCEL_JOB, job_id=(ValueTag.INTEGER, third)))

    async def listing(**attrs: Any) -> list[dict[str, Any]]:
        response = await client.send(client.request(Operation.GET_JOBS, **attrs))
        assert response.code == Status.SUCCESSFUL_OK, status(response)
        return [{a.name: a.value for a in g} for g in response.groups_of(JOB)]

    pending = await listing()
    assert [j["job-id"] for j in pending] == [first, second]  # oldest first: the order they print
    assert set(pending[0]) == {"job-id", "job-uri"}  # the default requested-attributes
    done = await listing(which_jobs=(ValueTag.KEYWORD, "completed"))
    assert [j["job-id"] for j in done] == [third]
    mine = await listing(my_jobs=(ValueTag.BOOLEAN, True), requesting_user_name=(ValueTag.NAME, "bob"))
    assert [j["job-id"] for j in mine] == [second]
    full = await listing(which_jobs=(ValueTag.KEYWORD, "all"), requested_attributes=(ValueTag.KEYWORD, "all"))
    assert {j["job-id"] for j in full} == {first, second, third}
    assert {j["job-state"] for j in full} == {JobState.PENDING, JobState.CANCELED}
    assert all(j["job-printer-uri"] == client.uri for j in full)
    limited = await listing(limit=(ValueTag.INTEGER, 1))
    assert len(limited) == 1
    bad = await client.send(client.request(Operation.GET_JOBS, which_jobs=(ValueTag.KEYWORD, "fetchable")))
    assert bad.code == Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED


async def test_job_numbers_are_per_tenant(relay_stack: RelayStack) -> None:
    store = relay_stack.relay.store
    now = time.time()
    a = await store.ipp_job_numbers("acme", "p", ["j1", "j2"], now)
    assert a == {"j1": 1, "j2": 2}
    assert await store.ipp_job_numbers("acme", "p", ["j2", "j3"], now) == {"j2": 2, "j3": 3}
    assert await store.ipp_job_numbers("globex", "p", ["j9"], now) == {"j9": 1}
    pending = await store.create_ipp_job(
        IppJob("acme", 0, "p", state="incoming", created_at=now, updated_at=now)
    )
    assert pending.number == 4
    assert await store.set_ipp_job_state("acme", 4, "incoming", "receiving", now)
    assert not await store.set_ipp_job_state("acme", 4, "incoming", "receiving", now)
    assert [j.number for j in await store.list_ipp_jobs("acme", "p", ["receiving"], 10)] == [4]


# --- printer attributes ---------------------------------------------------------------------------


async def test_printer_attributes_of_a_printer_that_reported_none(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    client = Ipp(relay_stack, "label")
    response = await client.send(client.request(Operation.GET_PRINTER_ATTRIBUTES))
    assert response.code == Status.SUCCESSFUL_OK, status(response)

    def value(name: str) -> Any:
        return response.value(PRINTER, name)

    assert value("printer-uri-supported") == client.uri
    assert value("uri-security-supported") == "none"
    assert value("uri-authentication-supported") == "basic"
    assert value("printer-name") == "label"
    assert value("printer-state") == PrinterState.IDLE
    assert value("printer-is-accepting-jobs") is True
    assert isinstance(value("printer-up-time"), int) and value("printer-up-time") > 0
    operations = response.attribute(PRINTER, "operations-supported")
    assert operations is not None
    assert Operation.PRINT_URI in operations.values and Operation.SEND_URI in operations.values
    assert response.attribute(PRINTER, "reference-uri-schemes-supported").values == ("http", "https", "ftp")
    assert {Operation.PRINT_JOB, Operation.CREATE_JOB, Operation.GET_JOBS} <= set(operations.values)
    formats = response.attribute(PRINTER, "document-format-supported")
    assert formats is not None and "application/octet-stream" in formats.values

    some = await client.send(
        client.request(
            Operation.GET_PRINTER_ATTRIBUTES,
            requested_attributes=(ValueTag.KEYWORD, "printer-uri-supported", "job-template"),
        )
    )
    names = {a.name for a in some.group(PRINTER) or ()}
    assert "printer-uri-supported" in names and "copies-supported" in names and "sides-default" in names
    assert "printer-name" not in names and "printer-state" not in names


async def test_reported_attributes_are_rewritten_for_the_relay(relay_stack: RelayStack) -> None:
    captured, _ = decode((DATA / "get-printer-attributes.response.bin").read_bytes())
    real = list(captured.group(PRINTER) or ())
    # as the connector reports it: the attributes, and which options it can hand the printer
    capabilities = {"ipp": attributes_to_json(real), "options": ["sides", "print-quality", "media"]}
    await offline_printer(relay_stack, "hall", capabilities=capabilities)
    client = Ipp(relay_stack, "hall")
    response = await client.send(client.request(Operation.GET_PRINTER_ATTRIBUTES))

    def value(name: str) -> Any:
        return response.value(PRINTER, name)

    assert value("printer-make-and-model") == "Example Printer"  # the device's own
    sides = response.attribute(PRINTER, "sides-supported")
    assert sides is not None and "two-sided-long-edge" in sides.values
    assert value("printer-uri-supported") == client.uri  # not the device's address
    assert value("printer-name") == "hall"
    assert response.attribute(PRINTER, "printer-icons") is None
    assert "localhost:18631" not in str(response)
    assert value("printer-state") == PrinterState.STOPPED  # its connector is offline
    assert value("printer-state-reasons") == "offline-report"
    assert value("compression-supported") == "none"

    # What the device supports goes through as job options; what it does not is reported.
    printed = await client.print_job(
        b"%PDF-1.4",
        job_name=(ValueTag.NAME, "duplex"),
    )
    assert printed.code == Status.SUCCESSFUL_OK
    request = client.request(
        Operation.PRINT_JOB,
        requesting_user_name=(ValueTag.NAME, "alice"),
        document_format=(ValueTag.MIME_MEDIA_TYPE, "application/pdf"),
    )
    job = request.add_group(JOB)
    job.add("sides", ValueTag.KEYWORD, "two-sided-long-edge")
    job.add("print-quality", ValueTag.ENUM, 5)
    job.add("number-up", ValueTag.INTEGER, 4)
    response = await client.send(request, b"%PDF-1.4")
    assert response.code == Status.SUCCESSFUL_OK_IGNORED_OR_SUBSTITUTED_ATTRIBUTES, status(response)
    assert response.value(UNSUPPORTED, "number-up") == 4
    async with relay_stack.client() as rest:
        jobs = (await rest.get("/v1/jobs")).json()["jobs"]
    assert jobs[0]["options"] == {"sides": "two-sided-long-edge", "print-quality": "high"}
    job_id = response.value(JOB, "job-id")
    details = await client.send(
        client.request(Operation.GET_JOB_ATTRIBUTES, job_id=(ValueTag.INTEGER, job_id))
    )
    assert details.value(JOB, "sides") == "two-sided-long-edge" and details.value(JOB, "print-quality") == 5

    request.request_id += 1
    request.operation.add("ipp-attribute-fidelity", ValueTag.BOOLEAN, True)
    strict = await client.send(request, b"%PDF-1.4")
    assert strict.code == Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED, status(strict)


async def test_default_printer_refuses_what_it_cannot_forward(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    request = client.request(Operation.VALIDATE_JOB, ipp_attribute_fidelity=(ValueTag.BOOLEAN, True))
    request.add_group(JOB).add("sides", ValueTag.KEYWORD, "two-sided-long-edge")
    response = await client.send(request)
    assert response.code == Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED, status(response)
    request = client.request(Operation.VALIDATE_JOB)
    request.add_group(JOB).add("sides", ValueTag.KEYWORD, "one-sided")  # what it does anyway
    assert (await client.send(request)).code == Status.SUCCESSFUL_OK


# --- bad IPP is an IPP error, never an HTTP 500 ---------------------------------------------------


GPA, GJA, PJ = Operation.GET_PRINTER_ATTRIBUTES, Operation.GET_JOB_ATTRIBUTES, Operation.PRINT_JOB


def header(version: tuple[int, int] = (2, 0), op: int = GPA, rid: int = 7) -> bytes:
    return struct.pack(">BBHi", *version, op, rid)


def attr(tag: int, name: str, value: bytes) -> bytes:
    return bytes([tag]) + struct.pack(">H", len(name)) + name.encode() + struct.pack(">H", len(value)) + value


CHARSET = attr(ValueTag.CHARSET, "attributes-charset", b"utf-8")
LANGUAGE = attr(ValueTag.NATURAL_LANGUAGE, "attributes-natural-language", b"en")


def ops(uri: str, *more: bytes, charset: bytes = CHARSET) -> bytes:
    """An operation group: charset, language, printer-uri, then ``more``."""
    return b"\x01" + charset + LANGUAGE + attr(ValueTag.URI, "printer-uri", uri.encode()) + b"".join(more)


END = b"\x03"
BAD = Status.CLIENT_ERROR_BAD_REQUEST
BAD_REQUESTS: dict[str, tuple[Any, Status]] = {
    "truncated header": (lambda uri: header()[:5], BAD),
    "no end tag": (lambda uri: header() + ops(uri), BAD),
    "version 0.0": (lambda uri: header((0, 0)) + ops(uri) + END, Status.SERVER_ERROR_VERSION_NOT_SUPPORTED),
    "version 3.0": (lambda uri: header((3, 0)) + ops(uri) + END, Status.SERVER_ERROR_VERSION_NOT_SUPPORTED),
    "request-id 0": (lambda uri: header(rid=0) + ops(uri) + END, BAD),
    "unknown operation": (
        lambda uri: header(op=0x7777) + ops(uri) + END,
        Status.SERVER_ERROR_OPERATION_NOT_SUPPORTED,
    ),
    "Print-URI without document-uri": (lambda uri: header(op=Operation.PRINT_URI) + ops(uri) + END, BAD),
    "Print-URI of a file: URI": (
        lambda uri: (
            header(op=Operation.PRINT_URI)
            + ops(uri, attr(ValueTag.URI, "document-uri", b"file:///etc/passwd"))
            + END
        ),
        Status.CLIENT_ERROR_URI_SCHEME_NOT_SUPPORTED,
    ),
    "Print-URI of loopback": (
        lambda uri: (
            header(op=Operation.PRINT_URI)
            + ops(uri, attr(ValueTag.URI, "document-uri", b"http://127.0.0.1:1/doc"))
            + END
        ),
        Status.CLIENT_ERROR_DOCUMENT_ACCESS_ERROR,
    ),
    "Send-URI without job-id": (lambda uri: header(op=Operation.SEND_URI) + ops(uri) + END, BAD),
    "no charset": (
        lambda uri: header() + b"\x01" + attr(ValueTag.URI, "printer-uri", uri.encode()) + END,
        BAD,
    ),
    "no operation group": (lambda uri: header() + END, BAD),
    "no printer-uri": (lambda uri: header() + b"\x01" + CHARSET + LANGUAGE + END, BAD),
    "charset koi8-r": (
        lambda uri: (
            header() + ops(uri, charset=attr(ValueTag.CHARSET, "attributes-charset", b"koi8-r")) + END
        ),
        Status.CLIENT_ERROR_CHARSET_NOT_SUPPORTED,
    ),
    "job group in Get-Printer-Attributes": (
        lambda uri: header() + ops(uri) + b"\x02" + attr(ValueTag.INTEGER, "copies", b"\0\0\0\1") + END,
        BAD,
    ),
    "printer group in Print-Job": (
        lambda uri: header(op=PJ) + ops(uri) + b"\x04" + attr(ValueTag.KEYWORD, "x", b"y") + END,
        BAD,
    ),
    "job-id as a keyword": (
        lambda uri: header(op=GJA) + ops(uri, attr(ValueTag.KEYWORD, "job-id", b"1")) + END,
        BAD,
    ),
    "no job-id": (lambda uri: header(op=GJA) + ops(uri) + END, BAD),
    "unknown job": (
        lambda uri: header(op=GJA) + ops(uri, attr(ValueTag.INTEGER, "job-id", b"\0\0\x30\x39")) + END,
        Status.CLIENT_ERROR_NOT_FOUND,
    ),
    "unsupported document-format": (
        lambda uri: (
            header(op=PJ)
            + ops(uri, attr(ValueTag.MIME_MEDIA_TYPE, "document-format", b"application/x-unknown"))
            + END
            + b"data"
        ),
        Status.CLIENT_ERROR_DOCUMENT_FORMAT_NOT_SUPPORTED,
    ),
    "gzip": (
        lambda uri: header(op=PJ) + ops(uri, attr(ValueTag.KEYWORD, "compression", b"gzip")) + END + b"data",
        Status.CLIENT_ERROR_COMPRESSION_NOT_SUPPORTED,
    ),
    "Print-Job without a document": (lambda uri: header(op=PJ) + ops(uri) + END, BAD),
    "oversized attribute section": (
        lambda uri: (
            header() + ops(uri, *(attr(ValueTag.TEXT, f"x-{i}", b"v" * 30000) for i in range(10))) + END
        ),
        Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_ipp_status_codes(relay_stack: RelayStack, case: str) -> None:
    build, expected = BAD_REQUESTS[case]
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    reply = await client.post_raw(build(client.uri))
    assert reply.status_code == 200, reply.text
    response, _ = decode(reply.content)
    assert response.code == expected, status(response)
    assert response.operation["attributes-charset"].value == "utf-8"
    assert isinstance(response.value(OP, "status-message"), str)
    if case == "Print-URI of loopback":  # refused for its address, not because nothing listens on port 1
        assert "non-public" in response.value(OP, "status-message"), status(response)


async def test_error_answers_keep_the_request_id(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    response, _ = decode((await client.post_raw(header((9, 9), rid=4242) + b"\x03")).content)
    assert (response.request_id, response.code) == (4242, Status.SERVER_ERROR_VERSION_NOT_SUPPORTED)
    assert response.version == (1, 1)


async def test_unknown_printer_is_not_found(relay_stack: RelayStack) -> None:
    client = Ipp(relay_stack, "nowhere")
    response = await client.send(client.request(Operation.GET_PRINTER_ATTRIBUTES))
    assert response.code == Status.CLIENT_ERROR_NOT_FOUND
    async with httpx.AsyncClient(base_url=relay_stack.api_url, auth=client.auth) as http:
        reply = await http.post("/ipp/scan/x", content=b"", headers={"content-type": "application/ipp"})
    assert reply.status_code == 404


@pytest.mark.parametrize("relay_overrides", [{"max_job_bytes": 100_000}])
async def test_document_larger_than_max_job_bytes(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    response = await client.print_job(os.urandom(300_000))
    assert response.code == Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE, status(response)
    assert "max_job_bytes" in str(response.value(OP, "status-message"))


@pytest.mark.parametrize("relay_overrides", [{"public_url": "https://print.example.com"}])
async def test_printer_uri_is_ipps_behind_tls(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    response = await client.send(client.request(Operation.GET_PRINTER_ATTRIBUTES))
    port = relay_stack.api_url.rsplit(":", 1)[1]
    assert response.value(PRINTER, "printer-uri-supported") == f"ipps://127.0.0.1:{port}/ipp/print/away"
    assert response.value(PRINTER, "uri-security-supported") == "tls"
    # a Host header that is not a host name falls back to the public URL's
    reply = await client.post_raw(encode(client.request(Operation.GET_PRINTER_ATTRIBUTES)), host="a b/c")
    printer_uri = decode(reply.content)[0].value(PRINTER, "printer-uri-supported")
    assert printer_uri == "ipps://print.example.com/ipp/print/away"


async def test_send_document_cut_short_can_be_sent_again(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    job_id = (await client.send(client.request(Operation.CREATE_JOB))).value(JOB, "job-id")
    assert isinstance(job_id, int)
    request = client.request(
        Operation.SEND_DOCUMENT, job_id=(ValueTag.INTEGER, job_id), last_document=(ValueTag.BOOLEAN, True)
    )
    head, body = encode(request), b"x" * 100_000
    port = int(relay_stack.api_url.rsplit(":", 1)[1])
    credentials = base64.b64encode(f"acme:{relay_stack.api_token}".encode()).decode()
    store = relay_stack.relay.store

    async def wait_for(state: str) -> None:
        with trio.fail_after(10):
            while True:
                record = await store.get_ipp_job("acme", job_id)
                if record is not None and record.state == state:
                    return
                await trio.sleep(0.02)  # polling the store: no event is published for this

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"POST {client.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/ipp\r\n"
            f"Authorization: Basic {credentials}\r\n"
            f"Content-Length: {len(head) + 10 * len(body)}\r\n\r\n".encode()
            + head
            + body
        )
        await wait_for("receiving")  # the upload is under way ...
    await wait_for("incoming")  # ... and undone when the client leaves mid-document
    again = await client.send(request, b"complete document")
    assert again.code == Status.SUCCESSFUL_OK, status(again)
    assert await client.job_state(job_id) == JobState.PENDING


async def test_close_job_release_reaches_watchers(relay_stack: RelayStack) -> None:
    """The release by Close-Job goes through the job lifecycle like any other change: live watchers
    (and webhooks) hear it. It used to change the store only."""
    await offline_printer(relay_stack)
    client = Ipp(relay_stack, "away")
    job_id = (await client.send(client.request(Operation.CREATE_JOB))).value(JOB, "job-id")
    await client.send(
        client.request(
            Operation.SEND_DOCUMENT,
            job_id=(ValueTag.INTEGER, job_id),
            last_document=(ValueTag.BOOLEAN, False),
        ),
        b"first part",
    )
    async with relay_stack.client() as rest:
        [job] = (await rest.get("/v1/jobs")).json()["jobs"]
        states = relay_stack.watch(rest, job["id"])
        assert await anext(states) == "held"  # the history so far
        await client.send(client.request(Operation.CLOSE_JOB, job_id=(ValueTag.INTEGER, job_id)))
        with trio.fail_after(10):
            assert await anext(states) == "queued"  # live
        await states.aclose()
