"""A few seconds of the load test (loadtest/run.py): relay, connector swarm and Locust as real processes.

The full runs are benchmarks (``make loadtest``); this one proves the harness works and that no job is
lost, printed twice or corrupted under a small mixed load with holds, releases and cancels. The verdict's
rules are tested with bytes in test_loadtest_verdict.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # loadtest/ is tooling next to the packages, not an installed package

from loadtest.bench_idle import reached  # noqa: E402
from loadtest.report import percentile  # noqa: E402

pytestmark = pytest.mark.e2e


def test_smoke_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "run.py"), "-u", "4", "-r", "4", "-t", "4s",
         "--connectors", "2", "--printers-per-connector", "2", "--max-large-mib", "2",
         "--think-max", "0.3", "--drain-timeout", "30", "--out", str(out)],
        capture_output=True, text=True, timeout=90, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + _logs(out)
    report = json.loads((out / "report.json").read_text())
    assert report["delivered"] > 10, report
    assert (report["lost"], report["duplicates"], report["corrupt"]) == (0, 0, 0), report
    assert report["canceled_printed"] == 0, report
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["passed"] and verdict["settled"], verdict
    assert verdict["outcomes"]["printed"] == report["delivered"]
    assert verdict["outcomes"]["unsettled"] == 0
    assert "verdict: PASSED | jobs " in result.stdout
    assert report["locust"]["failures"] == 0, (out / "locust_failures.csv").read_text()
    assert report["relay"]["peak_rss_mib"] > 0
    assert {"throughput.png", "latency.png"} <= {p.name for p in out.iterdir()}


def _logs(out: Path) -> str:
    """The tails of the processes' logs, for a failure message."""
    parts = []
    for name in ("relay.log", "swarm.log", "locust.log"):
        path = out / "work" / name
        if path.exists():
            parts.append(f"\n--- {name} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 99) == 0.0


def test_reconnect_shares_count_from_the_trough() -> None:
    # Right after a restart most connectors have not noticed yet: those early samples are not "reached".
    timeline = [(2.0, 997), (4.8, 400), (5.8, 0), (12.0, 300), (20.0, 600), (31.0, 1000)]
    assert reached(timeline, 1000, 0.25) == 12.0
    assert reached(timeline, 1000, 0.5) == 20.0
    assert reached(timeline, 1000, 0.99) == 31.0
    assert reached([(1.0, 10), (2.0, 200)], 1000, 0.5) is None
    assert reached([], 1000, 0.5) is None
