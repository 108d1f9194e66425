"""The relay's Prometheus metrics: few, low-cardinality, named for what ops watch.

All metric objects live here, in one registry per relay (so tests can run several relays in a process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("printrelay_jobs_submitted_total", "Jobs accepted", registry=r)
        self.jobs_finished = Counter(
            "printrelay_jobs_finished_total", "Jobs that reached a final state", ["state"], registry=r
        )
        self.job_bytes = Counter("printrelay_job_bytes_total", "Document bytes accepted", registry=r)
        self.delivery_latency = Histogram(
            "printrelay_job_delivery_seconds",
            "Time from accepting a job to its final state",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tunnel_out = Counter(
            "printrelay_tunnel_sent_bytes_total", "Payload bytes streamed to connectors", registry=r
        )
        self.registration_failures = Counter(
            "printrelay_tunnel_registration_failures_total",
            "Tunnel connections refused",
            ["reason"],
            registry=r,
        )
        self.connectors = Gauge("printrelay_connected_connectors", "Connector sessions held", registry=r)

    def tunnel_bytes_out(self, n: int) -> None:
        self.tunnel_out.inc(n)
