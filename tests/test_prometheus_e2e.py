"""A real Prometheus scrapes a relay and a connector (real processes, ``--metrics-listen``) during a run of
jobs; its query API then shows the job counters, the latency histogram and the connector gauge, and the
alert rules of docs/ops load and evaluate."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fixtures_printers import RawSink, free_port
from fixtures_processes import ProcessStack, Service

pytestmark = pytest.mark.e2e

ALERTS = Path(__file__).parent.parent / "docs" / "ops" / "alerts.yml"
JOBS = 5
# Prometheus applies new targets every 5 s (TESTING.md): the first samples come after 5-6 s.
QUERY_WITHIN = 25.0


class Prometheus:
    def __init__(self, tmp_path: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for job, port in targets.items()
            ],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        self.log_path = tmp_path / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    async def query(self, client: httpx.AsyncClient, expr: str) -> float | None:
        """The single value of an instant query, None while it has no result."""
        response = await client.get(f"{self.url}/api/v1/query", params={"query": expr})
        if response.status_code == 503:
            return None  # still starting
        data = response.json()
        assert data["status"] == "success", data
        result = data["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    async def wait_value(self, client: httpx.AsyncClient, expr: str, expected: float) -> None:
        last: float | None = None
        try:
            with trio.fail_after(QUERY_WITHIN):
                while True:
                    try:
                        last = await self.query(client, expr)
                    except httpx.TransportError:
                        last = None  # not listening yet
                    if last == expected:
                        return
                    await trio.sleep(0.25)  # an external process: polling its API is the only way
        except trio.TooSlowError:
            log = self.log_path.read_text()[-3000:]
            raise AssertionError(f"{expr} = {last}, expected {expected}\n{log}") from None


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(targets: dict[str, int]) -> Prometheus:
        server = Prometheus(tmp_path, targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def start_connector(stack: ProcessStack, printer_uri: str, metrics_port: int) -> Service:
    token = stack.token("connector", "acme", "--connector", "site-1")
    connector = Service(
        "connector",
        ["connector", "--relay", f"ws://127.0.0.1:{stack.tunnel_port}/v1/tunnel",
         "--state-dir", str(stack.tmp_path / "connector"), "--printer", f"label={printer_uri}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        stack.tmp_path / "connector.log",
        env={"PRINTRELAY_TOKEN": token},
    )  # fmt: skip
    connector.start()
    stack.services.append(connector)
    return connector


async def test_prometheus_scrapes_relay_and_connector(
    process_stack: ProcessStack, raw_sink: RawSink, prometheus_factory: Any
) -> None:
    stack = process_stack
    relay_metrics, connector_metrics = free_port(), free_port()
    stack.start_relay("--metrics-listen", f"127.0.0.1:{relay_metrics}")
    await stack.wait_ready()
    start_connector(stack, raw_sink.uri, connector_metrics)
    await stack.wait_printers_online("label")
    prometheus = prometheus_factory(
        {"printrelay-relay": relay_metrics, "printrelay-connector": connector_metrics}
    )

    async with httpx.AsyncClient(timeout=5) as http:
        # Scraped from the first second on, so the run of jobs happens while Prometheus watches.
        await prometheus.wait_value(http, 'up{job="printrelay-relay"}', 1)
        await prometheus.wait_value(http, 'up{job="printrelay-connector"}', 1)
        await prometheus.wait_value(http, "printrelay_connected_connectors", 1)

        ids = []
        async with stack.client() as client:
            for i in range(JOBS):
                r = await client.post("/v1/printers/label/jobs", content=b"job %d " % i * (1000 * (i + 1)))
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        await raw_sink.wait_for(JOBS, within=30)

        await prometheus.wait_value(http, "printrelay_jobs_submitted_total", JOBS)
        await prometheus.wait_value(
            http, 'sum(printrelay_jobs_finished_total{state="completed", reason="printed"})', JOBS
        )
        await prometheus.wait_value(http, "printrelay_job_delivery_seconds_count", JOBS)
        await prometheus.wait_value(http, 'printrelay_job_delivery_seconds_bucket{le="+Inf"}', JOBS)
        # every delivery of a few KiB to a local printer took well under a minute
        await prometheus.wait_value(http, 'printrelay_job_delivery_seconds_bucket{le="60.0"}', JOBS)
        p50 = await prometheus.query(
            http, "histogram_quantile(0.5, sum by (le) (printrelay_job_delivery_seconds_bucket))"
        )
        assert p50 is not None and 0 < p50 <= 60
        await prometheus.wait_value(http, "printrelay_job_queue_seconds_count", JOBS)
        await prometheus.wait_value(
            http, 'printrelay_connector_deliveries_total{backend="socket", result="completed"}', JOBS
        )
        await prometheus.wait_value(http, "printrelay_connector_ledger_entries", JOBS)
        await prometheus.wait_value(http, 'max(printrelay_connectors{state="online"})', 1)
        await prometheus.wait_value(http, "printrelay_connector_tunnel_sessions", 1)
        await prometheus.wait_value(http, 'printrelay_jobs{state="queued"}', 0)
        await prometheus.wait_value(http, "printrelay_ready", 1)
        await prometheus.wait_value(http, 'count(printrelay_build_info{component=~"relay|connector"})', 2)

        # the alert rules load, evaluate without errors, and none fires on a healthy run
        rules = (await http.get(f"{prometheus.url}/api/v1/rules")).json()["data"]["groups"]
        assert [(r["name"], r["health"]) for g in rules for r in g["rules"] if r["health"] != "ok"] == []
        assert len([r for g in rules for r in g["rules"]]) == 6
        firing = (await http.get(f"{prometheus.url}/api/v1/alerts")).json()["data"]["alerts"]
        assert firing == []

        # the probes of the separate listener, from the processes themselves
        relay_ready = await http.get(f"http://127.0.0.1:{relay_metrics}/readyz")
        connector_ready = await http.get(f"http://127.0.0.1:{connector_metrics}/readyz")
        assert relay_ready.json() == {"status": "ready"}
        assert connector_ready.json() == {"status": "ready"}
        assert (await http.get(f"http://127.0.0.1:{relay_metrics}/healthz")).status_code == 200
