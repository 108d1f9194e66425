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
from typing import Any, BinaryIO, Protocol

import trio

from relay.store.base import PayloadStore
from service.private_files import DIR_MODE, fsync_dir, new_private_file, private_dir
from tunnel.sealing import (
    PayloadSealer,
    key_id,
    new_data_key,
    seal_key,
)

__all__ = [
    "INLINE_MAX",
    "PayloadSpool",
    "PayloadTooLarge",
    "Spool",
    "SpoolFull",
    "StoredPayload",
    "seal_body",
]

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


def _remove_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


async def seal_body(
    job_id: str,
    body: AsyncIterable[bytes],
    *,
    recipient_public: bytes,
    max_bytes: int,
    chunk_size: int,
    inline_max: int,
    sink: PayloadSink,
) -> StoredPayload:
    """Seal ``body`` to ``recipient_public`` as it arrives. Sealed records stay in memory while the whole
    payload may still fit in ``inline_max`` (then the caller commits them with the job row), else they go
    to ``sink``, which keeps them durably on ``commit()`` and throws them away on ``abort()``.

    Streams: at most one chunk of plaintext and ``inline_max`` of sealed bytes are held at a time. On any
    error (too large, disk full, cancellation, the body iterator failing because the client went away)
    the sink is aborted and the exception propagates."""
    # Wrap first so a bad recipient key fails before any byte is written.
    dek = new_data_key()
    wrapped = seal_key(dek, recipient_public, context=job_id.encode("ascii"))
    sealer = PayloadSealer(dek, job_id, chunk_size)
    del dek  # only the sealer's cipher object holds it now, until this call returns
    digest = hashlib.sha256()
    held = bytearray()  # sealed records while they may still fit in inline_max
    spilled = False  # records went to the sink
    try:
        async for piece in body:
            if sealer.plain_bytes + len(piece) > max_bytes:
                raise PayloadTooLarge(max_bytes)
            digest.update(piece)
            held += sealer.feed(piece)
            if len(held) > inline_max:
                spilled = True
                await sink.write(bytes(held))
                held.clear()
        held += sealer.finish()
        inline: bytes | None = None
        if not spilled and len(held) <= inline_max:
            inline = bytes(held)
        else:
            await sink.write(bytes(held))
            await sink.commit()
    except BaseException:
        with trio.CancelScope(shield=True):
            await sink.abort()
        raise
    return StoredPayload(
        size=sealer.plain_bytes,
        sealed_size=sealer.sealed_bytes,
        sha256=digest.hexdigest(),
        wrapped_key=wrapped,
        key_id=key_id(recipient_public),
        inline=inline,
    )


class PayloadSink(Protocol):
    async def write(self, sealed: bytes) -> None: ...
    async def commit(self) -> None: ...
    async def abort(self) -> None: ...


class PayloadSpool(Protocol):
    """Where sealed payloads larger than ``inline_max`` live: files (one relay), or the database."""

    inline_max: int

    async def store(
        self, job_id: str, body: AsyncIterable[bytes], *, recipient_public: bytes, max_bytes: int
    ) -> StoredPayload: ...
    def open(self, job_id: str) -> AsyncGenerator[bytes, None]: ...
    async def erase(self, job_id: str) -> None: ...
    async def usage(self) -> tuple[int, int]: ...
    async def remove_orphans(self, known_job_ids: set[str], *, min_age: float = 0.0) -> int: ...
    async def prepare(self) -> None: ...
    def free_space_path(self) -> Path | None:
        """A path on the filesystem the payloads fill, for the free-space gauges (None: not a filesystem)."""
        ...


class _FileSink:
    """The ``.part`` file of one payload, opened at the first write, fsynced and renamed on commit."""

    def __init__(self, spool: Spool, job_id: str) -> None:
        self._spool = spool
        self.final = spool.path(job_id)
        self.part = spool._tmp / f"{job_id}.{secrets.token_hex(4)}{_PART_SUFFIX}"
        self._out: Any = None
        self._renamed = False

    async def write(self, sealed: bytes) -> None:
        try:
            if self._out is None:
                self._out = await self._spool._open_part(self.part, self.final)
            await self._out.write(sealed)
        except OSError as exc:
            self._spool.raise_if_full(exc, self.final)
            raise

    async def commit(self) -> None:
        out = self._out
        assert out is not None
        try:
            await out.flush()
            await trio.to_thread.run_sync(os.fsync, out.fileno())
            await out.aclose()
            await trio.to_thread.run_sync(os.replace, self.part, self.final)
            self._renamed = True
            await trio.to_thread.run_sync(fsync_dir, self.final.parent)
        except OSError as exc:
            self._spool.raise_if_full(exc, self.final)
            raise

    async def abort(self) -> None:
        # Synchronous removal: it must run even when we are being cancelled. A failure after the rename
        # (directory fsync, cancellation) means the caller will not record the job, so the file goes too.
        if self._out is not None:
            await self._out.aclose()
            _remove_quietly(self.final if self._renamed else self.part)


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

    def free_space_path(self) -> Path | None:
        return self.root if self.root.exists() else self.root.parent

    async def store(
        self,
        job_id: str,
        body: AsyncIterable[bytes],
        *,
        recipient_public: bytes,
        max_bytes: int,
    ) -> StoredPayload:
        """Seal ``body`` to ``recipient_public`` and store it durably as ``job_id``'s payload: a file when
        it is larger than ``inline_max`` (written to a temp file, fsynced, renamed into place)."""
        if job_id in self._writing:
            raise FileExistsError(f"payload of job {job_id} is already being stored")
        self._writing.add(job_id)
        try:
            return await seal_body(
                job_id, body, recipient_public=recipient_public, max_bytes=max_bytes,
                chunk_size=self.chunk_size, inline_max=self.inline_max, sink=_FileSink(self, job_id),
            )  # fmt: skip
        finally:
            self._writing.discard(job_id)

    def raise_if_full(self, exc: OSError, final: Path) -> None:
        if exc.errno in _DISK_FULL:
            job_id = final.name.removesuffix(_SEALED_SUFFIX)
            raise SpoolFull(
                f"spool disk full: {exc.strerror} while storing job {job_id} in {self.root}"
            ) from exc

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


