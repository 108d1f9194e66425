"""A RAW or LPD job's document once every byte of it is authenticated, ready for the printer.

RAW and LPD printers print whatever reaches them, so the connector receives a job's sealed payload whole
and authenticates every record before the printer gets a byte (connector/app.py). What it keeps is the
plaintext it authenticated: in memory when small, else in a 0600 file in ``STATE_DIR/incoming/`` that has
no name (``O_TMPFILE``, or unlinked as soon as it is made where that is not supported), so nothing is left
behind when the delivery ends or the process dies, and no other process can open it by a path. Sending
it is then one ``sendfile(2)`` loop: the kernel copies from the page cache to the printer's socket,
nothing is decrypted or copied through Python a second time.

It is an ``AsyncIterator[bytes]`` like any document, for backends that need chunks, and
:meth:`VerifiedDocument.send_to` sends it whole. Either way its hooks run once: ``before_first`` before the
first byte leaves, ``after_last`` once the printer has taken the last one.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import trio

from service.private_files import FILE_MODE, private_dir

READ_CHUNK = 1024 * 1024  # what iterating a file-backed document reads at a time (worker thread)
SEND_MAX = 4 * 1024 * 1024  # at most this much per sendfile(2) call, then other tasks get a turn
WRITEV_MAX = 512  # parts per writev(2): below IOV_MAX (1024 on Linux), whatever size the relay's records are

Hook = Callable[[], Awaitable[None]]


def unnamed_file(directory: Path) -> int:
    """A 0600 file in ``directory`` (made 0700) that has no name; an fd open for reading and writing."""
    private_dir(directory)
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, FILE_MODE)
    except (AttributeError, OSError) as exc:  # no O_TMPFILE here (not Linux, or the file system)
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, name = tempfile.mkstemp(prefix="job-", suffix=".part", dir=directory)  # 0600
    os.unlink(name)
    return fd


def remove_leftovers(directory: Path) -> int:
    """Remove what an earlier version left in ``directory`` when it died mid-job (sealed payloads under the
    job's name), or a crash between making a fallback file and unlinking it; how many."""
    removed = 0
    for pattern in ("*.sealed", "job-*.part"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def write_all(fd: int, parts: Sequence[bytes]) -> int:
    """Append ``parts`` to ``fd`` (a writev(2) per WRITEV_MAX parts when the kernel takes them whole); the
    bytes written."""
    total = 0
    for start in range(0, len(parts), WRITEV_MAX):
        group = parts[start : start + WRITEV_MAX]
        size = sum(len(part) for part in group)
        written = os.writev(fd, group)
        if written < size:  # a short write (a signal, the disk filling up): the rest in one piece
            rest = memoryview(b"".join(group))[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        total += size
    return total


class VerifiedDocument:
    """An authenticated document: ``parts`` in memory, or the first ``size`` bytes of the file ``fd``
    (owned: :meth:`close` closes it)."""

    def __init__(self, *, size: int, parts: list[bytes] | None = None, fd: int | None = None) -> None:
        if (parts is None) == (fd is None):
            raise ValueError("a document is either in memory or in a file")
        self.size = size
        self.sent = 0  # bytes handed to the socket by send_to, or yielded by iteration
        self._parts = parts
        self._fd = fd
        self._before_first: Hook | None = None
        self._after_last: Hook | None = None
        self._counted: Callable[[int], None] | None = None
        self.begun = False  # before_first ran: the printer may have some of the job
        self.ended = False  # after_last ran: the printer took every byte
        self._chunks: AsyncIterator[bytes] | None = None

    def __repr__(self) -> str:
        where = "memory" if self._parts is not None else f"fd {self._fd}"
        return f"VerifiedDocument({self.size} bytes in {where})"

    def watch(self, before_first: Hook, after_last: Hook, counted: Callable[[int], None]) -> None:
        """``before_first()`` before the first byte leaves, ``after_last()`` once the last one has, and
        ``counted(n)`` as bytes go out."""
        self._before_first, self._after_last, self._counted = before_first, after_last, counted

    def fileno(self) -> int | None:
        """The file's descriptor; None for a document in memory."""
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def _begin(self) -> None:
        if not self.begun:
            self.begun = True
            if self._before_first is not None:
                await self._before_first()

    async def _end(self) -> None:
        if not self.ended:
            self.ended = True
            if self._after_last is not None:
                await self._after_last()

    def _count(self, n: int) -> None:
        self.sent += n
        if self._counted is not None:
            self._counted(n)

    # --- as an AsyncIterator[bytes] (one pass) -------------------------------------------------------

    def __aiter__(self) -> VerifiedDocument:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._iterate()
        return await self._chunks.__anext__()

    async def _iterate(self) -> AsyncIterator[bytes]:
        await self._begin()
        if self._parts is not None:
            for part in self._parts:
                self._count(len(part))
                yield part
        else:
            offset = 0
            while offset < self.size:
                data = await trio.to_thread.run_sync(self._read, offset, min(READ_CHUNK, self.size - offset))
                offset += len(data)
                self._count(len(data))
                yield data
        await self._end()

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            raise trio.ClosedResourceError("the document was closed")
        data = os.pread(self._fd, size, offset)
        if not data:
            raise OSError(errno.EIO, f"the document's file ended at {offset} of {self.size} bytes")
        return data

    # --- whole, to a socket ------------------------------------------------------------------------------

    async def send_to(self, stream: trio.SocketStream, io_timeout: float) -> int:
        """Send the whole document to ``stream`` (bytes from the file go by sendfile(2)); the bytes sent.

        Like ``send_all``: trio.TooSlowError when the peer takes nothing for ``io_timeout`` seconds,
        trio.BrokenResourceError when it goes away. ``sent`` says how far it got either way."""
        await self._begin()
        self.sent = 0
        if self._parts is not None:
            for part in self._parts:
                with trio.fail_after(io_timeout):
                    await stream.send_all(part)
                self._count(len(part))
        else:
            await self._sendfile(stream.socket, io_timeout)
        await self._end()
        return self.sent

    async def _sendfile(self, sock: trio.socket.SocketType, io_timeout: float) -> None:
        # In the event loop: the file was written moments ago and is in the page cache, so a call copies
        # memory into the socket's buffer (at most its free space) and does not wait on the disk.
        if self._fd is None:
            raise trio.ClosedResourceError("the document was closed")
        offset = 0
        while offset < self.size:
            try:
                n = os.sendfile(sock.fileno(), self._fd, offset, min(SEND_MAX, self.size - offset))
            except BlockingIOError:
                with trio.fail_after(io_timeout):
                    await sock.wait_writable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if n == 0:
                raise OSError(errno.EIO, f"the document's file ended at {offset} of {self.size} bytes")
            offset += n
            self._count(n)
            await trio.lowlevel.checkpoint()
