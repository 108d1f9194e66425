"""The relay's Prometheus metrics: few, low-cardinality, named for what ops watch.

All metric objects live here, in one registry per relay (so tests can run several relays in a process).
Label values come from small closed sets: job states, reason classes, route templates, HTTP codes. Job
ids never become labels; printer ids only with ``--metrics-per-printer``, and then at most
``MAX_PRINTER_SERIES`` of them.

Three ways values get here:

* counters and histograms are updated where things happen (dispatcher, submission, lifecycle, tunnel);
* tunnel traffic is read from each session's :class:`~tunnel.session.SessionStats` at scrape time
  (:class:`TunnelTraffic`), so the hot send path counts nothing twice;
* gauges of the queue, the spool and the fleet are sampled by :meth:`RelayMetrics.sample` just before a
  scrape (see ``relay.ops``).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.jobs import LEASE_LAPSED, Job, JobState
from relay.store.base import StoreSample
from tunnel.session import SessionStats

if TYPE_CHECKING:
    from service.http.message import Request, Response
    from tunnel.session import H2Session

# accepted -> printed: seconds for a small job, hours for one that waited on an offline printer
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
MAX_PRINTER_SERIES = 500  # with --metrics-per-printer: printers beyond this are counted as "other"
OPEN_STATES = (JobState.HELD, JobState.QUEUED, JobState.SENDING, JobState.PRINTING)


# --- bounded label values -------------------------------------------------------------------------

# (substring of the job's final history message, reason label); first match wins. The messages are the
# relay's own (dispatcher, expiry, cancel paths), so this table and tests/test_metrics.py move together.
_FINISH_REASONS: dict[JobState, tuple[tuple[str, str], ...]] = {
    JobState.COMPLETED: (("already delivered", "duplicate"),),
    JobState.FAILED: (
        ("gave up after", "attempts_exhausted"),
        ("integrity", "integrity"),
        ("data key", "key_unavailable"),
        ("not served", "printer_unknown"),
        ("bad job ticket", "protocol"),
    ),
    JobState.CANCELED: (("at the printer", "printer"),),
    JobState.EXPIRED: (),
}
_DEFAULT_REASON = {
    JobState.COMPLETED: "printed",
    JobState.FAILED: "printer_refused",
    JobState.CANCELED: "client",
    JobState.EXPIRED: "ttl",
}


def finish_reason(state: JobState, message: str) -> str:
    """The reason class of a final state, from the message of its last transition."""
    lowered = message.lower()
    for needle, reason in _FINISH_REASONS.get(state, ()):
        if needle in lowered:
            return reason
    return _DEFAULT_REASON.get(state, "other")


# (prefix of H2Session.close_reason, label); see tunnel/session.py and relay/tunnel.py for the texts.
_CLOSE_REASONS = (
    ("transport lost", "transport_lost"),
    ("peer closed", "peer_closed"),
    ("peer sent goaway", "peer_goaway"),
    ("peer silent", "peer_dead"),
    ("peer did not read", "peer_slow"),
    ("peer is not reading", "peer_slow"),
    ("registration failed", "registration_failed"),
    ("connector stopped answering", "job_timeout"),
    ("token ", "token_invalidated"),
    ("relay ", "relay_shutdown"),
    ("session ended", "relay_shutdown"),
    ("stream resets exceed", "protocol_error"),
    ("pings exceed", "protocol_error"),
    ("settings frames exceed", "protocol_error"),
    ("frame too large", "protocol_error"),
    ("http/2 protocol error", "protocol_error"),
)


def close_reason_label(reason: str | None) -> str:
    """A session's close reason as one of a few label values (the text itself carries details)."""
    if reason is None:
        return "relay_shutdown"  # cancelled from outside: this relay is stopping
    lowered = reason.lower()
    for prefix, label in _CLOSE_REASONS:
        if lowered.startswith(prefix):
            return label
    return "other"


def registration_failure_label(message: str) -> str:
    lowered = message.lower()
    for needle in ("revoked", "expired", "missing"):
        if needle in lowered:
            return needle
    return "invalid"


_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)")


