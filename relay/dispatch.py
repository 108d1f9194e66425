"""Moves queued jobs onto a connector session: one HTTP/2 stream per job.

Each :class:`~relay.tunnel.ConnectorSession` runs one :class:`Dispatcher`. It claims due jobs of its
connector from the store (``queued → sending``), streams each job's sealed payload as the body of
``POST /v1/jobs/{id}`` and follows the NDJSON status lines the connector answers with. HTTP/2 flow
control paces the upload to what the printer takes.

Failure handling:

* the tunnel drops mid-stream → the job goes back to ``queued`` at once (no attempt is burnt: the
  connector's ledger keeps a resend from printing twice);
* the printer is busy or unreachable (``retry``) → ``queued`` with exponential backoff and jitter, until
  ``max_attempts``, then ``failed`` with the last error;
* the printer refused or aborted the job → ``failed``;
* the connector cannot know whether a RAW or LPD printer took the job (it stopped while feeding it)
  → ``held`` for a person to release or cancel;
* the stream ends in any other way (the session closed while the dispatcher was being cancelled, say)
  → ``queued`` again, shielded from that cancellation. A claim is also a lease (``job_lease``), renewed
  while the job streams (relay/leases.py), so a job whose dispatcher is gone is queued again even if
  this path was never reached.

Final states erase the payload.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio
from hpack import NeverIndexedHeaderTuple

from relay.jobs import Job, JobEvent
from relay.lifecycle import JobLifecycle
from relay.metrics import RelayMetrics
from relay.spool import PayloadSpool
from relay.store.base import JobStore, Lease, StoreUnavailable
from service.signal import Signal
from tunnel.messages import NDJSON, TICKET_HEADER, JobStatus, JobTicketMessage, LineSplitter, MessageError
from tunnel.session import ErrorCodes, H2Stream, SessionClosed, StreamClosed

if TYPE_CHECKING:
    from relay.tunnel import ConnectorSession

log = logging.getLogger("printrelay.relay.dispatch")

RESPONSE_TIMEOUT = 60.0  # connector must answer a job stream's headers within this
# A job may print for a long time; the tunnel's PINGs detect dead peers.
PROGRESS_TIMEOUT = 24 * 3600.0
NO_ANSWER = "connector did not answer in time"
STORE_RETRY = 2.0  # seconds between claims while the database is unavailable
STREAM_ENDED = "the connector session ended while the job was on its way; queued again"
STORE_FAILED = "the relay's database was unavailable"


class PayloadMissing(Exception):
    """The spool no longer holds a job's payload (lost disk, hand-deleted file)."""


