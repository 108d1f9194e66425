"""loadtest/verdict.py: each arrival compared with the bytes submitted, each job judged by its final state,
what the harness did to it and its copies; every way a cancel can race a delivery gives a passing verdict."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # loadtest/ is tooling next to the packages, not an installed package

from loadtest.documents import TITLE_PREFIX, document, tag_line  # noqa: E402
from loadtest.report import summarize  # noqa: E402
from loadtest.verdict import (  # noqa: E402
    Copy,
    Outcome,
    Received,
    RelayJob,
    Submission,
    Verdict,
    compare,
    judge,
)

SIZE = 185_799  # the document of the issue: 98,223 of its bytes arrived after a cancel


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def submission(tag: str, *, hold: bool = False, size: int = SIZE, seed: int = 7) -> Submission:
    body = document(tag, seed, 1000, size - len(tag_line(tag)))
    return Submission(tag, len(body), sha(body), seed, 1000, hold=hold, job=f"j-{tag}", due_at=1.0)


def arrival(data: bytes, tag: str, done_at: float = 2.0) -> Received:
    return Received(tag, len(data), sha(data), done_at)


def relay_job(tag: str, state: str, last_error: str = "") -> RelayJob:
    return RelayJob(f"j-{tag}", state, TITLE_PREFIX + tag, last_error)


def one(sub: Submission, state: str | None, copies: list[bytes]) -> Verdict:
    """``sub``, in ``state`` at the relay (None: the relay has no such job), beside one job printed fine (a
    run that printed nothing fails)."""
    fine = submission("fine")
    jobs = [relay_job(sub.tag, state)] if state else []
    return judge(
        {sub.tag: sub, "fine": fine},
        [*jobs, relay_job("fine", "completed")],
        [*(arrival(c, sub.tag) for c in copies), arrival(fine.document(), "fine")],
    )


def test_compare_tells_whole_prefix_and_differing_bytes() -> None:
    submitted = b"PRLOAD t\n" + bytes(range(256)) * 4
    assert compare(submitted, len(submitted), sha(submitted)) is Copy.WHOLE
    assert compare(submitted, 98, sha(submitted[:98])) is Copy.PREFIX
    assert compare(submitted, 1, sha(submitted[:1])) is Copy.PREFIX
    changed = bytearray(submitted)
    changed[500] ^= 1
    assert compare(submitted, len(changed), sha(bytes(changed))) is Copy.DIFFERS  # same size, one bit
    assert compare(submitted, 600, sha(bytes(changed[:600]))) is Copy.DIFFERS  # shorter, not a prefix
    longer = submitted + b"\x00"
    assert compare(submitted, len(longer), sha(longer)) is Copy.DIFFERS
    assert compare(submitted, 0, sha(b"")) is Copy.DIFFERS


def test_documents_are_rebuilt_from_their_recipe() -> None:
    sub = submission("a")
    body = sub.document()
    assert body.startswith(b"PRLOAD a\n") and len(body) == SIZE and sha(body) == sub.sha256
    # a longer block starts with the shorter one: any --max-large-mib rebuilds the same documents
    assert document("a", 7, 1000, 50) == body[:59]


def test_a_prefix_of_a_job_the_harness_canceled_is_an_expected_partial() -> None:
    sub = submission("a")
    sub.cancel_sent = True
    body = sub.document()
    verdict = one(sub, "canceled", [body[:98_223]])
    judged = verdict.judged["a"]
    assert judged.outcome is Outcome.CANCELED_PARTIAL, judged
    assert "partial of 185799 bytes" in judged.detail
    assert verdict.passed, verdict.problems()
    assert verdict.arrivals["prefix"] == 1


def test_a_prefix_without_a_cancel_is_corrupt() -> None:
    sub = submission("a")
    body = sub.document()
    verdict = one(sub, "completed", [body[:98_223]])
    assert verdict.judged["a"].outcome is Outcome.CORRUPT
    assert "no cancel was sent" in verdict.judged["a"].detail
    assert not verdict.passed and "1 corrupt" in verdict.problems()


@pytest.mark.parametrize("canceled", [False, True])
def test_bytes_that_differ_from_every_prefix_are_corrupt_canceled_or_not(canceled: bool) -> None:
    sub = submission("a")
    sub.cancel_sent = canceled
    body = bytearray(sub.document())
    body[60_000] ^= 0xFF
    for copy in (bytes(body), bytes(body[:70_000])):
        verdict = one(sub, "canceled" if canceled else "completed", [copy])
        assert verdict.judged["a"].outcome is Outcome.CORRUPT, verdict.judged["a"]


def test_a_completed_job_needs_exactly_one_whole_copy() -> None:
    sub = submission("a")
    body = sub.document()
    assert one(sub, "completed", [body]).judged["a"].outcome is Outcome.PRINTED
    assert one(sub, "completed", []).judged["a"].outcome is Outcome.LOST
    twice = one(sub, "completed", [body, body])
    assert twice.judged["a"].outcome is Outcome.DUPLICATE
    assert twice.problems() == ["1 duplicate"]


def test_a_canceled_job_printed_twice_is_a_duplicate() -> None:
    sub = submission("a")
    sub.cancel_sent = True
    body = sub.document()
    assert one(sub, "canceled", [body, body]).judged["a"].outcome is Outcome.DUPLICATE


@pytest.mark.parametrize(
    ("state", "answer", "received", "outcome"),
    [
        ("canceled", 200, "nothing", Outcome.CANCELED),  # canceled while queued or before the printer
        ("canceled", 200, "prefix", Outcome.CANCELED_PARTIAL),  # cut during delivery
        ("canceled", 200, "whole", Outcome.CANCELED_PRINTED_WHOLE),  # last byte out before the cancel
        ("completed", 409, "whole", Outcome.PRINTED),  # the job was final before the cancel came
        ("canceled", None, "prefix", Outcome.CANCELED_PARTIAL),  # Locust stopped before the answer
        ("completed", None, "whole", Outcome.PRINTED),
    ],
)
def test_every_way_a_cancel_races_a_delivery_passes(
    state: str, answer: int | None, received: str, outcome: Outcome
) -> None:
    sub = submission("a")
    sub.cancel_sent = True
    if answer is not None:
        sub.cancel_answers.append(answer)
    body = sub.document()
    copies = {"nothing": [], "prefix": [body[:98_223]], "whole": [body]}[received]
    verdict = one(sub, state, copies)
    assert verdict.judged["a"].outcome is outcome
    assert verdict.passed, verdict.problems()


def test_a_held_job_never_released_must_not_print() -> None:
    sub = submission("h", hold=True)
    sub.due_at = None
    body = sub.document()
    assert one(sub, "held", []).judged["h"].outcome is Outcome.HELD
    sub.cancel_sent = True
    assert one(sub, "canceled", []).judged["h"].outcome is Outcome.CANCELED
    for copies in ([body], [body[:1000]]):
        verdict = one(sub, "canceled", copies)
        assert verdict.judged["h"].outcome is Outcome.PRINTED_UNRELEASED
        assert "1 printed unreleased" in verdict.problems()
    sub.release_sent = True
    assert one(sub, "completed", [body]).judged["h"].outcome is Outcome.PRINTED
    assert one(sub, "held", []).judged["h"].outcome is Outcome.UNEXPECTED  # held again after its release


def test_failed_expired_unsettled_and_unexplained_states_fail_the_run() -> None:
    sub = submission("a")
    verdict = judge(
        {"a": sub}, [relay_job("a", "failed", "printer refused: bad ticket")], [arrival(sub.document(), "a")]
    )
    assert verdict.judged["a"].outcome is Outcome.FAILED
    assert verdict.judged["a"].detail == "printer refused: bad ticket"
    assert "1 failed" in verdict.problems()
    assert one(sub, "expired", []).judged["a"].outcome is Outcome.EXPIRED
    assert one(sub, "printing", [sub.document()]).judged["a"].outcome is Outcome.UNSETTLED
    assert one(sub, "canceled", []).judged["a"].outcome is Outcome.UNEXPECTED  # nobody canceled it
    stranger = judge({}, [RelayJob("j-x", "completed", "untitled")], [])
    assert stranger.judged["job:j-x"].outcome is Outcome.UNEXPECTED


def test_submissions_the_relay_never_accepted_and_unknown_arrivals() -> None:
    sub = submission("a")
    sub.job = ""
    assert one(sub, None, []).judged["a"].outcome is Outcome.NOT_ACCEPTED
    assert one(sub, None, [sub.document()]).judged["a"].outcome is Outcome.UNEXPECTED
    sub.job = "j-a"
    assert one(sub, None, []).judged["a"].outcome is Outcome.UNEXPECTED  # accepted, then gone
    verdict = judge({}, [], [arrival(b"PRLOAD zz\nhello", "zz")])
    assert verdict.problems() == ["1 unknown arrivals", "no job was printed"]


def test_a_delivery_cut_inside_the_tag_line_is_a_canceled_partial_only_if_a_cancel_was_sent() -> None:
    sub = submission("abc")
    cut = b"PRLOAD a"
    untagged = Received("", len(cut), sha(cut), 2.0, head=cut.hex())
    assert judge({"abc": sub}, [relay_job("abc", "completed")], [untagged]).arrivals["unknown"] == 1
    sub.cancel_sent = True
    verdict = judge({"abc": sub}, [relay_job("abc", "canceled")], [untagged])
    assert verdict.arrivals == {"untagged_prefix": 1} and not verdict.unknown_arrivals
    assert verdict.judged["abc"].outcome is Outcome.CANCELED


def test_documents_are_rebuilt_only_for_copies_that_are_not_whole() -> None:
    subs = {t: submission(t) for t in ("a", "b")}
    subs["b"].cancel_sent = True
    rebuilt: list[str] = []

    def rebuild(sub: Submission) -> bytes:
        rebuilt.append(sub.tag)
        return sub.document()

    b = subs["b"].document()
    copies = [arrival(subs["a"].document(), "a"), arrival(b[:10], "b"), arrival(b[:20], "b")]
    jobs = [relay_job("a", "completed"), relay_job("b", "canceled")]
    verdict = judge(subs, jobs, copies, rebuild=rebuild)
    assert rebuilt == ["b"]
    assert verdict.judged["b"].copies == (Copy.PREFIX, Copy.PREFIX)


def test_the_verdict_line_and_json_count_every_outcome() -> None:
    subs = {t: submission(t) for t in ("a", "b", "c")}
    subs["b"].cancel_sent = True
    a, b = subs["a"].document(), subs["b"].document()
    jobs = [relay_job("a", "completed"), relay_job("b", "canceled"), relay_job("c", "completed")]
    verdict = judge(subs, jobs, [arrival(a, "a"), arrival(b[:98_223], "b")], settled=False, settle_note="x")
    line = verdict.line()
    assert line.startswith("verdict: FAILED: 1 lost, deliveries not settled: x | jobs 3: 1 printed")
    assert "1 canceled_partial" in line and "0 corrupt" in line and "0 unknown_arrivals" in line
    data = verdict.to_json()
    assert data["passed"] is False
    assert data["outcomes"]["printed"] == 1 and data["outcomes"]["canceled_partial"] == 1
    assert data["failing_jobs"] == {
        "lost": [
            {
                "key": "c",
                "job": "j-c",
                "state": "completed",
                "detail": data["failing_jobs"]["lost"][0]["detail"],
            }
        ]
    }
    assert data["arrivals"] == {"prefix": 1, "whole": 1}


def test_the_record_says_what_was_sent_whatever_came_back() -> None:
    rows = [
        {"event": "submitting", "tag": "a", "size": 3, "sha256": "s", "seed": 1, "offset": 0, "hold": False},
        {"event": "accepted", "tag": "a", "job": "j-a", "at": 1.0},
        {"event": "canceling", "tag": "a", "job": "j-a", "at": 1.1, "held": False},
        {"event": "canceled", "tag": "a", "job": "j-a", "at": 1.2, "status": 409},
        {"event": "submitting", "tag": "h", "size": 3, "sha256": "s", "seed": 1, "offset": 0, "hold": True},
        {"event": "held", "tag": "h", "job": "j-h", "at": 1.0},
        {"event": "releasing", "tag": "h", "job": "j-h", "at": 2.0},  # Locust stopped before the answer
        {"event": "submitting", "tag": "n", "size": 3, "sha256": "s", "seed": 1, "offset": 0, "hold": False},
    ]
    subs = Submission.from_record(rows)
    assert (subs["a"].job, subs["a"].due_at, subs["a"].cancel_sent, subs["a"].cancel_answers) == (
        "j-a", 1.0, True, [409],
    )  # fmt: skip
    assert (subs["h"].hold, subs["h"].release_sent, subs["h"].due_at) == (True, True, None)
    assert (subs["n"].job, subs["n"].due_at) == ("", None)


def test_summary_figures_and_latency_from_the_answer_that_made_the_job_due() -> None:
    subs = {t: submission(t) for t in ("a", "d", "c")}
    subs["d"].due_at = 2.0  # released at 2.0
    subs["c"].cancel_sent = True
    docs = {t: s.document() for t, s in subs.items()}
    jobs = [relay_job("a", "completed"), relay_job("d", "completed"), relay_job("c", "canceled")]
    copies = [arrival(docs["a"], "a", 1.5), arrival(docs["d"], "d", 2.25), arrival(docs["c"][:5000], "c")]
    summary = summarize(judge(subs, jobs, copies), subs)
    assert (summary["delivered"], summary["lost"], summary["corrupt"], summary["canceled_partial"]) == (
        2,
        0,
        0,
        1,
    )
    assert summary["canceled_queued"] == 1 and summary["canceled_printed"] == 0
    assert summary["latency_ms"]["max"] == 500.0 and summary["latency_ms"]["p50"] == 250.0
    assert summary["verdict"]["passed"] is True