@functools.cache  # the API's few dozen routes; asked for every request
def route_template(pattern: re.Pattern[str]) -> str:
    """``^/v1/printers/(?P<printer>[^/]+)/jobs$`` -> ``/v1/printers/{printer}/jobs``."""
    return _GROUP.sub(r"{\1}", pattern.pattern).strip("^$")


def http_route(path: str, patterns: Iterable[re.Pattern[str]]) -> str:
    """The route label of a request path: a template, never the path itself (ids would explode it)."""
    if path in ("/healthz", "/readyz"):
        return path
    if path.startswith("/ipp/"):
        return "/ipp/print/{printer}"
    if path.startswith("/portal"):
        return "/portal"
    if path.startswith("/release/"):
        return "/release/{printer}"
    for pattern in patterns:
        if pattern.match(path):
            return route_template(pattern)
    return "unmatched"


# --- tunnel sessions --------------------------------------------------------------------------------


class ObservedSessionStats(SessionStats):
    """SessionStats whose PING round trips also land in a histogram (the session only keeps the last)."""

    def __init__(self, rtt: Histogram) -> None:
        self._rtt_histogram = rtt
        self._last_rtt: float | None = None
        super().__init__()

    @property
    def last_rtt(self) -> float | None:
        return self._last_rtt

    @last_rtt.setter
    def last_rtt(self, value: float | None) -> None:
        self._last_rtt = value
        if value is not None:
            self._rtt_histogram.observe(value)


