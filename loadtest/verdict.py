"""A load test's verdict: every job judged by its final state at the relay, what the harness did to it, and
the copies the printers received, with rules that hold however each race went.

Pure: records in, a :class:`Verdict` out; ``run.py`` does the waiting and the I/O. The inputs:

* the harness's record (``locustfile.py``): per document its tag, size, SHA-256 and recipe (``seed``,
  ``offset``: ``documents.py`` rebuilds its bytes), and which requests were *sent* for it (release, cancel),
  whatever their answer;
* the relay's job list once every job rests: id, state, title (``prload-<tag>``), last error;
* the arrivals at the sink printers (``sink.py``): tag, size, SHA-256.

Each arrival is compared with the document submitted under its tag: the same bytes (**whole**), a strict
**prefix** of them (a delivery cut short), or bytes that **differ** from every prefix. Then each job gets
one outcome. Expected ones (the run passes with any number of them):

* ``printed``: completed, exactly one whole copy;
* ``canceled``: canceled before anything reached the printer;
* ``canceled_partial``: canceled during delivery, a prefix arrived (a RAW printer prints what it got);
* ``canceled_printed_whole``: the cancel lost the race to the last byte, one whole copy;
* ``held``: held, never released, nothing printed;
* ``not_accepted``: the submit got no 201 (Locust stopped it, or the relay refused) and the relay has no job.

Any other fails the run:

* ``corrupt``: a copy that differs from every prefix of the document, or a prefix of a job the harness
  never canceled (truncated without a cause);
* ``duplicate``: more than one whole copy. Exactly once is a guarantee: the only documented exception,
  ``--uncertain-delivery reprint`` after a connector stopped mid-job, does not occur in a load test;
* ``printed_unreleased``: a held job that the harness never released reached a printer (canceled or not);
* ``lost``: completed, but no whole copy arrived;
* ``failed`` / ``expired``: the relay gave the job up (its ``last_error`` is kept). The sinks take every job,
  so a failure is the relay's or the connector's, never the printer's;
* ``unsettled``: still queued, sending or printing when the harness stopped waiting;
* ``unexpected``: a state the harness cannot explain (canceled without a cancel, held again after its
  release, a job the relay lists but nobody submitted, one accepted but no longer listed);
* unknown arrivals: a copy no submission's tag names.

A cancel that races a delivery can end as: canceled with nothing, a prefix or the whole printed, or (the
cancel answered 409) completed with the whole printed; all four are expected outcomes, so the verdict does
not depend on which one happened.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest.documents import TITLE_PREFIX, document, tag_line

RESTING_STATES = frozenset({"completed", "failed", "canceled", "expired", "held"})
DETAILS_PER_OUTCOME = 20  # jobs named per failing outcome in the JSON (counts are always complete)


class Copy(enum.StrEnum):
    WHOLE = "whole"
    PREFIX = "prefix"
    DIFFERS = "differs"


class Outcome(enum.StrEnum):
    PRINTED = "printed"
    CANCELED = "canceled"
    CANCELED_PARTIAL = "canceled_partial"
    CANCELED_PRINTED_WHOLE = "canceled_printed_whole"
    HELD = "held"
    NOT_ACCEPTED = "not_accepted"
    CORRUPT = "corrupt"
    DUPLICATE = "duplicate"
    PRINTED_UNRELEASED = "printed_unreleased"
    LOST = "lost"
    FAILED = "failed"
    EXPIRED = "expired"
    UNSETTLED = "unsettled"
    UNEXPECTED = "unexpected"


EXPECTED = frozenset(
    {
        Outcome.PRINTED,
        Outcome.CANCELED,
        Outcome.CANCELED_PARTIAL,
        Outcome.CANCELED_PRINTED_WHOLE,
        Outcome.HELD,
        Outcome.NOT_ACCEPTED,
    }
)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def compare(submitted: bytes, size: int, digest: str) -> Copy:
    """What an arrival of ``size`` bytes with SHA-256 ``digest`` is of the ``submitted`` document."""
    if size == len(submitted) and digest == sha256(submitted):
        return Copy.WHOLE
    if 0 < size < len(submitted) and digest == sha256(memoryview(submitted)[:size]):
        return Copy.PREFIX
    return Copy.DIFFERS


@dataclass
class Submission:
    """One document as the harness's record tells it."""

    tag: str
    size: int
    sha256: str
    seed: int
    offset: int
    hold: bool = False
    job: str = ""  # the relay's id, once a 201 was read
    due_at: float | None = None  # when it became due to print: the submit's 201, or the release's 200
    release_sent: bool = False
    cancel_sent: bool = False
    cancel_answers: list[int] = field(default_factory=list)

    def document(self) -> bytes:
        return document(self.tag, self.seed, self.offset, self.size - len(tag_line(self.tag)))

    @classmethod
    def from_record(cls, rows: Iterable[Mapping[str, Any]]) -> dict[str, Submission]:
        subs: dict[str, Submission] = {}
        for row in rows:
            event, tag = row.get("event"), str(row.get("tag", ""))
            if event == "submitting":
                subs[tag] = cls(
                    tag, row["size"], row["sha256"], row["seed"], row["offset"], hold=bool(row["hold"])
                )
                continue
            sub = subs.get(tag)
            if sub is None:
                continue
            if event in ("accepted", "held"):
                sub.job = row["job"]
                if event == "accepted":
                    sub.due_at = row["at"]
            elif event == "releasing":
                sub.release_sent = True
            elif event == "released":
                sub.due_at = row["at"]
            elif event == "canceling":
                sub.cancel_sent = True
            elif event == "canceled":
                sub.cancel_answers.append(int(row["status"]))
        return subs


