"""Process-wide settings of the relay's Python runtime, applied by ``printrelay serve``."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import trio

# CPython runs a full (generation 2) collection whenever the long-lived heap has grown by a quarter and
# ten generation-1 collections have passed. A relay registering thousands of connectors grows that heap
# from about 50,000 objects to millions (some 500 per session), so with the default thresholds (700, 10,
# 10) it ran about twenty full collections while 4,000 connectors reconnected on a loaded 2-core machine,
# each one stopping the event loop for 1 to 4 s: 17 s of garbage collection in a minute. With these, the
# same run spent 3 s in the collector and ran no full collection; full collections still come, after 100
# million allocations at most, so cyclic garbage cannot pile up for long.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect less often: the relay's heap is large and long-lived, and every collection stops it."""
    gc.set_threshold(*GC_THRESHOLDS)


# Memory that connections leave behind, handed back this often. After an abuse storm (40 misbehaving
# clients, 30 s) the relay's Python objects were back at their baseline count once collected, yet its RSS
# stayed 25 MiB up: cyclic garbage (exceptions and their tracebacks from every aborted connection) waits
# for 50,000 allocations before the youngest generation is collected, and glibc keeps what is freed for
# reuse instead of returning it. A young collection plus malloc_trim(0) took that back to 8 MiB above the
# baseline (what is left is fragmentation: pages that still hold a live object) in 2-50 ms.
MEMORY_INTERVAL = 30.0
YOUNG_GARBAGE = 2_000  # objects allocated since the last young collection that make one worth it


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class MemoryReturn:
    """Collects the youngest garbage and returns freed heap to the OS, every ``interval`` seconds."""

    def __init__(self, interval: float = MEMORY_INTERVAL) -> None:
        self.interval = interval
        self._trim = _malloc_trim()

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            self.once()

    def once(self) -> None:
        if gc.get_count()[0] >= YOUNG_GARBAGE:
            gc.collect(1)  # generations 0 and 1 only: the long-lived heap is not walked
        if self._trim is not None:
            self._trim(0)
