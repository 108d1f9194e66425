"""Process-wide settings of the relay's Python runtime, applied by ``printrelay serve``."""

from __future__ import annotations

import gc

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
