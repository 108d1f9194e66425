"""What a load test proved: the verdict's figures (``verdict.py`` judges each job), latency and plots.

Latency is from the client's "accepted" (201) or "released" (200) answer to the printer's EOF, for jobs
printed in full; throughput counts those jobs over the span from the first submission to the last arrival.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.verdict import Outcome, Submission, Verdict


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


def _printed(verdict: Verdict, subs: Mapping[str, Submission]) -> list[tuple[Submission, float]]:
    """(submission, when its first whole copy ended) of every job printed in full and due at a known time."""
    printed = []
    for key, judged in verdict.judged.items():
        sub = subs.get(key)
        if sub is not None and sub.due_at is not None and judged.printed_at is not None:
            printed.append((sub, judged.printed_at))
    return printed


def summarize(verdict: Verdict, subs: Mapping[str, Submission]) -> dict[str, Any]:
    """The report's figures; the names ``lost``, ``duplicates``, ``corrupt``... are the verdict's counts."""
    counts = verdict.counts()
    named = verdict.to_json()["failing_jobs"]
    latencies = [done - sub.due_at for sub, done in _printed(verdict, subs) if sub.due_at is not None]
    printed = [k for k, j in verdict.judged.items() if j.outcome is Outcome.PRINTED]
    done = [j.printed_at for j in verdict.judged.values() if j.printed_at is not None]
    starts = [s.due_at for s in subs.values() if s.due_at is not None]
    span = (max(done) - min(starts)) if done and starts else 0.0
    canceled = [s for s in subs.values() if s.cancel_sent]
    held_canceled = [s for s in canceled if s.hold and not s.release_sent]
    raced = counts[Outcome.CANCELED_PRINTED_WHOLE] + sum(1 for k in printed if subs[k].cancel_sent)
    return {
        "submitted": sum(1 for j in verdict.judged.values() if j.state),
        "expected": sum(1 for s in subs.values() if s.due_at is not None and not s.cancel_sent),
        "delivered": len(printed),
        "delivered_mib": round(sum(subs[k].size for k in printed) / 2**20, 1),
        "lost": counts[Outcome.LOST],
        "lost_jobs": [j["job"] for j in named.get("lost", [])],
        "duplicates": counts[Outcome.DUPLICATE],
        "duplicate_jobs": [j["job"] for j in named.get("duplicate", [])],
        "corrupt": counts[Outcome.CORRUPT],
        "unknown_arrivals": len(verdict.unknown_arrivals),
        "canceled_held": len(held_canceled),
        "canceled_queued": len(canceled) - len(held_canceled),
        "canceled_partial": counts[Outcome.CANCELED_PARTIAL],
        "canceled_printed": counts[Outcome.PRINTED_UNRELEASED],  # a held job printed without its release
        "canceled_raced_printed": raced,
        "failed": counts[Outcome.FAILED] + counts[Outcome.EXPIRED],
        "unsettled": counts[Outcome.UNSETTLED],
        "still_held": counts[Outcome.HELD],
        "jobs_per_s": round(len(printed) / span, 1) if span else 0.0,
        "latency_ms": {
            "p50": round(1000 * percentile(latencies, 50), 1),
            "p95": round(1000 * percentile(latencies, 95), 1),
            "p99": round(1000 * percentile(latencies, 99), 1),
            "max": round(1000 * max(latencies, default=0.0), 1),
        },
        "verdict": verdict.to_json(),
    }


def timeline(
    verdict: Verdict, subs: Mapping[str, Submission], start: float, bin_seconds: float = 1.0
) -> dict[str, list[float]]:
    """Per-second series: jobs due to print (not canceled), jobs printed, and p50/p99 latency of those."""
    accepted: Counter[int] = Counter()
    delivered: Counter[int] = Counter()
    latency: dict[int, list[float]] = defaultdict(list)
    for sub in subs.values():
        if sub.due_at is not None and not sub.cancel_sent:
            accepted[int((sub.due_at - start) // bin_seconds)] += 1
    for sub, done in _printed(verdict, subs):
        assert sub.due_at is not None
        slot = int((done - start) // bin_seconds)
        delivered[slot] += 1
        latency[slot].append(done - sub.due_at)
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
