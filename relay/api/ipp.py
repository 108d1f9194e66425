"""The relay as an IPP printer: ``POST /ipp/print/{printer_id}`` (RFC 8010/8011), one per relay printer.

Any IPP client (CUPS, Windows, macOS, ipptool) prints here with no agent installed; jobs made here are
ordinary relay jobs, accepted through :class:`relay.submit.Intake` like REST submissions.

Shape of one request:

1. HTTP: POST with ``Content-Type: application/ipp``; credentials are HTTP Basic (a person's email and
   password or one of their tokens; or a tenant and an API token of it) or Bearer. None or bad: 401 with
   a Basic challenge, which is what makes CUPS ask for (or send) the password. One exception: a small
   Get-Printer-Attributes without an Authorization header may carry the credentials in its printer-uri
   (``ipp://user:password@host/...``). That is how CUPS's scheduler asks for a printer's attributes when
   ``lpadmin -m everywhere`` makes a queue: it sends the device URI, credentials and all, and never
   answers a 401 (see :func:`uri_credentials`).
2. The attribute section is parsed incrementally from the body (bounded by
   ``IppLimits.max_attribute_bytes``); the document that follows is streamed into the spool, never
   held whole.
3. The request is checked as RFC 8011 §4.1 asks (request-id, charset and language first, groups,
   syntaxes, target) and carried out. Every problem with the request is an IPP status in an HTTP 200
   answer, never an HTTP 500.

IPP names jobs by integers: each tenant's jobs get numbers from the store (``ipp_jobs``). A Create-Job
has a number before it has a relay job; its document's Send-Document makes the relay job.

A job asked for with job-hold-until (anything but no-hold), one set aside with Hold-Job and every job
of a pull printer is a held relay job until Release-Job; only its owner or a tenant admin sees it to
hold or release it, like every other job operation.
"""

from __future__ import annotations

import base64
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import trio

from ipp import (
    Attribute,
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
    error_response,
    keyword,
    new_response,
)
from relay import audit, fetch
from relay.api.ipp_attributes import (
    MULTIPLE_OPERATION_TIMEOUT,
    RELAY_OPERATIONS,
    WHICH_JOBS,
    JobView,
    PrinterView,
    job_attributes,
    job_groups,
    printer_attributes,
    printer_groups,
    reported_attributes,
    select,
)
from relay.api.ipp_ticket import Ticket, job_ticket, option_attributes
from relay.auth import Principal
from relay.credentials import Credentials
from relay.jobs import FINAL_STATES, IPP_JOB_STATE, IppJobEvent, IppJobState, Job
from relay.jobs import JobState as RelayState
from relay.lifecycle import JobLifecycle
from relay.ratelimit import TokenRateLimiter, spend_request
from relay.store.base import IppJob, Printer, Store
from relay.submit import MAX_COPIES, Intake, Refusal, Submission, SubmitError
from relay.users import People
from service.http.message import HTTPError, Request, Response

log = logging.getLogger("printrelay.relay.ipp")

PATH_RE = re.compile(r"^/ipp/print/(?P<printer>[^/]{1,128})(?:/(?P<job>[0-9]{1,10}))?/?$")
FORMAT_RE = re.compile(r"^[a-z0-9!#$&^_.+-]{1,127}/[a-z0-9!#$&^_.+-]{1,127}$")
HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$"
)
CHALLENGE = [("www-authenticate", 'Basic realm="printrelay"')]
IPP_CONTENT_TYPE = "application/ipp"
#: a Create-Job's document upload that never finished (the relay restarted mid-upload) is given up after
RECEIVING_TIMEOUT = 3600.0
#: bound on the store write that undoes a failed Send-Document (it runs even while being cancelled)
STORE_CLEANUP_TIMEOUT = 10.0
#: the largest request read before authentication, for credentials in its printer-uri (CUPS's own
#: Get-Printer-Attributes is about 200 bytes); a larger one, or one of unknown length, is a plain 401
URI_CREDENTIALS_MAX_BODY = 8 * 1024

# Operation attributes the relay reads, and the syntaxes RFC 8011 gives them.
_NAME = (ValueTag.NAME, ValueTag.NAME_WITH_LANGUAGE)
OPERATION_SYNTAX: dict[str, tuple[int, ...]] = {
    "printer-uri": (ValueTag.URI,),
    "job-uri": (ValueTag.URI,),
    "job-id": (ValueTag.INTEGER,),
    "requesting-user-name": _NAME,
    "job-name": _NAME,
    "document-name": _NAME,
    "document-format": (ValueTag.MIME_MEDIA_TYPE,),
    "compression": (ValueTag.KEYWORD,),
    "ipp-attribute-fidelity": (ValueTag.BOOLEAN,),
    "last-document": (ValueTag.BOOLEAN,),
    "my-jobs": (ValueTag.BOOLEAN,),
    "which-jobs": (ValueTag.KEYWORD,),
    "limit": (ValueTag.INTEGER,),
    "requested-attributes": (ValueTag.KEYWORD,),
    "job-hold-until": (ValueTag.KEYWORD, *_NAME),
    "document-uri": (ValueTag.URI,),
}
MULTI_VALUED = frozenset({"requested-attributes"})
JOB_CREATION = frozenset(
    {Operation.PRINT_JOB, Operation.PRINT_URI, Operation.VALIDATE_JOB, Operation.CREATE_JOB}
)
JOB_TARGETED = frozenset(
    {
        Operation.SEND_DOCUMENT,
        Operation.SEND_URI,
        Operation.CANCEL_JOB,
        Operation.GET_JOB_ATTRIBUTES,
        Operation.HOLD_JOB,
        Operation.RELEASE_JOB,
        Operation.CLOSE_JOB,
    }
)
READ_ONLY = frozenset({Operation.GET_JOB_ATTRIBUTES, Operation.GET_JOBS, Operation.GET_PRINTER_ATTRIBUTES})
# Groups a request may carry besides its operation attributes (RFC 8011 §4.2, §4.3.1).
EXTRA_GROUPS: dict[int, frozenset[int]] = {
    Operation.PRINT_JOB: frozenset({DelimiterTag.JOB_ATTRIBUTES}),
    Operation.PRINT_URI: frozenset({DelimiterTag.JOB_ATTRIBUTES}),
    Operation.VALIDATE_JOB: frozenset({DelimiterTag.JOB_ATTRIBUTES}),
    Operation.CREATE_JOB: frozenset({DelimiterTag.JOB_ATTRIBUTES}),
    Operation.SEND_DOCUMENT: frozenset({DelimiterTag.DOCUMENT_ATTRIBUTES}),
    Operation.SEND_URI: frozenset({DelimiterTag.DOCUMENT_ATTRIBUTES}),
}
DEFAULT_JOB_LISTING = ("job-id", "job-uri")
_TIMES = frozenset({"all", "job-description", "time-at-processing", "date-time-at-processing"})
_RELAY_REASONS = {
    RelayState.HELD: ("job-hold-until-specified",),
    RelayState.QUEUED: ("job-queued",),
    RelayState.SENDING: ("job-printing",),
    RelayState.PRINTING: ("job-printing",),
    RelayState.COMPLETED: ("job-completed-successfully",),
    RelayState.FAILED: ("aborted-by-system", "job-completed-with-errors"),
    RelayState.CANCELED: ("job-canceled-by-user",),
    RelayState.EXPIRED: ("aborted-by-system",),
}
_FETCH_STATUS = {
    fetch.Failure.TOO_LARGE: Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE,
    fetch.Failure.BUSY: Status.SERVER_ERROR_BUSY,
}
_REFUSAL_STATUS = {
    Refusal.NOT_FOUND: Status.CLIENT_ERROR_NOT_FOUND,
    Refusal.BAD_REQUEST: Status.CLIENT_ERROR_BAD_REQUEST,
    Refusal.CONFLICT: Status.CLIENT_ERROR_NOT_POSSIBLE,
    Refusal.TOO_LARGE: Status.CLIENT_ERROR_REQUEST_ENTITY_TOO_LARGE,
    Refusal.UNAVAILABLE: Status.SERVER_ERROR_SERVICE_UNAVAILABLE,
    Refusal.STORAGE_FULL: Status.SERVER_ERROR_TEMPORARY_ERROR,
}


