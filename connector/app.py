"""The connector process: serves the relay's streams and delivers jobs to the site's printers.

Routes on the tunnel (the relay opens every stream):

* ``GET /v1/printers`` — inventory: our public key and printers;
* ``GET /v1/events`` — printer changes as NDJSON, for as long as the session lives;
* ``POST /v1/jobs/{id}`` — one job: check the ledger, open the data key, decrypt while delivering,
  answer with NDJSON status lines;
* ``POST /v1/drain`` — the relay is going away: finish this session's jobs, then reconnect;
* ``POST /v1/replicas`` — the number of relay replicas changed: keep sessions to up to that many.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from connector.config import ConnectorConfig, PrinterSpec, uncertain_delivery_for
from connector.delivery import (
    Backend,
    DeliveryError,
    IppBackend,
    JobTicket,
    LpdBackend,
    RawBackend,
    backend_for_uri,
)
from connector.delivery.document import VerifiedDocument, remove_leftovers, unnamed_file, write_all
from connector.discovery import DiscoverySettings, discover
from connector.keys import KeyRing
from connector.ledger import Ledger, LedgerEntry
from connector.metrics import ConnectorMetrics
from connector.ops import ops_listener
from connector.printer_mib import pages_between
from connector.printerbook import MAX_REQUEST_BYTES, PrinterBook, parse_printer_request
from connector.status import PrinterStatus, poll
from connector.tunnel import TunnelGroup
from service.listen import start_listener
from service.private_files import private_dir
from service.signal import Signal
from tunnel.messages import (
    MAX_REPLICAS_BYTES,
    NDJSON,
    TICKET_HEADER,
    Inventory,
    JobStatus,
    JobTicketMessage,
    MessageError,
    PrinterCandidate,
    PrinterInfo,
    candidate_event,
    parse_replicas,
    printer_event,
)
from tunnel.sealing import IntegrityError, PayloadOpener, open_key
from tunnel.session import ErrorCodes, H2Session, H2Stream, SessionClosed, StreamClosed

log = logging.getLogger("printrelay.connector")

VERSION = "0.1.0"
UNKNOWN_OUTCOME = "outcome unknown: the connector stopped while the printer was taking this job"
JOB_PATH = re.compile(r"^/v1/jobs/([A-Za-z0-9_-]{1,128})$")
PRINTER_PATH = re.compile(r"^/v1/printers/([A-Za-z0-9][A-Za-z0-9._-]{0,62})$")
PROBE_INTERVAL = 30.0
GOODBYE_TIMEOUT = 2.0  # a closing session's last bytes get this long to leave
BUSY_RETRY_CAP = 60.0  # seconds: the longest wait between tries of a printer that answers "busy"
STALLED_CHECK = 10.0  # seconds between looks for stalled jobs at a printer that stays busy
# The answer to a job sent while the connector stops: not the job's fault, so not an attempt; asked back in
# 5 s, not 1 (the relay would otherwise stream each queued job here every second until the drain ends).
DRAINING = JobStatus("retry", "connector is draining", retry_after=5, uncounted=True)
LEDGER_PRUNE_INTERVAL = 3600.0


@dataclass
class PrinterEntry:
    spec: PrinterSpec
    backend: Backend
    state: str = "unknown"
    reasons: list[str] = field(default_factory=list)
    capabilities: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    busy: trio.Lock = field(default_factory=trio.Lock)
    busy_since: float | None = None  # when it started answering "busy with another job" (server-error-busy)
    stalled_checked: float = -math.inf  # when we last looked for jobs stalled at it (cancel_stalled)

    def retry_when_busy(self, now: float) -> float:
        """Seconds before a job refused as busy is sent again: as long as the printer has been busy so far
        (at least 1 s, at most a minute). The attempt does not count, so the relay's backoff, which grows
        with attempts, would not grow: a printer stuck busy would be asked every second or two for as long
        as jobs live. By time, not by answers: a backlog refused in one second must not wait a minute."""
        if self.busy_since is None:
            self.busy_since = now
        return min(BUSY_RETRY_CAP, max(1.0, now - self.busy_since))

    def info(self) -> PrinterInfo:
        return PrinterInfo(
            id=self.spec.id,
            uri=self.spec.uri,
            kind=self.spec.kind,
            state=self.state,
            reasons=tuple(self.reasons),
            capabilities=self.capabilities,
            message=self.message,
        )


# A RAW/LPD job's sealed payload is received whole and authenticated before the printer gets a byte (see
# _deliver); what is kept is the plaintext the check produced (connector/delivery/document.py): up to
# IN_MEMORY_MAX bytes in memory, beyond that in an unnamed file in incoming/, sent with sendfile(2). The file
# is checked and written in batches of FILE_BATCH bytes in a worker thread (AES-GCM releases the GIL), so the
# event loop keeps serving the tunnel meanwhile and pays one thread hop per batch instead of one per HTTP/2
# DATA frame. A delivery holds about two batches at a time, and --max-jobs deliveries run at once: with 32
# jobs of 64 MiB, 1 MiB batches cost the connector ~20 MiB more RSS than 512 KiB ones, for no measurable
# gain on one job.
IN_MEMORY_MAX = 1024 * 1024
FILE_BATCH = 512 * 1024


def _open_and_write(opener: PayloadOpener, chunks: list[bytes], fd: int) -> int:
    """Authenticate ``chunks`` and append their plaintext to ``fd``; the plaintext bytes."""
    return write_all(fd, [plain for chunk in chunks for plain in opener.feed(chunk)])


async def _open_stream(stream: H2Stream, opener: PayloadOpener) -> AsyncIterator[bytes]:
    async for chunk in stream.iter_data():
        for plain in opener.feed(chunk):
            yield plain


@dataclass(eq=False)  # compared and hashed by identity: two streams of one job are two deliveries
class Delivery:
    job_id: str
    session: H2Session | None
    status: JobStatus | None = None
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    canceled: bool = False


class Connector:
    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config
        private_dir(config.state_dir)  # keys, ledger, payloads in transit: this user's only
        self.keys = KeyRing.load_or_create(config.state_dir)
        self.ledger = Ledger(config.state_dir / "ledger.sqlite3")
        self.book = PrinterBook(config.state_dir, config.printer)
        self.printers: dict[str, PrinterEntry] = {spec.id: self._entry(spec) for spec in self.book.specs()}
        self.candidates: dict[str, PrinterCandidate] = {}
        self._status_wakeup = trio.Event()
        self.status_rounds = 0  # completed polls of every printer
        self.status_polled = Signal()  # fires after each of them
        self.name = config.name or platform.node() or "connector"
        self.tunnel = TunnelGroup(
            config.relay, config.token, self.handle_stream, sessions=config.sessions, ca_file=config.ca_file,
            proxy_setting=config.proxy,
        )  # fmt: skip
        self._job_slots = trio.Semaphore(config.max_jobs)
        self._event_watchers: set[trio.MemorySendChannel[bytes]] = set()
        self._deliveries: dict[str, Delivery] = {}
        self._reporting: set[Delivery] = set()  # deliveries whose final status is not yet sent to the relay
        self._draining_sessions: set[int] = set()
        self._jobs_changed = Signal()
        self.deliveries = 0
        self.draining = False
        self.metrics = ConnectorMetrics(self)
        self.metrics_port: int | None = None  # with --metrics-listen

    @property
    def deliveries_in_progress(self) -> int:
        return len(self._deliveries)

    @property
    def registered(self) -> bool:
        """A tunnel session is up and the relay follows its events: the relay registered it."""
        return self.tunnel.session is not None and bool(self._event_watchers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.ledger.open()
        await trio.to_thread.run_sync(remove_leftovers, self.config.state_dir / "incoming")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._probe_printers)
                if self.config.discover:
                    nursery.start_soon(self._sweep)
                nursery.start_soon(self._prune_ledger)
                nursery.start_soon(self.tunnel.run)
                if self.config.metrics_listen is not None:
                    host, port = self.config.metrics_listen
                    serve = ops_listener(self).serve
                    self.metrics_port = await start_listener(nursery, serve, host, port, "--metrics-listen")
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await self.ledger.close()
            if self.draining:
                log.info("connector stopped")

    async def drain(self, grace: float) -> None:
        """Stop taking new jobs, let in-flight ones finish within ``grace`` seconds and report their final
        state to the relay, then stop. (A session closed before the report went out left the job "queued:
        tunnel lost" at the relay until the connector came back.)"""
        self.draining = True
        self.tunnel.stopping = True
        log.info(
            "stopping: taking no new jobs; %d in flight, %d final statuses to report (waiting up to %g s)",
            len(self._deliveries), len(self._reporting), grace,
        )  # fmt: skip
        with trio.move_on_after(grace):
            while self._deliveries or self._reporting:
                await self._jobs_changed.wait()
        if self._deliveries or self._reporting:
            log.warning(
                "drain grace of %g s over: stopping with jobs %s in flight and %s unreported",
                grace, sorted(self._deliveries) or "none",
                sorted(d.job_id for d in self._reporting) or "none",
            )  # fmt: skip
        sessions = self.tunnel.sessions
        for session in sessions:
            session.close("connector shutting down")
        # close() sends what is still queued (the last statuses) with the GOAWAY: let that leave first.
        with trio.move_on_after(GOODBYE_TIMEOUT):
            for session in sessions:
                await session.finished.wait()
        self._nursery.cancel_scope.cancel()

    # --- streams from the relay -------------------------------------------------------------------

    async def handle_stream(self, stream: H2Stream) -> None:
        method, path = stream.method, stream.path
        if method == "GET" and path == "/v1/printers":
            await self._send_json(stream, 200, self.inventory().encode())
        elif method == "GET" and path == "/v1/events":
            await self._serve_events(stream)
        elif method == "POST" and path == "/v1/printers":
            await self._put_printer(stream)
        elif method == "DELETE" and (match := PRINTER_PATH.match(path)):
            await self._remove_printer(stream, match.group(1))
        elif method == "POST" and path == "/v1/drain":
            await self._send_json(stream, 200, b'{"status":"draining"}')
            self._drain_session(stream)
        elif method == "POST" and path == "/v1/replicas":
            try:
                alive = parse_replicas(await stream.read_body(MAX_REPLICAS_BYTES))
            except MessageError as exc:
                await self._send_json(stream, 400, json.dumps({"error": str(exc)}).encode())
                return
            self.tunnel.replicas_said(alive)
            await self._send_json(stream, 200, b'{"status":"ok"}')
        elif method == "POST" and (match := JOB_PATH.match(path)):
            await self._serve_job(stream, match.group(1))
        else:
            await self._send_json(stream, 404, b'{"error":"not found"}')

    def inventory(self) -> Inventory:
        return Inventory(
            name=self.name,
            version=VERSION,
            key_id=self.keys.current_key_id,
            public_key=self.keys.current_public,
            printers=tuple(p.info() for p in self.printers.values()),
        )

    async def _send_json(self, stream: H2Stream, status: int, body: bytes) -> None:
        await stream.send_response(status, [("content-type", "application/json")])
        await stream.send_data(body, end_stream=True)

    async def _serve_events(self, stream: H2Stream) -> None:
        send, receive = trio.open_memory_channel[bytes](64)
        self._event_watchers.add(send)
        try:
            await stream.send_response(200, [("content-type", NDJSON)])
            # A status poll that ended between the inventory and this subscription would be lost, and
            # a new session starts without the candidates found before it: tell it both.
            for printer in list(self.printers.values()):
                await stream.send_data(printer_event(printer.info()))
            for candidate in list(self.candidates.values()):
                await stream.send_data(candidate_event(candidate))
            async with receive:
                async for line in receive:
                    await stream.send_data(line)
        finally:
            self._event_watchers.discard(send)

    def _publish(self, line: bytes) -> None:
        for watcher in list(self._event_watchers):
            try:
                watcher.send_nowait(line)
            except trio.WouldBlock:
                # A watcher that cannot keep up loses this event; the next inventory corrects it.
                pass
            except trio.BrokenResourceError:
                self._event_watchers.discard(watcher)

    def _drain_session(self, stream: H2Stream) -> None:
        """The relay replica of this stream's session is going away: finish that session's jobs, then
        close it (its slot dials again, most likely another replica); the other sessions go on."""
        session = stream.session
        self._draining_sessions.add(id(session))
        self._nursery.start_soon(self._close_when_idle, session)

    async def _close_when_idle(self, session: H2Session) -> None:
        # Until its deliveries have ended and their final statuses have gone out on it.
        while any(d.session is session for d in (*self._deliveries.values(), *self._reporting)):
            await self._jobs_changed.wait()
        session.close("relay asked us to drain")
        self._draining_sessions.discard(id(session))

    # --- jobs -----------------------------------------------------------------------------------

    async def _serve_job(self, stream: H2Stream, job_id: str) -> None:
        session = stream.session
        if self.draining or id(session) in self._draining_sessions:
            await self._answer_early(stream, DRAINING)
            return
        try:
            ticket = JobTicketMessage.decode(stream.header(TICKET_HEADER) or "")
            if ticket.job_id != job_id:
                raise MessageError("ticket is for another job")
        except MessageError as exc:
            await self._answer_early(stream, JobStatus("failed", f"bad job ticket: {exc}"))
            return
        printer = self.printers.get(ticket.printer_id)
        if printer is None:
            await self._answer_early(
                stream, JobStatus("failed", f"printer {ticket.printer_id} is not served here")
            )
            return

        while True:
            running = self._deliveries.get(job_id)
            if running is not None:
                # A resend while an earlier delivery still runs (its tunnel dropped): wait for its outcome.
                await running.done.wait()
                continue
            entry = await self.ledger.get(job_id)
            if job_id not in self._deliveries:  # and none started while the ledger answered
                break
        if self.draining or id(session) in self._draining_sessions:  # it began while we waited
            await self._answer_early(stream, DRAINING)
            return
        if (
            entry is not None
            and entry.state == "feeding"
            and ticket.unknown_outcomes <= entry.unknown_outcomes  # not released by a person since
        ):
            policy = uncertain_delivery_for(self.config, printer.spec.id)
            log.warning(
                "job %s: the connector stopped while %s was taking it; the printer may or may not have "
                "printed it: %s (uncertain_delivery=%s)", job_id, printer.spec.id,
                "holding it for a person to release or cancel" if policy == "hold" else "printing it again",
                policy, extra={"job_id": job_id, "printer_id": printer.spec.id},
            )  # fmt: skip
            if policy == "hold":
                self.metrics.delivery_done(printer.spec.kind, "held", 0.0)
                await self._answer_early(stream, JobStatus("held", UNKNOWN_OUTCOME))
                return
        # An IPP printer job that had its whole document may still be printing: it is followed to its end
        # (_follow_handed), not reported done while the printer still has it.
        follow = (
            entry is not None and entry.state == "handed" and entry.printer_job_id is not None
            and entry.printer_id == printer.spec.id  # not a job id on another printer (a job moved)
            and isinstance(printer.backend, IppBackend)
        )  # fmt: skip
        if entry is not None and entry.state in ("handed", "completed", "failed", "canceled") and not follow:
            state = entry.state if entry.state in ("failed", "canceled") else "completed"
            message = entry.message or "delivered before"
            self.metrics.delivery_done(printer.spec.kind, "duplicate", 0.0)
            await self._answer_early(stream, JobStatus(state, message, entry.printer_job_id, duplicate=True))
            return

        # Registered before the next await, so that a second stream of this job (two replicas after a
        # lapsed lease) waits for this delivery instead of starting one beside it.
        delivery = Delivery(job_id, session)
        self._deliveries[job_id] = delivery
        try:
            await stream.send_response(200, [("content-type", NDJSON)])
            # The delivery belongs to the connector, not to the tunnel session: if the tunnel drops while a
            # printer is being fed, the printer still gets the whole job and the ledger records it, so the
            # relay's resend is answered from the ledger instead of printing a fragment.
            self._nursery.start_soon(self._run_delivery, delivery, stream, ticket, printer, entry)
        except BaseException:  # the session ended, or the connector is stopping: no delivery runs
            self._delivery_ended(delivery)
            raise
        self._reporting.add(delivery)
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(self._cancel_on_reset, stream, delivery)
                await delivery.done.wait()
                watch.cancel_scope.cancel()
            assert delivery.status is not None
            await stream.send_data(delivery.status.encode(), end_stream=True)
        finally:
            # The final status is on its way to the relay, or the stream is gone: a session that ends
            # cancels this handler while it waits for the delivery, and the relay then hears the outcome
            # from the ledger when it sends the job again. Either way a drain need not wait for it.
            self._reporting.discard(delivery)
            self._jobs_changed.fire()

    async def _cancel_on_reset(self, stream: H2Stream, delivery: Delivery) -> None:
        """RST_STREAM(CANCEL) from the relay means the job was canceled: stop delivering it. A stream that
        merely died with its tunnel does not stop the delivery (see _serve_job)."""
        if await stream.wait_closed() == ErrorCodes.CANCEL:
            delivery.canceled = True
            delivery.scope.cancel()

    async def _run_delivery(
        self,
        delivery: Delivery,
        stream: H2Stream,
        ticket: JobTicketMessage,
        printer: PrinterEntry,
        earlier: LedgerEntry | None,
    ) -> None:
        started = time.monotonic()
        try:
            with delivery.scope:
                async with self._job_slots:
                    try:
                        delivery.status = await self._deliver(stream, ticket, printer, earlier)
                    except (StreamClosed, SessionClosed) as exc:
                        if isinstance(exc, StreamClosed) and exc.error_code == ErrorCodes.CANCEL:
                            delivery.canceled = True  # _cancel_on_reset may not have run yet
                        delivery.status = JobStatus("retry", f"tunnel lost during delivery: {exc}")
                    except Exception as exc:
                        # A bug, or a printer answer nobody foresaw: this job's delivery ends, not the
                        # connector (deliveries run in the connector's own nursery).
                        log.exception(
                            "job %s: delivery to %s failed", delivery.job_id, printer.spec.id,
                            extra={"job_id": delivery.job_id, "printer_id": printer.spec.id},
                        )  # fmt: skip
                        delivery.status = JobStatus("retry", f"connector error during delivery: {exc!r}")
            if delivery.canceled:
                log.info(
                    "job %s canceled by the relay while delivering to %s", delivery.job_id, printer.spec.id,
                    extra={"job_id": delivery.job_id, "printer_id": printer.spec.id},
                )  # fmt: skip
                delivery.status = JobStatus("canceled", "canceled by the relay")
                with trio.CancelScope(shield=True):
                    await self.ledger.record(
                        ticket.job_id, printer.spec.id, "canceled", "canceled by the relay"
                    )
        finally:
            if delivery.status is None:
                delivery.status = JobStatus("retry", "delivery interrupted", uncounted=True)
            self.metrics.delivery_done(printer.spec.kind, delivery.status.state, time.monotonic() - started)
            self._delivery_ended(delivery)

    def _job_canceled(self, job_id: str) -> bool:
        """Whether a delivery being cancelled is the job's cancel (by the relay), not the connector's stop."""
        delivery = self._deliveries.get(job_id)
        return delivery is None or delivery.canceled

    def _delivery_ended(self, delivery: Delivery) -> None:
        del self._deliveries[delivery.job_id]
        delivery.done.set()  # after the removal: a second stream of the job waits on it, then looks again
        self._jobs_changed.fire()

    async def _answer_early(self, stream: H2Stream, status: JobStatus) -> None:
        """Answer a job stream without reading its body: the status, then RST_STREAM(NO_ERROR) so the
        relay stops uploading (RFC 9113 §8.1)."""
        await stream.send_response(200, [("content-type", NDJSON)])
        await stream.send_data(status.encode(), end_stream=True)
        stream.reset(0)

    async def _deliver(
        self, stream: H2Stream, ticket: JobTicketMessage, printer: PrinterEntry, earlier: LedgerEntry | None
    ) -> JobStatus:
        """Deliver one job; ``earlier``: its ledger entry, read after any earlier delivery of it ended
        (``_deliveries`` keeps a second one from starting meanwhile)."""
        job_id = ticket.job_id
        if earlier is not None and earlier.state == "handed":
            return await self._follow_handed(stream, ticket, printer, earlier)
        try:
            dek = open_key(ticket.wrapped_key, self.keys.private_for(ticket.key_id), context=job_id.encode())
        except (KeyError, IntegrityError) as exc:
            return JobStatus("failed", f"cannot open the job's data key: {exc}")
        handed_on_accept = printer.spec.kind in ("ipp", "ipps", "cups")  # IPP underneath
        # RAW and LPD printers print whatever bytes reach them, so a tunnel that drops mid-job would print
        # a fragment. For them the sealed payload is first received whole and authenticated, and the
        # plaintext kept (in memory, or an unnamed 0600 file: connector/delivery/document.py) is what the
        # printer gets. IPP printers discard an unfinished request by themselves.
        verified: VerifiedDocument | None = None
        if not handed_on_accept:
            try:
                verified = await self._receive_verified(stream, dek, job_id)
            except IntegrityError as exc:
                return await self._integrity_failure(job_id, printer, exc)
        try:
            return await self._feed(stream, ticket, printer, earlier, dek, verified)
        finally:
            if verified is not None:
                verified.close()

    async def _cancel_stalled(self, printer: PrinterEntry, user: str, now: float) -> None:
        """Busy for a while: perhaps a printer job left waiting for its document by a client that died
        (this connector, killed before it journaled one), which the printer does not abort. Best effort,
        and at most every STALLED_CHECK seconds."""
        if not isinstance(printer.backend, IppBackend) or now - printer.stalled_checked < STALLED_CHECK:
            return
        printer.stalled_checked = now
        try:
            stalled = await printer.backend.cancel_stalled(user)
        except DeliveryError as exc:
            log.debug("printer %s: no look at stalled jobs: %s", printer.spec.id, exc.message)
            return
        if stalled:
            log.warning(
                "printer %s: canceled printer jobs %s, left waiting for a document longer than the "
                "printer's multiple-operation-time-out", printer.spec.id, stalled,
                extra={"printer_id": printer.spec.id},
            )  # fmt: skip

    async def _follow_handed(
        self, stream: H2Stream, ticket: JobTicketMessage, printer: PrinterEntry, earlier: LedgerEntry
    ) -> JobStatus:
        """The job again after a restart, its IPP printer job handed over whole before: follow that printer
        job under the printer's lock (the next job would only hear "busy" meanwhile) and report its end."""
        assert isinstance(printer.backend, IppBackend) and earlier.printer_job_id is not None
        printer_job = earlier.printer_job_id
        with contextlib.suppress(StreamClosed, SessionClosed):
            await self._status(stream, JobStatus("printing", f"printer job {printer_job} had the document"))
        job = JobTicket(
            job_id=ticket.job_id, title=ticket.title, document_format=ticket.document_format,
            user=ticket.user or "printrelay", job_canceled=partial(self._job_canceled, ticket.job_id),
        )  # fmt: skip
        try:
            async with printer.busy:
                result = await printer.backend.follow(job, printer_job)
        except DeliveryError as exc:  # cannot ask it now; the job stays `handed`, never sent again
            return JobStatus("retry", exc.message, uncounted=True)
        if result is None:  # the printer forgot it (or cannot be asked): it had the document
            return JobStatus("completed", earlier.message or "delivered before", printer_job, duplicate=True)
        await self.ledger.record(ticket.job_id, printer.spec.id, result.state, result.message, printer_job)
        return JobStatus(result.state, result.message, printer_job, duplicate=True)

    async def _feed(
        self,
        stream: H2Stream,
        ticket: JobTicketMessage,
        printer: PrinterEntry,
        earlier: LedgerEntry | None,
        dek: bytes,
        verified: VerifiedDocument | None,
    ) -> JobStatus:
        """Hand the job to the printer: ``verified``, or for IPP printers the payload as it arrives."""
        job_id = ticket.job_id
        handed_on_accept = verified is None
        printed = self.metrics.printer_bytes.labels(printer.spec.kind)
        if verified is not None:

            async def feeding() -> None:
                # On disk before the printer gets a byte: a connector that dies from here until `handed`
                # cannot know what printed, and must not print it again blindly.
                await self.ledger.record(
                    job_id, printer.spec.id, "feeding", f"attempt {ticket.attempt}: printer taking it",
                    unknown_outcomes=ticket.unknown_outcomes,
                )  # fmt: skip

            async def handed() -> None:
                await self.ledger.record(job_id, printer.spec.id, "handed", "printer took every byte")

            verified.watch(feeding, handed, printed.inc)

        async def streamed() -> AsyncIterator[bytes]:
            opener = PayloadOpener(dek, job_id)
            async for plain in _open_stream(stream, opener):
                printed.inc(len(plain))
                yield plain
            opener.finish()

        document: AsyncIterator[bytes] = verified if verified is not None else streamed()

        async def progress(state: str, message: str) -> None:
            if state == "printing":
                if handed_on_accept:
                    await self.ledger.record(job_id, printer.spec.id, "handed", message)
                with contextlib.suppress(StreamClosed, SessionClosed):
                    await self._status(stream, JobStatus("printing", message))

        job = JobTicket(
            job_id=job_id,
            title=ticket.title,
            document_format=ticket.document_format,
            copies=ticket.copies,
            user=ticket.user or "printrelay",
            size=ticket.size,
            options=ticket.options,
            earlier_printer_job=earlier.printer_job_id if earlier and earlier.state == "created" else None,
            job_canceled=partial(self._job_canceled, job_id),
        )
        if job.earlier_printer_job is None:
            self.ledger.note_started(job_id, printer.spec.id, f"attempt {ticket.attempt}")

        async def journal(printer_job_id: int) -> None:
            # Durable before the first document byte leaves: see connector/ledger.py.
            await self.ledger.record(
                job_id, printer.spec.id, "created", f"printer job {printer_job_id} created", printer_job_id
            )

        started = time.monotonic()
        pages: int | None = None
        # RAW and LPD printers with SNMP: the page counter before the job and once the printer settles
        # after it (connector/printer_mib.py), under the printer's lock so that our next job does not
        # count in this one. Best effort, and bounded: an agent that does not answer costs one timeout.
        # Not while other jobs wait for the printer: settling takes up to SETTLE_WITHIN, and a queue of
        # jobs is better printed than counted (the count gives up when one starts waiting).
        mib = printer.backend.snmp if isinstance(printer.backend, RawBackend | LpdBackend) else None
        try:
            async with printer.busy:
                before = await mib.life_count() if mib is not None else None
                result = await printer.backend.deliver(job, document, progress, journal)
                printer.busy_since = None  # it took a job: the next "busy" starts the waits again
                if mib is not None and before is not None and result.state == "completed":
                    lock = printer.busy
                    after = await mib.settled_count(
                        before, give_up=lambda: lock.statistics().tasks_waiting > 0
                    )
                    pages = pages_between(before, after)
        except IntegrityError as exc:
            return await self._integrity_failure(job_id, printer, exc)
        except DeliveryError as exc:
            if exc.retryable:
                if verified is not None and verified.begun:  # we saw it fail: a retry, not an unknown outcome
                    await self.ledger.record(
                        job_id, printer.spec.id, "started", f"attempt failed: {exc.message}"
                    )
                if exc.busy:
                    now = time.monotonic()
                    wait = printer.retry_when_busy(now)
                    if wait > 1.0:  # busy for a while
                        await self._cancel_stalled(printer, job.user, now)
                    return JobStatus("retry", exc.message, retry_after=wait, uncounted=True)
                return JobStatus("retry", exc.message)
            await self.ledger.record(job_id, printer.spec.id, "failed", exc.message)
            return JobStatus("failed", exc.message)
        except StreamClosed:
            raise  # the relay went away; it will resend, the ledger says how far we got
        self.deliveries += 1
        message = result.message
        if pages is not None:
            message += (
                f"; {pages} page{'s' if pages != 1 else ''} by the printer's page counter (best effort)"
            )
        if verified is not None and verified.ended and result.state == "completed":
            self.ledger.note_completed(job_id, printer.spec.id, message)  # `handed` is on disk already
        else:
            await self.ledger.record(job_id, printer.spec.id, result.state, message, result.printer_job_id)
        log.info(
            "job %s %s on %s in %.2f s: %s", job_id, result.state, printer.spec.id,
            time.monotonic() - started, message,
            extra={"job_id": job_id, "printer_id": printer.spec.id},
        )  # fmt: skip
        return JobStatus(result.state, message, result.printer_job_id, pages=pages)

    async def _integrity_failure(self, job_id: str, printer: PrinterEntry, exc: IntegrityError) -> JobStatus:
        log.error(
            "job %s failed its integrity check: %s", job_id, exc,
            extra={"job_id": job_id, "printer_id": printer.spec.id},
        )  # fmt: skip
        await self.ledger.record(job_id, printer.spec.id, "failed", f"integrity error: {exc}")
        return JobStatus("failed", f"payload integrity check failed: {exc}")

    async def _receive_verified(self, stream: H2Stream, dek: bytes, job_id: str) -> VerifiedDocument:
        """Receive the whole sealed payload, authenticating every record, and keep its plaintext: in memory
        when the payload fits in IN_MEMORY_MAX, else in an unnamed file in ``incoming/`` (checked and
        written FILE_BATCH bytes at a time in a worker thread; the HTTP/2 window keeps the tunnel busy
        meanwhile). IntegrityError, and nothing kept, if any record fails or the payload is cut short;
        StreamClosed, and nothing kept, if the stream was reset (a cancel) before all of it was read."""
        opener = PayloadOpener(dek, job_id)
        batch: list[bytes] = []
        held = 0
        size = 0
        fd: int | None = None
        try:
            async for chunk in stream.iter_data():
                batch.append(chunk)
                held += len(chunk)
                if held >= FILE_BATCH and (fd is not None or held > IN_MEMORY_MAX):
                    if fd is None:
                        fd = await trio.to_thread.run_sync(unnamed_file, self.config.state_dir / "incoming")
                    size += await trio.to_thread.run_sync(_open_and_write, opener, batch, fd)
                    batch, held = [], 0
            if fd is None:
                parts = [part for chunk in batch for part in opener.feed(chunk)]
                opener.finish()
                return VerifiedDocument(size=sum(len(part) for part in parts), parts=parts)
            size += await trio.to_thread.run_sync(_open_and_write, opener, batch, fd)
            opener.finish()
        except BaseException:
            if fd is not None:
                os.close(fd)  # the file has no name: closing it frees it
            raise
        return VerifiedDocument(size=size, fd=fd)

    async def _status(self, stream: H2Stream, status: JobStatus, *, start: bool = False) -> None:
        if start:
            await stream.send_response(200, [("content-type", NDJSON)])
        await stream.send_data(status.encode())

    # --- background -----------------------------------------------------------------------------

    async def _probe_printers(self) -> None:
        """Status of every printer every ``status_interval``; changes go to the relay as events."""
        while True:
            async with trio.open_nursery() as nursery:
                for printer in list(self.printers.values()):
                    nursery.start_soon(self._poll_printer, printer)
            self.status_rounds += 1
            self.status_polled.fire()
            with trio.move_on_after(self.config.status_interval):
                await self._status_wakeup.wait()
            self._status_wakeup = trio.Event()

    async def _poll_printer(self, printer: PrinterEntry) -> None:
        status: PrinterStatus = await poll(printer.backend)
        if self.printers.get(printer.spec.id) is not printer:
            return  # removed or replaced while we asked
        reasons = list(status.reasons)
        if (status.state, reasons, status.capabilities, status.message) == (
            printer.state,
            printer.reasons,
            printer.capabilities,
            printer.message,
        ):
            return
        if status.state != printer.state:
            log.info(
                "printer %s: %s -> %s %s", printer.spec.id, printer.state, status.state, status.message,
                extra={"printer_id": printer.spec.id},
            )  # fmt: skip
        printer.state, printer.reasons, printer.capabilities = status.state, reasons, status.capabilities
        printer.message = status.message
        self._publish(printer_event(printer.info()))

    # --- printers added, changed and removed at run time --------------------------------------------

    def _entry(self, spec: PrinterSpec) -> PrinterEntry:
        config = self.config
        backend = backend_for_uri(
            spec.uri, spool_dir=config.state_dir / "spool", snmp_port=config.snmp_port,
            snmp_community=config.snmp_community,
        )  # fmt: skip
        return PrinterEntry(spec, backend)

    async def _put_printer(self, stream: H2Stream) -> None:
        """``POST /v1/printers`` ``{"id", "uri"}``: serve this printer from now on (201 new, 200 changed)."""
        try:
            spec = parse_printer_request(await stream.read_body(MAX_REQUEST_BYTES))
        except ValueError as exc:
            await self._send_json(stream, 400, json.dumps({"error": str(exc)}).encode())
            return
        existed = spec.id in self.printers
        entry = self._entry(spec)
        await self.book.put(spec)
        self.printers[spec.id] = entry
        self.candidates.pop(spec.uri, None)
        log.info("printer %s %s: %s", spec.id, "changed" if existed else "added", spec.uri)
        await self._poll_printer(entry)  # the relay learns its state and capabilities at once
        self._publish(printer_event(entry.info()))
        await self._send_json(stream, 200 if existed else 201, json.dumps(entry.info().to_json()).encode())

    async def _remove_printer(self, stream: H2Stream, printer_id: str) -> None:
        if not await self.book.remove(printer_id):
            await self._send_json(
                stream, 404, json.dumps({"error": f"printer {printer_id} not found"}).encode()
            )
            return
        entry = self.printers.pop(printer_id)
        log.info("printer %s removed", printer_id)
        removed = PrinterInfo(id=printer_id, uri=entry.spec.uri, kind=entry.spec.kind, state="removed")
        self._publish(printer_event(removed))
        await self._send_json(stream, 200, json.dumps(removed.to_json()).encode())

    async def _sweep(self) -> None:
        """Discovery every ``discover_interval``: new candidates (not served yet) go to the relay."""
        config = self.config
        settings = DiscoverySettings(
            cups=config.discover_cups, mdns=config.discover_mdns,
            mdns_interfaces=tuple(config.discover_mdns_interface), cidrs=tuple(config.discover_cidr),
            ipp_ports=tuple(config.discover_ipp_port), raw_ports=tuple(config.discover_raw_port),
        )  # fmt: skip
        while True:
            try:
                found = await discover(settings)
                self.metrics.sweeps.labels("ok").inc()
            except ValueError as exc:  # a --discover-cidr that cannot be scanned
                log.error("discovery sweep failed: %s", exc)
                self.metrics.sweeps.labels("error").inc()
                found = []
            served = {p.spec.uri for p in self.printers.values()}
            for candidate in found:
                if candidate.uri not in served and candidate.uri not in self.candidates:
                    self.candidates[candidate.uri] = candidate
                    log.info("discovered %s (%s, %s)", candidate.uri, candidate.name, candidate.source)
                    self._publish(candidate_event(candidate))
            await trio.sleep(config.discover_interval)

    async def _prune_ledger(self) -> None:
        while True:
            await self.ledger.prune()
            await trio.sleep(LEDGER_PRUNE_INTERVAL)
