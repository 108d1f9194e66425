"""What a load test proved: submissions matched against what the printers received, and plots.

Inputs are two NDJSON files: the job record Locust writes (``accepted``, ``held``, ``released``,
``canceled``, each with the document's tag and SHA-256) and the arrivals the sink printers write. A job is
*expected* once it is accepted (or released, for a held job) and not canceled. Then:

* lost: expected, but no intact copy arrived (must be 0);
* duplicate: more than one intact copy arrived (must be 0);
* corrupt: a copy arrived whose size or SHA-256 differs from what was submitted (must be 0);
* canceled_printed: a held job was canceled and printed anyway (must be 0). A queued job canceled
  while already streaming may print (the cancel raced the printer); that is counted, not failed.

Latency is from the client's "accepted" (201) or "released" (200) answer to the printer's EOF.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a process that was stopped
    return rows


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Submitted:
    tag: str
    job: str
    size: int
    sha256: str
    accepted_at: float
    expected_at: float | None = None  # when it became due to print (accepted, or released)
    canceled: bool = False
    canceled_held: bool = False


@dataclass
class Matching:
    submitted: dict[str, Submitted] = field(default_factory=dict)
    arrivals: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]], arrivals: Iterable[dict[str, Any]]) -> Matching:
        matching = cls()
        for row in records:
            event, tag = row.get("event"), row.get("tag", "")
            if event in ("accepted", "held"):
                sub = Submitted(tag, row["job"], row["size"], row["sha256"], row["at"])
                if event == "accepted":
                    sub.expected_at = row["at"]
                matching.submitted[tag] = sub
            elif event == "released" and tag in matching.submitted:
                matching.submitted[tag].expected_at = row["at"]
            elif event == "canceled" and tag in matching.submitted:
                sub = matching.submitted[tag]
                sub.canceled = True
                sub.canceled_held = bool(row.get("held"))
        for arrival in arrivals:
            matching.arrivals[arrival["tag"]].append(arrival)
        return matching

    def expected(self) -> list[Submitted]:
        return [s for s in self.submitted.values() if s.expected_at is not None and not s.canceled]

    def intact(self, sub: Submitted) -> list[dict[str, Any]]:
        return [
            a for a in self.arrivals.get(sub.tag, ()) if a["size"] == sub.size and a["sha256"] == sub.sha256
        ]

    def missing(self) -> list[Submitted]:
        return [s for s in self.expected() if not self.intact(s)]


def summarize(matching: Matching) -> dict[str, Any]:
    expected = matching.expected()
    latencies: list[float] = []
    lost: list[str] = []
    duplicates: list[str] = []
    for sub in expected:
        copies = matching.intact(sub)
        if not copies:
            lost.append(sub.job)
            continue
        if len(copies) > 1:
            duplicates.append(sub.job)
        assert sub.expected_at is not None
        latencies.append(min(a["done_at"] for a in copies) - sub.expected_at)
    corrupt = 0
    for sub in matching.submitted.values():
        corrupt += len(matching.arrivals.get(sub.tag, ())) - len(matching.intact(sub))
    known = set(matching.submitted)
    strangers = sum(len(v) for tag, v in matching.arrivals.items() if tag not in known)
    canceled = [s for s in matching.submitted.values() if s.canceled]
    held_open = [s for s in matching.submitted.values() if s.expected_at is None and not s.canceled]
    canceled_printed = [s.job for s in canceled if s.canceled_held and matching.arrivals.get(s.tag)]
    raced = [s.job for s in canceled if not s.canceled_held and matching.intact(s)]
    held_printed = [s.job for s in held_open if matching.arrivals.get(s.tag)]
    done = [a["done_at"] for v in matching.arrivals.values() for a in v]
    starts = [s.accepted_at for s in matching.submitted.values()]
    span = (max(done) - min(starts)) if done and starts else 0.0
    delivered = len(expected) - len(lost)
    delivered_bytes = sum(s.size for s in expected if s.job not in set(lost))
    return {
        "submitted": len(matching.submitted),
        "expected": len(expected),
        "delivered": delivered,
        "delivered_mib": round(delivered_bytes / 2**20, 1),
        "lost": len(lost),
        "lost_jobs": lost[:20],
        "duplicates": len(duplicates),
        "duplicate_jobs": duplicates[:20],
        "corrupt": corrupt,
        "unknown_arrivals": strangers,
        "canceled_held": sum(1 for s in canceled if s.canceled_held),
        "canceled_queued": sum(1 for s in canceled if not s.canceled_held),
        "canceled_printed": len(canceled_printed) + len(held_printed),
        "canceled_raced_printed": len(raced),
        "still_held": len(held_open),
        "jobs_per_s": round(delivered / span, 1) if span else 0.0,
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 50), 1),
            "p95": round(1000 * percentile(latencies, 95), 1),
            "p99": round(1000 * percentile(latencies, 99), 1),
            "max": round(1000 * max(latencies, default=0.0), 1),
        },
    }


def timeline(matching: Matching, start: float, bin_seconds: float = 1.0) -> dict[str, list[float]]:
    """Per-second series: accepted jobs, delivered jobs, and p50/p99 latency of the jobs delivered."""
    accepted: Counter[int] = Counter()
    delivered: Counter[int] = Counter()
    latency: dict[int, list[float]] = defaultdict(list)
    for sub in matching.expected():
        assert sub.expected_at is not None
        accepted[int((sub.expected_at - start) // bin_seconds)] += 1
        copies = matching.intact(sub)
        if copies:
            done = min(a["done_at"] for a in copies)
            slot = int((done - start) // bin_seconds)
            delivered[slot] += 1
            latency[slot].append(done - sub.expected_at)
    last = max([*accepted, *delivered, 0])
    slots = range(0, last + 1)
    return {
        "t": [s * bin_seconds for s in slots],
        "accepted_per_s": [accepted[s] / bin_seconds for s in slots],
        "delivered_per_s": [delivered[s] / bin_seconds for s in slots],
        "p50_ms": [1000 * percentile(latency[s], 50) for s in slots],
        "p99_ms": [1000 * percentile(latency[s], 99) for s in slots],
    }


def plot(
    series: dict[str, list[float]], resources: dict[str, list[tuple[float, float, float]]], out: Path
) -> list[Path]:
    """PNG plots of throughput, latency and relay resources over time; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(series["t"], series["accepted_per_s"], label="accepted (or released)")
    ax.plot(series["t"], series["delivered_per_s"], label="received by printers")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("jobs/s")
    ax.set_title("Throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    written.append(out / "throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(series["t"], series["p50_ms"], label="p50")
    ax.plot(series["t"], series["p99_ms"], label="p99")
    ax.set_xlabel("seconds since the load started (by delivery time)")
    ax.set_ylabel("accepted → printed, ms")
    ax.set_title("End-to-end latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    written.append(out / "latency.png")
    plt.close(fig)

    if resources:
        fig, (cpu_ax, rss_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
        for name, points in resources.items():
            cpu_ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
            rss_ax.plot([p[0] for p in points], [p[2] for p in points], label=name)
        cpu_ax.set_ylabel("CPU, % of one core")
        rss_ax.set_ylabel("RSS, MiB")
        for ax in (cpu_ax, rss_ax):
            ax.set_xlabel("seconds since the load started")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "resources.png", dpi=100)
        written.append(out / "resources.png")
        plt.close(fig)
    return written
