"""Accepting a job: the one path every front door (REST, IPP) takes into the spool and the store.

The document streams into the spool, sealed to the printer's connector as it arrives; the job row is
committed only after the payload is on disk (fsync) — or, for a small payload, in the same transaction
as the row — and only then does the caller answer "accepted".
A rejected submission leaves nothing behind and never touches jobs accepted before it.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass, field

import trio

from relay.capabilities import OptionRefused, check_options
from relay.jobs import AWAITING_RELEASE, Job, JobState, new_job_id
from relay.metrics import RelayMetrics
from relay.spool import PayloadSpool, PayloadTooLarge, SpoolFull
from relay.store.base import Conflict, Quota, QuotaExceeded, Store, StoreUnavailable
from service.http.message import format_bytes

log = logging.getLogger("printrelay.relay.submit")

MAX_TITLE = 255
MAX_COPIES = 999


# A MIME type as a document format (``application/pdf``): what REST and the portal accept from clients.
FORMAT_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")


class Refusal(enum.Enum):
    NOT_FOUND = 404
    QUOTA = 429
    BAD_REQUEST = 400
    CONFLICT = 409
    TOO_LARGE = 413
    UNAVAILABLE = 503
    STORAGE_FULL = 507


class SubmitError(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.message = message


@dataclass(frozen=True)
class Submission:
    tenant: str
    printer_id: str
    title: str = "untitled"
    document_format: str = "application/octet-stream"
    copies: int = 1
    user: str = ""
    owner: str = ""  # the user id of a person submitting; empty for an API token
    content_length: int | None = None
    idempotency_key: str | None = None
    hold: bool = False  # a pull printer holds every job, whatever this says
    expires_in: float | None = None  # seconds; default: the relay's job_ttl (held: at most held_job_ttl)
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitLimits:
    max_job_bytes: int
    tenant_max_jobs: int
    tenant_max_spool_bytes: int
    max_attempts: int
    job_ttl: float
    held_job_ttl: float


class Intake:
    """Accepts jobs: spool first, then the job row, then "accepted"."""

    def __init__(
        self,
        store: Store,
        spool: PayloadSpool,
        metrics: RelayMetrics,
        limits: SubmitLimits,
        *,
        on_accepted: Callable[[Job], None] = lambda job: None,
        on_replayed: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self._store = store
        self._spool = spool
        self._metrics = metrics
        self.limits = limits
        self._on_accepted = on_accepted
        self._on_replayed = on_replayed

    def replayed(self, earlier: Job) -> tuple[Job, bool]:
        """An Idempotency-Key replay answers with the job made before, which may have been committed behind
        a lost connection (no notice woke its dispatcher then): told as accepted again."""
        self._on_replayed(earlier)
        return earlier, False

    async def accept(self, submission: Submission, body: AsyncIterable[bytes]) -> tuple[Job, bool]:
        """Spool and commit a job. Returns the job and whether it is new (False: an Idempotency-Key
        replay)."""
        limits, store, spool = self.limits, self._store, self._spool
        printer, connector, (used_bytes, used_jobs) = await store.submit_lookups(
            submission.tenant, submission.printer_id
        )
        if printer is None:
            raise SubmitError(Refusal.NOT_FOUND, f"printer {submission.printer_id} not found")
        limit = limits.max_job_bytes
        if submission.content_length is not None and submission.content_length > limit:
            raise SubmitError(
                Refusal.TOO_LARGE,
                f"job too large: {format_bytes(submission.content_length)} exceeds "
                f"max_job_bytes={format_bytes(limit)}",
            )
        if submission.content_length == 0:
            raise SubmitError(Refusal.BAD_REQUEST, "the document is empty (0 bytes): nothing to print")
        if not 1 <= submission.copies <= MAX_COPIES:
            raise SubmitError(Refusal.BAD_REQUEST, f"copies must be between 1 and {MAX_COPIES}")
        try:
            check_options(
                printer.capabilities, document_format=submission.document_format, copies=submission.copies,
                options=submission.options,
            )  # fmt: skip
        except OptionRefused as exc:
            raise SubmitError(Refusal.BAD_REQUEST, f"printer {printer.id}: {exc.message}") from None
        if connector is None or not connector.public_key:
            raise SubmitError(
                Refusal.UNAVAILABLE, f"printer {printer.id}: its connector never registered a key"
            )

        # A first look at the quota, so a document that cannot be kept is not spooled at all; the insert
        # checks it again atomically (other replicas submit meanwhile).
        if used_jobs >= limits.tenant_max_jobs:
            raise SubmitError(
                Refusal.QUOTA,
                f"quota reached: {used_jobs} undelivered jobs (tenant_max_jobs={limits.tenant_max_jobs})",
            )
        room = limits.tenant_max_spool_bytes - used_bytes
        quota_name = f"tenant_max_spool_bytes={format_bytes(limits.tenant_max_spool_bytes)}"
        if room <= 0 or (submission.content_length is not None and submission.content_length > room):
            raise SubmitError(
                Refusal.STORAGE_FULL,
                f"quota reached: {format_bytes(max(0, used_bytes))} spooled ({quota_name})",
            )

        job_id = new_job_id()
        try:
            stored = await spool.store(
                job_id, body, recipient_public=connector.public_key, max_bytes=min(limit, room)
            )
        except PayloadTooLarge:
            if room < limit:
                raise SubmitError(
                    Refusal.STORAGE_FULL, f"quota reached: the document exceeds {quota_name}"
                ) from None
            raise SubmitError(
                Refusal.TOO_LARGE, f"job too large: more than max_job_bytes={format_bytes(limit)}"
            ) from None
        except SpoolFull as exc:
            raise SubmitError(Refusal.STORAGE_FULL, f"cannot accept the job: {exc}") from None
        if stored.size == 0:  # a chunked body that ended at once: nothing was worth keeping
            await spool.erase(job_id)
            raise SubmitError(Refusal.BAD_REQUEST, "the document is empty (0 bytes): nothing to print")

        now = time.time()
        held = submission.hold or printer.pull
        ttl = submission.expires_in if submission.expires_in is not None else limits.job_ttl
        if held:
            # A document nobody releases does not wait for long; a release gives it job_ttl again.
            ttl = min(ttl, limits.held_job_ttl)
        job = Job(
            id=job_id,
            tenant=submission.tenant,
            printer_id=printer.id,
            state=JobState.HELD if held else JobState.QUEUED,
            title=submission.title[:MAX_TITLE],
            document_format=submission.document_format,
            copies=submission.copies,
            user=submission.user[:255],
            owner=submission.owner,
            size=stored.size,
            sealed_size=stored.sealed_size,
            sha256=stored.sha256,
            wrapped_key=stored.wrapped_key,
            key_id=stored.key_id,
            connector_id=printer.connector_id,
            max_attempts=limits.max_attempts,
            last_error=AWAITING_RELEASE if printer.pull else "",
            idempotency_key=submission.idempotency_key,
            options=dict(submission.options),
            created_at=now,
            updated_at=now,
            expires_at=now + ttl,
        )
        accepted = f"accepted {stored.size} bytes" + (
            f"; {AWAITING_RELEASE} {printer.id}" if printer.pull else ""
        )
        quota = Quota(max_bytes=limits.tenant_max_spool_bytes, max_jobs=limits.tenant_max_jobs)
        try:
            await store.insert_job(job, accepted, payload=stored.inline, quota=quota)
        except Conflict:
            if stored.inline is None:
                await spool.erase(job_id)
            key = submission.idempotency_key
            earlier = await store.find_job_by_idempotency_key(submission.tenant, key) if key else None
            if earlier is None:
                raise
            if earlier.sha256 != stored.sha256 or earlier.printer_id != printer.id:
                raise SubmitError(
                    Refusal.CONFLICT, "Idempotency-Key was already used for a different document or printer"
                ) from None
            return self.replayed(earlier)
        except QuotaExceeded as exc:
            if stored.inline is None:
                await spool.erase(job_id)
            raise SubmitError(
                Refusal.QUOTA if exc.what == "jobs" else Refusal.STORAGE_FULL, exc.message
            ) from None
        except StoreUnavailable:
            # The connection to PostgreSQL died, perhaps during COMMIT: the job may be durable, so its
            # payload stays (a client retrying with its Idempotency-Key gets that job, which prints). One
            # that was not committed is an orphan the next start's sweep removes.
            raise
        except BaseException:
            if stored.inline is None:
                with trio.CancelScope(shield=True):
                    await spool.erase(job_id)
            raise
        self._metrics.jobs_submitted.inc()
        self._metrics.job_bytes.inc(stored.size)
        log.info(
            "job %s accepted for printer %s: %d bytes, %s", job.id, job.printer_id, stored.size, job.state,
            extra={"job_id": job.id, "tenant": job.tenant, "printer_id": job.printer_id,
                   "connector_id": job.connector_id},
        )  # fmt: skip
        self._on_accepted(job)
        return job, True
