"""Delivery to IPP printers (``ipp://``, ``ipps://``): Print-Job, then follow the printer's job.

1. POST one Print-Job request: the attribute section, then the document streamed as chunked
   transfer encoding, one chunk pulled from the tunnel per chunk the socket has taken.
2. Check the status: busy-like statuses are worth retrying, other errors are not.
3. Poll Get-Job-Attributes every ``poll_interval`` until job-state is terminal (RFC 8011 §5.3.7),
   or ``job_timeout`` passes.

Once the printer has answered Print-Job with a job-id, nothing ends in a retryable error: sending
again would print twice. Before that answer, a timeout is retryable even though the printer may have
received the whole document; IPP gives no way to tell (Create-Job + Send-Document would narrow it).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import httpx
import trio

from connector.delivery.base import DeliveryError, DeliveryResult, JobTicket, Journal, Progress
from connector.delivery.options import OptionError, ipp_job_attributes
from ipp import (
    DEFAULT_LIMITS,
    DelimiterTag,
    IPPError,
    JobState,
    Limits,
    Message,
    MessageParser,
    Operation,
    Status,
    ValueTag,
    encode,
    keyword,
    new_request,
)

DEFAULT_PORT = 631  # for ipps too (RFC 7472 §4)

#: statuses that mean "not now": the relay may send the job again later
RETRYABLE_STATUSES = frozenset(
    {
        Status.SERVER_ERROR_BUSY,
        Status.SERVER_ERROR_SERVICE_UNAVAILABLE,
        Status.SERVER_ERROR_TEMPORARY_ERROR,
    }
)
#: HTTP statuses a proxy or a restarting printer gives when it is only temporarily unable
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


CANCEL_TIMEOUT = 10.0  # seconds to tell a printer a job was canceled


class IppBackend:
    """Prints through IPP/1.1+ Print-Job to one printer URI."""

    def __init__(
        self,
        uri: str,
        *,
        connect_timeout: float = 10.0,
        io_timeout: float = 60.0,
        poll_interval: float = 0.5,
        job_timeout: float = 3600.0,
        max_poll_errors: int = 10,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in ("ipp", "ipps") or not parts.hostname:
            raise ValueError(f"not an ipp:// or ipps:// printer URI: {uri!r}")
        port = parts.port or DEFAULT_PORT
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        http_scheme = "https" if parts.scheme == "ipps" else "http"
        self.uri = uri
        self.url = f"{http_scheme}://{host}:{port}{parts.path or '/'}"
        self.poll_interval = poll_interval
        self.job_timeout = job_timeout
        self.max_poll_errors = max_poll_errors
        self.limits = limits
        self._probe_timeout = connect_timeout + io_timeout
        self._timeout = httpx.Timeout(
            connect=connect_timeout, read=io_timeout, write=io_timeout, pool=connect_timeout
        )
        self._request_ids = itertools.count(1)
        self._create_job: bool | None = None  # does the printer take Create-Job + Send-Document?

    def __repr__(self) -> str:
        return f"IppBackend({self.uri!r})"

    def _client(self) -> httpx.AsyncClient:
        # ipps: default certificate verification; printers with self-signed certificates need
        # a configurable trust store, which is for later.
        return httpx.AsyncClient(timeout=self._timeout)

    def _request(self, operation: Operation) -> Message:
        return new_request(operation, next(self._request_ids), printer_uri=self.uri)

    async def _exchange(
        self,
        client: httpx.AsyncClient,
        request: Message,
        document: AsyncIterator[bytes] | None = None,
    ) -> Message:
        """POST ``request`` (and the document after it) and decode the response's attributes."""

        async def body() -> AsyncIterator[bytes]:
            yield encode(request)
            if document is not None:
                async for chunk in document:
                    if chunk:  # an empty chunk would end the chunked body early
                        yield chunk

        what = keyword(Operation, request.code)
        try:
            async with client.stream(
                "POST", self.url, content=body(), headers={"Content-Type": "application/ipp"}
            ) as response:
                if response.status_code != 200:
                    raise DeliveryError(
                        f"{self.uri}: {what} answered HTTP {response.status_code}",
                        retryable=response.status_code in RETRYABLE_HTTP,
                    )
                # the parser bounds what is read: a response never buffers more than limits allow
                parser = MessageParser(self.limits)
                async for chunk in response.aiter_bytes():
                    done = parser.feed(chunk)
                    if done is not None:
                        return done.message
                parser.end_of_input()
                raise AssertionError("unreachable")  # end_of_input raised
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                f"{self.uri}: {what} timed out ({type(exc).__name__})", retryable=True
            ) from exc
        except httpx.TransportError as exc:
            root = _root_cause(exc)
            if isinstance(root, ssl.SSLCertVerificationError):
                # not a passing condition: retrying will not make the certificate trusted
                raise DeliveryError(
                    f"{self.uri}: TLS certificate not trusted: {root.verify_message}",
                    retryable=False,
                ) from exc
            raise DeliveryError(
                f"{self.uri}: {what} failed: {type(exc).__name__}: {exc or repr(root)}",
                retryable=True,
            ) from exc
        except IPPError as exc:
            raise DeliveryError(
                f"{self.uri}: unreadable {what} response: {exc.message}", retryable=True
            ) from exc

    async def deliver(
        self,
        ticket: JobTicket,
        document: AsyncIterator[bytes],
        progress: Progress,
        journal: Journal | None = None,
    ) -> DeliveryResult:
        """Hand the job to the printer and follow it to its end.

        With a ``journal`` and a printer that supports it, the job is made with Create-Job and its id is
        journaled before Send-Document carries the document: a connector that dies mid-delivery can then
        tell, when the job comes again, whether the printer already has it (no second print) or not.
        Otherwise one Print-Job.
        """
        try:
            attributes = ipp_job_attributes(ticket.copies, ticket.options)
        except OptionError as exc:
            raise DeliveryError(f"{self.uri}: {exc.message}", retryable=False) from None
        async with self._client() as client:
            if ticket.earlier_printer_job is not None:
                earlier = await self._resolve_earlier(client, ticket)
                if earlier is not None:
                    await progress(
                        "printing", f"printer job {ticket.earlier_printer_job} already had the document"
                    )
                    return await self._settle(client, ticket, ticket.earlier_printer_job, earlier)
            two_step = journal is not None and await self._supports_create_job(client)
            request = self._request(Operation.CREATE_JOB if two_step else Operation.PRINT_JOB)
            op = request.operation
            op.add("requesting-user-name", ValueTag.NAME, ticket.user)
            op.add("job-name", ValueTag.NAME, ticket.title)
            if not two_step:
                op.add("document-format", ValueTag.MIME_MEDIA_TYPE, ticket.document_format)
            if attributes:
                group = request.add_group(DelimiterTag.JOB_ATTRIBUTES)
                for attribute in attributes:
                    group.attributes[attribute.name] = attribute
            if two_step:
                assert journal is not None
                created = await self._exchange(client, request)
                _check_status(self.uri, created)
                job_id = created.value(DelimiterTag.JOB_ATTRIBUTES, "job-id")
                if not isinstance(job_id, int):
                    raise DeliveryError(f"{self.uri}: Create-Job answered without a job-id", retryable=True)
                await journal(job_id)
                send = self._request(Operation.SEND_DOCUMENT)
                send.operation.add("job-id", ValueTag.INTEGER, job_id)
                send.operation.add("requesting-user-name", ValueTag.NAME, ticket.user)
                send.operation.add("document-format", ValueTag.MIME_MEDIA_TYPE, ticket.document_format)
                send.operation.add("last-document", ValueTag.BOOLEAN, True)
                try:
                    response = await self._exchange(client, send, document)
                    _check_status(self.uri, response)
                except BaseException:
                    # The printer holds a job that will never get its document: drop it (best effort).
                    with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_TIMEOUT):
                        await self._cancel_printer_job(client, job_id, ticket.user)
                    raise
            else:
                response = await self._exchange(client, request, document)
                _check_status(self.uri, response)
                job_id = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-id")
                if not isinstance(job_id, int):
                    return DeliveryResult("completed", "printer accepted the job without a job-id")
            await progress("printing", f"printer job {job_id} accepted")
            return await self._settle(client, ticket, job_id, response)

    async def _settle(
        self, client: httpx.AsyncClient, ticket: JobTicket, job_id: int, response: Message
    ) -> DeliveryResult:
        state = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state")
        if isinstance(state, int) and state >= JobState.CANCELED:
            return _result(job_id, response)
        try:
            return await self._follow(client, job_id, ticket.user)
        except trio.Cancelled:
            if ticket.job_canceled():  # the relay canceled it while the printer had it: drop it there too
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_TIMEOUT):
                    await self._cancel_printer_job(client, job_id, ticket.user)
            raise

    async def follow(self, ticket: JobTicket, job_id: int) -> DeliveryResult | None:
        """A printer job an earlier delivery handed over whole (before the connector restarted), followed
        to its end. None when the printer no longer knows it (purged from its history): it had the
        document, so it is never sent again. A DeliveryError when the printer cannot be asked now."""
        request = self._request(Operation.GET_JOB_ATTRIBUTES)
        request.operation.add("job-id", ValueTag.INTEGER, job_id)
        request.operation.add("requesting-user-name", ValueTag.NAME, ticket.user)
        request.operation.add("requested-attributes", ValueTag.KEYWORD, "job-state", "job-state-reasons")
        async with self._client() as client:
            response = await self._exchange(client, request)
            if response.code == Status.CLIENT_ERROR_NOT_FOUND:
                return None
            _check_status(self.uri, response)
            return await self._settle(client, ticket, job_id, response)

    async def cancel_stalled(self, user: str, older_than: float | None = None) -> list[int]:
        """Cancel printer jobs left waiting for their document (``job-data-insufficient``) for longer than
        the printer's ``multiple-operation-time-out`` (or ``older_than`` seconds); their ids.

        A client that died between Create-Job and Send-Document leaves such a job, this connector too
        when it was killed before it journaled the job's id. The printer says it aborts them after that
        time; one that does not (ippeveprinter) answers every other job "busy" until someone does.
        """
        async with self._client() as client:
            about = self._request(Operation.GET_PRINTER_ATTRIBUTES)
            about.operation.add(
                "requested-attributes", ValueTag.KEYWORD, "multiple-operation-time-out", "printer-up-time"
            )
            printer = await self._exchange(client, about)
            advertised = printer.value(DelimiterTag.PRINTER_ATTRIBUTES, "multiple-operation-time-out")
            limit = older_than if older_than is not None else advertised
            now = printer.value(DelimiterTag.PRINTER_ATTRIBUTES, "printer-up-time")
            if not isinstance(limit, int | float) or not isinstance(now, int):
                return []  # no clock to tell a stalled job from a slow one
            jobs = self._request(Operation.GET_JOBS)
            jobs.operation.add("requesting-user-name", ValueTag.NAME, user)
            jobs.operation.add("which-jobs", ValueTag.KEYWORD, "not-completed")
            jobs.operation.add(
                "requested-attributes", ValueTag.KEYWORD, "job-id", "job-state", "job-state-reasons",
                "time-at-creation",
            )  # fmt: skip
            listed = await self._exchange(client, jobs)
            _check_status(self.uri, listed)
            stalled = []
            for job in listed.groups_of(DelimiterTag.JOB_ATTRIBUTES):
                job_id, state, created = (
                    a.value if (a := job.get(name)) is not None else None
                    for name in ("job-id", "job-state", "time-at-creation")
                )
                reasons = set(r.values) if (r := job.get("job-state-reasons")) is not None else set()
                # waiting for a document, none arriving (some printers say both while one arrives)
                waiting = "job-data-insufficient" in reasons and "job-incoming" not in reasons
                if (
                    isinstance(job_id, int) and isinstance(created, int) and waiting
                    and state in (JobState.PENDING, JobState.PENDING_HELD) and now - created >= limit
                    and await self._cancel_printer_job(client, job_id, user)
                ):  # fmt: skip
                    stalled.append(job_id)
            return stalled

    async def _supports_create_job(self, client: httpx.AsyncClient) -> bool:
        if self._create_job is None:
            request = self._request(Operation.GET_PRINTER_ATTRIBUTES)
            request.operation.add("requested-attributes", ValueTag.KEYWORD, "operations-supported")
            try:
                response = await self._exchange(client, request)
            except DeliveryError:
                return False  # ask again next time; Print-Job meanwhile
            supported = response.attribute(DelimiterTag.PRINTER_ATTRIBUTES, "operations-supported")
            values = set(supported.values) if supported is not None else set()
            self._create_job = {Operation.CREATE_JOB, Operation.SEND_DOCUMENT} <= values
        return self._create_job

    async def _resolve_earlier(self, client: httpx.AsyncClient, ticket: JobTicket) -> Message | None:
        """The earlier attempt's printer job, if the printer got its whole document; else None (after
        canceling a job that still waits for a document, so it cannot print later)."""
        job_id = ticket.earlier_printer_job
        assert job_id is not None
        request = self._request(Operation.GET_JOB_ATTRIBUTES)
        request.operation.add("job-id", ValueTag.INTEGER, job_id)
        request.operation.add("requesting-user-name", ValueTag.NAME, ticket.user)
        request.operation.add("requested-attributes", ValueTag.KEYWORD, "job-state", "job-state-reasons")
        response = await self._exchange(client, request)
        if response.code == Status.CLIENT_ERROR_NOT_FOUND:
            return None
        _check_status(self.uri, response)
        state = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state")
        reasons = response.attribute(DelimiterTag.JOB_ATTRIBUTES, "job-state-reasons")
        waiting = {"job-incoming", "job-data-insufficient"} & set(reasons.values if reasons else ())
        if state in (JobState.PENDING, JobState.PENDING_HELD) or waiting:
            await self._cancel_printer_job(client, job_id, ticket.user)
            return None
        if state in (JobState.CANCELED, JobState.ABORTED):
            return None  # it did not print; print it now
        return response  # processing, stopped or completed: the printer has the document

    async def _cancel_printer_job(self, client: httpx.AsyncClient, job_id: int, user: str) -> bool:
        """Cancel-Job (RFC 8011 §4.3.3), best effort: the job may have finished meanwhile. Whether the
        printer did it."""
        request = self._request(Operation.CANCEL_JOB)
        request.operation.add("job-id", ValueTag.INTEGER, job_id)
        request.operation.add("requesting-user-name", ValueTag.NAME, user)
        try:
            return (await self._exchange(client, request)).code < 0x0100
        except DeliveryError:
            return False

    async def _follow(self, client: httpx.AsyncClient, job_id: int, user: str) -> DeliveryResult:
        """Poll Get-Job-Attributes until the job is terminal, a bounded number of errors, or time."""
        errors = 0
        last: Message | None = None
        with trio.move_on_after(self.job_timeout):
            while True:
                request = self._request(Operation.GET_JOB_ATTRIBUTES)
                request.operation.add("job-id", ValueTag.INTEGER, job_id)
                # as the job's owner: CUPS shows other users' job details only to admins
                request.operation.add("requesting-user-name", ValueTag.NAME, user)
                request.operation.add(
                    "requested-attributes",
                    ValueTag.KEYWORD,
                    "job-state",
                    "job-state-reasons",
                    "job-state-message",
                )
                try:
                    response = await self._exchange(client, request)
                except DeliveryError as exc:
                    # the printer took the job: sending it again would print it twice, so errors
                    # here end in a failed result, never in a DeliveryError
                    errors += 1
                    if errors >= self.max_poll_errors:
                        return DeliveryResult(
                            "failed",
                            f"printer job {job_id} accepted, then lost contact: {exc.message}",
                            job_id,
                        )
                else:
                    errors = 0
                    if response.code == Status.CLIENT_ERROR_NOT_FOUND:
                        return DeliveryResult(
                            "failed", f"printer job {job_id} accepted, then forgotten", job_id
                        )
                    state = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state")
                    last = response
                    if isinstance(state, int) and state >= JobState.CANCELED:
                        return _result(job_id, response)
                await trio.sleep(self.poll_interval)
        detail = f" ({_job_detail(last)})" if last is not None else ""
        return DeliveryResult(
            "failed",
            f"printer job {job_id} not finished after job_timeout={self.job_timeout:g} s{detail}",
            job_id,
        )

    def new_request(self, operation: Operation) -> Message:
        """A request to this printer (charset, language, printer-uri) with the next request-id."""
        return self._request(operation)

    async def send(self, request: Message) -> Message:
        """One request without a document; a DeliveryError when the printer cannot be asked."""
        async with self._client() as client:
            return await self._exchange(client, request)

    async def get_printer_attributes(self, requested: Sequence[str]) -> Message:
        """Get-Printer-Attributes (RFC 8011 §4.2.5); a DeliveryError when the printer cannot be asked."""
        request = self._request(Operation.GET_PRINTER_ATTRIBUTES)
        request.operation.add("requested-attributes", ValueTag.KEYWORD, *requested)
        return await self.send(request)

    async def probe(self) -> bool:
        request = self._request(Operation.GET_PRINTER_ATTRIBUTES)
        request.operation.add("requested-attributes", ValueTag.KEYWORD, "printer-state")
        with trio.move_on_after(self._probe_timeout):
            try:
                async with self._client() as client:
                    response = await self._exchange(client, request)
            except DeliveryError:
                return False
            return response.code < 0x0100
        return False


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: httpx wraps socket and TLS errors two or three levels deep."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


