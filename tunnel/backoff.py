"""Reconnect backoff: full-jitter exponential, as in the AWS architecture blog's "Exponential Backoff And
Jitter" (sleep = random(0, min(cap, base * 2**attempt))).

Full jitter spreads a reconnect storm after a relay restart evenly over the window instead of
synchronising every connector on the same powers of two. A session that stayed up for ``reset_after``
seconds counts as stable and resets the attempt counter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    reset_after: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """The delay before the next attempt; a server's ``Retry-After`` is a floor, still capped."""
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        delay = self.rng.uniform(0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap))
        return delay

    def session_ended(self, lasted: float) -> None:
        """Tell the backoff how long the last session stayed up."""
        if lasted >= self.reset_after:
            self.attempt = 0
