"""A document kept in a temporary file for as long as one delivery needs it.

Two protocols need the bytes more than once or before they can start: LPD announces the data file's
length before sending it (when the ticket does not say), and RAW sends a second copy as a second job.
The file lives in the connector's state directory (``spool_dir``), not in memory, and is removed when
the delivery ends, however it ends. It holds decrypted document bytes: mode 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

READ_CHUNK = 256 * 1024


class SpoolFile:
    """``async with SpoolFile(dir) as spool:`` then :meth:`tee` or :meth:`fill`, then :meth:`read`."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.size = 0

    async def __aenter__(self) -> SpoolFile:
        if self.directory is not None:
            await trio.Path(self.directory).mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = await trio.to_thread.run_sync(
            lambda: tempfile.mkstemp(prefix="job-", suffix=".spool", dir=self.directory)
        )
        os.close(fd)  # mkstemp made it 0600; reopened below through trio's file wrapper
        self.path = Path(name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.path is not None:
            with trio.CancelScope(shield=True):
                await trio.Path(self.path).unlink(missing_ok=True)

    async def tee(self, document: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass ``document`` through, keeping a copy of every chunk in the file."""
        assert self.path is not None
        async with await trio.open_file(self.path, "wb") as file:
            async for chunk in document:
                await file.write(chunk)
                self.size += len(chunk)
                yield chunk

    async def fill(self, document: AsyncIterator[bytes]) -> int:
        """Store the whole document; returns its size."""
        async for _ in self.tee(document):
            pass
        return self.size

    async def read(self) -> AsyncIterator[bytes]:
        assert self.path is not None
        async with await trio.open_file(self.path, "rb") as file:
            while chunk := await file.read(READ_CHUNK):
                yield chunk
