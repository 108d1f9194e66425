"""Fuzzing the relay's IPP request handling: random and mutated requests never crash it (every answer is
an IPP response or a 4xx HTTP error), and bad requests leave nothing behind (memory, files, fds).

Hypothesis drives the examples from a worker thread; each example is answered by the endpoint in the
test's trio run (``trio.from_thread.run``), against the in-process relay and its real store and spool.
"""

from __future__ import annotations

import base64
import gc
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fixtures_relay import RelayStack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipp import DelimiterTag, Operation, Status, ValueTag, decode, encode, new_request
from ipp.jsonattrs import attributes_to_json
from relay.api.ipp import IppEndpoint
from relay.store.base import ConnectorRecord, Printer
from service.http.message import Headers, HTTPError, Request, RequestBody, Response

DATA = Path(__file__).parent / "data" / "ipp"
PATHS = ("/ipp/print/away", "/ipp/print/hall", "/ipp/print/hall/1", "/ipp/print/nowhere")
URI = "ipp://relay.example/ipp/print/hall"
KNOWN_STATUSES = {int(s) for s in Status}


def _request(op: int, rid: int, *attrs: tuple[str, int, Any], job: dict[str, Any] | None = None) -> bytes:
    message = new_request(op, rid, printer_uri=URI)
    for name, tag, value in attrs:
        message.operation.add(name, tag, value)
    if job:
        group = message.add_group(DelimiterTag.JOB_ATTRIBUTES)
        for name, (tag, value) in job.items():
            group.add(name, tag, value)
    return encode(message)


USER = ("requesting-user-name", ValueTag.NAME, "fuzz")
PDF = ("document-format", ValueTag.MIME_MEDIA_TYPE, "application/pdf")
#: well-formed requests of every operation, the seeds that mutations start from
VALID = [
    _request(Operation.GET_PRINTER_ATTRIBUTES, 1, ("requested-attributes", ValueTag.KEYWORD, "all")),
    _request(Operation.PRINT_JOB, 2, USER, PDF, job={"sides": (ValueTag.KEYWORD, "two-sided-long-edge")})
    + b"%PDF-1.4 fuzz",
    _request(Operation.VALIDATE_JOB, 3, USER, PDF, job={"copies": (ValueTag.INTEGER, 2)}),
    _request(Operation.CREATE_JOB, 4, USER),
    _request(
        Operation.SEND_DOCUMENT, 5, ("job-id", ValueTag.INTEGER, 1), ("last-document", ValueTag.BOOLEAN, True)
    )
    + b"document",
    _request(Operation.CLOSE_JOB, 6, ("job-id", ValueTag.INTEGER, 1)),
    _request(Operation.CANCEL_JOB, 7, ("job-id", ValueTag.INTEGER, 1)),
    _request(Operation.GET_JOB_ATTRIBUTES, 8, ("job-id", ValueTag.INTEGER, 1)),
    _request(
        Operation.GET_JOBS, 9, ("which-jobs", ValueTag.KEYWORD, "all"), ("my-jobs", ValueTag.BOOLEAN, True)
    ),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "tag", "length"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "tag" and data:
            data[at] = draw(
                st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x10, 0x13, 0x21, 0x34, 0x37, 0x4A, 0x7F])
            )
        elif kind == "length" and len(data) >= at + 2:
            data[at : at + 2] = struct.pack(">H", draw(st.sampled_from([0, 1, 0x7FFF, 0x8000, 0xFFFF])))
    return bytes(data)