@dataclass(frozen=True)
class RelayJob:
    id: str
    state: str
    title: str = ""
    last_error: str = ""
    hold_reason: str = ""

    @property
    def tag(self) -> str:
        return self.title.removeprefix(TITLE_PREFIX) if self.title.startswith(TITLE_PREFIX) else ""

    @classmethod
    def from_api(cls, job: Mapping[str, Any]) -> RelayJob:
        return cls(
            job["id"], job["state"], job.get("title") or "", job.get("last_error") or "",
            job.get("hold_reason") or "",
        )  # fmt: skip


@dataclass(frozen=True)
class Received:
    """An arrival at a sink printer, as ``sink.ArrivalLog`` wrote it."""

    tag: str
    size: int
    sha256: str
    done_at: float
    printer: str = ""
    head: str = ""  # hex, when the bytes hold no whole tag line

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Received:
        return cls(
            row.get("tag", ""), row["size"], row["sha256"], row["done_at"], row.get("printer", ""),
            row.get("head", ""),
        )  # fmt: skip


@dataclass(frozen=True)
class Judged:
    key: str  # the tag, or "job:<id>" for a job without one
    job: str
    state: str  # at the relay; "" when the relay has no such job
    outcome: Outcome
    detail: str
    copies: tuple[Copy, ...] = ()
    printed_at: float | None = None  # when the first whole copy's last byte arrived


def judge_job(sub: Submission | None, job: RelayJob | None, copies: list[Copy]) -> tuple[Outcome, str]:
    """The outcome of one job (see the module's docstring), and why, in words."""
    if sub is None:
        assert job is not None
        return Outcome.UNEXPECTED, f"the relay lists job {job.id} ({job.title!r}), which nobody submitted"
    if job is None:
        if copies:
            return Outcome.UNEXPECTED, f"{len(copies)} copies printed, but the relay lists no such job"
        if sub.job:
            return Outcome.UNEXPECTED, f"accepted as {sub.job}, but the relay no longer lists it"
        return Outcome.NOT_ACCEPTED, "no 201 and no job at the relay"
    if sub.job and sub.job != job.id:
        return Outcome.UNEXPECTED, f"accepted as {sub.job}, but its title names job {job.id}"
    if job.state not in RESTING_STATES:
        return Outcome.UNSETTLED, f"still {job.state} when the harness stopped waiting"
    whole = copies.count(Copy.WHOLE)
    prefixes = copies.count(Copy.PREFIX)
    of = f"of {sub.size} bytes"
    if Copy.DIFFERS in copies:
        return Outcome.CORRUPT, f"{copies.count(Copy.DIFFERS)} copies differ from every prefix {of}"
    if prefixes and not sub.cancel_sent:
        return Outcome.CORRUPT, f"{prefixes} truncated copies {of}, and no cancel was sent"
    if whole > 1:
        return Outcome.DUPLICATE, f"{whole} whole copies ({job.state})"
    if sub.hold and not sub.release_sent and copies:
        return (
            Outcome.PRINTED_UNRELEASED,
            f"{len(copies)} copies of a job held and never released ({job.state})",
        )
    if job.state == "completed":
        if whole:
            return Outcome.PRINTED, "cancel sent too late" if sub.cancel_sent else ""
        return Outcome.LOST, f"completed, but no whole copy arrived ({prefixes} partial)"
    if job.state == "canceled":
        if not sub.cancel_sent:
            return Outcome.UNEXPECTED, "canceled, but the harness never canceled it"
        if whole:
            return Outcome.CANCELED_PRINTED_WHOLE, "the cancel lost the race to the last byte"
        if prefixes:
            return Outcome.CANCELED_PARTIAL, f"canceled during delivery: partial {of}"
        return Outcome.CANCELED, ""
    if job.state == "held":
        if sub.release_sent:
            return Outcome.UNEXPECTED, f"held again after its release: {job.hold_reason or job.last_error}"
        return Outcome.HELD, ""
    reason = job.last_error or "no reason given"
    return (Outcome.FAILED if job.state == "failed" else Outcome.EXPIRED), reason


