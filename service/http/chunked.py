"""Chunk sizes of a chunked request body, checked before h11 waits for them. Sans-IO: bytes in.

h11 takes a chunk size of up to 20 hex digits (2^80 - 1) and then waits for that many bytes, so a request
announcing an impossible chunk ends in a body timeout (408) instead of the 400 it deserves. This follows
the chunked framing (RFC 9112 §7.1) over the same bytes h11 is given and refuses a size that does not fit
in a signed 64-bit length, as Go's net/http and nginx do. Everything else about the framing is left to
h11, which validates it; this class only needs to find the size lines.
"""

from __future__ import annotations

import enum

# Larger than any body anyone can send; the bound is the largest length a signed 64-bit field holds.
MAX_CHUNK_SIZE = 2**63 - 1
# Only the size's digits are kept of a size line (extensions are h11's to bound).
_KEPT_OF_SIZE_LINE = 64


class ChunkSizeError(ValueError):
    pass


class _Part(enum.Enum):
    SIZE_LINE = enum.auto()
    DATA = enum.auto()
    DATA_END = enum.auto()  # the CRLF after a chunk's data
    TRAILER = enum.auto()
    DONE = enum.auto()


class ChunkSizes:
    """Feed it the body bytes in the order h11 receives them; raises :class:`ChunkSizeError`."""

    def __init__(self, max_size: int = MAX_CHUNK_SIZE) -> None:
        self.max_size = max_size
        self._part = _Part.SIZE_LINE
        self._line = bytearray()  # the start of the current size or trailer line
        self._line_length = 0
        self._remaining = 0  # bytes of chunk data, or of DATA_END's CRLF

    @property
    def done(self) -> bool:
        return self._part is _Part.DONE

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._part is not _Part.DONE:
            if self._part in (_Part.DATA, _Part.DATA_END):
                taken = min(self._remaining, len(view))
                self._remaining -= taken
                view = view[taken:]
                if self._remaining == 0:
                    if self._part is _Part.DATA:
                        self._part, self._remaining = _Part.DATA_END, 2
                    else:
                        self._part = _Part.SIZE_LINE
                continue
            end = bytes(view[:_KEPT_OF_SIZE_LINE]).find(b"\n")
            if end < 0 and len(view) > _KEPT_OF_SIZE_LINE:
                end = bytes(view).find(b"\n")
            piece = view[: end + 1] if end >= 0 else view
            if len(self._line) < _KEPT_OF_SIZE_LINE:
                self._line += piece[: _KEPT_OF_SIZE_LINE - len(self._line)]
            self._line_length += len(piece)
            view = view[len(piece) :]
            if end >= 0:
                self._line_ended()

    def _line_ended(self) -> None:
        line = bytes(self._line).strip()
        blank = self._line_length <= 2 and not line
        self._line.clear()
        self._line_length = 0
        if self._part is _Part.TRAILER:
            if blank:
                self._part = _Part.DONE
            return
        digits = line.split(b";", 1)[0].strip(b" \t")
        try:
            size = int(digits, 16)
        except ValueError:
            return  # not a size line: h11 refuses it with its own message
        if size > self.max_size:
            shown = digits[:24].decode("ascii", "replace")
            raise ChunkSizeError(
                f"chunk size {shown} exceeds the largest body length ({self.max_size:,} bytes)"
            )
        if size == 0:
            self._part = _Part.TRAILER
        else:
            self._part, self._remaining = _Part.DATA, size
