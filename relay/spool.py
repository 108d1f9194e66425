"""The relay's encrypted payload spool: one file of sealed records per job, or none for a small job.

A job's body is sealed (``tunnel.sealing``) as it arrives and written to a temp file; only
when the whole body is on disk is the file fsynced and renamed into place, and the directory
fsynced, so a job that was accepted survives a crash and a half-written one never looks
complete. The data key lives only in the ``store()`` call: what comes back is the key wrapped
to the connector (``StoredPayload.wrapped_key``), which the relay cannot open. The file is
later streamed unchanged over the tunnel as the job's request body.

A payload whose sealed form fits in ``INLINE_MAX`` never becomes a file: ``store()`` returns its
sealed bytes (``StoredPayload.inline``) and the caller commits them with the job row, in the same
transaction, so a small job costs one fsync instead of three file operations, two fsyncs and an unlink.

Layout::

    root/tmp/<job_id>.<random>.part   bodies being received
    root/<ab>/<job_id>.sealed         stored payloads; <ab> = first two hex digits of
                                      sha256(job_id), so ids sharing a prefix still spread
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import trio

from service.private_files import DIR_MODE, new_private_file, private_dir
from tunnel.sealing import (
    PayloadSealer,
    key_id,
    new_data_key,
    seal_key,
)

__all__ = ["INLINE_MAX", "PayloadTooLarge", "Spool", "SpoolFull", "StoredPayload"]

# Job ids become file names: keep them to a safe alphabet and length.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SEALED_SUFFIX = ".sealed"
_PART_SUFFIX = ".part"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Sealed payloads up to this size are not written to a file: the store keeps them next to the job row,
# committed in the same transaction (one fsync for both, none for a file and its directory, no unlink).
# A constant, not a setting: a job with sealed_size <= INLINE_MAX never has a file (relay/lifecycle.py
# relies on it), whatever the version that accepted it.
INLINE_MAX = 64 * 1024


@dataclass(frozen=True)
class StoredPayload:
    size: int  # plaintext bytes
    sealed_size: int  # bytes on disk / over the tunnel
    sha256: str  # hex digest of the plaintext (for Idempotency-Key body comparison)
    wrapped_key: bytes  # seal_key(dek, connector public key, context=job_id)
    key_id: str  # key_id(connector public key)
    # The sealed bytes when they fit in INLINE_MAX: kept by the store in the job's own transaction,
    # no file (see ``Spool.store``). None: the payload is the file at ``Spool.path(job_id)``.
    inline: bytes | None = None


class PayloadTooLarge(Exception):
    """The body went past ``max_bytes``; nothing was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"job too large: more than max_job_bytes={limit} bytes")
        self.limit = limit


class SpoolFull(Exception):
    """The spool's disk or quota ran out while storing a body; nothing was kept."""


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} is not 1-128 characters of [A-Za-z0-9_-]")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