def _check_status(uri: str, response: Message) -> None:
    if response.code < 0x0100:
        return
    name = keyword(Status, response.code)
    detail = response.value(DelimiterTag.OPERATION_ATTRIBUTES, "status-message")
    message = f"{uri}: printer refused the job: {name}"
    if isinstance(detail, str) and detail:
        message += f" ({detail})"
    raise DeliveryError(
        message, retryable=response.code in RETRYABLE_STATUSES, busy=response.code == Status.SERVER_ERROR_BUSY
    )


def _job_detail(response: Message) -> str:
    state = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state")
    parts = [keyword(JobState, state) if isinstance(state, int) else "job-state unknown"]
    reasons = response.attribute(DelimiterTag.JOB_ATTRIBUTES, "job-state-reasons")
    if reasons is not None:
        named = [str(r) for r in reasons.values if isinstance(r, str) and r != "none"]
        if named:
            parts.append(", ".join(named))
    message = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state-message")
    if isinstance(message, str) and message:
        parts.append(message)
    return "; ".join(parts)


def _result(job_id: int, response: Message) -> DeliveryResult:
    state = response.value(DelimiterTag.JOB_ATTRIBUTES, "job-state")
    if state == JobState.COMPLETED:
        return DeliveryResult("completed", f"printer job {job_id} completed", job_id)
    return DeliveryResult("failed", f"printer job {job_id} {_job_detail(response)}", job_id)
