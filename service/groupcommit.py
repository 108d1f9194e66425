"""Group commit: many callers' database calls, one worker-thread hop and one transaction.

Blocking database drivers (sqlite3, psycopg) run in worker threads (``trio.to_thread``), and each commit
costs an fsync. Calls made while a batch runs wait for the next one, which the first of them runs: its
reads, then its writes in one transaction, each write under a savepoint of its own (an error undoes that
write only). Every caller returns once its batch is done, so a write that returned is durable. There is
no batching task: the caller that finds no batch running runs one, so every call has an owner and a
database nobody calls costs nothing.

The relay's store and the connector's ledger both commit this way; what a batch does with its connection
(``BEGIN IMMEDIATE`` on SQLite, a pooled connection's transaction on PostgreSQL) is the backend's
:class:`Batcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import outcome
import trio

T = TypeVar("T")
C = TypeVar("C")


@dataclass(eq=False)
class Call(Generic[C, T]):
    """One call waiting for the next batch; ``result`` is set when its batch is done."""

    fn: Callable[[C], T]
    write: bool
    result: outcome.Outcome[T] | None = None
    waited: bool = True  # False: queued by enqueue(), nobody waits for it


class Batcher(Protocol[C]):
    def run_batch(self, reads: Sequence[Call[C, Any]], writes: Sequence[Call[C, Any]]) -> None:
        """In a worker thread: run ``reads`` (each result set), then ``writes`` in one transaction, each
        under its own savepoint; when the transaction itself fails, every write's result is that error."""
        ...


class GroupCommit(Generic[C]):
    def __init__(self, batcher: Batcher[C], *, limiter: trio.CapacityLimiter | None = None) -> None:
        self._batcher = batcher
        self._limiter = limiter or trio.CapacityLimiter(1)
        self._pending: list[Call[C, Any]] = []
        self._running = False
        self._batch_done = trio.Event()
        self.batches = 0  # batches with writes (tests and benchmarks look at these)
        self.batched_writes = 0

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self._limiter

    async def read(self, fn: Callable[[C], T]) -> T:
        """Runs with the next batch, outside its transaction."""
        return await self.call(Call(fn, write=False))

    async def write(self, fn: Callable[[C], T]) -> T:
        """Runs in the next batch's transaction; returns once that is committed."""
        return await self.call(Call(fn, write=True))

    def enqueue(self, fn: Callable[[C], object]) -> None:
        """A write that goes with the next batch that has writes of its own, without waiting for it (see
        the connector's ledger: only a write whose loss changes nothing may be queued this way). A batch
        of reads leaves it queued, so that a read does not wait for a commit nobody asked it for."""
        self._pending.append(Call(fn, write=True, waited=False))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    async def flush(self) -> None:
        """Commit what :meth:`enqueue` left waiting (before closing)."""
        if self._pending and not self._running:
            await self._run_batch(queued=True)

    async def call(self, call: Call[C, T]) -> T:
        self._pending.append(call)
        while call.result is None:
            if not self._running:
                await self._run_batch()
                continue
            try:
                await self._batch_done.wait()
            except trio.Cancelled:
                if call in self._pending:  # not started: drop it
                    self._pending.remove(call)
                    raise
                # Started: like a worker thread, it cannot be abandoned halfway; wait for its end and
                # return what it did, as trio.to_thread does. Raising Cancelled here would tell the caller
                # that a committed write did not happen (submit would then erase the payload of a job it
                # had just made durable). The scope stays cancelled: the caller's next checkpoint raises.
                with trio.CancelScope(shield=True):
                    while call.result is None:
                        await self._batch_done.wait()
        return call.result.unwrap()

    async def _run_batch(self, *, queued: bool = False) -> None:
        batch, self._pending = self._pending, []
        if not queued and not any(c.write and c.waited for c in batch):
            # Reads only: queued writes wait for the next batch that commits anyway.
            self._pending = [c for c in batch if c.write]
            batch = [c for c in batch if not c.write]
        reads = [c for c in batch if not c.write]
        writes = [c for c in batch if c.write]
        if writes:
            self.batches += 1
            self.batched_writes += len(writes)
        self._running = True
        try:
            # Shielded: the calls of others are in this batch; a cancellation arrives after it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._execute, reads, writes, limiter=self._limiter)
        finally:
            self._running = False
            done, self._batch_done = self._batch_done, trio.Event()
            done.set()

    def _execute(self, reads: list[Call[C, Any]], writes: list[Call[C, Any]]) -> None:
        try:
            self._batcher.run_batch(reads, writes)
        except BaseException as exc:  # the connection itself failed: every unfinished call learns it
            for call in (*reads, *writes):
                if call.result is None:
                    call.result = outcome.Error(exc)


class _PassFailed(Exception):
    """A write failed in the optimistic pass: the batch runs again, with savepoints."""


def run_writes_in_transaction(
    writes: Sequence[Call[C, Any]],
    conn: C,
    *,
    begin: Callable[[], object],
    commit: Callable[[], object],
    rollback: Callable[[], object],
    savepoint: Callable[[], object],
    rollback_to_savepoint: Callable[[], object],
    release_savepoint: Callable[[], object],
    before_commit: Callable[[], object] = lambda: None,
    optimistic: Callable[[], AbstractContextManager[object]] | None = None,
) -> None:
    """The write half of a batch, for drivers with explicit transaction statements.

    ``optimistic``: first run the writes inside this context (PostgreSQL's pipeline mode: statements go
    out without waiting for each other) and without savepoints. Only if that pass fails, wherever the
    error surfaces, is it rolled back and the batch run again the careful way, each write under a savepoint
    so that its error is its own. Write functions must then be safe to run twice (they touch only the
    database and what they return).
    """
    try:
        if optimistic is not None:
            try:
                with optimistic():
                    begin()
                    for call in writes:
                        call.result = outcome.capture(call.fn, conn)
                        if isinstance(call.result, outcome.Error):
                            raise _PassFailed
                    before_commit()
                    commit()
                return
            except Exception:  # whatever it was, the careful pass tells whose it is
                rollback()
                for call in writes:
                    call.result = None
        begin()
        for call in writes:
            if len(writes) == 1:  # no savepoint needed: its error undoes the whole transaction
                call.result = outcome.capture(call.fn, conn)
                if isinstance(call.result, outcome.Error):
                    rollback()
                    return
                continue
            savepoint()
            call.result = outcome.capture(call.fn, conn)
            if isinstance(call.result, outcome.Error):
                rollback_to_savepoint()
            release_savepoint()
        before_commit()
        commit()
    except BaseException as exc:
        # BEGIN, a savepoint or COMMIT failed (disk full, I/O error, a lost connection): nothing of the
        # batch is kept.
        try:
            rollback()
        finally:
            for call in writes:
                call.result = outcome.Error(exc)
