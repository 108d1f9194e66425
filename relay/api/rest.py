"""The public REST API: submit jobs, follow them, list printers.

Every request names its tenant through its bearer token; ids of other tenants answer 404, exactly as ids
that do not exist. Errors are JSON ``{"error": "..."}`` naming the limit or the fix.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from ipp.options import OPTION_NAMES
from relay import adoption, audit, fetch, qr, webhooks
from relay.adoption import Adoption
from relay.api.ipp import IppEndpoint
from relay.api.openapi import OPENAPI
from relay.api.people import PEOPLE_ROUTES, PeopleApi
from relay.api.query import int_param as _int_param
from relay.api.query import one as _one
from relay.api.query import time_param as _time_param
from relay.api.tenants import TENANT_ROUTES, TenantsApi
from relay.auth import Principal
from relay.capabilities import OptionRefused, validate_option
from relay.credentials import Credentials
from relay.eventstream import KEEPALIVE, EventStreams, TooManyStreams, sse
from relay.jobs import Job, JobState
from relay.lifecycle import JobLifecycle
from relay.ratelimit import TokenRateLimiter, spend_request
from relay.secretbox import SecretBox
from relay.store.base import Store, StoreUnavailable
from relay.submit import FORMAT_RE, MAX_COPIES, Intake, Refusal, Submission, SubmitError
from relay.users import People
from service import bounded_json
from service.http.message import Handler, HTTPError, Request, Response
from service.settings import parse_duration

log = logging.getLogger("printrelay.relay.api")

Route = Callable[[Request, Principal, re.Match[str]], Awaitable[Response]]

MAX_EXPIRES_IN = 365 * 86400.0
STORE_RETRY_AFTER = 5  # seconds a client is asked to wait while the database is unavailable
MAX_LIST = 500
MAX_IDEMPOTENCY_KEY = 255
MAX_ADMIN_BODY = 16 * 1024
MAX_SOURCE_BODY = 64 * 1024  # a print-from-URL body: the URL and its headers (relay.fetch bounds each)
# A JSON body is not a document: it names one to fetch (printing JSON itself: send it as text/plain).
SOURCE_FORMAT = "application/json"
DEFAULT_FORMAT = "application/octet-stream"


def _store_outage(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable that ``exc`` is, or holds alone (trio's nurseries wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, StoreUnavailable) else None


def _duration_param(request: Request, name: str) -> float | None:
    raw = _one(request, name)
    if raw is None:
        return None
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise HTTPError(400, f"{name}: {exc}") from None
    if not 0 < value <= MAX_EXPIRES_IN:
        raise HTTPError(400, f"{name} must be more than 0 and at most {MAX_EXPIRES_IN / 86400:.0f} days")
    return value


def encode_cursor(job: Job) -> str:
    """Where a page of jobs ended, opaque to clients: the last job's (created_at, id)."""
    return base64.urlsafe_b64encode(json.dumps([job.created_at, job.id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        if len(cursor) > 200:
            raise ValueError("too long")
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(created_at, int | float) or not isinstance(job_id, str):
            raise ValueError("not a cursor")
        return float(created_at), job_id
    except (ValueError, TypeError, binascii.Error):
        raise HTTPError(400, "after must be the next cursor of a previous page") from None


def _options(request: Request) -> dict[str, str]:
    """Job options from the query (``?sides=two-sided-long-edge&media=iso_a4_210x297mm``)."""
    options: dict[str, str] = {}
    for name in OPTION_NAMES:
        value = _one(request, name)
        if value is None:
            continue
        try:
            options[name] = validate_option(name, value)
        except OptionRefused as exc:
            raise HTTPError(400, exc.message) from None
    return options


CHALLENGE = [("www-authenticate", 'Bearer realm="printrelay", Basic realm="printrelay"')]

# The query parameters of a submit: the job's own, and the print options (relay/capabilities.py).
SUBMIT_PARAMETERS = frozenset({"title", "copies", "user", "hold", "expires_in", *OPTION_NAMES})

# Every route: method, path pattern, scope its token needs, and the RestApi method that answers.
ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
    ("POST", re.compile(r"^/v1/printers/(?P<printer>[^/]+)/jobs$"), "jobs:submit", "submit_job"),
    ("GET", re.compile(r"^/v1/printers$"), "jobs:read", "list_printers"),
    ("GET", re.compile(r"^/v1/printers/(?P<printer>[^/]+)$"), "jobs:read", "get_printer"),
    (
        "GET",
        re.compile(r"^/v1/printers/(?P<printer>[^/]+)/qr(?P<kind>\.svg|\.png)$"),
        "jobs:read",
        "printer_qr",
    ),
    ("POST", re.compile(r"^/v1/printers$"), "printers:admin", "put_printer"),
    ("DELETE", re.compile(r"^/v1/printers/(?P<printer>[^/]+)$"), "printers:admin", "remove_printer"),
    ("GET", re.compile(r"^/v1/candidates$"), "printers:admin", "list_candidates"),
    ("POST", re.compile(r"^/v1/webhooks$"), "printers:admin", "add_webhook"),
    ("GET", re.compile(r"^/v1/webhooks$"), "printers:admin", "list_webhooks"),
    ("DELETE", re.compile(r"^/v1/webhooks/(?P<hook>[^/]+)$"), "printers:admin", "delete_webhook"),
    ("GET", re.compile(r"^/v1/jobs$"), "jobs:read", "list_jobs"),
    ("GET", re.compile(r"^/v1/jobs/(?P<job>[^/]+)$"), "jobs:read", "get_job"),
    ("GET", re.compile(r"^/v1/jobs/(?P<job>[^/]+)/events$"), "jobs:read", "job_events"),
    ("GET", re.compile(r"^/v1/jobs/(?P<job>[^/]+)/watch$"), "jobs:read", "watch_job"),
    ("POST", re.compile(r"^/v1/jobs/(?P<job>[^/]+)/cancel$"), "jobs:submit", "cancel_job"),
    ("POST", re.compile(r"^/v1/jobs/(?P<job>[^/]+)/release$"), "jobs:submit", "release_job"),
    # the tenant's job changes and device events (not the connector's /v1/events, which is inside the tunnel)
    ("GET", re.compile(r"^/v1/events$"), "jobs:read", "event_stream"),
)


class RestApi:
    def __init__(
        self,
        store: Store,
        jobs: JobLifecycle,
        intake: Intake,
        adoption: Adoption,
        rate_limiter: TokenRateLimiter,
        secrets_at_rest: SecretBox,
        *,
        ipp: IppEndpoint,
        readiness: Callable[[], Awaitable[str | None]],
        credentials: Credentials | None = None,
        webhook_allow_private: bool = False,
        portal: Handler | None = None,
        public_url: str = "",
        tls: bool = False,
        max_child_tenants: int,
        fetcher: fetch.Fetcher,
    ) -> None:
        self._store = store
        # GET /v1/events; its owner hands it the store's notices (relay/app.py)
        self.events = EventStreams(store)
        self._fetcher = fetcher  # print from a URL (relay.fetch)
        self._credentials = credentials or Credentials(store, People(store))
        self._webhook_allow_private = webhook_allow_private
        self.portal = portal  # people's pages (/portal, /release/...)
        self.public_url, self.tls = public_url, tls  # where the release URLs in QR codes point
        self._jobs = jobs
        self._intake = intake
        self._adoption = adoption
        self._rate_limiter = rate_limiter
        self._secrets_at_rest = secrets_at_rest
        self._ipp = ipp
        self._readiness = readiness
        # (method, path, scope, handler) with the handlers bound to this API
        people = PeopleApi(store)
        self.routes: list[tuple[str, re.Pattern[str], str, Route]] = [
            (method, pattern, scope, getattr(self, name)) for method, pattern, scope, name in ROUTES
        ]
        self.routes += [
            (method, pattern, scope, getattr(people, name)) for method, pattern, scope, name in PEOPLE_ROUTES
        ]
        tenants = TenantsApi(store, max_children=max_child_tenants)
        self.routes += [(m, p, scope, getattr(tenants, name)) for m, p, scope, name in TENANT_ROUTES]

    async def handle(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except Exception as exc:
            reason = _store_outage(exc)
            if reason is None:
                raise
            # PostgreSQL restarting, say: nothing accepted is lost, and the client tries again.
            raise HTTPError(
                503, f"the relay's database is unavailable ({reason}); retry in {STORE_RETRY_AFTER} s",
                [("retry-after", str(STORE_RETRY_AFTER))],
            ) from None  # fmt: skip

    async def _handle(self, request: Request) -> Response:
        if request.path == "/healthz":
            return Response.json({"status": "alive"})
        if request.path == "/readyz":
            return await self.ready()
        if request.path == "/openapi.json":
            return Response.json(OPENAPI)
        if request.path.startswith("/ipp/"):
            return await self._ipp.handle(request)
        if self.portal is not None and (
            request.path == "/portal" or request.path.startswith(("/portal/", "/release/"))
        ):
            return await self.portal(request)  # people's pages: a session cookie, not a token
        allowed: list[str] = []
        for method, pattern, scope, route in self.routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            if method != request.method and not (method == "GET" and request.method == "HEAD"):
                allowed.append(method)
                continue
            principal = await self._credentials.of_request(request, CHALLENGE)
            self.rate_limit(principal)
            if scope and not principal.allows(scope):
                if principal.user_id:
                    raise HTTPError(403, f"{principal.email} may not do this: it needs a tenant admin")
                raise HTTPError(403, f"token lacks the {scope} scope")
            return await route(request, principal, match)
        if allowed:
            raise HTTPError(405, f"method {request.method} not allowed", [("allow", ", ".join(allowed))])
        raise HTTPError(404, f"no such resource: {request.path}")

    def rate_limit(self, principal: Principal) -> None:
        """Spend one request of the token's budget (after authentication: see relay.ratelimit)."""
        spend_request(self._rate_limiter, principal)

    async def ready(self) -> Response:
        reason = await self._readiness()
        if reason is not None:
            return Response.json({"status": "not ready", "reason": reason}, 503)
        return Response.json({"status": "ready"})

    # --- jobs -----------------------------------------------------------------------------------

    async def submit_job(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        document_format = (request.headers.get("content-type") or "application/octet-stream").split(";")[0]
        document_format = document_format.strip().lower()
        if not FORMAT_RE.match(document_format):
            raise HTTPError(400, f"Content-Type {document_format!r} is not a MIME type")
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise HTTPError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        unknown = sorted(set(request.query) - SUBMIT_PARAMETERS)
        if unknown:
            # A misspelt option (?side=...) would otherwise be dropped and the job printed without it.
            raise HTTPError(
                400,
                f"unknown parameter {unknown[0][:40]!r}; a job takes {', '.join(sorted(SUBMIT_PARAMETERS))}",
            )
        hold = (_one(request, "hold") or "false").lower()
        if hold not in ("true", "false", "1", "0"):
            raise HTTPError(400, "hold must be true or false")
        submission = Submission(
            tenant=principal.tenant,
            printer_id=match["printer"],
            title=_one(request, "title") or request.headers.get("x-job-title") or "untitled",
            document_format=document_format,
            copies=_int_param(request, "copies", 1, 1, MAX_COPIES),
            # A person is who they signed in as; an application may say on whose behalf it prints.
            user=principal.email or _one(request, "user") or principal.token_id,
            owner=principal.user_id or "",
            content_length=request.body.content_length,
            idempotency_key=idempotency_key,
            hold=hold in ("true", "1"),
            expires_in=_duration_param(request, "expires_in"),
            options=_options(request),
        )
        try:
            if document_format == SOURCE_FORMAT:
                job, created = await self._submit_from_url(request, submission)
            else:
                job, created = await self._intake.accept(submission, request.body)
        except SubmitError as exc:
            retry = [("retry-after", "60")] if exc.refusal is Refusal.QUOTA else []
            raise HTTPError(exc.refusal.value, exc.message, retry) from None
        return Response.json(job.public(), 201 if created else 200, [("location", f"/v1/jobs/{job.id}")])

    async def _submit_from_url(self, request: Request, submission: Submission) -> tuple[Job, bool]:
        """A JSON body names the document's URL: the relay fetches it into the spool (relay.fetch)."""
        body = await request.body.read(MAX_SOURCE_BODY, limit_name="max_source_body")
        try:
            source = fetch.parse_source(bounded_json.loads(body))
        except ValueError as exc:
            example = '{"source_url": "https://..."}'
            raise HTTPError(400, f"the body must be JSON, e.g. {example}: {exc}") from None
        except fetch.FetchError as exc:
            raise HTTPError(exc.failure.value, exc.message) from None
        key = submission.idempotency_key
        earlier = await self._store.find_job_by_idempotency_key(submission.tenant, key) if key else None
        if earlier is not None:
            # a retry: the same job, without fetching again (its signed URL may have expired meanwhile)
            if earlier.printer_id != submission.printer_id:
                raise HTTPError(409, "Idempotency-Key was already used for a different document or printer")
            return self._intake.replayed(earlier)
        try:
            async with self._fetcher.open(source, owner=submission.tenant) as download:
                submission = dataclasses.replace(
                    submission,
                    document_format=source.document_format or download.document_format or DEFAULT_FORMAT,
                    content_length=download.length,
                )
                accepted = await self._intake.accept(submission, download.body)
        except fetch.FetchError as exc:
            retry = [("retry-after", "5")] if exc.failure is fetch.Failure.BUSY else []
            raise HTTPError(exc.failure.value, exc.message, retry) from None
        log.info("job %s fetched from %s", accepted[0].id, source.origin)
        return accepted

    async def get_job(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        job = await self._job(principal, match["job"])
        return Response.json(job.public())

    async def job_events(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        job = await self._job(principal, match["job"])
        history = await self._store.job_history(job.id)
        return Response.json({"job_id": job.id, "events": [h.public() for h in history]})

    async def cancel_job(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        job = await self._job(principal, match["job"])
        if job.state.final:
            raise HTTPError(409, f"job {job.id} is already {job.state}")
        done = await self._jobs.cancel(job, f"canceled by {principal.actor}")
        if done is None:
            job = await self._job(principal, job.id)
            raise HTTPError(409, f"job {job.id} is already {job.state}")
        audit.record(
            "job.canceled", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"job:{job.id}", printer_id=job.printer_id, state=str(done.state),
        )  # fmt: skip
        return Response.json(done.public())

    async def release_job(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        job = await self._job(principal, match["job"])
        body = await request.body.read(16 * 1024, limit_name="max_release_body")
        printer_id = _one(request, "printer_id")
        if body.strip():
            try:
                data = bounded_json.loads(body)
            except ValueError as exc:
                raise HTTPError(
                    400, f'release body must be JSON, e.g. {{"printer_id": "office"}}: {exc}'
                ) from None
            if not isinstance(data, dict) or not isinstance(data.get("printer_id", ""), str):
                raise HTTPError(400, "printer_id must be a string")
            printer_id = data.get("printer_id") or printer_id
        if job.state is not JobState.HELD:
            raise HTTPError(409, f"job {job.id} is {job.state}, not held")
        try:
            done = await self._jobs.release(job, printer_id, f"released by {principal.actor}")
        except LookupError as exc:
            raise HTTPError(404, str(exc).strip("'\"")) from None
        except ValueError as exc:
            raise HTTPError(409, str(exc)) from None
        if done is None:
            job = await self._job(principal, job.id)
            raise HTTPError(409, f"job {job.id} is {job.state}, not held")
        audit.record(
            "job.released", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"job:{job.id}", printer_id=done.printer_id,
        )  # fmt: skip
        return Response.json(done.public())

    async def watch_job(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Server-Sent Events: the history so far, then each change live, until the job is final."""
        job = await self._job(principal, match["job"])
        lifecycle = self._jobs
        # Subscribe before reading the history, so no change falls between the two.
        send, live = lifecycle.watch(job.id)
        history = await self._store.job_history(job.id)

        async def events() -> AsyncIterator[bytes]:
            seen = len(history)
            try:
                for entry in history:
                    yield sse(entry.public(), "state")
                if history and history[-1].state.final:
                    return
                while True:
                    with trio.move_on_after(KEEPALIVE) as idle:
                        entry = await live.receive()
                    if idle.cancelled_caught:
                        yield b": keep-alive\n\n"
                        continue
                    seen += 1
                    yield sse(entry.public(), "state")
                    if entry.state.final:
                        return
            except trio.EndOfChannel:
                yield sse({"error": "watcher fell behind; reconnect to replay", "seen": seen}, "error")
            finally:
                lifecycle.unwatch(job.id, send, live)

        return Response(
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-store"),
                ("x-accel-buffering", "no"),
            ],
            events(),
        )

    async def event_stream(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Server-Sent Events: the tenant's job changes (a person: their own jobs') and device events, live
        from now on (relay/eventstream.py)."""
        try:
            subscriber = self.events.subscribe(principal)
        except TooManyStreams as exc:
            raise HTTPError(429, str(exc), [("retry-after", "60")]) from None
        return Response(
            200,
            [
                ("content-type", "text/event-stream"),
                ("cache-control", "no-store"),
                ("x-accel-buffering", "no"),
            ],
            self.events.stream(subscriber),
        )

    async def list_jobs(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        state_text = _one(request, "state")
        state = None
        if state_text:
            try:
                state = JobState(state_text)
            except ValueError:
                known = ", ".join(s.value for s in JobState)
                raise HTTPError(400, f"unknown state {state_text!r}; states are {known}") from None
        limit = _int_param(request, "limit", 100, 1, MAX_LIST)
        owner = None if principal.sees_all_jobs else principal.user_id
        after = _one(request, "after")
        jobs = await self._store.list_jobs(
            principal.tenant, printer_id=_one(request, "printer_id"), state=state, owner=owner,
            user=_one(request, "user"), since=_time_param(request, "since"),
            until=_time_param(request, "until"), before=decode_cursor(after) if after else None,
            limit=limit + 1,
        )  # fmt: skip
        # One more than asked tells whether a next page exists; its cursor is the last job shown.
        page, more = jobs[:limit], len(jobs) > limit
        return Response.json(
            {"jobs": [j.public() for j in page], "next": encode_cursor(page[-1]) if more else None}
        )

    async def _job(self, principal: Principal, job_id: str) -> Job:
        job = await self._store.get_job(principal.tenant, job_id)
        # Another user's job is not found, exactly as one that does not exist: job ids do not leak.
        if job is None or not (principal.sees_all_jobs or job.owner == principal.user_id):
            raise HTTPError(404, f"job {job_id} not found")
        return job

    # --- printers -------------------------------------------------------------------------------

    async def list_printers(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        printers = await self._store.list_printers(principal.tenant)
        return Response.json({"printers": [p.public() for p in printers]})

    async def get_printer(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        printer = await self._store.get_printer(principal.tenant, match["printer"])
        if printer is None:
            raise HTTPError(404, f"printer {match['printer']} not found")
        return Response.json(printer.public())

    async def printer_qr(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """A QR code (SVG or PNG) of the printer's release page, ``{public_url}/release/{printer}``."""
        printer = await self._store.get_printer(principal.tenant, match["printer"])
        if printer is None:
            raise HTTPError(404, f"printer {match['printer']} not found")
        url = qr.release_url(qr.base_url(self.public_url, request, tls=self.tls), printer.id)
        body, content_type = qr.image(url, match["kind"][1:], qr.scale_param(request))
        return Response(200, [("content-type", content_type), ("cache-control", "no-store")], body)

    async def put_printer(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Adopt a discovered candidate, or add or change a printer: ``{"uri", "id"?, "connector_id"?,
        "pull"?}``; or ``{"id", "pull"}``: make it a pull printer or not."""
        body = await request.body.read(MAX_ADMIN_BODY, limit_name="max_admin_body")
        try:
            printer, created = await self._adoption.put_printer(principal.tenant, body)
        except adoption.AdoptionError as exc:
            raise HTTPError(exc.status, exc.message) from None
        audit.record(
            "printer.adopted" if created else "printer.changed", tenant=principal.tenant,
            actor=audit.actor(principal), target=f"printer:{printer.id}",
            connector_id=printer.connector_id, uri=printer.uri, pull=printer.pull,
        )  # fmt: skip
        return Response.json(
            printer.public(), 201 if created else 200, [("location", f"/v1/printers/{printer.id}")]
        )

    async def remove_printer(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        try:
            printer = await self._adoption.remove_printer(principal.tenant, match["printer"])
        except adoption.AdoptionError as exc:
            raise HTTPError(exc.status, exc.message) from None
        audit.record(
            "printer.removed", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"printer:{printer.id}", connector_id=printer.connector_id,
        )  # fmt: skip
        return Response.json(printer.public())

    async def list_candidates(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        views = await self._adoption.candidates(principal.tenant)
        return Response.json({"candidates": [v.public() for v in views]})

    # --- webhooks -------------------------------------------------------------------------------

    async def add_webhook(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Register a URL for the tenant's job changes; the signing secret is shown in this answer only."""
        body = await request.body.read(webhooks.MAX_BODY, limit_name="max_webhook_body")
        try:
            hook = await webhooks.register(
                self._store, self._secrets_at_rest, principal.tenant, body,
                allow_private=self._webhook_allow_private,
            )  # fmt: skip
        except webhooks.WebhookError as exc:
            raise HTTPError(exc.status, exc.message) from None
        return Response.json(
            {**hook.public(), "secret": hook.secret}, 201, [("location", f"/v1/webhooks/{hook.id}")]
        )

    async def list_webhooks(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        hooks = await self._store.list_webhooks(principal.tenant)
        return Response.json({"webhooks": [h.public() for h in hooks]})

    async def delete_webhook(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        hook = await self._store.delete_webhook(principal.tenant, match["hook"])
        if hook is None:
            raise HTTPError(404, f"webhook {match['hook']} not found")
        return Response.json(hook.public())
