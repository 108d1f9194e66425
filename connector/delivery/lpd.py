"""Delivery to LPD print servers (``lpd://host[:515]/queue``, RFC 1179).

One connection per job:

1. ``\\x02queue\\n`` (receive a printer job); the server answers one octet, ``\\x00`` = yes.
2. ``\\x02COUNT cfA123host\\n`` then the control file and a ``\\x00``; each step acknowledged.
3. ``\\x03COUNT dfA123host\\n`` then the document and a ``\\x00``; acknowledged once the server has it.

The data file's length goes first, so a document of unknown size is spooled to a temporary file before
anything is sent. The control file comes first (RFC 1179 allows either order) so the server knows the
job before the bytes stream through. Copies are ``l`` lines repeated (§7: "the same file may be printed
several times"); any other option is refused, LPD has no way to carry it.

RFC 1179 §3.1 asks for a source port from 721-731; almost no server enforces it, and binding one needs
root, so we do not (the "source port rules relaxed" of most clients).

The control file and command lines are built by pure functions, tested with bytes alone.
"""

from __future__ import annotations

import re
import socket
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import trio

from connector.delivery.base import (
    DeliveryError,
    DeliveryResult,
    JobTicket,
    Journal,
    Progress,
    connect_printer,
)
from connector.delivery.document import VerifiedDocument
from connector.delivery.options import OptionError, refuse_for_stream
from connector.delivery.spoolfile import SpoolFile
from connector.printer_mib import PrinterMib

DEFAULT_PORT = 515
ACK = b"\x00"
#: RFC 1179 §7: a host name of at most 31 octets, a job name (J) of at most 99, user (P) at most 31
MAX_HOST = 31
MAX_JOB_NAME = 99
MAX_USER = 31
MAX_QUEUE = 255
QUEUE_RE = re.compile(r"^[!-~]{1,255}$")  # printable ASCII, no space: it ends at the line's LF


class LpdProtocolError(Exception):
    """The server answered something other than the one-octet acknowledgement."""


def _printable(text: str, limit: int, fallback: str) -> str:
    """Control file lines are ASCII and end at LF: drop what would break or confuse the server."""
    cleaned = "".join(ch if " " <= ch <= "~" else "_" for ch in text).strip()
    return cleaned[:limit] or fallback


def job_number(job_id: str) -> int:
    """A stable 000-999 job number for a relay job id (the same id gets the same number on a resend)."""
    return zlib.crc32(job_id.encode()) % 1000


def receive_job_command(queue: str) -> bytes:
    return b"\x02" + queue.encode("ascii") + b"\n"


def subcommand(code: int, count: int, name: str) -> bytes:
    """``\\x02`` receive control file / ``\\x03`` receive data file: ``code COUNT SP NAME LF``."""
    return bytes([code]) + f"{count} {name}\n".encode("ascii")


def file_names(job_id: str, host: str) -> tuple[str, str]:
    """(control file name, data file name): ``cfA`` / ``dfA``, the job number, the sending host."""
    number = f"{job_number(job_id):03d}"
    host = _printable(host, MAX_HOST, "printrelay").replace(" ", "_")
    return f"cfA{number}{host}", f"dfA{number}{host}"


def control_file(ticket: JobTicket, host: str, data_name: str) -> bytes:
    """The control file (RFC 1179 §7): who and what, then one ``l`` line per copy, then unlink.

    ``l`` (print, leaving control characters) rather than ``f``: the document is already in the
    printer's language (PDF, PCL, PostScript), and ``f`` would let the server mangle it.
    """
    user = _printable(ticket.user, MAX_USER, "printrelay")
    title = _printable(ticket.title, MAX_JOB_NAME, "untitled")
    lines = [
        f"H{_printable(host, MAX_HOST, 'printrelay')}",
        f"P{user}",
        f"J{title}",
        f"N{title}",
        *[f"l{data_name}"] * max(1, ticket.copies),
        f"U{data_name}",
    ]
    return "".join(line + "\n" for line in lines).encode("ascii")


def parse_lpd_uri(uri: str) -> tuple[str, int, str]:
    """``lpd://host[:port]/queue`` -> (host, port, queue)."""
    parts = urlsplit(uri)
    queue = unquote(parts.path.lstrip("/"))
    if parts.scheme != "lpd" or not parts.hostname:
        raise ValueError(f"not an lpd://host/queue printer URI: {uri!r}")
    if not QUEUE_RE.match(queue):
        raise ValueError(f"LPD printer URI {uri!r} needs a queue name: lpd://host[:515]/QUEUE")
    return parts.hostname, parts.port or DEFAULT_PORT, queue


