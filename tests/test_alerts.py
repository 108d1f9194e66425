"""docs/ops/alerts.yml: promtool checks and unit-tests it; every alert is tested firing and not firing,
uses only exported metrics and has a runbook paragraph."""

from __future__ import annotations

import subprocess
from typing import Any

import yaml
from test_dashboard import OPS, exported_metric_names, metric_names

ALERTS = OPS / "alerts.yml"
ALERT_TESTS = OPS / "alerts_test.yml"
RUNBOOK = OPS / "runbook.md"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> str:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, cwd=OPS)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_rules() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", ALERTS.name)


def test_promtool_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", ALERT_TESTS.name)


def test_the_issue_alerts_exist() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert names == {
        "PrintrelayConnectorDown",
        "PrintrelayQueuedJobTooOld",
        "PrintrelayDeliveryFailureRatioHigh",
        "PrintrelaySpoolDiskNearlyFull",
        "PrintrelayReconnectStorm",
        "PrintrelayRelayNotReady",
    }


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names <= firing, f"never tested firing: {sorted(names - firing)}"
    assert names <= quiet, f"never tested quiet: {sorted(names - quiet)}"


def test_alerts_use_exported_metrics_and_have_runbooks() -> None:
    exported = exported_metric_names()
    runbook = RUNBOOK.read_text()
    for rule in alerts():
        name = rule["alert"]
        used = metric_names(rule["expr"])
        assert used <= exported, f"{name}: {sorted(used - exported)} are not exported"
        assert f"\n## {name}\n" in runbook, f"{name} has no runbook paragraph"
        assert rule["annotations"]["runbook"] == f"docs/ops/runbook.md#{name.lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        paragraph = runbook.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert len(paragraph.split()) > 60, f"{name}: runbook paragraph too thin"
