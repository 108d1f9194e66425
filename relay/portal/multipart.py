"""A streaming reader of ``multipart/form-data`` (RFC 7578): the portal's print form.

The file part is handed on as it arrives (into the spool, sealed), never held whole; the small fields
before it are read into memory, each bounded. Every limit is an :class:`HTTPError` that names it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

from service.http.message import HTTPError

MAX_HEAD = 8 * 1024  # the headers of one part
MAX_PREAMBLE = 1024  # bytes before the first boundary (browsers send none)
MAX_BOUNDARY = 70  # RFC 2046 §5.1.1
BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.IGNORECASE)
PARAM_RE = re.compile(r';\s*([A-Za-z*]+)="((?:[^"\\]|\\.)*)"|;\s*([A-Za-z*]+)=([^;\s]*)')


def boundary_of(content_type: str | None) -> bytes:
    """The boundary a ``multipart/form-data`` Content-Type names; 400 for anything else."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise HTTPError(
            400, f"a form with a file must be multipart/form-data, not {media[:60] or 'nothing'!r}"
        )
    match = BOUNDARY_RE.search(content_type or "")
    if match is None:
        raise HTTPError(400, "multipart/form-data without a boundary")
    return (match.group(1) or match.group(2)).encode("latin-1")


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str


def _part(head: bytes) -> Part:
    name, filename, content_type = None, None, "text/plain"
    for line in head.decode("utf-8", "replace").split("\r\n"):
        field, _, value = line.partition(":")
        field = field.strip().lower()
        if field == "content-type":
            content_type = value.strip()
        elif field == "content-disposition":
            disposition, _, params = value.partition(";")
            if disposition.strip().lower() != "form-data":
                raise HTTPError(400, "a form part's Content-Disposition must be form-data")
            for quoted_name, quoted, plain_name, plain in PARAM_RE.findall(";" + params):
                key, text = (quoted_name or plain_name).lower(), quoted if quoted_name else plain
                text = text.replace('\\"', '"')
                if key == "name":
                    name = text
                elif key == "filename":
                    filename = text
    if name is None:
        raise HTTPError(400, "a form part without a name")
    return Part(name, filename, content_type)


class MultipartReader:
    """Parts in order: :meth:`next_part`, then :meth:`read` (a small field) or :meth:`stream` (a file)."""

    def __init__(self, body: AsyncIterable[bytes], boundary: bytes, *, max_parts: int = 20) -> None:
        if not 0 < len(boundary) <= MAX_BOUNDARY:
            raise HTTPError(400, f"a multipart boundary has 1 to {MAX_BOUNDARY} characters")
        self._chunks = aiter(body)
        # Starting with CRLF makes the first delimiter look like every other one.
        self._buffer = bytearray(b"\r\n")
        self._delimiter = b"\r\n--" + boundary
        self._parts_left = max_parts
        self._in_part = False
        self._done = False
        self._started = False

    async def _fill(self) -> bool:
        """More bytes into the buffer; False at the end of the body."""
        chunk = await anext(self._chunks, None)
        if chunk is None:
            return False
        self._buffer += chunk
        return True

    async def next_part(self) -> Part | None:
        """The next part's headers (the rest of the current part is skipped); None after the last."""
        if self._in_part:
            async for _ in self.stream():
                pass
        if self._done:
            return None
        if not self._started:
            while (at := self._buffer.find(self._delimiter)) < 0:
                if len(self._buffer) > MAX_PREAMBLE + len(self._delimiter) or not await self._fill():
                    raise HTTPError(400, "malformed multipart body: no boundary")
            del self._buffer[: at + len(self._delimiter)]
            self._started = True
        # After a delimiter: "--" ends the body, CRLF starts a part.
        while len(self._buffer) < 2:
            if not await self._fill():
                raise HTTPError(400, "malformed multipart body: it ends inside a boundary")
        if self._buffer[:2] == b"--":
            self._done = True
            return None
        if self._buffer[:2] != b"\r\n":
            raise HTTPError(400, "malformed multipart body: junk after a boundary")
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_HEAD or not await self._fill():
                raise HTTPError(400, f"malformed multipart body: part headers over {MAX_HEAD} bytes or cut")
        if end > MAX_HEAD:
            raise HTTPError(400, f"malformed multipart body: part headers over {MAX_HEAD} bytes")
        self._parts_left -= 1
        if self._parts_left < 0:
            raise HTTPError(400, "too many parts in the form")
        part = _part(bytes(self._buffer[2:end]))
        del self._buffer[: end + 4]
        self._in_part = True
        return part

    async def stream(self) -> AsyncIterator[bytes]:
        """The current part's bytes as they arrive."""
        keep = len(self._delimiter) - 1  # bytes that may be the start of a delimiter split across chunks
        while self._in_part:
            at = self._buffer.find(self._delimiter)
            if at >= 0:
                data = bytes(self._buffer[:at])
                del self._buffer[: at + len(self._delimiter)]
                self._in_part = False
                if data:
                    yield data
                return
            if len(self._buffer) > keep:
                data = bytes(self._buffer[:-keep])
                del self._buffer[:-keep]
                yield data
            if not await self._fill():
                raise HTTPError(400, "malformed multipart body: it ends inside a part")

    async def read(self, limit: int) -> str:
        """The current part as text (a form field), at most ``limit`` bytes."""
        data = bytearray()
        async for chunk in self.stream():
            data += chunk
            if len(data) > limit:
                raise HTTPError(400, f"a form field is longer than {limit} bytes")
        return data.decode("utf-8", "replace")