# Chunk rows of a payload kept in the database: about this many sealed bytes each (a 1 GiB job is 1,024
# rows; a read brings back CHUNKS_PER_READ of them, so 4 MiB are in memory at a time).
CHUNK_ROW_BYTES = 1024 * 1024
CHUNKS_PER_READ = 4
# An upload whose chunks stopped coming this long ago, with no job made of it, died with its replica.
ORPHAN_CHUNK_AGE = 3600.0


class _ChunkSink:
    """One payload's chunk rows, written as the sealed records fill them. Nothing refers to them until
    the job row is committed; abort deletes them."""

    def __init__(self, store: PayloadStore, job_id: str) -> None:
        self._store = store
        self._job_id = job_id
        self._buffer = bytearray()
        self._seq = 0

    async def write(self, sealed: bytes) -> None:
        self._buffer += sealed
        while len(self._buffer) >= CHUNK_ROW_BYTES:
            await self._flush(CHUNK_ROW_BYTES)

    async def _flush(self, size: int) -> None:
        await self._store.add_payload_chunk(self._job_id, self._seq, bytes(self._buffer[:size]))
        del self._buffer[:size]
        self._seq += 1

    async def commit(self) -> None:
        if self._buffer or self._seq == 0:
            await self._flush(len(self._buffer))

    async def abort(self) -> None:
        if self._seq:
            with trio.move_on_after(30):  # bounded: a database that is down leaves it to the orphan sweep
                await self._store.erase_payload_chunks(self._job_id)


class DatabaseSpool:
    """Sealed payloads as chunk rows in the store's database, so any replica can stream any job and none
    needs a shared disk. Each row is committed as the upload goes (group-committed with everything else),
    never a whole document in memory; the job's final state deletes them in its own transaction."""

    def __init__(
        self, store: PayloadStore, *, chunk_size: int = 256 * 1024, inline_max: int = INLINE_MAX
    ) -> None:
        self._store = store
        self.inline_max = min(inline_max, INLINE_MAX)
        self.chunk_size = chunk_size

    def free_space_path(self) -> Path | None:
        return None

    async def prepare(self) -> None:
        return None

    async def store(
        self, job_id: str, body: AsyncIterable[bytes], *, recipient_public: bytes, max_bytes: int
    ) -> StoredPayload:
        _check_job_id(job_id)
        return await seal_body(
            job_id, body, recipient_public=recipient_public, max_bytes=max_bytes, chunk_size=self.chunk_size,
            inline_max=self.inline_max, sink=_ChunkSink(self._store, job_id),
        )  # fmt: skip

    async def open(self, job_id: str) -> AsyncGenerator[bytes, None]:
        """The sealed bytes, CHUNKS_PER_READ rows at a time (FileNotFoundError if there are none)."""
        seq = 0
        while True:
            rows = await self._store.payload_chunks(job_id, seq, CHUNKS_PER_READ)
            if not rows and seq == 0:
                raise FileNotFoundError(f"payload of job {job_id} is not in the database")
            for data in rows:
                yield data
            if len(rows) < CHUNKS_PER_READ:
                return
            seq += len(rows)

    async def erase(self, job_id: str) -> None:
        await self._store.erase_payload_chunks(job_id)

    async def usage(self) -> tuple[int, int]:
        return await self._store.payload_chunk_usage()

    async def remove_orphans(self, known_job_ids: set[str], *, min_age: float = ORPHAN_CHUNK_AGE) -> int:
        """Chunks of uploads that died with their replica (another replica may be mid-upload: only those
        silent for ``min_age`` go)."""
        return await self._store.remove_orphan_chunks(max(min_age, ORPHAN_CHUNK_AGE))