def retry_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries neither bunch nor vanish."""
    ceiling = min(cap, base * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class DispatchSettings:
    max_streams: int  # job streams to one connector session at once
    retry_base: float
    retry_cap: float
    lease: Lease  # this replica's claims


class Drain:
    """Whether this relay is draining (it streams what it has and claims nothing new), and a signal each
    time a job stream ends (the drain waits on it)."""

    def __init__(self) -> None:
        self.draining = False
        self.streams_changed = Signal()


class Dispatcher:
    def __init__(
        self,
        session: ConnectorSession,
        *,
        store: JobStore,
        spool: PayloadSpool,
        jobs: JobLifecycle,
        metrics: RelayMetrics,
        settings: DispatchSettings,
        wakeup: Signal,
        drain: Drain,
    ) -> None:
        self.session = session
        self._store = store
        self._spool = spool
        self._jobs = jobs
        self._metrics = metrics
        self._settings = settings
        self._wakeup = wakeup
        self._drain = drain
        self.in_flight = 0
        self.claimed: set[str] = set()  # jobs claimed and not yet settled: their leases are renewed
        self._slot_freed = trio.Event()
        self._streams: dict[str, H2Stream] = {}

    async def settled(self) -> None:
        """Wait until no job stream is in flight (the session has ended: nothing new is claimed)."""
        self._wakeup.fire()  # the claim loop sees the session closed and stops
        while self.in_flight:
            await self._slot_freed.wait()

    def cancel(self, job_id: str) -> None:
        """The job was canceled while streaming: reset its stream; the connector stops it at the printer."""
        stream = self._streams.get(job_id)
        if stream is not None:
            stream.reset(ErrorCodes.CANCEL)

    async def run(self) -> None:
        session, store = self.session, self._store
        limit = self._settings.max_streams
        async with trio.open_nursery() as nursery:
            while session.h2.is_open:
                woken = self._wakeup.next_firing()
                # A draining relay finishes what it streams and starts nothing new.
                free = 0 if self._drain.draining else limit - self.in_flight
                jobs: list[Job] = []
                due: float | None = None
                if free > 0:
                    try:
                        jobs, due = await store.claim_jobs_and_next_due(
                            session.tenant, session.connector_id, time.time(), free, self._settings.lease
                        )
                    except StoreUnavailable as exc:
                        log.warning(
                            "cannot claim jobs for %s/%s: %s", session.tenant, session.connector_id, exc
                        )
                        due = time.time() + STORE_RETRY  # and wake-ups end the wait sooner

                for job in jobs:
                    # No checkpoint between the claim and start_soon: a cancellation now still runs
                    # _deliver, which queues the job again.
                    self.claimed.add(job.id)
                    self.in_flight += 1
                    self._metrics.job_dispatched(job, time.time())
                    nursery.start_soon(self._deliver, job)
                if jobs and len(jobs) == free:
                    continue  # there may be more; claim again once a slot frees
                if self.in_flight >= limit:
                    await self._slot_freed.wait()
                    continue
                # Without a retry coming due, sleep until woken: every path that makes a job of this
                # connector claimable (submit, release, retry, requeue, a printer back online) wakes it,
                # so an idle session costs no store calls at all.
                if free <= 0:  # draining: nothing was claimed, so nothing was looked up
                    with contextlib.suppress(StoreUnavailable):
                        due = await store.next_due(session.tenant, session.connector_id)
                timeout = math.inf if due is None else max(0.0, due - time.time())
                with trio.move_on_after(timeout):
                    await woken.wait()

    async def _deliver(self, job: Job) -> None:
        # What happens to the job if its stream ends without an outcome (cancellation, a bug).
        outcome: JobStatus | str = STREAM_ENDED
        try:
            with self._metrics.job_streams.track_inprogress():
                outcome = await self._stream_job(job)
        finally:
            with trio.CancelScope(shield=True):  # the job must not stay `sending`, whatever ended us
                try:
                    if isinstance(outcome, str):
                        # Not at once after a database error: one that recurs for this job would loop.
                        delay = STORE_RETRY if outcome.startswith(STORE_FAILED) else 0.0
                        await self._requeue(job, outcome, delay)
                    else:
                        await self._finish(job, outcome)
                except StoreUnavailable as exc:
                    # Not recorded now: the lease lapses and the job is queued again; the connector's
                    # ledger answers the resend with this outcome, printing nothing twice.
                    log.warning("job %s: outcome not recorded: %s", job.id, exc, extra={"job_id": job.id})
            self.claimed.discard(job.id)
            self.in_flight -= 1
            self._slot_freed.set()
            self._slot_freed = trio.Event()
            self._drain.streams_changed.fire()

    async def _stream_job(self, job: Job) -> JobStatus | str:
        """The connector's final status, or why the job must simply be queued again."""
        h2 = self.session.h2
        ticket = JobTicketMessage(
            job_id=job.id,
            printer_id=job.printer_id,
            title=job.title,
            document_format=job.document_format,
            copies=job.copies,
            user=job.user,
            size=job.size,
            sealed_size=job.sealed_size,
            key_id=job.key_id,
            wrapped_key=job.wrapped_key,
            attempt=job.attempts,
            options=job.options,
            unknown_outcomes=job.unknown_outcomes,
        )
        try:
            stream = await h2.open_stream(
                "POST",
                f"/v1/jobs/{job.id}",
                # Never indexed (RFC 7541 §7.1.3): the ticket carries the wrapped key, and each one is unique,
                # so adding it to the HPACK tables would only evict useful entries, on both sides.
                # The size is in the ticket; the connector checks integrity.
                [cast(tuple[str, str], NeverIndexedHeaderTuple(TICKET_HEADER, ticket.encode()))],
            )
        except (StreamClosed, SessionClosed) as exc:
            return f"tunnel lost before sending: {exc}"
        self._streams[job.id] = stream
        outcome: JobStatus | str | None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._upload, stream, job)
                outcome = await self._result(stream, job)
                nursery.cancel_scope.cancel()  # the connector may answer before it read everything
        except* PayloadMissing:
            # No attempt can ever succeed, so fail the job instead of queueing it again.
            outcome = JobStatus("failed", "payload is missing from the relay's spool")
        except* StoreUnavailable as failed:
            # Reading the payload failed (PostgreSQL failing over, say): this job is queued again, not the
            # connector's whole session ended with every other job on it.
            outcome = f"{STORE_FAILED}: {failed.exceptions[0]}"
        finally:
            self._streams.pop(job.id, None)
            stream.reset(ErrorCodes.NO_ERROR)  # no-op once both sides ended; frees the stream
        if outcome == NO_ANSWER:
            h2.close("connector stopped answering a job stream")
        return outcome or JobStatus("retry", "connector ended the stream without a result")

    async def _result(self, stream: H2Stream, job: Job) -> JobStatus | str | None:
        """The connector's final status; a reason string when the job must simply be queued again."""
        try:
            with trio.fail_after(RESPONSE_TIMEOUT):
                await stream.receive_response()
            if stream.status != 200:
                body = (await stream.read_body(16 * 1024)).decode(errors="replace").strip()
                return JobStatus("retry", f"connector answered {stream.status}: {body}")
            with trio.fail_after(PROGRESS_TIMEOUT):
                return await self._follow(stream, job)
        except (StreamClosed, SessionClosed) as exc:
            return f"tunnel lost while sending: {exc}"
        except trio.TooSlowError:
            return NO_ANSWER
        except MessageError as exc:
            return JobStatus("retry", f"connector sent a malformed status: {exc}")

    async def _upload(self, stream: H2Stream, job: Job) -> None:
        """Send the sealed payload; PayloadMissing if the spool has lost it."""
        try:
            inline = (
                await self._store.get_payload(job.id) if job.sealed_size <= self._spool.inline_max else None
            )
            if inline is not None:
                await stream.send_data(inline, end_stream=True)
                self._metrics.tunnel_bytes_out(len(inline))
                return
            async with aclosing(self._spool.open(job.id)) as chunks:
                async for chunk in chunks:
                    await stream.send_data(chunk)
                    self._metrics.tunnel_bytes_out(len(chunk))
            await stream.end()
        except (StreamClosed, SessionClosed):
            pass  # the response side reports what happened
        except FileNotFoundError:
            # Not CANCEL: to the connector that means the user canceled the job.
            stream.reset(ErrorCodes.INTERNAL_ERROR)
            log.error(
                "payload of job %s is missing from the spool", job.id,
                extra={"job_id": job.id, "tenant": job.tenant, "connector_id": job.connector_id},
            )  # fmt: skip
            raise PayloadMissing(job.id) from None

    async def _follow(self, stream: H2Stream, job: Job) -> JobStatus | None:
        if NDJSON not in (stream.header("content-type", stream.response_headers) or ""):
            raise MessageError("job stream answered without NDJSON")
        splitter = LineSplitter()
        # Closed here when the final status returns: an abandoned generator is finalized later by trio
        # (a wake-up and a task per job).
        async with aclosing(stream.iter_data(open_window=False)) as chunks:
            async for chunk in chunks:
                for line in splitter.feed(chunk):
                    status = JobStatus.decode(line)
                    if status.final:
                        return status
                    if status.state == "printing":
                        try:
                            await self._transition(
                                job, JobEvent.ACCEPTED, status.message or "printer accepted the job"
                            )
                        except StoreUnavailable as exc:  # progress only: the final status settles the job
                            log.warning("job %s: 'printing' not recorded: %s", job.id, exc,
                                        extra={"job_id": job.id})  # fmt: skip
        return None

    async def _transition(self, job: Job, event: JobEvent, message: str, **fields: Any) -> Job | None:
        return await self._jobs.transition(job.id, event, message, **fields)

    async def _requeue(self, job: Job, message: str, delay: float = 0.0, reason: str | None = None) -> None:
        """Queue the job again in ``delay`` seconds, giving its attempt back: not the job's fault (a lost
        tunnel, a stopping connector, a busy printer, the relay's database). ``reason``: its last_error,
        when not the message itself."""
        with trio.CancelScope(shield=True):
            await self._transition(
                job, JobEvent.RETRY, message, next_attempt_at=time.time() + delay,
                attempts=max(0, job.attempts - 1), last_error=message if reason is None else reason,
            )  # fmt: skip

    async def _finish(self, job: Job, status: JobStatus) -> None:
        settings = self._settings
        now = time.time()
        with trio.CancelScope(shield=True):
            if status.state == "completed":
                message = status.message or "printed"
                if status.duplicate:
                    message += " (already delivered earlier; not printed again)"
                # pages: the printer's page counter, when the connector could read it (RAW/LPD over SNMP)
                counted = {"pages": status.pages} if status.pages is not None else {}
                await self._transition(job, JobEvent.COMPLETE, message, **counted)
            elif status.state == "retry" and status.uncounted:
                # The connector was stopping, or the printer busy with another job: not this job's fault,
                # so the attempt is given back (as a stopped printer holds its jobs without spending any).
                delay = status.retry_after or retry_delay(
                    max(1, job.attempts), settings.retry_base, settings.retry_cap
                )
                message = f"{status.message}; trying again in {delay:.0f} s"
                await self._requeue(job, message, delay, reason=status.message)
            elif status.state == "retry" and job.attempts < job.max_attempts:
                delay = status.retry_after or retry_delay(
                    job.attempts, settings.retry_base, settings.retry_cap
                )
                await self._transition(
                    job, JobEvent.RETRY,
                    f"attempt {job.attempts} failed: {status.message}; retrying in {delay:.0f} s",
                    next_attempt_at=now + delay, last_error=status.message,
                )  # fmt: skip
            elif status.state == "canceled":
                await self._transition(job, JobEvent.CANCEL, status.message or "canceled at the printer")
            elif status.state == "held":
                # Printing again might print twice, not printing might print never: a person decides.
                reason = status.message or "outcome unknown"
                await self._transition(
                    job, JobEvent.HOLD, f"held: {reason}; release the job to print it again",
                    last_error=reason, unknown_outcomes=job.unknown_outcomes + 1,
                )  # fmt: skip
            else:
                reason = status.message or "delivery failed"
                if status.state == "retry":
                    reason = f"gave up after {job.attempts} attempts: {reason}"
                await self._transition(job, JobEvent.FAIL, reason, last_error=status.message)