TAGS = [0x13, 0x21, 0x22, 0x23, 0x30, 0x31, 0x32, 0x33, 0x41, 0x42, 0x44, 0x45, 0x47, 0x48, 0x49]
VALUES = [
    b"utf-8", b"en", URI.encode(), b"\x00\x00\x00\x01", b"\x01", b"all", b"two-sided-long-edge",
    b"application/pdf", b"\x00\x00\x00\x01\x00\x00\x00\x03",
]  # fmt: skip


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Well-framed messages with arbitrary operations, groups and attributes of arbitrary syntax."""
    out = bytearray(struct.pack(">BBHi", draw(st.sampled_from([1, 2])), draw(st.integers(0, 2)),
                                draw(st.sampled_from([*map(int, Operation), 0, 0x3333])),
                                draw(st.integers(-5, 2**31 - 1))))  # fmt: skip
    names = ["attributes-charset", "attributes-natural-language", "printer-uri", "job-id", "job-uri",
             "requested-attributes", "which-jobs", "my-jobs", "limit", "last-document", "document-format",
             "requesting-user-name", "ipp-attribute-fidelity", "copies", "sides", "media", "media-col",
             "page-ranges", "print-quality", "compression", "job-name", "x-vendor"]  # fmt: skip
    for group in draw(st.lists(st.sampled_from([1, 1, 2, 4, 5, 9]), min_size=0, max_size=3)):
        out.append(group)
        for _ in range(draw(st.integers(0, 6))):
            name = draw(st.sampled_from(names)).encode()
            tag = draw(st.sampled_from(TAGS))
            value = draw(st.one_of(st.binary(max_size=12), st.sampled_from(VALUES)))
            out += bytes([tag]) + struct.pack(">H", len(name)) + name + struct.pack(">H", len(value)) + value
    if draw(st.booleans()):
        out.append(0x03)
    return bytes(out + draw(st.binary(max_size=64)))


class Harness:
    def __init__(self, stack: RelayStack) -> None:
        self.stack = stack
        relay = stack.relay
        self.endpoint = IppEndpoint(relay.store, relay.jobs, relay.intake, relay.rate_limiter)
        credentials = base64.b64encode(f"acme:{stack.api_token}".encode()).decode()
        self.headers = [
            ("content-type", "application/ipp"),
            ("authorization", f"Basic {credentials}"),
            ("host", "relay.example"),
        ]

    async def answer(self, path: str, body: bytes) -> Response | HTTPError:
        request = Request(
            method="POST",
            target=path,
            path=path,
            query={},
            headers=Headers(self.headers),
            client=None,
            body=RequestBody.from_bytes(body),
        )
        try:
            return await self.endpoint.handle(request)
        except HTTPError as exc:
            return exc

    def check(self, path: str, body: bytes) -> None:
        """One request from the hypothesis thread: the answer must be well-formed IPP or a 4xx."""
        result = trio.from_thread.run(self.answer, path, body)
        if isinstance(result, HTTPError):
            assert 400 <= result.status < 500, result
            return
        assert result.status == 200 and ("content-type", "application/ipp") in result.headers
        assert isinstance(result.body, bytes)
        response, offset = decode(result.body)
        assert offset == len(result.body)
        assert response.code in KNOWN_STATUSES, hex(response.code)
        assert response.operation["attributes-charset"].value == "utf-8"
        if len(body) >= 8 and body[0] in (1, 2):
            assert response.request_id == struct.unpack(">i", body[4:8])[0]


async def printers(stack: RelayStack) -> None:
    """'away' described by defaults, 'hall' by a real printer's attributes; both offline, so jobs stay."""
    public = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    store = stack.relay.store
    await store.upsert_connector(ConnectorRecord(tenant="acme", id="site-9", public_key=public, key_id="k"))
    captured, _ = decode((DATA / "get-printer-attributes.response.bin").read_bytes())
    capabilities = {
        "ipp": attributes_to_json(captured.group(DelimiterTag.PRINTER_ATTRIBUTES) or ()),
        "options": ["sides", "media", "print-quality", "page-ranges"],
    }
    await store.update_printer(Printer(tenant="acme", id="away", connector_id="site-9", kind="raw"))
    await store.update_printer(
        Printer(tenant="acme", id="hall", connector_id="site-9", kind="ipp", capabilities=capabilities)
    )


def _fuzz(harness: Harness, strategy: st.SearchStrategy[bytes], examples: int) -> None:
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=st.sampled_from(PATHS), body=strategy)
    def run(path: str, body: bytes) -> None:
        harness.check(path, body)

    run()


async def test_random_bytes_never_crash(relay_stack: RelayStack) -> None:
    await printers(relay_stack)
    harness = Harness(relay_stack)
    await trio.to_thread.run_sync(_fuzz, harness, st.binary(max_size=600), 250)


async def test_mutated_requests_never_crash(relay_stack: RelayStack) -> None:
    await printers(relay_stack)
    harness = Harness(relay_stack)
    await trio.to_thread.run_sync(_fuzz, harness, mutated(), 500)


async def test_structured_requests_never_crash(relay_stack: RelayStack) -> None:
    await printers(relay_stack)
    harness = Harness(relay_stack)
    await trio.to_thread.run_sync(_fuzz, harness, structured(), 500)
    # whatever was accepted is a consistent job: its payload is in the spool (or, small, in the store),
    # nothing half-written
    spool = relay_stack.relay.spool
    store = relay_stack.relay.store
    jobs = [
        job_id for job_id in await store.all_job_ids_with_payload() if await store.get_payload(job_id) is None
    ]

    def spool_state() -> tuple[bool, list[Path]]:
        every = all(spool.path(job_id).exists() for job_id in jobs)
        return every, [p for p in relay_stack.relay.config.spool_dir.rglob("*") if p.name.endswith(".part")]

    every, stray = await trio.to_thread.run_sync(spool_state)
    assert every and not stray


async def test_bad_requests_leave_no_memory_or_fds_behind(relay_stack: RelayStack) -> None:
    await printers(relay_stack)
    harness = Harness(relay_stack)
    bodies = [bytes(b) for b in (VALID[1][:40], VALID[0][:-1], b"\x02\x00\x00\x0b\x00\x00\x00\x01\x01\x03")]
    bodies += [VALID[2].replace(b"application/pdf", b"application/xxx"), b"\x09" * 64]

    async def round_of(n: int) -> None:
        for i in range(n):
            path = PATHS[i % len(PATHS)]
            result = await harness.answer(path, bodies[i % len(bodies)])
            assert not isinstance(result, HTTPError) or result.status < 500

    await round_of(300)  # warm caches (hypothesis-free: a fixed set, so growth means a leak)
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await round_of(800)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 512 * 1024, f"{growth} bytes more after 800 bad requests"
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
