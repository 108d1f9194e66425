"""Query parameters of REST requests, read and checked the same way by every route: a bad value is a 400
that says what a good one looks like."""

from __future__ import annotations

import datetime

from service.http.message import HTTPError, Request

# The times ISO 8601 can write (years 1 to 9999), as epoch seconds: NaN, infinities and 1e300 are no time.
EARLIEST = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC).timestamp()
LATEST = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC).timestamp()


def one(request: Request, name: str, default: str | None = None) -> str | None:
    """The parameter's last value (``?a=1&a=2`` is 2), or ``default``."""
    values = request.query.get(name)
    return values[-1] if values else default


def time_param(request: Request, name: str) -> float | None:
    """An ISO 8601 time (``2026-12-06T10:00:00Z``) or seconds since the epoch."""
    text = one(request, name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise HTTPError(
                400, f"{name} must be an ISO 8601 time (2026-12-06T10:00:00Z) or epoch seconds"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        value = moment.timestamp()
    if not EARLIEST <= value <= LATEST:  # False for NaN too
        raise HTTPError(
            400, f"{name} must be in the years 1 to 9999 (epoch seconds {EARLIEST:.0f} to {LATEST:.0f})"
        )
    return value


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = one(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high}")
    return value
