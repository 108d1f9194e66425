"""The connector's ledger: concurrent deliveries' writes share a commit, and each is durable on return."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from connector.ledger import Ledger


async def test_concurrent_records_share_commits_and_are_on_disk_when_they_return(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    seen: list[int] = []

    async def deliver(i: int) -> None:
        await ledger.record(f"job{i}", "p1", "started")
        # Durable now: another connection (another process after a crash) already sees it.
        other = sqlite3.connect(tmp_path / "ledger.sqlite3")
        assert other.execute("SELECT state FROM deliveries WHERE job_id = ?", (f"job{i}",)).fetchone()
        other.close()
        await ledger.record(f"job{i}", "p1", "handed", "printer took every byte")
        seen.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(deliver, i)
    assert sorted(seen) == list(range(40))
    assert ledger.batches < 80  # 80 writes, fewer fsyncs
    entry = await ledger.get("job7")
    assert entry is not None and entry.state == "handed"
    assert await ledger.size() == 40
    await ledger.close()


async def test_a_cancelled_caller_leaves_the_ledger_usable(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ledger.record, "a", "p1", "started")
        with trio.move_on_after(0):
            await ledger.record("b", "p1", "started")
    assert (await ledger.get("a")) is not None
    await ledger.record("c", "p1", "completed")
    assert (await ledger.get("c")) is not None
    await ledger.close()


async def test_started_is_noted_without_a_wait_and_committed_before_the_next_record(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    ledger.note_started("a", "p1", "attempt 1")
    batches = ledger.batches
    await ledger.record("a", "p1", "handed", "printer took every byte")
    assert ledger.batches == batches + 1  # one commit for both
    entry = await ledger.get("a")
    assert entry is not None and entry.state == "handed"  # in order: started, then handed
    ledger.note_started("b", "p1", "attempt 1")
    await ledger.close()  # a note nobody followed is committed at close
    reopened = Ledger(tmp_path / "ledger.sqlite3")
    await reopened.open()
    entry = await reopened.get("b")
    assert entry is not None and entry.state == "started" and entry.message == "attempt 1"
    await reopened.close()


async def test_completed_after_handed_goes_with_the_next_batch(tmp_path: Path) -> None:
    """RAW/LPD: ``handed`` is waited for; the ``completed`` after it is not (a resend finding ``handed`` is
    already answered "completed"), and goes with the next batch or at close."""
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    await ledger.open()
    await ledger.record("a", "p1", "handed", "printer took every byte")
    batches = ledger.batches
    ledger.note_completed("a", "p1", "sent 4096 bytes")
    assert ledger.batches == batches  # nothing waited for
    entry = await ledger.get("a")  # a lookup does not commit it (no fsync on the next job's lookup)
    assert entry is not None and entry.state == "handed" and ledger.batches == batches
    await ledger.record("b", "p1", "feeding", "attempt 1")
    assert ledger.batches == batches + 1  # one commit for both
    entry = await ledger.get("a")
    assert entry is not None and (entry.state, entry.message) == ("completed", "sent 4096 bytes")
    await ledger.record("c", "p1", "handed", "printer took every byte")
    ledger.note_completed("c", "p1", "sent 1 bytes")
    await ledger.close()
    reopened = Ledger(tmp_path / "ledger.sqlite3", keep_days=0)
    await reopened.open()
    entry = await reopened.get("c")
    assert entry is not None and entry.state == "completed"
    # `handed` is as final as `completed` for pruning: a lost `completed` leaves nothing forever
    await reopened.record("d", "p1", "handed", "printer took every byte")
    await reopened.record("e", "p1", "feeding", "attempt 1")
    assert await reopened.prune() == 3  # a, c, d
    assert (await reopened.get("e")) is not None
    await reopened.close()
