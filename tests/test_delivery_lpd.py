"""LpdBackend: the RFC 1179 bytes it builds, and delivery to a real LPD receiver."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fixtures_peers import LpdReceiver
from fixtures_printers import free_port

from connector.delivery import DeliveryError, JobTicket, LpdBackend, backend_for_uri
from connector.delivery.document import VerifiedDocument, unnamed_file, write_all
from connector.delivery.lpd import (
    control_file,
    file_names,
    job_number,
    parse_lpd_uri,
    receive_job_command,
    subcommand,
)


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Progress:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, state: str, message: str) -> None:
        self.calls.append((state, message))


# --- sans-IO ---------------------------------------------------------------------------------------


def test_command_lines() -> None:
    assert receive_job_command("lp") == b"\x02lp\n"
    assert subcommand(2, 57, "cfA123host") == b"\x0257 cfA123host\n"
    assert subcommand(3, 10, "dfA123host") == b"\x0310 dfA123host\n"


def test_control_file_lines_and_copies() -> None:
    ticket = JobTicket("job-9", "Quarterly report", "application/pdf", copies=3, user="alice")
    control_name, data_name = file_names(ticket.job_id, "site-gw")
    number = f"{job_number('job-9'):03d}"
    assert (control_name, data_name) == (f"cfA{number}site-gw", f"dfA{number}site-gw")
    assert (
        control_file(ticket, "site-gw", data_name)
        == (
            f"Hsite-gw\nPalice\nJQuarterly report\nNQuarterly report\n"
            f"l{data_name}\nl{data_name}\nl{data_name}\nU{data_name}\n"
        ).encode()
    )


def test_control_file_is_ascii_and_bounded() -> None:
    ticket = JobTicket("j", "line\nbreak\x00 and ünïcode " + "x" * 200, "text/plain", user="évé\nP root")
    lines = control_file(ticket, "h" * 80, "dfA001h").decode("ascii").splitlines()
    assert lines[0] == "H" + "h" * 31
    assert lines[1] == "P_v__P root"  # no line break smuggles a second command in
    assert lines[2].startswith("Jline_break_ and _n_code ") and len(lines[2]) == 1 + 99
    assert job_number("j") == job_number("j") and 0 <= job_number("j") <= 999


def test_parse_lpd_uri() -> None:
    assert parse_lpd_uri("lpd://printer.local/raw") == ("printer.local", 515, "raw")
    assert parse_lpd_uri("lpd://10.0.0.7:5515/PASSTHRU") == ("10.0.0.7", 5515, "PASSTHRU")
    for bad in ("lpd://host", "lpd://host/", "lpd:///q", "lpd://h/with space"):
        with pytest.raises(ValueError, match="lpd"):
            parse_lpd_uri(bad)


# --- against the receiver --------------------------------------------------------------------------


async def test_lpd_delivery_arrives_intact(lpd_receiver: LpdReceiver) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    backend = backend_for_uri(lpd_receiver.uri("office"))
    assert isinstance(backend, LpdBackend)
    progress = Progress()
    ticket = JobTicket("job-1", "report.pdf", "application/pdf", user="bob", size=len(data))
    result = await backend.deliver(ticket, chunks(data), progress)

    assert result.state == "completed"
    assert result.message == f"sent {len(data)} bytes to lpd://127.0.0.1:{lpd_receiver.port}/office"
    assert progress.calls[0][0] == "printing"
    (job,) = await lpd_receiver.wait_for(1)
    assert job.queue == "office"
    assert job.size == len(data) and job.sha256 == hashlib.sha256(data).hexdigest()
    assert job.line("P") == "bob" and job.line("J") == "report.pdf"
    assert [line for line in job.lines if line.startswith("l")] == [f"l{job.data_name}"]


async def test_copies_by_repetition_of_the_print_line(lpd_receiver: LpdReceiver) -> None:
    data = b"%!PS\nshowpage\n"
    ticket = JobTicket("job-2", "t", "application/postscript", copies=2, size=len(data))
    result = await backend_for_uri(lpd_receiver.uri()).deliver(ticket, chunks(data), Progress())
    assert result.state == "completed" and "2 copies" in result.message
    (job,) = await lpd_receiver.wait_for(1)
    assert [line for line in job.lines if line.startswith("l")] == [f"l{job.data_name}"] * 2
    assert job.data_path.read_bytes() == data  # sent once


async def test_unknown_size_is_spooled_first(lpd_receiver: LpdReceiver, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    spool = tmp_path / "spool"
    backend = backend_for_uri(lpd_receiver.uri(), spool_dir=spool)
    ticket = JobTicket("job-3", "t", "application/octet-stream", size=None)
    result = await backend.deliver(ticket, chunks(data, 7000), Progress())
    assert result.state == "completed"
    (job,) = await lpd_receiver.wait_for(1)
    assert job.size == len(data) and job.sha256 == hashlib.sha256(data).hexdigest()
    assert list(spool.iterdir()) == []  # the temporary copy is gone


async def test_wrong_announced_size_drops_the_job(lpd_receiver: LpdReceiver) -> None:
    backend = backend_for_uri(lpd_receiver.uri())
    for size in (5, 50):
        ticket = JobTicket(f"job-{size}", "t", "text/plain", size=size)
        with pytest.raises(DeliveryError, match="announced") as info:
            await backend.deliver(ticket, chunks(b"x" * 10), Progress())
        assert not info.value.retryable
    assert lpd_receiver.jobs == []


async def test_refused_queue_is_retryable_and_named(lpd_receiver: LpdReceiver) -> None:
    lpd_receiver.refuse_queues.add("disabled")
    ticket = JobTicket("job-4", "t", "text/plain", size=3)
    with pytest.raises(DeliveryError, match="refused queue 'disabled'") as info:
        await backend_for_uri(lpd_receiver.uri("disabled")).deliver(ticket, chunks(b"abc"), Progress())
    assert info.value.retryable


async def test_options_other_than_copies_are_refused(lpd_receiver: LpdReceiver) -> None:
    ticket = JobTicket("job-5", "t", "text/plain", size=3, options={"sides": "two-sided-long-edge"})
    with pytest.raises(DeliveryError, match="LPD printers take no job options besides copies") as info:
        await backend_for_uri(lpd_receiver.uri()).deliver(ticket, chunks(b"abc"), Progress())
    assert not info.value.retryable and "sides=two-sided-long-edge" in info.value.message
    assert lpd_receiver.connections == 0  # refused before connecting


async def test_unreachable_and_probe(lpd_receiver: LpdReceiver) -> None:
    backend = backend_for_uri(lpd_receiver.uri())
    assert await backend.probe()
    dead = LpdBackend(f"lpd://127.0.0.1:{free_port()}/lp", connect_timeout=2)
    assert not await dead.probe()
    with pytest.raises(DeliveryError, match="cannot connect") as info:
        await dead.deliver(JobTicket("j", "t", "text/plain", size=1), chunks(b"x"), Progress())
    assert info.value.retryable


async def test_stalled_server_times_out(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, silent, 0)
    port = listeners[0].socket.getsockname()[1]
    backend = LpdBackend(f"lpd://127.0.0.1:{port}/lp", io_timeout=0.3)
    with pytest.raises(DeliveryError, match=r"io_timeout=0\.3 s") as info:
        await backend.deliver(JobTicket("j", "t", "text/plain", size=1), chunks(b"x"), Progress())
    assert info.value.retryable


async def test_a_verified_document_announces_its_own_size(lpd_receiver: LpdReceiver, tmp_path: Path) -> None:
    """The connector's authenticated copy knows its size: no spool copy, and sendfile(2) for the data."""
    data = os.urandom(300_000)
    fd = unnamed_file(tmp_path / "incoming")
    write_all(fd, [data])
    document = VerifiedDocument(size=len(data), fd=fd)
    backend = backend_for_uri(lpd_receiver.uri(), spool_dir=tmp_path / "spool")
    ticket = JobTicket("job-4", "t", "application/octet-stream", size=None)
    result = await backend.deliver(ticket, document, Progress())
    document.close()
    assert result.state == "completed"
    (job,) = await lpd_receiver.wait_for(1)
    assert job.size == len(data) and job.sha256 == hashlib.sha256(data).hexdigest()
    assert not (tmp_path / "spool").exists()
