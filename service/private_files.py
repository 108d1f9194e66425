"""Files only the service's own user may read: directories 0700, files 0600, whatever the umask.

The relay's database holds token hashes, job titles and users, and the webhook secrets' sealed form; its
spool holds sealed payloads, the connector's keys open them, and the connector's incoming folder holds the
documents being delivered (unnamed files: connector/delivery/document.py). Under the common umask 022
everything would be readable by every local user, so both sides create their state through these, and
tighten what an older version left behind when they open it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

_log = logging.getLogger("printrelay.files")

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) and make it 0700. mkdir's own mode is subject to the umask.

    A directory this user does not own (a volume's mount point, owned by root and shared through a group,
    as Kubernetes' fsGroup does it) keeps its mode, with a warning: the files made in it are 0600 anyway.
    """
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    try:
        os.chmod(path, DIR_MODE)
    except PermissionError:
        if path.stat().st_uid == os.geteuid():
            raise
        _log.warning(
            "%s belongs to uid %d, so its mode stays %o; the files kept in it are 0600",
            path, path.stat().st_uid, stat.S_IMODE(path.stat().st_mode),
        )  # fmt: skip
    return path


def create_private(path: Path, flags: int = os.O_WRONLY) -> int:
    """Open ``path`` for writing, creating it 0600 (and making an existing one 0600); an fd."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def new_private_file(path: Path) -> int:
    """Create ``path``, which must not exist, 0600; an fd open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)


def create_whole(path: Path, data: bytes) -> bool:
    """Create ``path`` 0600 holding ``data``, unless it exists (then False, and it is left as it is).

    Readers never see it part-written: the data goes to a private temporary file first, which is then
    linked in place (link(2), unlike rename(2), refuses to replace what another process made meanwhile).
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # No hard links here (vfat, SMB shares): made in place, as exclusive as the filesystem allows
            # (a reader may find it empty for a moment), and removed if it cannot be written whole.
            try:
                fd = new_private_file(path)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
            except BaseException:
                path.unlink(missing_ok=True)
                raise
    finally:
        os.unlink(temporary)
    fsync_dir(path.parent)  # the name too survives a power cut
    return True


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a file created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some filesystems cannot sync a directory; SQLite ignores it too
            raise
    finally:
        os.close(fd)


def private_database(path: Path) -> None:
    """Before SQLite opens ``path``: the database exists and is 0600, and so are its WAL and shared-memory
    files if an older version left them readable (SQLite gives new ones the database's mode)."""
    private_dir(path.parent)
    os.close(create_private(path, os.O_RDONLY))
    tighten(Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))


def tighten(paths: Iterable[Path]) -> None:
    """Make these files 0600 where they exist.

    A file given read-only (a Kubernetes Secret volume, a read-only bind mount) or owned by another user
    (the kubelet) keeps its mode, with a warning: the service only reads it, and its owner chose the mode.
    """
    for path in paths:
        try:
            os.chmod(path, FILE_MODE)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EPERM) or (
                exc.errno == errno.EPERM and path.stat().st_uid == os.geteuid()
            ):
                raise
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != FILE_MODE:
                _log.warning(
                    "%s is %s, so its mode stays %o", path,
                    "on a read-only file system" if exc.errno == errno.EROFS else "another user's", mode,
                )  # fmt: skip
