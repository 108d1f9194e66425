"""docs/ops/grafana-dashboard.json: importable, every PromQL expression parses (Prometheus' own parser,
through promtool) and refers only to metrics the relay and connector export."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import promql_parser
from prometheus_client import CollectorRegistry

from connector.metrics import ConnectorMetrics
from relay.metrics import RelayMetrics
from service.ops import register_build_info

OPS = Path(__file__).parent.parent / "docs" / "ops"
DASHBOARD = OPS / "grafana-dashboard.json"
# Grafana's own variables, replaced by something of the same PromQL type before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _names(registry: CollectorRegistry) -> set[str]:
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
    }
    return {family.name + s for family in registry.collect() for s in suffixes[family.type]}


def exported_metric_names() -> set[str]:
    """Every series name relay and connector can expose (all families, observed or not)."""
    relay = RelayMetrics(per_printer=True)
    register_build_info(relay.registry, "relay")
    tunnel = SimpleNamespace(sessions=[], replicas=set(), sessions_opened=0, retries={})
    connector: Any = SimpleNamespace(tunnel=tunnel, printers={}, deliveries_in_progress=0, candidates={})
    site = ConnectorMetrics(connector)
    register_build_info(site.registry, "connector")
    return _names(relay.registry) | _names(site.registry) | SYNTHETIC


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects, from its syntax tree."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            found.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector", "vs"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(expr))
    return found


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], substitute(target["expr"])))
    return out


def promtool_parses(expressions: list[str], tmp_path: Path) -> None:
    """Parse with Prometheus' parser: each expression as a recording rule, checked by promtool."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(expressions)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.json"  # JSON is YAML
    path.write_text(json.dumps(rules))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and "id" not in dashboard  # import assigns the id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    titles = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    for area in ("Fleet overview", "Queue and latency", "Tunnel health"):
        assert area in titles
    assert any(t.startswith("Per-printer failures") for t in titles)


def test_every_expression_parses_and_uses_exported_metrics(tmp_path: Path) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    promtool_parses([e for _, e in expressions], tmp_path)
    exported = exported_metric_names()
    used: set[str] = set()
    for title, expr in expressions:
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} are not exported"
        used |= names
    # the dashboard shows the areas: queue, latency histogram, connectors, tunnel, spool, HTTP
    for name in (
        "printrelay_job_delivery_seconds_bucket",
        "printrelay_queue_oldest_job_age_seconds",
        "printrelay_connected_connectors",
        "printrelay_tunnel_ping_rtt_seconds_bucket",
        "printrelay_spool_bytes",
        "printrelay_http_requests_total",
        "printrelay_printer_jobs_finished_total",
        "printrelay_connector_deliveries_total",
    ):
        assert name in used, name


def test_the_checker_catches_mistakes(tmp_path: Path) -> None:
    assert metric_names('sum(rate(printrelay_jobs_finished_totl{state="x"}[5m])) / on() up') == {
        "printrelay_jobs_finished_totl",
        "up",
    }
    assert "printrelay_jobs_finished_totl" not in exported_metric_names()
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m])))") == {"a_bucket"}
    assert metric_names("max_over_time(b[1h:5m]) > bool 1") == {"b"}
    bad = tmp_path / "bad"
    bad.mkdir()
    try:
        promtool_parses(["sum(rate(x[5m])"], bad)
    except AssertionError as exc:
        assert re.search(r"unclosed|parse error|expected", str(exc))
    else:
        raise AssertionError("promtool accepted a broken expression")
