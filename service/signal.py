"""A re-armable event: every waiter wakes on the next :meth:`Signal.fire`, then re-checks its condition.

trio.Event fires once; state that changes again and again (data arrived, window opened, a job became due)
needs a fresh event after each firing. Waiters always check their condition before waiting, so a firing
between the check and the wait cannot be missed (trio is single-threaded: nothing runs in between).
"""

from __future__ import annotations

import trio


class Signal:
    # The event exists only while someone waits for it: most signals fire far more often than anyone
    # waits (the tunnel's "output queued" on every frame), and a relay holds several per idle tunnel.
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        await self.next_firing().wait()

    def next_firing(self) -> trio.Event:
        """The event the next :meth:`fire` sets. Take it *before* a check that awaits (a store query),
        then wait on it: a firing during the check is not lost."""
        if self._event is None:
            self._event = trio.Event()
        return self._event
