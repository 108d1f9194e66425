"""What every delivery backend takes and returns, whatever the protocol to the printer."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import trio


@dataclass(frozen=True)
class JobTicket:
    job_id: str  # relay job id
    title: str
    document_format: str  # MIME type, e.g. "application/pdf", "application/octet-stream"
    copies: int = 1
    user: str = "printrelay"  # requesting-user-name
    size: int | None = None  # bytes, when known
    options: Mapping[str, str] = field(
        default_factory=dict
    )  # sides, media, ... (connector/delivery/options.py)
    # A job an earlier attempt created at the printer (IPP Create-Job) whose fate is unknown: the
    # connector died between creating it and hearing how it ended. The backend resolves it first.
    earlier_printer_job: int | None = None
    # Asked when the delivery is cancelled while the printer has the job: was the job itself canceled (the
    # printer drops it too), or is the connector only stopping (the printer goes on, and the job's next
    # delivery follows it)?
    job_canceled: Callable[[], bool] = lambda: True


@dataclass(frozen=True)
class DeliveryResult:
    state: Literal["completed", "failed"]
    message: str  # human-readable: "printer job 7 completed" or the printer's reasons
    printer_job_id: int | None = None


class DeliveryError(Exception):
    """The job could not be handed to the printer.

    ``retryable`` is true when trying again later may work (printer busy, connection refused,
    timeout) and false when it will not (the printer refused this job as it is). ``busy``: the printer
    said it is busy with another job, which is not this job's fault (the relay does not count the attempt).
    """

    def __init__(self, message: str, *, retryable: bool, busy: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.busy = busy


#: (state, message): called with ("printing", ...) once the printer has accepted the job
Progress = Callable[[str, str], Awaitable[None]]

#: called with the printer's job id after Create-Job and before any document byte is sent, so a
#: connector that dies mid-delivery knows which printer job to look at when the job comes again
Journal = Callable[[int], Awaitable[None]]


class Backend(Protocol):
    async def deliver(
        self,
        ticket: JobTicket,
        document: AsyncIterator[bytes],
        progress: Progress,
        journal: Journal | None = None,
    ) -> DeliveryResult:
        """Send the document to the printer and follow it to a final state.

        ``document`` is pulled one chunk at a time, only once the printer side has taken the previous
        one, so back-pressure reaches the sender; it is never joined into one bytes object.
        """
        ...

    async def probe(self) -> bool:
        """Is the printer reachable? Bounded by the backend's timeout; never raises."""
        ...


async def connect_printer(host: str, port: int, connect_timeout: float, where: str) -> trio.SocketStream:
    """A TCP connection to a printer (RAW, LPD); failures are retryable DeliveryErrors naming ``where``."""
    try:
        with trio.fail_after(connect_timeout):
            family = _literal_family(host)
            if family is None:
                return await trio.open_tcp_stream(host, port)
            # An address: one socket and one connect. open_tcp_stream's resolver and happy-eyeballs
            # nursery cost more CPU than the connect itself (a RAW printer takes one connection per job).
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                await sock.connect((host, port))
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)
    except trio.TooSlowError:
        raise DeliveryError(
            f"cannot connect to {where}: no answer within connect_timeout={connect_timeout:g} s",
            retryable=True,
        ) from None
    except OSError as exc:
        raise DeliveryError(f"cannot connect to {where}: {exc}", retryable=True) from exc


@functools.lru_cache(maxsize=1024)
def _literal_family(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP address without a zone; None for a name (or a scoped address)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return None
    return socket.AF_INET if address.version == 4 else socket.AF_INET6