@dataclass(frozen=True)
class IppLimits:
    #: the attribute section of one request (CUPS itself sends a few KiB; a Get-Jobs answer is ours)
    max_attribute_bytes: int = 256 * 1024
    max_attributes: int = 1000
    #: jobs one Get-Jobs looks at per state (newest first)
    max_jobs_listed: int = 500


def _ipp_error(status: Status, message: str) -> IPPError:
    return IPPError(status, message)


def _bad(message: str) -> IPPError:
    return IPPError(Status.CLIENT_ERROR_BAD_REQUEST, message)


# --------------------------------------------------------------------------------------------
# checking a request (sans-IO)


def check_request(message: Message) -> None:
    """RFC 8011 §4.1: what every request must be, whatever its operation. Raises :class:`IPPError`."""
    if not 1 <= message.request_id <= 2**31 - 1:
        raise _bad(f"request-id {message.request_id} is not in 1..2147483647 (RFC 8011 §4.1.1)")
    if not message.groups or message.groups[0].tag != DelimiterTag.OPERATION_ATTRIBUTES:
        raise _bad("the first attribute group must be operation-attributes (RFC 8011 §4.1.4)")
    operation = message.groups[0]
    names = list(operation.attributes)
    if names[:2] != ["attributes-charset", "attributes-natural-language"]:
        raise _bad(
            "operation attributes must begin with attributes-charset, then attributes-natural-language "
            "(RFC 8011 §4.1.4)"
        )
    charset = operation["attributes-charset"]
    language = operation["attributes-natural-language"]
    if charset.tag != ValueTag.CHARSET or len(charset.values) != 1:
        raise _bad("attributes-charset must be one charset value")
    if language.tag != ValueTag.NATURAL_LANGUAGE or len(language.values) != 1:
        raise _bad("attributes-natural-language must be one naturalLanguage value")
    if str(charset.value).lower() not in ("utf-8", "us-ascii"):
        raise _ipp_error(
            Status.CLIENT_ERROR_CHARSET_NOT_SUPPORTED,
            f"charset {charset.value!r} is not supported (utf-8 is)",
        )
    if message.code not in RELAY_OPERATIONS:
        raise _ipp_error(
            Status.SERVER_ERROR_OPERATION_NOT_SUPPORTED,
            f"operation {keyword(Operation, message.code)} is not supported by this printer",
        )
    allowed = EXTRA_GROUPS.get(message.code, frozenset())
    for group in message.groups[1:]:
        if group.tag not in allowed:
            raise _bad(f"{_group_name(group.tag)} group is not allowed in {keyword(Operation, message.code)}")
    for attribute in operation:
        syntax = OPERATION_SYNTAX.get(attribute.name)
        if syntax is None:
            continue
        if any(tag not in syntax for tag in attribute.tags):
            raise _bad(f"operation attribute {attribute.name!r} has the wrong syntax")
        if len(attribute.values) != 1 and attribute.name not in MULTI_VALUED:
            raise _bad(f"operation attribute {attribute.name!r} must have one value")
    if "printer-uri" not in operation and "job-uri" not in operation:
        raise _bad("missing printer-uri (or job-uri) operation attribute (RFC 8011 §4.1.5)")


def _group_name(tag: int) -> str:
    try:
        return DelimiterTag(tag).name.lower().replace("_", "-")
    except ValueError:
        return f"0x{tag:02x}"


def _text(message: Message, name: str) -> str | None:
    value = message.value(DelimiterTag.OPERATION_ATTRIBUTES, name)
    if isinstance(value, tuple):  # nameWithLanguage
        value = value[0]
    return value if isinstance(value, str) else None


def _bool(message: Message, name: str) -> bool | None:
    value = message.value(DelimiterTag.OPERATION_ATTRIBUTES, name)
    return value if isinstance(value, bool) else None