class Spool:
    """Sealed payload files under ``root``. Safe for concurrent stores of different jobs."""

    def __init__(self, root: Path, *, chunk_size: int = 256 * 1024, inline_max: int = INLINE_MAX) -> None:
        self.root = Path(root)
        self.inline_max = min(inline_max, INLINE_MAX)  # smaller in tests, to exercise the files
        self.chunk_size = chunk_size
        self._tmp = self.root / "tmp"
        self._writing: set[str] = set()  # job ids with a store() in progress

    def path(self, job_id: str) -> Path:
        """Where the sealed payload of ``job_id`` lives (whether or not it exists)."""
        _check_job_id(job_id)
        fan = hashlib.sha256(job_id.encode("ascii")).hexdigest()[:2]
        return self.root / fan / f"{job_id}{_SEALED_SUFFIX}"

    async def store(
        self,
        job_id: str,
        body: AsyncIterable[bytes],
        *,
        recipient_public: bytes,
        max_bytes: int,
    ) -> StoredPayload:
        """Seal ``body`` to ``recipient_public`` and store it durably as ``job_id``'s payload.

        Streams: at most one chunk of plaintext is held at a time. On any error (too large,
        disk full, cancellation, the body iterator failing because the client went away) the
        partial file is removed and the exception propagates.
        """
        final = self.path(job_id)
        if job_id in self._writing:
            raise FileExistsError(f"payload of job {job_id} is already being stored")
        # Wrap first so a bad recipient key fails before any byte is written.
        dek = new_data_key()
        wrapped = seal_key(dek, recipient_public, context=job_id.encode("ascii"))
        sealer = PayloadSealer(dek, job_id, self.chunk_size)
        del dek  # only the sealer's cipher object holds it now, until this call returns
        digest = hashlib.sha256()
        held = bytearray()  # sealed records while they may still fit in INLINE_MAX
        part = self._tmp / f"{job_id}.{secrets.token_hex(4)}{_PART_SUFFIX}"
        out: Any = None  # the .part file, once the payload is too large to keep inline
        renamed = False
        self._writing.add(job_id)
        try:
            try:
                async for piece in body:
                    if sealer.plain_bytes + len(piece) > max_bytes:
                        raise PayloadTooLarge(max_bytes)
                    digest.update(piece)
                    held += sealer.feed(piece)
                    if len(held) > self.inline_max:
                        if out is None:
                            out = await self._open_part(part, final)
                        await out.write(held)
                        held.clear()
                held += sealer.finish()
                if out is None and len(held) <= self.inline_max:
                    inline: bytes | None = bytes(held)
                else:
                    inline = None
                    if out is None:
                        out = await self._open_part(part, final)
                    await out.write(held)
                    await out.flush()
                    await trio.to_thread.run_sync(os.fsync, out.fileno())
                    await out.aclose()
                    await trio.to_thread.run_sync(os.replace, part, final)
                    renamed = True
                    await trio.to_thread.run_sync(_fsync_path, final.parent)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    raise SpoolFull(
                        f"spool disk full: {exc.strerror} while storing job {job_id} in {self.root}"
                    ) from exc
                raise
        except BaseException:
            # Synchronous on purpose: it must run even when we are being cancelled. A failure
            # after the rename (directory fsync, cancellation) means the caller will not record
            # the job, so the renamed file goes too.
            if out is not None:
                with trio.CancelScope(shield=True):
                    await out.aclose()
                _remove_quietly(final if renamed else part)
            raise
        finally:
            self._writing.discard(job_id)
        return StoredPayload(
            size=sealer.plain_bytes,
            sealed_size=sealer.sealed_bytes,
            sha256=digest.hexdigest(),
            wrapped_key=wrapped,
            key_id=key_id(recipient_public),
            inline=inline,
        )

    async def prepare(self) -> None:
        """The spool's directories, 0700 whatever the umask (also tightens one an older version made)."""
        await trio.to_thread.run_sync(lambda: (private_dir(self.root), private_dir(self._tmp)))

    async def _open_part(self, part: Path, final: Path) -> Any:
        if await trio.to_thread.run_sync(final.exists):
            raise FileExistsError(f"payload already exists: {final}")
        return trio.wrap_file(await trio.to_thread.run_sync(self._create_part, part, final.parent))

    def _create_part(self, part: Path, fan_dir: Path) -> BinaryIO:
        self._make_dirs(fan_dir)
        return os.fdopen(new_private_file(part), "wb")  # 0600, and "x": never an existing file

    def _make_dirs(self, directory: Path) -> None:
        if not self._tmp.is_dir():
            private_dir(self.root)
            private_dir(self._tmp)
        directory.mkdir(exist_ok=True, mode=DIR_MODE)

    async def open(self, job_id: str, *, read_size: int = 256 * 1024) -> AsyncGenerator[bytes, None]:
        """Stream the sealed bytes of ``job_id``'s payload (FileNotFoundError if absent).

        An async generator: wrap it in ``contextlib.aclosing`` when the consumer may stop
        early, so the file is closed at once rather than when the generator is collected.
        """
        path = self.path(job_id)
        async with await trio.open_file(path, "rb", buffering=0) as f:
            while True:
                data = await f.read(read_size)
                if not data:
                    return
                yield data

    async def erase(self, job_id: str) -> None:
        """Delete ``job_id``'s payload; idempotent."""
        await trio.to_thread.run_sync(_remove_quietly, self.path(job_id))

    async def usage(self) -> tuple[int, int]:
        """(bytes, files) of stored payloads; bodies still being received are not counted."""
        return await trio.to_thread.run_sync(self._usage)

    def _usage(self) -> tuple[int, int]:
        total = files = 0
        for path in self._sealed_files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # erased while we looked
                continue
            files += 1
        return total, files

    def _sealed_files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            path
            for fan in self.root.iterdir()
            if len(fan.name) == 2 and fan.is_dir()
            for path in fan.iterdir()
            if path.name.endswith(_SEALED_SUFFIX)
        ]

    async def remove_orphans(self, known_job_ids: set[str], *, min_age: float = 0.0) -> int:
        """Delete temp files and payloads of jobs not in ``known_job_ids``; return the count.

        Meant for startup, after a crash. Stores in progress in this process are left alone;
        ``min_age`` (seconds) spares files modified more recently, for a periodic sweep that
        may race a store whose job row is not committed yet.
        """
        return await trio.to_thread.run_sync(self._remove_orphans, set(known_job_ids), min_age)

    def _remove_orphans(self, known: set[str], min_age: float) -> int:
        cutoff = time.time() - min_age
        candidates: list[Path] = []
        if self._tmp.is_dir():
            for path in self._tmp.iterdir():
                job_id = path.name.split(".", 1)[0]
                if path.name.endswith(_PART_SUFFIX) and job_id not in self._writing:
                    candidates.append(path)
        for path in self._sealed_files():
            job_id = path.name[: -len(_SEALED_SUFFIX)]
            if job_id not in known and job_id not in self._writing:
                candidates.append(path)
        removed = 0
        for path in candidates:
            try:
                if min_age and path.stat().st_mtime > cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        return removed
