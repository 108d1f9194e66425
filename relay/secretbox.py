"""Secrets the relay must use later but keep unreadable at rest: sealed with a key outside the database.

Webhook signing secrets are needed in clear to sign each delivery, so they cannot be hashed like tokens.
They are stored sealed (AES-256-GCM under a key derived from ``secret_key_file``), bound to the webhook's
id, so a copy of the database alone reveals none of them; whoever also has the key file can read them,
as can the relay itself. Relays sharing a database must share the key file.

Stored form: ``sealed:v1:`` + base64url(nonce (12) || ciphertext || tag (16)).
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.private_files import create_whole, private_dir, tighten

PREFIX = "sealed:v1:"
KEY_BYTES = 32
EMPTY_KEY_WAIT = 5.0  # seconds an empty key file is given to be written by another process


class SecretBoxError(Exception):
    pass


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretBoxError(f"the secret key must be {KEY_BYTES} bytes, not {len(key)}")
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"printrelay secrets v1").derive(
            key
        )
        self._aead = AESGCM(derived)
        # Tells keys apart without revealing them: relays sharing a database check they share the key.
        self.fingerprint = (
            HKDF(algorithm=hashes.SHA256(), length=8, salt=None, info=b"printrelay key check v1")
            .derive(key)
            .hex()
        )

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """The key in ``path`` (base64 text), created 0600 with a random key when missing."""
        try:
            text = path.read_text().strip()
            deadline = time.monotonic() + EMPTY_KEY_WAIT
            while not text and time.monotonic() < deadline:
                # Another relay is writing it in place (a filesystem without hard links: create_whole).
                time.sleep(0.05)
                text = path.read_text().strip()
        except FileNotFoundError:
            if not path.parent.exists():
                private_dir(path.parent)
            # Relays started together on one volume: whichever links its key first, all use that one.
            create_whole(path, base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
            return cls.load_or_create(path)
        tighten([path])
        try:
            return cls(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError, SecretBoxError) as exc:
            raise SecretBoxError(f"{path}: not a printrelay secret key ({exc})") from None

    def seal(self, secret: str, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, secret.encode(), context.encode())
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, context: str) -> str:
        """The secret; a value stored in clear by an older version is returned as it is."""
        if not stored.startswith(PREFIX):
            return stored
        try:
            raw = base64.urlsafe_b64decode(stored[len(PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SecretBoxError(
                f"a sealed secret of {context} does not open with this key (was secret_key_file changed?)"
            ) from exc

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(PREFIX)