class LpdBackend:
    """Prints through one LPD queue."""

    def __init__(
        self,
        uri: str,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        spool_dir: Path | None = None,
        local_host: str | None = None,
        snmp: PrinterMib | None = None,
    ) -> None:
        self.uri = uri
        self.host, self.port, self.queue = parse_lpd_uri(uri)
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.spool_dir = spool_dir  # for documents whose size is not known up front
        self.local_host = local_host or socket.gethostname().split(".")[0] or "printrelay"
        self.snmp = snmp  # the printer's state and page counter (connector/printer_mib.py); None: off

    def __repr__(self) -> str:
        return f"LpdBackend({self.uri!r})"

    @property
    def _where(self) -> str:
        return f"lpd://{self.host}:{self.port}/{self.queue}"

    async def _connect(self) -> trio.SocketStream:
        return await connect_printer(self.host, self.port, self.connect_timeout, self._where)

    async def _ack(self, stream: trio.SocketStream, what: str) -> None:
        with trio.fail_after(self.io_timeout):
            answer = await stream.receive_some(1)
        if answer != ACK:
            shown = "the connection closed" if not answer else f"octet {answer[0]}"
            raise LpdProtocolError(f"{self._where} refused {what}: {shown}")

    async def deliver(
        self,
        ticket: JobTicket,
        document: AsyncIterator[bytes],
        progress: Progress,
        journal: Journal | None = None,  # a socket has no job to journal
    ) -> DeliveryResult:
        try:
            refuse_for_stream("LPD", ticket.options)
        except OptionError as exc:
            raise DeliveryError(exc.message, retryable=False) from None
        if isinstance(document, VerifiedDocument):  # authenticated whole: its size is known exactly
            return await self._send(ticket, document.size, document, progress)
        if ticket.size is not None:
            return await self._send(ticket, ticket.size, document, progress)
        async with SpoolFile(self.spool_dir) as spool:
            size = await spool.fill(document)
            return await self._send(ticket, size, spool.read(), progress)

    async def _send(
        self, ticket: JobTicket, size: int, document: AsyncIterator[bytes], progress: Progress
    ) -> DeliveryResult:
        control_name, data_name = file_names(ticket.job_id, self.local_host)
        control = control_file(ticket, self.local_host, data_name)
        stream = await self._connect()
        sent = 0
        async with stream:
            try:
                with trio.fail_after(self.io_timeout):
                    await stream.send_all(receive_job_command(self.queue))
                await self._ack(stream, f"queue {self.queue!r}")
                with trio.fail_after(self.io_timeout):
                    await stream.send_all(subcommand(2, len(control), control_name))
                await self._ack(stream, "the control file header")
                with trio.fail_after(self.io_timeout):
                    await stream.send_all(control + ACK)
                await self._ack(stream, "the control file")
                with trio.fail_after(self.io_timeout):
                    await stream.send_all(subcommand(3, size, data_name))
                await self._ack(stream, "the data file header")
                await progress("printing", f"{self._where} accepted job {control_name[3:6]}")
                if isinstance(document, VerifiedDocument):
                    try:
                        await document.send_to(stream, self.io_timeout)  # sendfile(2)
                    finally:
                        sent = document.sent  # how far it got, for the errors below too
                else:
                    async for chunk in document:
                        if sent + len(chunk) > size:
                            # closing without the final octet makes the server drop the job (RFC 1179 §6.2)
                            raise DeliveryError(
                                f"document longer than its announced size {size}: job dropped",
                                retryable=False,
                            )
                        with trio.fail_after(self.io_timeout):
                            await stream.send_all(chunk)
                        sent += len(chunk)
                if sent != size:
                    raise DeliveryError(
                        f"document ended after {sent} of its announced {size} bytes: job dropped",
                        retryable=False,
                    )
                with trio.fail_after(self.io_timeout):
                    await stream.send_all(ACK)
                await self._ack(stream, "the data file")
            except LpdProtocolError as exc:
                # a queue that is disabled or full says so with a non-zero octet; it may change
                raise DeliveryError(str(exc), retryable=sent == 0) from None
            except trio.TooSlowError:
                raise DeliveryError(
                    f"{self._where} took no data for io_timeout={self.io_timeout:g} s after {sent} bytes",
                    retryable=True,
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise DeliveryError(
                    f"{self._where} closed the connection after {sent} bytes: {exc.__cause__ or exc}",
                    retryable=True,
                ) from exc
        copies = f"{ticket.copies} copies of " if ticket.copies > 1 else ""
        return DeliveryResult("completed", f"sent {copies}{size} bytes to {self._where}")

    async def probe(self) -> bool:
        """Reachable when the server takes a TCP connection; nothing is sent, so nothing is queued."""
        try:
            stream = await self._connect()
        except DeliveryError:
            return False
        await stream.aclose()
        return True
