"""Every change of a job's state goes through here: the table in relay/jobs.py, the store, what follows.

One place, so that nothing that follows from a transition can be forgotten by one of its callers
(dispatcher, lease keeper, REST, IPP, expiry). The store records each change with its history row, its
webhook outbox rows and a ``job`` notice, in one transaction; once committed:

* here, on the replica that made the change: a final state erases the payload and counts the job;
  a job held for release waits at most ``held_job_ttl``, and a release gives it ``job_ttl`` from then on;
* on every replica (the notice, locally at once and to the others through the store): live watchers (SSE)
  get the change, webhook senders wake, a queued job wakes its connector's dispatcher, and a canceled job
  that is streaming is stopped by whoever streams it.

IPP Create-Job records move through their own table (``IPP_TRANSITIONS``) here too.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import trio

from relay.capabilities import OptionRefused, check_options
from relay.jobs import (
    IllegalTransition,
    IppJobEvent,
    IppJobState,
    Job,
    JobEvent,
    JobHistoryEntry,
    JobState,
    next_ipp_state,
)
from relay.metrics import RelayMetrics
from relay.spool import PayloadSpool
from relay.store.base import ConnectorStore, IppJob, IppJobStore, JobStore, Notice

log = logging.getLogger("printrelay.relay.jobs")

WATCH_QUEUE = 64  # events a slow watcher may lag behind before it is dropped


class JobLifecycle:
    def __init__(
        self,
        jobs: JobStore,
        ipp_jobs: IppJobStore,
        printers: ConnectorStore,
        spool: PayloadSpool,
        metrics: RelayMetrics,
        *,
        job_ttl: float,
        held_job_ttl: float,
    ) -> None:
        self._jobs = jobs
        self._job_ttl, self._held_job_ttl = job_ttl, held_job_ttl
        self._ipp_jobs = ipp_jobs
        self._printers = printers
        self._spool = spool
        self._metrics = metrics
        self._watchers: dict[str, set[trio.MemorySendChannel[JobHistoryEntry]]] = defaultdict(set)

    # --- transitions ----------------------------------------------------------------------------

    async def transition(self, job_id: str, event: JobEvent, message: str, **fields: Any) -> Job | None:
        """Apply ``event``; None when the job is gone or the move is no longer legal (a newer state won)."""
        now = time.time()
        if event is JobEvent.RELEASE:  # on its way again: job_ttl from now to be delivered
            fields.setdefault("expires_at", now + self._job_ttl)
        elif event is JobEvent.SET_ASIDE:  # a document nobody releases does not wait long (see submit.py)
            fields.setdefault("expires_at", now + self._held_job_ttl)
        try:
            job = await self._jobs.transition(job_id, event, message, now, **fields)
        except IllegalTransition as exc:
            log.info("job %s: %s (%s)", job_id, exc, message, extra={"job_id": job_id})
            return None
        if job is not None and job.state.final:
            await self._finished(job, message)
        return job

    async def _finished(self, job: Job, message: str) -> None:
        # A small payload had no file: the store erased it with the final state.
        if job.sealed_size > self._spool.inline_max:
            with trio.CancelScope(shield=True):
                await self._spool.erase(job.id)  # crypto-shred: the wrapped key dies with the row's use
        self._metrics.job_finished(job, message)
        log.info(
            "job %s %s", job.id, job.state,
            extra={"job_id": job.id, "tenant": job.tenant, "connector_id": job.connector_id,
                   "printer_id": job.printer_id},
        )  # fmt: skip

    def heard(self, notice: Notice) -> None:
        """A job change committed here or on another replica: tell its watchers."""
        if notice.kind != "job":
            return
        entry = JobHistoryEntry(
            notice.key, float(notice.data["at"]), JobState(notice.data["state"]), str(notice.data["message"])
        )
        for channel in list(self._watchers.get(notice.key, ())):
            try:
                channel.send_nowait(entry)
            except (trio.WouldBlock, trio.BrokenResourceError):
                # A watcher that cannot keep up is dropped; it can reconnect and replay the history.
                self._forget(notice.key, channel)
                channel.close()

    # --- watchers -------------------------------------------------------------------------------

    def watch(
        self, job_id: str
    ) -> tuple[trio.MemorySendChannel[JobHistoryEntry], trio.MemoryReceiveChannel[JobHistoryEntry]]:
        """A channel of the job's changes from now on; give both ends back to :meth:`unwatch`."""
        send, receive = trio.open_memory_channel[JobHistoryEntry](WATCH_QUEUE)
        self._watchers[job_id].add(send)
        return send, receive

    def unwatch(
        self,
        job_id: str,
        send: trio.MemorySendChannel[JobHistoryEntry],
        receive: trio.MemoryReceiveChannel[JobHistoryEntry],
    ) -> None:
        """This watcher is done; the job's other watchers go on."""
        receive.close()
        send.close()
        self._forget(job_id, send)

    def _forget(self, job_id: str, send: trio.MemorySendChannel[JobHistoryEntry]) -> None:
        watchers = self._watchers.get(job_id)
        if watchers is not None:
            watchers.discard(send)
            if not watchers:
                del self._watchers[job_id]

    # --- operations -----------------------------------------------------------------------------

    async def cancel(self, job: Job, reason: str) -> Job | None:
        """Cancel a job in any non-final state. Held or queued: it never prints. Sending or printing: the
        relay streaming it (this one or another) resets the stream when it hears of the change, and the
        connector cancels it at the printer where the protocol allows (IPP Cancel-Job)."""
        return await self.transition(job.id, JobEvent.CANCEL, reason, **_no_longer_waiting(job))

    async def expire(self, job: Job) -> Job | None:
        """A held or queued job whose ``expires_at`` passed: expired, and its document erased."""
        if job.state is JobState.HELD:
            message = "not released before expires_at; its document is erased"
            return await self.transition(job.id, JobEvent.EXPIRE, message, **_no_longer_waiting(job, message))
        return await self.transition(job.id, JobEvent.EXPIRE, "not delivered before expires_at")

    async def hold(self, job: Job, message: str) -> Job | None:
        """A person holds their queued job until they release it; None when it left the queue meanwhile."""
        return await self.transition(job.id, JobEvent.SET_ASIDE, message)

    async def release(self, job: Job, printer_id: str | None, message: str) -> Job | None:
        """A person releases a held job, optionally to another printer of the tenant served by the same
        connector (the payload is sealed to that connector; the relay cannot re-seal it to another) that
        can print it as it was submitted. LookupError: no such printer; ValueError: it cannot take the job."""
        fields = _no_longer_waiting(job)
        if printer_id is not None and printer_id != job.printer_id:
            printer = await self._printers.get_printer(job.tenant, printer_id)
            if printer is None or printer.state == "removed":
                raise LookupError(f"printer {printer_id} not found")
            if printer.connector_id != job.connector_id:
                raise ValueError(
                    f"printer {printer_id} is served by connector {printer.connector_id}, but the job is "
                    f"sealed to connector {job.connector_id}; submit it again for that printer"
                )
            try:
                check_options(
                    printer.capabilities, document_format=job.document_format, copies=job.copies,
                    options=job.options,
                )  # fmt: skip
            except OptionRefused as exc:
                raise ValueError(
                    f"printer {printer_id} cannot print this job: {exc.message}; release it to another "
                    "printer or submit it again"
                ) from None
            fields["printer_id"] = printer_id
        return await self.transition(job.id, JobEvent.RELEASE, message, **fields)

    async def documents_complete(self, tenant: str, job_id: str) -> Job | None:
        """An IPP job's last document arrived (Close-Job): queue the job that was held for it, unless it
        waits for a person's release at a pull printer; then it stays held (None), like a refused move."""
        job = await self._jobs.get_job(tenant, job_id)
        if job is None or job.awaits_release_at_printer:
            return None
        return await self.transition(job_id, JobEvent.RELEASE, "last document received")

    # --- IPP Create-Job records -----------------------------------------------------------------

    async def advance_ipp_job(self, record: IppJob, event: IppJobEvent, job_id: str | None = None) -> bool:
        """Move a Create-Job record by ``event`` from the state it was read in (compare-and-set: False when
        another request moved it first, or when the event does not apply to that state)."""
        state = next_ipp_state(record.state, event)
        if state is None:
            return False
        now = time.time()
        moved = await self._ipp_jobs.set_ipp_job_state(
            record.tenant, record.number, record.state, state, now, job_id
        )
        if moved:
            record.state, record.updated_at = state, now
            if job_id is not None:
                record.job_id = job_id
        return moved


def _no_longer_waiting(job: Job, why: str = "") -> dict[str, Any]:
    """A job leaving its wait for a release at a pull printer no longer says it waits (its last_error is
    its hold reason over REST and its job-state-message over IPP)."""
    return {"last_error": why} if job.awaits_release_at_printer else {}


__all__ = ["IppJobEvent", "IppJobState", "JobLifecycle"]
