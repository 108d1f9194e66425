"""Opening a listener a flag names: an address in use (or not this host's) is one line naming both."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio


class ListenError(Exception):
    """A listener could not be opened; the message names the address and the setting to change."""


async def start_listener(
    nursery: trio.Nursery, serve: Callable[..., Awaitable[Any]], host: str, port: int, flag: str
) -> Any:
    """``nursery.start(serve, host, port)``; a bind that fails raises :class:`ListenError`."""
    try:
        return await nursery.start(serve, host, port)
    except BaseException as raised:
        exc: BaseException = raised
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if not isinstance(exc, OSError):
            raise
        shown = f"[{host}]" if ":" in host else host or "*"
        reason = exc.strerror or str(exc)
        raise ListenError(
            f"cannot listen on {shown}:{port} ({flag}): {reason}; choose another with {flag}"
        ) from None
