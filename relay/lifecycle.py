"""Every change of a job's state goes through here: the store, the watchers, the payload, the wakeups.

One place, so that nothing that follows from a transition can be forgotten by one of the many callers
(dispatcher, REST, IPP, expiry): a final state erases the payload and counts the job, a queued job wakes
its connector's dispatcher, and every change is published to live watchers (SSE) and webhooks.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from relay.jobs import IllegalTransition, Job, JobEvent, JobHistoryEntry, JobState

if TYPE_CHECKING:
    from relay.app import Relay

log = logging.getLogger("printrelay.relay.jobs")

WATCH_QUEUE = 64  # events a slow watcher may lag behind before it is dropped

Listener = Callable[[Job, JobHistoryEntry], None]


class JobLifecycle:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._watchers: dict[str, set[trio.MemorySendChannel[JobHistoryEntry]]] = defaultdict(set)
        self.listeners: list[Listener] = []  # e.g. webhooks; called for every change, must not block

    # --- transitions ----------------------------------------------------------------------------

    async def transition(self, job_id: str, event: JobEvent, message: str, **fields: Any) -> Job | None:
        """Apply ``event``; None when the job is gone or the move is no longer legal (a newer state won)."""
        now = time.time()
        try:
            job = await self.relay.store.transition(job_id, event, message, now, **fields)
        except IllegalTransition as exc:
            log.info("job %s: %s (%s)", job_id, exc, message, extra={"job_id": job_id})
            return None
        if job is not None:
            await self.changed(job, JobHistoryEntry(job.id, now, job.state, message))
        return job

    async def changed(self, job: Job, entry: JobHistoryEntry) -> None:
        """Consequences of a state change already in the store."""
        self.publish(job, entry)
        if job.state.final:
            await self._finished(job, entry.message)
        elif job.state is JobState.QUEUED:
            self.relay.registry.wake(job.tenant, job.connector_id)

    async def _finished(self, job: Job, message: str) -> None:
        relay = self.relay
        # A small payload had no file: the store erased it with the final state.
        if job.sealed_size > relay.spool.inline_max:
            with trio.CancelScope(shield=True):
                await relay.spool.erase(job.id)  # crypto-shred: the wrapped key dies with the row's use
        relay.metrics.job_finished(job, message)
        log.info(
            "job %s %s", job.id, job.state,
            extra={"job_id": job.id, "tenant": job.tenant, "connector_id": job.connector_id,
                   "printer_id": job.printer_id},
        )  # fmt: skip

    def publish(self, job: Job, entry: JobHistoryEntry) -> None:
        for channel in list(self._watchers.get(job.id, ())):
            try:
                channel.send_nowait(entry)
            except (trio.WouldBlock, trio.BrokenResourceError):
                # A watcher that cannot keep up is dropped; it can reconnect and replay the history.
                self._watchers[job.id].discard(channel)
                channel.close()
        for listener in self.listeners:
            listener(job, entry)

    def watch(self, job_id: str) -> trio.MemoryReceiveChannel[JobHistoryEntry]:
        send, receive = trio.open_memory_channel[JobHistoryEntry](WATCH_QUEUE)
        self._watchers[job_id].add(send)
        return receive

    def unwatch(self, job_id: str, receive: trio.MemoryReceiveChannel[JobHistoryEntry]) -> None:
        receive.close()
        watchers = self._watchers.get(job_id)
        if watchers is not None:
            for send in list(watchers):
                send.close()  # closed channels are pruned here or on the next publish
            watchers.clear()
            self._watchers.pop(job_id, None)

    # --- operations -----------------------------------------------------------------------------

    async def cancel(self, job: Job, reason: str) -> Job | None:
        """Cancel a job in any non-final state. Held or queued: it never prints. Sending or printing: the
        stream to the connector is reset, and the connector cancels it at the printer where the protocol
        allows (IPP Cancel-Job)."""
        in_flight = job.state in (JobState.SENDING, JobState.PRINTING)
        done = await self.transition(job.id, JobEvent.CANCEL, reason)
        if done is not None and in_flight:
            for session in self.relay.registry.sessions(job.tenant):
                session.cancel_stream(job.id)
        return done

    async def release(self, job: Job, printer_id: str | None, message: str) -> Job | None:
        """Release a held job, optionally to another printer of the tenant served by the same connector
        (the payload is sealed to that connector; the relay cannot re-seal it to another)."""
        fields: dict[str, Any] = {}
        if printer_id is not None and printer_id != job.printer_id:
            printer = await self.relay.store.get_printer(job.tenant, printer_id)
            if printer is None:
                raise LookupError(f"printer {printer_id} not found")
            if printer.connector_id != job.connector_id:
                raise ValueError(
                    f"printer {printer_id} is served by connector {printer.connector_id}, but the job is "
                    f"sealed to connector {job.connector_id}; submit it again for that printer"
                )
            fields["printer_id"] = printer_id
        return await self.transition(job.id, JobEvent.RELEASE, message, **fields)
