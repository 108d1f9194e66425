"""Per-token request rate limits: a token bucket per API token, answered with 429 and ``Retry-After``.

Buckets are keyed by the token id *after* authentication. Keying by anything a request merely claims
(a token id in a forged header) would let an attacker who read a token id in a log spend its owner's
budget. Unauthenticated floods are the HTTP server's business (connection limits and deadlines).

The limiter is sans-IO like :mod:`tunnel.protocol`: the caller passes ``now`` (``spend_request`` reads the
clock for the API). Memory is bounded: at most
``max_tracked`` buckets are kept, least recently used dropped first; a dropped bucket only forgets debt,
so the worst an eviction does is forgive a token some requests.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from relay.auth import Principal
from service.http.message import HTTPError

MAX_TRACKED = 100_000


@dataclass
class _Bucket:
    tokens: float
    last: float


class TokenRateLimiter:
    """``rate`` requests per second per key on average, bursts of up to ``burst``; ``rate=0`` disables."""

    def __init__(self, rate: float, burst: int, *, max_tracked: int = MAX_TRACKED) -> None:
        if rate < 0 or burst < 1 or max_tracked < 1:
            raise ValueError("rate must be >= 0, burst and max_tracked at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0

    def check(self, key: str, now: float) -> float | None:
        """Spend one request of ``key``: None if allowed, else the seconds until one would be."""
        if self.rate == 0:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.last) * self.rate)
            bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        self.refused += 1
        return (1.0 - bucket.tokens) / self.rate

    def retry_after_header(self, wait: float) -> str:
        """``Retry-After`` takes whole seconds; round up so a client that obeys is not refused again."""
        return str(max(1, math.ceil(wait)))

    def __len__(self) -> int:
        return len(self._buckets)


def spend_request(limiter: TokenRateLimiter, principal: Principal) -> None:
    """One request of the token's budget, for the REST API and the IPP endpoint alike (429 beyond it)."""
    wait = limiter.check(principal.token_id or f"user:{principal.user_id}", time.monotonic())
    if wait is not None:
        who = f"token {principal.token_id}" if principal.token_id else f"user {principal.email}"
        retry_after = limiter.retry_after_header(wait)  # the body says what the header says
        raise HTTPError(
            429,
            f"{who} exceeds rate_limit={limiter.rate:g} requests/s "
            f"(rate_burst={limiter.burst:g}); retry after {retry_after} s",
            [("retry-after", retry_after)],
        )
