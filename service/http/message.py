"""What handlers see of HTTP: requests with a streaming body, responses, and the errors between them.

Nothing here touches a socket. The server hands a `RequestBody` a `BodySource` that pulls chunks off
the connection; tests and other callers can build one from bytes with `RequestBody.from_bytes`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "BodySource",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnected",
    "HTTPError",
    "Handler",
    "Headers",
    "Request",
    "RequestBody",
    "Response",
    "format_bytes",
]


def format_bytes(n: int) -> str:
    """`65536` -> `"64 KiB"`: sizes in error messages read like the limits people configure."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


class HTTPError(Exception):
    """Raise from a handler to answer `status` with the JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = list(headers)


class BodyTooLarge(HTTPError):
    """The request body is longer than the caller's limit (413)."""

    def __init__(self, limit: int, size: int | None = None, *, name: str = "limit") -> None:
        seen = f"{format_bytes(size)} " if size is not None else ""
        super().__init__(413, f"request body {seen}exceeds {name}={format_bytes(limit)}")
        self.limit = limit
        self.size = size


class BodyTimeout(HTTPError):
    """The client sent the body too slowly (408); the connection is closed after the answer."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)


class ClientDisconnected(Exception):
    """The client went away before the request body was complete."""


class Headers:
    """Case-insensitive multi-map of header fields.

    Stored as (lowercased name, value) bytes pairs, as h11 delivers them; looked up and iterated as
    `str` (latin-1, the historical charset of HTTP field values, so no byte is ever lost).
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes | str, bytes | str]] = ()) -> None:
        self._items: list[tuple[bytes, bytes]] = [
            (_to_bytes(name).lower(), _to_bytes(value)) for name, value in items
        ]

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The first value of `name`, or `default`."""
        key = _to_bytes(name).lower()
        for k, v in self._items:
            if k == key:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        key = _to_bytes(name).lower()
        return [v.decode("latin-1") for k, v in self._items if k == key]

    def raw(self) -> list[tuple[bytes, bytes]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str | bytes):
            return False
        key = _to_bytes(name).lower()
        return any(k == key for k, _ in self._items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for k, v in self._items:
            yield k.decode("latin-1"), v.decode("latin-1")

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


def _to_bytes(s: str | bytes) -> bytes:
    return s.encode("latin-1") if isinstance(s, str) else s


class BodySource(Protocol):
    async def receive_body_chunk(self) -> bytes | None:
        """The next non-empty chunk of the body, or None at its end. Each wait is bounded."""
        ...


class _BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data or None

    async def receive_body_chunk(self) -> bytes | None:
        data, self._data = self._data, None
        return data


class RequestBody:
    """Streams a request body. Never holds it whole, unless `read()` is asked to."""

    def __init__(self, source: BodySource, content_length: int | None) -> None:
        self._source = source
        self.content_length = content_length
        self.bytes_received = 0
        self._done = False

    @classmethod
    def from_bytes(cls, data: bytes) -> RequestBody:
        return cls(_BytesSource(data), len(data))

    @property
    def complete(self) -> bool:
        """True once the end of the body has been seen."""
        return self._done

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        chunk = await self._source.receive_body_chunk()
        if chunk is None:
            self._done = True
            raise StopAsyncIteration
        self.bytes_received += len(chunk)
        return chunk

    async def read(self, limit: int, *, limit_name: str = "limit") -> bytes:
        """The whole body; raises BodyTooLarge(limit) as soon as it is known to be longer."""
        if self.content_length is not None and self.content_length > limit:
            raise BodyTooLarge(limit, self.content_length, name=limit_name)
        data = bytearray()
        async for chunk in self:
            if len(data) + len(chunk) > limit:
                raise BodyTooLarge(limit, name=limit_name)
            data += chunk
        return bytes(data)


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    client: tuple[str, int] | None
    body: RequestBody
    http_version: str = "1.1"


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    # An async iterable is streamed with chunked transfer encoding (e.g. server-sent events).
    body: bytes | AsyncIterable[bytes] = b""

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("content-type", "application/json"), *headers], body)


Handler = Callable[[Request], Awaitable[Response]]
