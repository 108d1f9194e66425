"""The connector's X25519 key ring: the private keys that open the data keys of its jobs.

The relay seals each job's data key to the connector's current public key
(``tunnel.sealing.seal_key``). Rotation makes a new current key but keeps the old ones,
because jobs already queued at the relay were sealed to them; ``retire`` drops an old key
once no queued job needs it.

On disk, in ``state_dir/keys/`` (mode 0700)::

    <key_id>.pem   one unencrypted PKCS#8 PEM private key per file, mode 0600
    current        the key id new jobs should be sealed to

A key file that group or others may access is refused rather than silently used: the key
may already have leaked, and the operator should know. Files are written to a temp name,
fsynced and renamed, so a crash leaves either the old or the new state, never half a key.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from service.private_files import fsync_dir, private_dir
from tunnel.sealing import generate_private_key, key_id, public_bytes

__all__ = ["KeyRing"]

_KEY_SUFFIX = ".pem"
_CURRENT = "current"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never briefly wider)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _load_key(path: Path) -> X25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"key file {path} is accessible by group/others (mode {mode:04o}); "
            f"it may have leaked: check, then run: chmod 600 {path}"
        )
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, X25519PrivateKey):
        raise ValueError(f"key file {path} holds a {type(key).__name__}, not an X25519 key")
    return key


class KeyRing:
    """The connector's private keys, one of them current. Not safe across processes."""

    def __init__(self, keys_dir: Path, keys: dict[str, X25519PrivateKey], current: str) -> None:
        self._dir = keys_dir
        self._keys = keys
        self._current = current

    @classmethod
    def load_or_create(cls, state_dir: Path) -> KeyRing:
        """Load the key ring from ``state_dir/keys``, creating a first key if there is none."""
        keys_dir = Path(state_dir) / "keys"
        if not keys_dir.is_dir():
            private_dir(keys_dir)
        keys: dict[str, X25519PrivateKey] = {}
        for path in sorted(keys_dir.glob(f"*{_KEY_SUFFIX}")):
            key = _load_key(path)
            kid = key_id(public_bytes(key))
            if path.name != f"{kid}{_KEY_SUFFIX}":
                raise ValueError(f"key file {path} holds key {kid}; its name must be {kid}{_KEY_SUFFIX}")
            keys[kid] = key
        current_path = keys_dir / _CURRENT
        if not current_path.exists():
            if keys:
                raise ValueError(
                    f"{current_path} is missing but {len(keys)} key(s) exist in {keys_dir}; "
                    f"write the id of the key to seal new jobs to into it"
                )
            ring = cls(keys_dir, keys, "")
            ring.rotate()
            return ring
        current = current_path.read_text("ascii").strip()
        if current not in keys:
            raise ValueError(f"{current_path} names key {current!r}, but {keys_dir} has no such key file")
        return cls(keys_dir, keys, current)

    @property
    def current_key_id(self) -> str:
        """Id of the key new jobs are sealed to."""
        return self._current

    @property
    def current_public(self) -> bytes:
        """Raw public key new jobs are sealed to."""
        return public_bytes(self._keys[self._current])

    @property
    def all_public(self) -> dict[str, bytes]:
        """Every held key's raw public key, by key id (a copy)."""
        return {kid: public_bytes(key) for kid, key in self._keys.items()}

    def private_for(self, key_id: str) -> X25519PrivateKey:
        """The private key with ``key_id``; KeyError if this connector does not hold it."""
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyError(
                f"no connector key {key_id!r} in {self._dir} (holding {sorted(self._keys)}): "
                f"the job was sealed to a key this connector never had or has retired"
            ) from None

    def rotate(self) -> str:
        """Make a new current key and return its id; older keys stay usable."""
        key = generate_private_key()
        kid = key_id(public_bytes(key))
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        # Key file first, then the pointer: a crash in between leaves an unused extra key.
        _write_private(self._dir / f"{kid}{_KEY_SUFFIX}", pem)
        _write_private(self._dir / _CURRENT, f"{kid}\n".encode("ascii"))
        self._keys[kid] = key
        self._current = kid
        return kid

    def retire(self, key_id: str) -> None:
        """Delete an old key once no queued job needs it; the current key cannot be retired."""
        if key_id == self._current:
            raise ValueError(f"cannot retire key {key_id}: it is the current key (rotate first)")
        if key_id not in self._keys:
            raise KeyError(f"cannot retire key {key_id!r}: no such key in {self._dir}")
        (self._dir / f"{key_id}{_KEY_SUFFIX}").unlink(missing_ok=True)
        fsync_dir(self._dir)
        del self._keys[key_id]
