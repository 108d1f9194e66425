"""Delivery to "RAW" / JetDirect printers (``socket://host:9100``): the document bytes, nothing else.

The protocol has no status: the job is done when the printer closes its side after our EOF. Many
printers keep the connection open instead, so an idle timeout ends the wait too. There is no job ticket
either: copies are sent as repeated jobs, and any other option is refused (see ``options.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

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

DEFAULT_PORT = 9100
#: what a printer may send back (PJL status) before we stop listening
MAX_BACKCHANNEL_BYTES = 1024 * 1024


class RawBackend:
    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        idle_timeout: float = 30.0,
        spool_dir: Path | None = None,
        snmp: PrinterMib | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.idle_timeout = idle_timeout
        self.spool_dir = spool_dir  # for the copy kept when copies > 1
        self.snmp = snmp  # the printer's state and page counter (connector/printer_mib.py); None: off

    def __repr__(self) -> str:
        return f"RawBackend({self.host!r}, {self.port})"

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port}"

    async def _connect(self) -> trio.SocketStream:
        return await connect_printer(self.host, self.port, self.connect_timeout, self._where)

    async def deliver(
        self,
        ticket: JobTicket,
        document: AsyncIterator[bytes],
        progress: Progress,
        journal: Journal | None = None,  # a socket has no job to journal
    ) -> DeliveryResult:
        try:
            refuse_for_stream("RAW", ticket.options)
        except OptionError as exc:
            raise DeliveryError(exc.message, retryable=False) from None
        if ticket.copies <= 1:
            sent, note = await self._send_once(document, progress)
            return DeliveryResult("completed", f"sent {sent} bytes to {self._where}{note}")
        if isinstance(document, VerifiedDocument):  # already whole on our side: send it again per copy
            sent, note = await self._send_once(document, progress)
            for copy in range(2, ticket.copies + 1):
                try:
                    _, note = await self._send_once(document, None)
                except DeliveryError as exc:
                    return DeliveryResult(
                        "failed", f"copy {copy} of {ticket.copies} not delivered: {exc.message}"
                    )
            return DeliveryResult(
                "completed", f"sent {ticket.copies} copies of {sent} bytes to {self._where}{note}"
            )
        # Copies by repetition, one connection each (a RAW printer takes one job per connection).
        # The first copy streams from the tunnel and is kept in a spool file for the others.
        async with SpoolFile(self.spool_dir) as spool:
            sent, note = await self._send_once(spool.tee(document), progress)
            for copy in range(2, ticket.copies + 1):
                try:
                    _, note = await self._send_once(spool.read(), None)
                except DeliveryError as exc:
                    # earlier copies printed: sending the job again would print them twice
                    return DeliveryResult(
                        "failed", f"copy {copy} of {ticket.copies} not delivered: {exc.message}"
                    )
        return DeliveryResult(
            "completed", f"sent {ticket.copies} copies of {sent} bytes to {self._where}{note}"
        )

    async def _send_once(self, document: AsyncIterator[bytes], progress: Progress | None) -> tuple[int, str]:
        """One connection: the document, EOF, then wait for the printer to close."""
        stream = await self._connect()
        async with stream:
            if progress is not None:
                await progress("printing", f"connected to {self._where}")
            sent = 0
            try:
                if isinstance(document, VerifiedDocument):
                    try:
                        await document.send_to(stream, self.io_timeout)  # sendfile(2)
                    finally:
                        sent = document.sent  # how far it got, for the errors below too
                else:
                    async for chunk in document:
                        with trio.fail_after(self.io_timeout):
                            await stream.send_all(chunk)
                        sent += len(chunk)
                with trio.fail_after(self.io_timeout):
                    await stream.send_eof()
            except trio.TooSlowError:
                raise DeliveryError(
                    f"{self._where} took no data for io_timeout={self.io_timeout:g} s after {sent} bytes",
                    retryable=True,
                ) from None
            except trio.BrokenResourceError as exc:
                raise DeliveryError(
                    f"{self._where} closed the connection after {sent} bytes: {exc.__cause__ or exc}",
                    retryable=True,
                ) from exc
            closed = await self._wait_for_close(stream)
        note = "" if closed else f"; it did not close within idle_timeout={self.idle_timeout:g} s"
        return sent, note

    async def _wait_for_close(self, stream: trio.SocketStream) -> bool:
        """Read (and drop) whatever the printer says until it closes; False when it stays idle."""
        received = 0
        while received <= MAX_BACKCHANNEL_BYTES:
            with trio.move_on_after(self.idle_timeout):
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return True  # a reset after our EOF: the printer is done with us
                if not data:
                    return True
                received += len(data)
                continue
            return False
        return False

    async def probe(self) -> bool:
        try:
            stream = await self._connect()
        except DeliveryError:
            return False
        await stream.aclose()
        return True