class TunnelTraffic(Collector):
    """Counters over all sessions, past and present: live sessions' stats plus what closed ones left."""

    def __init__(self) -> None:
        # by identity: thousands of sessions come and go in a reconnect storm, so no list scans
        self._live: dict[int, SessionStats] = {}
        self._closed = SessionStats()

    def track(self, stats: SessionStats) -> None:
        self._live[id(stats)] = stats

    def untrack(self, stats: SessionStats) -> None:
        if self._live.pop(id(stats), None) is not None:
            self._closed.bytes_in += stats.bytes_in
            self._closed.bytes_out += stats.bytes_out
            self._closed.flow_stalls += stats.flow_stalls

    def collect(self) -> Iterator[Metric]:
        everyone = [self._closed, *self._live.values()]
        for name, doc, value in (
            ("printrelay_tunnel_received_bytes", "Bytes received from connectors on tunnels (HTTP/2 wire)",
             sum(s.bytes_in for s in everyone)),
            ("printrelay_tunnel_sent_bytes", "Bytes sent to connectors on tunnels (HTTP/2 wire)",
             sum(s.bytes_out for s in everyone)),
            ("printrelay_tunnel_flow_stalls", "Times a job stream waited for the connector's flow-control "
             "window (a printer slower than the relay)", sum(s.flow_stalls for s in everyone)),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


# --- sampled state ----------------------------------------------------------------------------------


class RelayMetrics:
    def __init__(self, *, per_printer: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_printer = per_printer
        r = self.registry

        # jobs
        self.jobs_submitted = Counter("printrelay_jobs_submitted_total", "Jobs accepted", registry=r)
        self.job_bytes = Counter("printrelay_job_bytes_total", "Document bytes accepted", registry=r)
        self.jobs_finished = Counter(
            "printrelay_jobs_finished_total",
            "Jobs that reached a final state (completed, failed, canceled, expired), by reason class",
            ["state", "reason"],
            registry=r,
        )
        self.printer_jobs_finished = Counter(
            "printrelay_printer_jobs_finished_total",
            "Jobs that reached a final state, per printer (only with --metrics-per-printer)",
            ["printer", "state"],
            registry=r,
        )
        self._printer_labels: set[str] = set()
        self.delivery_latency = Histogram(
            "printrelay_job_delivery_seconds",
            "Time from accepting a job to the printer having it (completed jobs only)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "printrelay_job_queue_seconds",
            "Time from accepting a job to its first dispatch to a connector",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge(
            "printrelay_jobs", "Jobs not final yet, by state (all replicas)", ["state"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "printrelay_queue_oldest_job_age_seconds",
            "Age of the oldest queued job (0 when the queue is empty)",
            registry=r,
        )
        self.job_streams = Gauge(
            "printrelay_tunnel_job_streams", "Job streams in flight to connectors", registry=r
        )
        self.leases_lapsed = Counter(
            "printrelay_job_leases_lapsed_total",
            "Jobs in flight queued again because their claim lapsed (the stream sending them was gone)",
            registry=r,
        )
        self.leases_reclaimed = Counter(
            "printrelay_job_leases_reclaimed_total",
            "Jobs claimed again by this replica after their earlier claim lapsed",
            registry=r,
        )

        # tunnel
        self.connectors = Gauge(
            "printrelay_connected_connectors",
            "Connectors with at least one session to this relay",
            registry=r,
        )
        self.fleet = Gauge(
            "printrelay_connectors",
            "Connectors with a valid token, by whether any relay replica holds a session (from the store)",
            ["state"],
            registry=r,
        )
        self.sessions = Gauge("printrelay_tunnel_sessions", "Tunnel sessions this relay holds", registry=r)
        self.replica_sessions = Gauge(
            "printrelay_replica_tunnel_sessions",
            "Tunnel sessions each live relay replica holds (from the store: the same on every replica)",
            ["replica"],
            registry=r,
        )
        self.sessions_opened = Counter(
            "printrelay_tunnel_sessions_opened_total", "Tunnel sessions accepted (after auth)", registry=r
        )
        self.sessions_closed = Counter(
            "printrelay_tunnel_sessions_closed_total",
            "Tunnel sessions ended, by reason",
            ["reason"],
            registry=r,
        )
        self.registration_failures = Counter(
            "printrelay_tunnel_registration_failures_total",
            "Tunnel connections refused (bad token; busy: too many registering at once) or not registered",
            ["reason"],
            registry=r,
        )
        self.tunnel_out = Counter(
            "printrelay_tunnel_payload_sent_bytes_total", "Sealed job payload bytes streamed to connectors",
            registry=r,
        )  # fmt: skip
        self.rtt = Histogram(
            "printrelay_tunnel_ping_rtt_seconds", "HTTP/2 PING round trips on tunnels", buckets=RTT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.traffic = TunnelTraffic()
        r.register(self.traffic)

        # spool
        # Payloads up to spool.inline_max (64 KiB) live in the database, not in files: see tenant usage.
        self.spool_bytes = Gauge(
            "printrelay_spool_bytes", "Sealed payload bytes in spool files (payloads over 64 KiB)", registry=r
        )
        self.spool_files = Gauge(
            "printrelay_spool_files", "Payload files in the spool (payloads over 64 KiB)", registry=r
        )
        self.spool_fs_avail = Gauge(
            "printrelay_spool_filesystem_avail_bytes", "Free bytes on the spool's filesystem", registry=r
        )
        self.spool_fs_size = Gauge(
            "printrelay_spool_filesystem_size_bytes", "Size of the spool's filesystem", registry=r
        )

        # HTTP API
        self.http_requests = Counter(
            "printrelay_http_requests_total", "Public API requests, by route and status", ["route", "code"],
            registry=r,
        )  # fmt: skip
        self.http_latency = Histogram(
            "printrelay_http_request_duration_seconds",
            "Time to the response head of public API requests (streamed bodies not included)",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("printrelay_ready", "1 when the relay's /readyz answers ready", registry=r)

        # store
        self.store_latency = Histogram(
            "printrelay_store_call_seconds",
            "Store calls from asking to the answer (waiting for a group commit included), by kind",
            ["kind"],
            buckets=STORE_BUCKETS,
            registry=r,
        )
        # Labelled series as hot paths ask for them (each .labels() takes a lock and builds a key); the
        # label values are bounded: route templates, status codes, store call kinds.
        self._http_series = functools.cache(lambda route, code: self.http_requests.labels(route, str(code)))
        self._http_latency_series = functools.cache(self.http_latency.labels)
        self._store_latency_series = functools.cache(self.store_latency.labels)
        self.notice_lag = Histogram(
            "printrelay_store_notice_lag_seconds",
            "Time from another replica committing a change to this one hearing it (PostgreSQL NOTIFY; "
            "includes the difference between the hosts' clocks)",
            buckets=STORE_BUCKETS,
            registry=r,
        )

    # --- events -------------------------------------------------------------------------------------

    def job_finished(self, job: Job, message: str = "") -> None:
        state = JobState(job.state)
        self.jobs_finished.labels(str(state), finish_reason(state, message)).inc()
        if state is JobState.COMPLETED and job.completed_at is not None:
            self.delivery_latency.observe(max(0.0, job.completed_at - job.created_at))
        if self.per_printer:
            self.printer_jobs_finished.labels(self._printer_label(job.printer_id), str(state)).inc()

    def _printer_label(self, printer_id: str) -> str:
        if printer_id in self._printer_labels or len(self._printer_labels) < MAX_PRINTER_SERIES:
            self._printer_labels.add(printer_id)
            return printer_id
        return "other"

    def job_dispatched(self, job: Job, at: float) -> None:
        if job.last_error == LEASE_LAPSED:
            self.leases_reclaimed.inc()
        elif job.attempts <= 1 and not job.last_error:
            # The first dispatch only: a retry waits on backoff, not on the queue, even one whose attempt
            # was given back (a busy printer, a stopping connector, a relay restart: each sets last_error).
            self.queue_time.observe(max(0.0, at - job.created_at))

    def tunnel_bytes_out(self, n: int) -> None:
        self.tunnel_out.inc(n)

    def registration_failed(self, message: str) -> None:
        self.registration_failures.labels(registration_failure_label(message)).inc()

    @contextmanager
    def tunnel_session(self, h2: H2Session) -> Iterator[None]:
        """Count a session from accept to end; its traffic and PING RTTs are read while it lives."""
        h2.stats = ObservedSessionStats(self.rtt)
        self.sessions_opened.inc()
        self.traffic.track(h2.stats)
        try:
            yield
        finally:
            self.traffic.untrack(h2.stats)
            self.sessions_closed.labels(close_reason_label(h2.close_reason)).inc()

    def instrument_http(
        self,
        handler: Callable[[Request], Awaitable[Response]],
        routes: Sequence[tuple[Any, re.Pattern[str], Any, Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap the public API handler: requests by route template and status, and their latency."""
        from service.http.message import HTTPError

        async def instrumented(request: Request) -> Response:
            route = http_route(request.path, (pattern for _, pattern, _, _ in routes))
            started = time.perf_counter()
            code = 500
            try:
                response = await handler(request)
                code = response.status
                return response
            except HTTPError as exc:
                code = exc.status
                raise
            finally:
                self._http_series(route, code).inc()
                self._http_latency_series(route).observe(time.perf_counter() - started)

        return instrumented

    # --- sampled before a scrape ---------------------------------------------------------------------

    def store_call(self, kind: str, seconds: float) -> None:
        self._store_latency_series(kind).observe(seconds)

    def notice_heard(self, lag: float) -> None:
        self.notice_lag.observe(lag)

    def set_store_sample(self, sample: StoreSample, now: float) -> None:
        for state in OPEN_STATES:
            self.jobs.labels(str(state)).set(sample.jobs_by_state.get(str(state), 0))
        oldest = sample.oldest_queued_at
        self.queue_oldest_age.set(0.0 if oldest is None else max(0.0, now - oldest))
        self.fleet.labels("online").set(sample.connectors_online)
        self.fleet.labels("offline").set(sample.connectors_offline)
        self.replica_sessions.clear()  # retired replicas leave the series
        for replica, count in sample.sessions_by_replica.items():
            self.replica_sessions.labels(replica).set(count)

    def set_spool(self, used_bytes: int, files: int, fs: tuple[int, int] | None) -> None:
        """``fs``: (available, size) of the spool's filesystem; None when payloads live in the database."""
        self.spool_bytes.set(used_bytes)
        self.spool_files.set(files)
        if fs is not None:
            self.spool_fs_avail.set(fs[0])
            self.spool_fs_size.set(fs[1])