def _int(message: Message, name: str) -> int | None:
    value = message.value(DelimiterTag.OPERATION_ATTRIBUTES, name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def requested_attributes(message: Message) -> list[str] | None:
    attribute = message.attribute(DelimiterTag.OPERATION_ATTRIBUTES, "requested-attributes")
    if attribute is None:
        return None
    return [v for v in attribute.values if isinstance(v, str)]


def job_number(message: Message, path_job: int | None) -> int:
    """The job a job operation targets: job-uri, or printer-uri + job-id, or the HTTP path."""
    job_uri = _text(message, "job-uri")
    if job_uri is not None:
        tail = urllib.parse.urlsplit(job_uri).path.rstrip("/").rsplit("/", 1)[-1]
        if not tail.isdigit() or not 0 < int(tail) < 2**31:
            raise _bad(f"job-uri {job_uri!r} does not end in a job number")
        return int(tail)
    number = _int(message, "job-id")
    if number is None:
        number = path_job
    if number is None:
        raise _bad("missing job-id operation attribute (RFC 8011 §4.3)")
    if number <= 0:
        raise _bad(f"job-id {number} is not a job number")
    return number


def uri_credentials(message: Message) -> str | None:
    """An ``Authorization`` value from the userinfo of a Get-Printer-Attributes' printer-uri, or None.

    CUPS's scheduler, making a queue with ``lpadmin -m everywhere``, asks the device URI for its attributes
    with the URI's credentials in printer-uri and none in the HTTP request, and gives up on a 401 (the
    queue is then made without the printer's options). The credentials are the ones a Basic header would
    carry, on the same connection, and are checked the same way (rate limits included). Only for
    Get-Printer-Attributes: every other request answers a 401 with the header, as IPP clients do.
    """
    if message.code != Operation.GET_PRINTER_ATTRIBUTES:
        return None
    uri = _text(message, "printer-uri")
    if uri is None:
        return None
    try:
        parts = urllib.parse.urlsplit(uri)
        user, password = parts.username, parts.password
    except ValueError:
        return None
    if not user or password is None:
        return None
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


# --------------------------------------------------------------------------------------------
# the document part of the body


class _Document:
    """The body after the attribute section: the rest of the chunk that ended it, then the body."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes]) -> None:
        self._first = first
        self._rest = rest
        self._ended = False

    def __aiter__(self) -> _Document:
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        if self._ended:
            raise StopAsyncIteration
        try:
            return await self._rest.__anext__()
        except StopAsyncIteration:
            self._ended = True
            raise

    async def has_data(self) -> bool:
        """Whether any document byte follows (reads ahead at most one chunk)."""
        while not self._first and not self._ended:
            try:
                self._first = await self._rest.__anext__()
            except StopAsyncIteration:
                self._ended = True
        return bool(self._first)


@dataclass
class _Call:
    request: Message
    principal: Principal
    printer_id: str
    path_job: int | None
    printer_uri: str  # the relay's URI of this printer
    http_base: str  # http(s)://HOST, for links into the REST API
    document: _Document
    document_length: int | None

    @property
    def tenant(self) -> str:
        return self.principal.tenant

    @property
    def user(self) -> str:
        """A person is who they signed in as; for an API token, requesting-user-name says (or the token)."""
        if self.principal.user_id:
            return self.principal.email
        name = _text(self.request, "requesting-user-name")
        return name[:255] if name else self.principal.token_id

    @property
    def owner(self) -> str | None:
        """The user whose jobs alone this call may see and act on; None: all of the tenant's."""
        return None if self.principal.sees_all_jobs else self.principal.user_id

    def job_uri(self, number: int) -> str:
        return f"{self.printer_uri}/{number}"


# --------------------------------------------------------------------------------------------
# the endpoint


class IppEndpoint:
    """Answers IPP requests for the relay's printers. Keeps no state between requests."""

    def __init__(
        self,
        store: Store,
        jobs: JobLifecycle,
        intake: Intake,
        rate_limiter: TokenRateLimiter,
        *,
        credentials: Credentials | None = None,
        public_url: str = "",
        tls: bool = False,
        limits: IppLimits | None = None,
        fetcher: fetch.Fetcher | None = None,
    ) -> None:
        self._store = store
        self._credentials = credentials or Credentials(store, People(store))
        self._jobs = jobs
        self._intake = intake
        self._rate_limiter = rate_limiter
        self._public_url = public_url
        self._tls = tls
        self.limits = limits or IppLimits()
        # Print-URI and Send-URI (relay.fetch): the relay's own limits when the caller has none to give
        self._fetcher = fetcher or fetch.Fetcher(fetch.FetchLimits(max_bytes=intake.limits.max_job_bytes))

    async def handle(self, request: Request) -> Response:
        match = PATH_RE.match(request.path)
        if match is None:
            raise HTTPError(404, f"no such IPP printer: {request.path} (printers are /ipp/print/ID)")
        if request.method != "POST":
            raise HTTPError(405, "IPP requests are POSTs", [("allow", "POST")])
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type != IPP_CONTENT_TYPE:
            raise HTTPError(415, f"Content-Type must be {IPP_CONTENT_TYPE}, not {content_type or 'none'!r}")
        authorization = request.headers.get("authorization")
        length = request.body.content_length
        principal = None
        if authorization or length is None or length > URI_CREDENTIALS_MAX_BODY:
            principal = await self._credentials.of_request(request, CHALLENGE, authorization)
            spend_request(self._rate_limiter, principal)  # the REST budget of the token, shared (429)
        answer = await self._answer(request, principal, match["printer"], match["job"])
        return Response(200, [("content-type", IPP_CONTENT_TYPE)], encode(answer))

    async def _read(self, request: Request, head: _Head) -> tuple[Message, _Document, int]:
        """The attribute section, the document after it, and the section's size in bytes."""
        limits = self.limits
        parser = MessageParser(
            Limits(max_attribute_bytes=limits.max_attribute_bytes, max_attributes=limits.max_attributes)
        )
        body = request.body
        fed = 0
        async for chunk in body:
            head.feed(chunk)
            done = parser.feed(chunk)
            if done is not None:
                size = fed + done.document_start
                return done.message, _Document(chunk[done.document_start :], body.__aiter__()), size
            fed += len(chunk)
        parser.end_of_input()
        raise AssertionError("unreachable: end_of_input raised")

    async def _answer(
        self, request: Request, principal: Principal | None, printer_id: str, path_job: str | None
    ) -> Message:
        """``principal`` None: a small request without credentials; its printer-uri may carry some.

        Such a request is checked as IPP before credentials are asked for (a malformed one is answered
        as such: that reads nothing of any tenant). Besides, ipptool gives a request a new request-id
        after a 401 that comes with its response rather than before its body, so a conformance test of
        a bad request-id would otherwise never reach the check.
        """
        head = _Head()
        try:
            message, document, size = await self._read(request, head)
        except IPPError as exc:
            return error_response(head.request_id, exc, version=head.version)
        try:
            check_request(message)
        except IPPError as exc:
            return _error_answer(message, exc)
        if principal is None:
            principal = await self._credentials.of_request(request, CHALLENGE, uri_credentials(message))
            spend_request(self._rate_limiter, principal)
        remaining = None
        if request.body.content_length is not None:
            remaining = request.body.content_length - size
        printer_uri, http_base = self._bases(request, printer_id)
        call = _Call(
            request=message,
            principal=principal,
            printer_id=printer_id,
            path_job=int(path_job) if path_job else None,
            printer_uri=printer_uri,
            http_base=http_base,
            document=document,
            document_length=remaining,
        )
        try:
            scope = "jobs:read" if message.code in READ_ONLY else "jobs:submit"
            if not principal.allows(scope):
                raise _ipp_error(Status.CLIENT_ERROR_NOT_AUTHORIZED, f"token lacks the {scope} scope")
            return await self._operation(call)
        except IPPError as exc:
            return _error_answer(message, exc)

    def _bases(self, request: Request, printer_id: str) -> tuple[str, str]:
        public = urllib.parse.urlsplit(self._public_url) if self._public_url else None
        tls = self._tls or (public is not None and public.scheme == "https")
        host = request.headers.get("host")
        if host is None or len(host) > 255 or not HOST_RE.match(host):
            host = public.netloc if public is not None and public.netloc else "localhost"
        path = urllib.parse.quote(printer_id, safe="")
        scheme = ("ipps", "https") if tls else ("ipp", "http")
        return f"{scheme[0]}://{host}/ipp/print/{path}", f"{scheme[1]}://{host}"

    async def _operation(self, call: _Call) -> Message:
        handlers = {
            Operation.PRINT_JOB: self.print_job,
            Operation.PRINT_URI: self.print_uri,
            Operation.VALIDATE_JOB: self.validate_job,
            Operation.CREATE_JOB: self.create_job,
            Operation.SEND_DOCUMENT: self.send_document,
            Operation.SEND_URI: self.send_uri,
            Operation.CLOSE_JOB: self.close_job,
            Operation.CANCEL_JOB: self.cancel_job,
            Operation.GET_JOB_ATTRIBUTES: self.get_job_attributes,
            Operation.GET_JOBS: self.get_jobs,
            Operation.GET_PRINTER_ATTRIBUTES: self.get_printer_attributes,
            Operation.HOLD_JOB: self.hold_job,
            Operation.RELEASE_JOB: self.release_job,
        }
        return await handlers[Operation(call.request.code)](call)

    # --- printers -------------------------------------------------------------------------------

    async def _printer(self, call: _Call) -> Printer:
        printer = await self._store.get_printer(call.tenant, call.printer_id)
        if printer is None:
            raise _ipp_error(Status.CLIENT_ERROR_NOT_FOUND, f"printer {call.printer_id} not found")
        return printer

    def _printer_view(self, call: _Call, printer: Printer, queued: int = 0) -> PrinterView:
        return PrinterView(
            tenant=call.tenant,
            printer_id=printer.id,
            printer_uri=call.printer_uri,
            more_info=f"{call.http_base}/v1/printers/{urllib.parse.quote(printer.id, safe='')}",
            online=printer.online,
            state=printer.state,
            reasons=printer.reasons,
            queued_jobs=queued,
            connector_id=printer.connector_id,
            pull=printer.pull,
            message=printer.message,
        )

    async def _printer_attributes(
        self, call: _Call, printer: Printer, queued: int = 0
    ) -> dict[str, Attribute]:
        reported = reported_attributes(printer.capabilities, printer.id)
        return printer_attributes(reported, self._printer_view(call, printer, queued))

    async def get_printer_attributes(self, call: _Call) -> Message:
        printer = await self._printer(call)
        queued = 0
        for state in (RelayState.HELD, RelayState.QUEUED, RelayState.SENDING, RelayState.PRINTING):
            queued += len(
                await self._store.list_jobs(
                    call.tenant, printer_id=printer.id, state=state, limit=self.limits.max_jobs_listed
                )
            )
        attrs = await self._printer_attributes(call, printer, queued)
        response = new_response(call.request, Status.SUCCESSFUL_OK)
        group = response.add_group(DelimiterTag.PRINTER_ATTRIBUTES)
        for attribute in select(attrs, requested_attributes(call.request), printer_groups(attrs)):
            group.attributes[attribute.name] = attribute
        return response

    # --- job creation ---------------------------------------------------------------------------

    def _document_format(self, call: _Call, attrs: dict[str, Attribute], default: str | None) -> str:
        text = _text(call.request, "document-format")
        if text is None:
            text = default
        if text is None:
            fallback = attrs.get("document-format-default")
            text = fallback.value if fallback is not None and isinstance(fallback.value, str) else None
        text = (text or "application/octet-stream").lower()
        supported = attrs.get("document-format-supported")
        if not FORMAT_RE.match(text) or (supported is not None and text not in supported.values):
            raise _ipp_error(
                Status.CLIENT_ERROR_DOCUMENT_FORMAT_NOT_SUPPORTED,
                f"document-format {text!r} is not supported by printer {call.printer_id}",
            )
        return text

    def _check_compression(self, call: _Call) -> None:
        compression = _text(call.request, "compression")
        if compression not in (None, "none"):
            raise _ipp_error(
                Status.CLIENT_ERROR_COMPRESSION_NOT_SUPPORTED,
                f"compression {compression!r} is not supported (documents pass through unchanged)",
            )

    async def _ticket(self, call: _Call, printer: Printer) -> tuple[Ticket, dict[str, Attribute]]:
        """The job template of a creation request, checked against the printer (RFC 8011 §4.1.7)."""
        attrs = await self._printer_attributes(call, printer)
        job_group = call.request.group(DelimiterTag.JOB_ATTRIBUTES)
        template = list(job_group) if job_group is not None else []
        # The connector says which options it can hand this printer (none for RAW and LPD).
        forward = printer.capabilities.get("options")
        if not isinstance(forward, list):
            forward = []
        ticket = job_ticket(attrs, template, forward=forward, max_copies=MAX_COPIES)
        if ticket.unsupported and _bool(call.request, "ipp-attribute-fidelity"):
            names = ", ".join(a.name for a in ticket.unsupported)
            raise _ipp_error(
                Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED,
                f"not supported with ipp-attribute-fidelity=true: {names}",
            )
        self._check_compression(call)
        return ticket, attrs

    def _creation_response(self, call: _Call, ticket: Ticket) -> Message:
        status = (
            Status.SUCCESSFUL_OK_IGNORED_OR_SUBSTITUTED_ATTRIBUTES
            if ticket.unsupported
            else Status.SUCCESSFUL_OK
        )
        response = new_response(call.request, status)
        if ticket.unsupported:
            group = response.add_group(DelimiterTag.UNSUPPORTED_ATTRIBUTES)
            for attribute in ticket.unsupported:
                group.attributes[attribute.name] = attribute
        return response

    def _title(self, call: _Call) -> str:
        return _text(call.request, "job-name") or _text(call.request, "document-name") or "untitled"

    async def _accept(
        self,
        call: _Call,
        printer: Printer,
        document_format: str,
        ticket: dict[str, Any],
        *,
        hold: bool = False,
        document: AsyncIterable[bytes] | None = None,
        length: int | None = None,
    ) -> Job:
        """A relay job of ``document`` (default: the request's own, Print-Job and Send-Document)."""
        submission = Submission(
            tenant=call.tenant,
            printer_id=printer.id,
            title=str(ticket["title"]),
            document_format=document_format,
            copies=int(ticket["copies"]),
            user=str(ticket["user"]),
            owner=str(ticket.get("owner", "")),
            content_length=call.document_length if document is None else length,
            options=dict(ticket["options"]),
            hold=hold,
        )
        try:
            job, _ = await self._intake.accept(submission, call.document if document is None else document)
        except SubmitError as exc:
            raise _ipp_error(_REFUSAL_STATUS[exc.refusal], exc.message) from None
        return job

    async def validate_job(self, call: _Call) -> Message:
        printer = await self._printer(call)
        ticket, attrs = await self._ticket(call, printer)
        self._document_format(call, attrs, None)
        return self._creation_response(call, ticket)

    async def print_job(self, call: _Call) -> Message:
        printer = await self._printer(call)
        ticket, attrs = await self._ticket(call, printer)
        document_format = self._document_format(call, attrs, None)
        if not await call.document.has_data():
            raise _bad("Print-Job without document data")
        job = await self._accept(
            call, printer, document_format, self._job_record(call, ticket), hold=ticket.hold
        )
        return await self._printed(call, printer, ticket, job)

    async def print_uri(self, call: _Call) -> Message:
        source = self._document_uri(call)
        printer = await self._printer(call)
        ticket, attrs = await self._ticket(call, printer)
        async with self._fetched(call, source) as download:
            document_format = self._document_format(call, attrs, self._sent_format(download, attrs))
            job = await self._accept(
                call, printer, document_format, self._job_record(call, ticket), hold=ticket.hold,
                document=download.body, length=download.length,
            )  # fmt: skip
        return await self._printed(call, printer, ticket, job)

    def _job_record(self, call: _Call, ticket: Ticket) -> dict[str, Any]:
        return {
            "title": self._title(call),
            "user": call.user,
            "owner": call.principal.user_id or "",
            "copies": ticket.copies,
            "options": ticket.options,
        }

    async def _printed(self, call: _Call, printer: Printer, ticket: Ticket, job: Job) -> Message:
        numbers = await self._store.ipp_job_numbers(call.tenant, printer.id, [job.id], time.time())
        response = self._creation_response(call, ticket)
        self._add_job(response, self._relay_job_view(call, numbers[job.id], job), _CREATED)
        return response

    async def create_job(self, call: _Call) -> Message:
        printer = await self._printer(call)
        ticket, attrs = await self._ticket(call, printer)
        document_format = _text(call.request, "document-format")
        if document_format is not None:
            document_format = self._document_format(call, attrs, None)
        now = time.time()
        record = await self._store.create_ipp_job(
            IppJob(
                tenant=call.tenant,
                number=0,
                printer_id=printer.id,
                state=IppJobState.INCOMING,
                ticket={
                    "title": self._title(call),
                    "user": call.user,
                    "owner": call.principal.user_id or "",
                    "copies": ticket.copies,
                    "options": ticket.options,
                    "document_format": document_format,
                    "hold": ticket.hold,
                },
                created_at=now,
                updated_at=now,
            )
        )
        response = self._creation_response(call, ticket)
        self._add_job(response, self._pending_view(call, record), _CREATED)
        return response

    async def _document_target(self, call: _Call) -> tuple[bool, Printer, IppJob, dict[str, Attribute]]:
        """What Send-Document and Send-URI check first: last-document, and a job waiting for its document."""
        last = _bool(call.request, "last-document")
        if last is None:
            raise _bad("missing last-document operation attribute (RFC 8011 §4.3.1)")
        printer = await self._printer(call)
        record = await self._ipp_job(call)
        if record.state is not IppJobState.INCOMING:
            raise self._not_open(record)
        attrs = await self._printer_attributes(call, printer)
        self._check_compression(call)
        return last, printer, record, attrs

    async def send_document(self, call: _Call) -> Message:
        last, printer, record, attrs = await self._document_target(call)
        document_format = self._document_format(call, attrs, record.ticket.get("document_format"))
        if not await call.document.has_data():
            if not last:
                raise _bad("Send-Document without document data and with last-document=false")
            return await self.close_job(call)
        return await self._attach(call, printer, record, document_format, last)

    async def send_uri(self, call: _Call) -> Message:
        source = self._document_uri(call)
        last, printer, record, attrs = await self._document_target(call)
        async with self._fetched(call, source) as download:
            default = record.ticket.get("document_format") or self._sent_format(download, attrs)
            document_format = self._document_format(call, attrs, default)
            return await self._attach(
                call, printer, record, document_format, last, document=download.body, length=download.length
            )

    def _document_uri(self, call: _Call) -> fetch.Source:
        """The document-uri of Print-URI or Send-URI, checked before anything else is (RFC 8011 §4.2.2)."""
        uri = _text(call.request, "document-uri")
        if uri is None:
            raise _bad("missing document-uri operation attribute (RFC 8011 §4.2.2)")
        try:
            return fetch.Source(url=fetch.check_uri(uri))
        except fetch.SchemeRefused as exc:
            raise _ipp_error(Status.CLIENT_ERROR_URI_SCHEME_NOT_SUPPORTED, exc.message) from None
        except fetch.FetchError as exc:
            raise _ipp_error(Status.CLIENT_ERROR_DOCUMENT_ACCESS_ERROR, exc.message) from None

    @asynccontextmanager
    async def _fetched(self, call: _Call, source: fetch.Source) -> AsyncIterator[fetch.Download]:
        try:
            async with self._fetcher.open(source, owner=call.tenant) as download:
                yield download
        except fetch.FetchError as exc:
            status = _FETCH_STATUS.get(exc.failure, Status.CLIENT_ERROR_DOCUMENT_ACCESS_ERROR)
            raise _ipp_error(status, exc.message) from None

    @staticmethod
    def _sent_format(download: fetch.Download, attrs: dict[str, Attribute]) -> str | None:
        """The source's Content-Type when the printer takes it (S3 and others send binary/octet-stream
        for anything): otherwise the printer's default decides."""
        supported = attrs.get("document-format-supported")
        sent = download.document_format
        return sent if sent is not None and supported is not None and sent in supported.values else None

    async def _attach(
        self,
        call: _Call,
        printer: Printer,
        record: IppJob,
        document_format: str,
        last: bool,
        *,
        document: AsyncIterable[bytes] | None = None,
        length: int | None = None,
    ) -> Message:
        """The document of a Create-Job job arrives (Send-Document, Send-URI): its relay job is made."""
        ticket = record.ticket
        # One upload at a time: a compare-and-set, so two replicas cannot both make the relay job.
        if not await self._jobs.advance_ipp_job(record, IppJobEvent.UPLOAD):
            raise self._not_open(await self._ipp_job(call))
        try:
            # A job whose last document has not come yet is held (the relay has no "incoming"
            # state): the dispatcher leaves it alone until Close-Job releases it.
            job = await self._accept(
                call, printer, document_format, ticket, hold=not last or bool(ticket.get("hold")),
                document=document, length=length,
            )  # fmt: skip
        except BaseException:
            # Also when the client left (cancelled): the job must take a document again.
            with trio.CancelScope(shield=True), trio.move_on_after(STORE_CLEANUP_TIMEOUT):
                await self._jobs.advance_ipp_job(record, IppJobEvent.UPLOAD_FAILED)
            raise
        event = IppJobEvent.ATTACH if last else IppJobEvent.ATTACH_OPEN
        with trio.CancelScope(shield=True):  # the relay job exists now: record it, client or not
            attached = await self._jobs.advance_ipp_job(record, event, job_id=job.id)
        if not attached:
            # canceled while the document streamed in: the new relay job is canceled as well
            await self._cancel_relay_job(job)
            raise _ipp_error(Status.SERVER_ERROR_JOB_CANCELED, f"job {record.number} was canceled")
        response = new_response(call.request, Status.SUCCESSFUL_OK)
        self._add_job(response, self._relay_job_view(call, record.number, job), _CREATED)
        return response

    def _not_open(self, record: IppJob) -> IPPError:
        if record.state in (IppJobState.ATTACHED, IppJobState.OPEN):
            return _ipp_error(
                Status.SERVER_ERROR_MULTIPLE_DOCUMENT_JOBS_NOT_SUPPORTED,
                f"job {record.number} already has its document (multiple-document-jobs-supported is false)",
            )
        if record.state is IppJobState.RECEIVING:
            return _ipp_error(Status.SERVER_ERROR_BUSY, f"job {record.number}: a document is being received")
        return _ipp_error(Status.CLIENT_ERROR_NOT_POSSIBLE, f"job {record.number} is {record.state}")

    async def close_job(self, call: _Call) -> Message:
        await self._printer(call)
        record = await self._ipp_job(call)
        if record.state is IppJobState.INCOMING:
            await self._jobs.advance_ipp_job(record, IppJobEvent.ABANDON)  # no document will come
        elif record.state is IppJobState.OPEN and record.job_id is not None:
            await self._documents_complete(call, record)
        elif record.state is not IppJobState.ATTACHED:
            raise self._not_open(record)
        response = new_response(call.request, Status.SUCCESSFUL_OK)
        self._add_job(response, await self._job_view(call, record), _CREATED)
        return response

    async def _documents_complete(self, call: _Call, record: IppJob) -> None:
        assert record.job_id is not None
        # Canceled or expired meanwhile: the transition is refused, and that is the answer. A job created
        # with job-hold-until stays held for its Release-Job (so does one at a pull printer: the lifecycle
        # knows that one).
        if await self._jobs.advance_ipp_job(record, IppJobEvent.CLOSE) and not record.ticket.get("hold"):
            await self._jobs.documents_complete(call.tenant, record.job_id)

    # --- existing jobs --------------------------------------------------------------------------

    async def _ipp_job(self, call: _Call) -> IppJob:
        number = job_number(call.request, call.path_job)
        record = await self._store.get_ipp_job(call.tenant, number)
        if record is None or record.printer_id != call.printer_id or not await self._visible(call, record):
            raise _ipp_error(Status.CLIENT_ERROR_NOT_FOUND, f"job {number} not found")
        return await self._expire_pending(call, record)

    async def _visible(self, call: _Call, record: IppJob) -> bool:
        """Whether the caller may see this job: another user's is not found, as if it did not exist."""
        if call.owner is None:
            return True
        if record.job_id is None:
            return record.ticket.get("owner") == call.owner
        job = await self._store.get_job(call.tenant, record.job_id)
        return job is not None and job.owner == call.owner

    async def _expire_pending(self, call: _Call, record: IppJob) -> IppJob:
        """A Create-Job left without its document past multiple-operation-time-out is aborted."""
        limit = {
            IppJobState.INCOMING: MULTIPLE_OPERATION_TIMEOUT, IppJobState.RECEIVING: RECEIVING_TIMEOUT,
        }.get(record.state)  # fmt: skip
        if limit is not None and time.time() - record.updated_at > limit:
            await self._jobs.advance_ipp_job(record, IppJobEvent.ABANDON)
        return record

    async def cancel_job(self, call: _Call) -> Message:
        await self._printer(call)
        record = await self._ipp_job(call)
        if record.job_id is None:
            if not await self._jobs.advance_ipp_job(record, IppJobEvent.CANCEL):
                raise _ipp_error(Status.CLIENT_ERROR_NOT_POSSIBLE, f"job {record.number} is {record.state}")
            return new_response(call.request, Status.SUCCESSFUL_OK)
        job = await self._store.get_job(call.tenant, record.job_id)
        if job is None:
            raise _ipp_error(Status.CLIENT_ERROR_NOT_FOUND, f"job {record.number} not found")
        if job.state in FINAL_STATES:
            raise _ipp_error(Status.CLIENT_ERROR_NOT_POSSIBLE, f"job {record.number} is already {job.state}")
        if not await self._cancel_relay_job(job):
            raise _ipp_error(
                Status.CLIENT_ERROR_NOT_POSSIBLE,
                f"job {record.number} is already {job.state} to the printer and cannot be stopped",
            )
        audit.record(
            "job.canceled", tenant=call.tenant, actor=audit.actor(call.principal),
            target=f"job:{job.id}", printer_id=job.printer_id, via="ipp",
        )  # fmt: skip
        return new_response(call.request, Status.SUCCESSFUL_OK)

    async def _cancel_relay_job(self, job: Job) -> bool:
        """Cancel through the lifecycle: a job on its way to the printer is stopped by whoever streams it."""
        return await self._jobs.cancel(job, "canceled over IPP") is not None

    async def _relay_job(self, call: _Call, record: IppJob, operation: str) -> Job:
        """The relay job of an IPP job that has its document; a Create-Job still without one cannot be held
        or released (a hold asked for at Create-Job, with job-hold-until, applies when it comes)."""
        if record.job_id is None or record.state is not IppJobState.ATTACHED:
            why = "is still open for its document" if record.state is IppJobState.OPEN else "has no document"
            raise _ipp_error(
                Status.CLIENT_ERROR_NOT_POSSIBLE,
                f"job {record.number} {why}; {operation} applies to a job once its document has come",
            )
        job = await self._store.get_job(call.tenant, record.job_id)
        if job is None:
            raise _ipp_error(Status.CLIENT_ERROR_NOT_FOUND, f"job {record.number} not found")
        return job

    async def hold_job(self, call: _Call) -> Message:
        """RFC 8011 §4.3.5: a pending job waits for Release-Job; a held one stays held."""
        await self._printer(call)
        record = await self._ipp_job(call)
        job = await self._relay_job(call, record, "Hold-Job")
        if job.state is RelayState.QUEUED:
            # Not audited (nothing prints or is lost): the job's history says who held it.
            held = await self._jobs.hold(job, f"held by {call.principal.actor} (IPP Hold-Job)")
            job = held or await self._store.get_job(call.tenant, job.id) or job  # on its way meanwhile
        if job.state is not RelayState.HELD:
            raise _ipp_error(
                Status.CLIENT_ERROR_NOT_POSSIBLE,
                f"job {record.number} is {job.state}: only a pending job can be held",
            )
        # The one hold the relay keeps is until released: any other job-hold-until is held that way.
        until = call.request.attribute(DelimiterTag.OPERATION_ATTRIBUTES, "job-hold-until")
        if until is None or until.value == "indefinite":
            return new_response(call.request, Status.SUCCESSFUL_OK)
        response = new_response(call.request, Status.SUCCESSFUL_OK_IGNORED_OR_SUBSTITUTED_ATTRIBUTES)
        response.add_group(DelimiterTag.UNSUPPORTED_ATTRIBUTES).attributes[until.name] = until
        return response

    async def release_job(self, call: _Call) -> Message:
        """RFC 8011 §4.3.6: a held job (by job-hold-until, Hold-Job or a pull printer) goes to its printer."""
        await self._printer(call)
        record = await self._ipp_job(call)
        job = await self._relay_job(call, record, "Release-Job")
        released = None
        if job.state is RelayState.HELD:
            message = f"released by {call.principal.actor} (IPP Release-Job)"
            released = await self._jobs.release(job, None, message)
        if released is None:
            job = await self._store.get_job(call.tenant, job.id) or job
            raise _ipp_error(
                Status.CLIENT_ERROR_NOT_POSSIBLE, f"job {record.number} is {job.state}, not held"
            )
        audit.record(
            "job.released", tenant=call.tenant, actor=audit.actor(call.principal),
            target=f"job:{job.id}", printer_id=released.printer_id, via="ipp",
        )  # fmt: skip
        return new_response(call.request, Status.SUCCESSFUL_OK)

    async def get_job_attributes(self, call: _Call) -> Message:
        await self._printer(call)
        record = await self._ipp_job(call)
        view = await self._job_view(call, record, history=True)
        response = new_response(call.request, Status.SUCCESSFUL_OK)
        self._add_job(response, view, requested_attributes(call.request) or ["all"])
        return response

    async def get_jobs(self, call: _Call) -> Message:
        printer = await self._printer(call)
        which = _text(call.request, "which-jobs") or "not-completed"
        if which not in WHICH_JOBS:
            raise _ipp_error(
                Status.CLIENT_ERROR_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED,
                f"which-jobs {which!r} is not supported ({', '.join(WHICH_JOBS)} are)",
            )
        limit = _int(call.request, "limit")
        if limit is not None and limit < 1:
            raise _bad(f"limit {limit} must be at least 1")
        requested = requested_attributes(call.request) or list(DEFAULT_JOB_LISTING)
        # A user sees their own jobs only, whatever my-jobs says; for others my-jobs means this user name.
        user = call.user if _bool(call.request, "my-jobs") and call.owner is None else None
        views = await self._list_jobs(call, printer, which, user, history=bool(_TIMES & set(requested)))
        response = new_response(call.request, Status.SUCCESSFUL_OK)
        for view in views[:limit]:
            self._add_job(response, view, requested)
        return response

    async def _list_jobs(
        self, call: _Call, printer: Printer, which: str, user: str | None, *, history: bool
    ) -> list[JobView]:
        store = self._store
        cap = self.limits.max_jobs_listed
        pending = which in ("not-completed", "all")
        done = which in ("completed", "all")
        states = [
            s for s in RelayState if (s in FINAL_STATES and done) or (s not in FINAL_STATES and pending)
        ]
        jobs: list[Job] = []
        for state in states:
            jobs += await store.list_jobs(
                call.tenant, printer_id=printer.id, state=state, owner=call.owner, limit=cap
            )
        if user is not None:
            jobs = [job for job in jobs if job.user == user]
        numbers = await store.ipp_job_numbers(call.tenant, printer.id, [j.id for j in jobs], time.time())
        views = [await self._relay_view_with_history(call, numbers[j.id], j, history) for j in jobs]
        placeholder_states = [s for s in (IppJobState.INCOMING, IppJobState.RECEIVING) if pending] + [
            s for s in (IppJobState.CANCELED, IppJobState.ABORTED) if done
        ]
        for record in await store.list_ipp_jobs(call.tenant, printer.id, placeholder_states, cap):
            view = self._pending_view(call, await self._expire_pending(call, record))
            finished = view.state >= JobState.CANCELED
            mine = call.owner is None or record.ticket.get("owner") == call.owner
            if (done if finished else pending) and (user is None or view.user == user) and mine:
                views.append(view)
        if done and not pending:
            views.sort(key=lambda v: (v.completed_at or v.created_at, v.number), reverse=True)
        else:
            views.sort(key=lambda v: (v.state >= JobState.CANCELED, v.created_at, v.number))
        return views

    # --- job views ------------------------------------------------------------------------------

    async def _job_view(self, call: _Call, record: IppJob, *, history: bool = False) -> JobView:
        if record.job_id is None:
            return self._pending_view(call, record)
        job = await self._store.get_job(call.tenant, record.job_id)
        if job is None:
            raise _ipp_error(Status.CLIENT_ERROR_NOT_FOUND, f"job {record.number} not found")
        view = await self._relay_view_with_history(call, record.number, job, history)
        if record.state is IppJobState.OPEN:  # held for more documents, not for a release by a user
            template = view.template
            if not record.ticket.get("hold"):
                template = tuple(a for a in template if a.name != "job-hold-until")
            view = replace(
                view, reasons=("job-incoming",), message="waiting for Close-Job", template=template
            )
        return view

    async def _relay_view_with_history(self, call: _Call, number: int, job: Job, history: bool) -> JobView:
        processing_at = None
        if history and job.state not in (RelayState.HELD, RelayState.QUEUED):
            for entry in await self._store.job_history(job.id):
                if entry.state in (RelayState.SENDING, RelayState.PRINTING):
                    processing_at = entry.at
                    break
        return self._relay_job_view(call, number, job, processing_at)

    def _relay_job_view(
        self, call: _Call, number: int, job: Job, processing_at: float | None = None
    ) -> JobView:
        final = job.state in FINAL_STATES
        return JobView(
            number=number,
            job_uri=call.job_uri(number),
            printer_uri=call.printer_uri,
            more_info=f"{call.http_base}/v1/jobs/{job.id}",
            name=job.title,
            user=job.user,
            state=IPP_JOB_STATE[job.state],
            reasons=_RELAY_REASONS[job.state],
            message=job.last_error or f"{job.state}",
            created_at=job.created_at,
            processing_at=processing_at,
            completed_at=(job.completed_at or job.updated_at) if final else None,
            size=job.size,
            document_format=job.document_format,
            template=tuple(option_attributes(job.copies, job.options, held=job.state is RelayState.HELD)),
            uuid=uuid.uuid5(uuid.NAMESPACE_URL, f"printrelay:job:{job.id}").urn,
        )

    def _pending_view(self, call: _Call, record: IppJob) -> JobView:
        ticket = record.ticket
        state, reasons, message = {
            IppJobState.INCOMING: (JobState.PENDING_HELD, ("job-incoming",), "waiting for its document"),
            IppJobState.RECEIVING: (JobState.PENDING_HELD, ("job-incoming",), "receiving its document"),
            IppJobState.CANCELED: (
                JobState.CANCELED, ("job-canceled-by-user",), "canceled before its document came"
            ),
        }.get(record.state, (JobState.ABORTED, ("aborted-by-system",), "no document came"))  # fmt: skip
        copies = ticket.get("copies", 1)
        options = ticket.get("options", {})
        return JobView(
            number=record.number,
            job_uri=call.job_uri(record.number),
            printer_uri=call.printer_uri,
            more_info=None,
            name=str(ticket.get("title", "untitled")),
            user=str(ticket.get("user", "")),
            state=state,
            reasons=reasons,
            message=message,
            created_at=record.created_at,
            completed_at=record.updated_at if state >= JobState.CANCELED else None,
            documents=0,
            template=tuple(
                option_attributes(
                    copies if isinstance(copies, int) else 1,
                    options if isinstance(options, dict) else {},
                    held=bool(ticket.get("hold")),
                )
            ),
            uuid=uuid.uuid5(uuid.NAMESPACE_URL, f"printrelay:ipp-job:{record.tenant}/{record.number}").urn,
        )

    def _add_job(self, response: Message, view: JobView, requested: Sequence[str]) -> None:
        attrs = job_attributes(view)
        group = response.add_group(DelimiterTag.JOB_ATTRIBUTES)
        for attribute in select(attrs, requested, job_groups(attrs)):
            group.attributes[attribute.name] = attribute


def _error_answer(request: Message, error: IPPError) -> Message:
    answer = new_response(request, error.status, status_message=error.message[:255])
    if error.status == Status.CLIENT_ERROR_DOCUMENT_FORMAT_NOT_SUPPORTED:
        fmt = request.attribute(DelimiterTag.OPERATION_ATTRIBUTES, "document-format")
        if fmt is not None:
            answer.add_group(DelimiterTag.UNSUPPORTED_ATTRIBUTES).attributes[fmt.name] = fmt
    return answer


#: what a job creation answer carries (RFC 8011 §4.2.1.2)
_CREATED = ("job-id", "job-uri", "job-state", "job-state-reasons", "job-state-message")


class _Head:
    """The first 8 bytes of a request (version, operation, request-id): an answer to a request whose
    attribute section does not decode still carries its request-id (RFC 8010 §3.1.1)."""

    def __init__(self) -> None:
        self._bytes = b""

    def feed(self, chunk: bytes) -> None:
        if len(self._bytes) < 8:
            self._bytes += chunk[: 8 - len(self._bytes)]

    @property
    def request_id(self) -> int:
        return int.from_bytes(self._bytes[4:8], "big", signed=True) if len(self._bytes) == 8 else 0

    @property
    def version(self) -> tuple[int, int]:
        if len(self._bytes) >= 2 and self._bytes[0] in (1, 2):
            return self._bytes[0], self._bytes[1]
        return (2, 0)