@dataclass
class Verdict:
    judged: dict[str, Judged]
    arrivals: Counter[str]  # per kind: whole, prefix, differs, untagged_prefix, unknown
    unknown_arrivals: list[Received]
    settled: bool = True  # every delivery had ended (and been recorded) before the judging
    settle_note: str = ""

    def counts(self) -> Counter[Outcome]:
        return Counter(j.outcome for j in self.judged.values())

    def problems(self) -> list[str]:
        counts = self.counts()
        problems = [
            f"{counts[o]} {o.value.replace('_', ' ')}" for o in Outcome if o not in EXPECTED and counts[o]
        ]
        if self.unknown_arrivals:
            problems.append(f"{len(self.unknown_arrivals)} unknown arrivals")
        if not self.settled:
            problems.append(f"deliveries not settled: {self.settle_note}")
        if not counts[Outcome.PRINTED]:
            problems.append("no job was printed")
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems()

    def line(self) -> str:
        """One line: the verdict, then the count of every outcome, expected ones first."""
        counts = self.counts()
        parts = [f"{counts[o]} {o.value}" for o in Outcome]
        parts.append(f"{len(self.unknown_arrivals)} unknown_arrivals")
        head = "PASSED" if self.passed else "FAILED: " + ", ".join(self.problems())
        return f"verdict: {head} | jobs {sum(counts.values())}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        counts = self.counts()
        failing: dict[str, list[dict[str, Any]]] = {}
        for judged in self.judged.values():
            if judged.outcome not in EXPECTED:
                named = failing.setdefault(judged.outcome.value, [])
                if len(named) < DETAILS_PER_OUTCOME:
                    named.append(
                        {"key": judged.key, "job": judged.job, "state": judged.state, "detail": judged.detail}
                    )
        return {
            "passed": self.passed,
            "problems": self.problems(),
            "settled": self.settled,
            "outcomes": {o.value: counts[o] for o in Outcome},
            "arrivals": dict(sorted(self.arrivals.items())),
            "unknown_arrivals": [
                {"tag": a.tag, "size": a.size, "printer": a.printer}
                for a in self.unknown_arrivals[:DETAILS_PER_OUTCOME]
            ],
            "failing_jobs": failing,
        }


def judge(
    subs: Mapping[str, Submission],
    jobs: Iterable[RelayJob],
    arrivals: Iterable[Received],
    *,
    rebuild: Callable[[Submission], bytes] = Submission.document,
    settled: bool = True,
    settle_note: str = "",
) -> Verdict:
    """Judge every job the harness submitted or the relay lists. ``rebuild`` gives a submission's bytes
    (called only for arrivals that are not a whole copy, and at most once per job)."""
    by_key = {(listed.tag or f"job:{listed.id}"): listed for listed in jobs}
    received: dict[str, list[Received]] = {}
    kinds: Counter[str] = Counter()
    unknown: list[Received] = []
    for arrival in arrivals:
        if arrival.tag in subs:
            received.setdefault(arrival.tag, []).append(arrival)
        elif not arrival.tag and _cut_in_tag_line(arrival, subs.values()):
            kinds["untagged_prefix"] += 1  # too short to say whose: a canceled job's, so expected
        else:
            kinds["unknown"] += 1
            unknown.append(arrival)
    judged: dict[str, Judged] = {}
    for key in sorted({*subs, *by_key}):
        sub, job = subs.get(key), by_key.get(key)
        copies: list[Copy] = []
        printed_at = None
        if sub is not None:
            submitted: bytes | None = None
            for arrival in received.get(key, ()):
                if arrival.size == sub.size and arrival.sha256 == sub.sha256:
                    copy = Copy.WHOLE
                    printed_at = arrival.done_at if printed_at is None else min(printed_at, arrival.done_at)
                else:
                    submitted = rebuild(sub) if submitted is None else submitted
                    copy = compare(submitted, arrival.size, arrival.sha256)
                copies.append(copy)
                kinds[copy.value] += 1
        outcome, detail = judge_job(sub, job, copies)
        job_id = job.id if job is not None else sub.job if sub is not None else ""
        judged[key] = Judged(
            key, job_id, job.state if job else "", outcome, detail, tuple(copies), printed_at
        )
    return Verdict(judged, kinds, unknown, settled, settle_note)


def _cut_in_tag_line(arrival: Received, subs: Iterable[Submission]) -> bool:
    """Whether an untagged arrival is all there was (it fits its recorded head) and a strict prefix of the
    tag line of a job the harness canceled: a delivery cut within its first bytes."""
    try:
        head = bytes.fromhex(arrival.head)
    except ValueError:
        return False
    if not head or len(head) != arrival.size or sha256(head) != arrival.sha256:
        return False
    return any(s.cancel_sent and tag_line(s.tag).startswith(head) for s in subs)
