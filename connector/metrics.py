"""The connector's Prometheus metrics, in one registry per connector.

Labels come from small closed sets: backend kinds (ipp, ipps, socket, lpd, cups), delivery results,
printer states, reconnect reasons. Printer ids and job ids never become labels: a site's dashboard
wants "how many printers are stopped", the relay's per-printer metrics say which.

State the connector keeps anyway (tunnel, printers, deliveries in progress) is read at scrape time by
:class:`_LiveState`; events are counted where they happen; the ledger size is sampled before a scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from connector.app import Connector

# a label printer answers in seconds, an IPP printer that prints before answering in minutes
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
RESULTS = ("completed", "failed", "retry", "canceled", "duplicate")


class _LiveState(Collector):
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def collect(self) -> Iterator[Metric]:
        connector = self.connector
        tunnel = connector.tunnel
        sessions = GaugeMetricFamily(
            "printrelay_connector_tunnel_sessions", "Tunnel sessions to the relay that are up"
        )
        sessions.add_metric([], len(tunnel.sessions))
        yield sessions
        replicas = GaugeMetricFamily(
            "printrelay_connector_tunnel_replicas",
            "Distinct relay replicas this connector holds sessions to (HA: at least 2 when the relay runs "
            "2+)",
        )
        replicas.add_metric([], len(tunnel.replicas))
        yield replicas
        opened = CounterMetricFamily(
            "printrelay_connector_tunnel_sessions_opened", "Tunnel sessions established to the relay"
        )
        opened.add_metric([], tunnel.sessions_opened)
        yield opened
        reconnects = CounterMetricFamily(
            "printrelay_connector_tunnel_reconnects",
            "Times the connector dialed the relay again, by why the last attempt ended "
            "(session_ended, refused: HTTP 401 or similar, "
            "busy: HTTP 503 from a relay under a reconnect storm, unreachable, "
            "duplicate: reached a replica another session holds)",
            labels=["reason"],
        )
        for reason in ("session_ended", "refused", "busy", "unreachable", "duplicate"):
            reconnects.add_metric([reason], tunnel.retries.get(reason, 0))
        yield reconnects
        printers = GaugeMetricFamily(
            "printrelay_connector_printers", "Printers this connector serves, by state", labels=["state"]
        )
        states: dict[str, int] = {}
        for entry in list(connector.printers.values()):
            states[entry.state] = states.get(entry.state, 0) + 1
        for state in ("idle", "processing", "stopped", "offline", "unknown"):
            states.setdefault(state, 0)
        for state, count in sorted(states.items()):
            printers.add_metric([state], count)
        yield printers
        in_progress = GaugeMetricFamily(
            "printrelay_connector_deliveries_in_progress", "Jobs being delivered to printers now"
        )
        in_progress.add_metric([], connector.deliveries_in_progress)
        yield in_progress
        candidates = GaugeMetricFamily(
            "printrelay_connector_discovered_candidates", "Printers discovered and not served (yet)"
        )
        candidates.add_metric([], len(connector.candidates))
        yield candidates


class ConnectorMetrics:
    def __init__(self, connector: Connector) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_LiveState(connector))
        self.deliveries = Counter(
            "printrelay_connector_deliveries_total",
            "Job deliveries finished, by backend and result (duplicate: answered from the ledger)",
            ["backend", "result"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "printrelay_connector_delivery_seconds",
            "Time from a job stream's arrival to the printer's answer, by backend",
            ["backend"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.printer_bytes = Counter(
            "printrelay_connector_printer_sent_bytes_total",
            "Document bytes handed to printers, by backend",
            ["backend"],
            registry=r,
        )
        self.ledger_entries = Gauge(
            "printrelay_connector_ledger_entries", "Deliveries remembered in the ledger", registry=r
        )
        self.sweeps = Counter(
            "printrelay_connector_discovery_sweeps_total",
            "Discovery sweeps, by result",
            ["result"],
            registry=r,
        )

    def delivery_done(self, backend: str, result: str, seconds: float) -> None:
        self.deliveries.labels(backend, result if result in RESULTS else "failed").inc()
        self.delivery_seconds.labels(backend).observe(seconds)
