"""A re-armable event: every waiter wakes on the next :meth:`Signal.fire`, then re-checks its condition.

trio.Event fires once; state that changes again and again (data arrived, window opened, a job became due)
needs a fresh event after each firing. Waiters always check their condition before waiting, so a firing
between the check and the wait cannot be missed (trio is single-threaded: nothing runs in between).
"""

from __future__ import annotations

import trio


class Signal:
    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def next_firing(self) -> trio.Event:
        """The event the next :meth:`fire` sets. Take it *before* a check that awaits (a store query),
        then wait on it: a firing during the check is not lost."""
        return self._event
