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
        """The delay before the next attempt.

        A server that answered with ``Retry-After`` is up and has said when to come back (a busy relay
        draws it at random, spreading the storm itself): wait that long plus up to a second, capped,
        without growing the exponential. Otherwise a relay back from a restart would see each refused
        connector wait out a window doubled by every 503 on top of the time it asked for.
        """
        if retry_after is not None:
            return min(self.cap, max(0.0, retry_after) + self.rng.uniform(0, 1))
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(0, ceiling)

    def session_ended(self, lasted: float) -> None:
        """Tell the backoff how long the last session stayed up."""
        if lasted >= self.reset_after:
            self.attempt = 0
