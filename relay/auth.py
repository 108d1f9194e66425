"""Bearer tokens: 256-bit random secrets, shown once, stored only as a SHA-256 hash.

A token reads ``pr<kind>_<id>_<secret>``: ``kind`` is ``a`` (API) or ``c`` (connector), ``id`` is a short
public prefix that identifies the token in listings and logs, ``secret`` carries 256 random bits. The
relay looks a token up by its id and compares hashes in constant time. A plain hash (not a slow KDF) is
right here: the secret is random and long, so there is nothing to brute-force.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from relay.store.base import Notice, TokenRecord

KINDS = {"api": "a", "connector": "c", "user": "u"}
API_SCOPES = ("jobs:submit", "jobs:read", "printers:admin", "admin")
DEFAULT_API_SCOPES = ("jobs:submit", "jobs:read")
# What a person may do: a user their own jobs; a tenant's administrator everything an admin token may.
USER_SCOPES = {"user": ("jobs:submit", "jobs:read"), "admin": ("admin",)}
TOKEN_RE = re.compile(r"^pr([acu])_([a-z0-9]{10})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class TokenLookup(Protocol):
    async def get_token(self, token_id: str) -> TokenRecord | None: ...


class TokenCache:
    """Token records as authentication reads them, kept for ``ttl`` seconds: every API request is
    authenticated, and a store read for each was a good part of a small job's cost. A revocation or
    deletion anywhere (this replica, another, the CLI) is heard as a ``tokens`` notice and drops the
    record at once; ``ttl`` bounds what a missed notice could cost. Only tokens that exist are kept (a
    flood of made-up ids fills nothing), at most ``max_entries`` of them."""

    def __init__(self, store: TokenLookup, *, ttl: float = 5.0, max_entries: int = 10_000) -> None:
        self._store = store
        self._ttl = ttl
        self._max = max_entries
        self._records: dict[str, tuple[TokenRecord, float]] = {}
        self._generation = 0  # changes with every revocation heard: a read it overlapped is not kept

    async def get_token(self, token_id: str) -> TokenRecord | None:
        now = time.monotonic()
        found = self._records.get(token_id)
        if found is not None and found[1] > now:
            return found[0]
        generation = self._generation
        record = await self._store.get_token(token_id)
        if record is not None and generation == self._generation:
            self._records.pop(token_id, None)
            if len(self._records) >= self._max:
                del self._records[next(iter(self._records))]  # the oldest
            self._records[token_id] = (record, now + self._ttl)
        return record

    def heard(self, notice: Notice) -> None:
        if notice.kind == "tokens" and notice.key:
            self._generation += 1
            self._records.pop(notice.key, None)
        elif notice.kind in ("tokens", "resync"):
            self._generation += 1
            self._records.clear()


class AuthError(Exception):
    """The request carries no valid credentials; the message is safe to show."""


@dataclass(frozen=True)
class Principal:
    """Who a request is: an API token, a connector, or a person (``kind`` "user", by password or by one of
    their own tokens; ``token_id`` is then the token's id, or empty for a password)."""

    tenant: str
    kind: str
    token_id: str
    scopes: tuple[str, ...] = ()
    connector_id: str | None = None
    user_id: str | None = None
    email: str = ""

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @property
    def sees_all_jobs(self) -> bool:
        """API tokens and tenant admins see every job of the tenant; a user only their own."""
        return self.user_id is None or "admin" in self.scopes

    @property
    def actor(self) -> str:
        """Who did it, for audit entries and job messages."""
        return self.email or self.token_id


def hash_secret(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_name(what: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def new_token(
    tenant: str,
    kind: str,
    *,
    scopes: tuple[str, ...] = (),
    connector_id: str | None = None,
    label: str = "",
    expires_in: float | None = None,
    now: float | None = None,
    user_id: str | None = None,
) -> tuple[str, TokenRecord]:
    """Make a token; returns the secret (show it once) and the record to store."""
    if kind not in KINDS:
        raise ValueError(f"token kind must be one of {', '.join(KINDS)}, not {kind!r}")
    validate_name("tenant", tenant)
    if kind == "api":
        bad = [s for s in scopes if s not in API_SCOPES]
        if bad:
            raise ValueError(f"unknown scope {bad[0]!r}; scopes are {', '.join(API_SCOPES)}")
        scopes = scopes or DEFAULT_API_SCOPES
        connector_id = None
    elif kind == "user":
        if not user_id:
            raise ValueError("a user token needs the user it belongs to")
        scopes, connector_id = (), None  # the user's role decides, as it is when the token is used
    else:
        scopes = ()
        connector_id = validate_name("connector id", connector_id or f"connector-{secrets.token_hex(3)}")
    token_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:10]
    token_id = token_id.replace("=", "a")
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    token = f"pr{KINDS[kind]}_{token_id}_{secret}"
    created = time.time() if now is None else now
    record = TokenRecord(
        id=token_id,
        tenant=tenant,
        kind=kind,
        secret_hash=hash_secret(token),
        scopes=scopes,
        connector_id=connector_id,
        label=label,
        created_at=created,
        expires_at=created + expires_in if expires_in else None,
        user_id=user_id if kind == "user" else None,
    )
    return token, record


async def authenticate(store: TokenLookup, token: str, *, kind: str, now: float | None = None) -> Principal:
    """Check a bearer token; raises :class:`AuthError` with a reason that does not help an attacker. A user
    token gives a principal without the user's role: :func:`relay.credentials` adds it."""
    record = await token_record(store, token, kind=kind, now=now)
    return Principal(
        tenant=record.tenant,
        kind=record.kind,
        token_id=record.id,
        scopes=record.scopes,
        connector_id=record.connector_id,
        user_id=record.user_id,
    )


def token_kind(token: str) -> str | None:
    """``api``, ``connector`` or ``user`` by the token's prefix; None when it is not a token's shape."""
    match = TOKEN_RE.match(token.strip())
    if match is None:
        return None
    return next(kind for kind, letter in KINDS.items() if letter == match.group(1))


async def token_record(store: TokenLookup, token: str, *, kind: str, now: float | None = None) -> TokenRecord:
    """The live record of a token of ``kind``; :class:`AuthError` when it is not one."""
    match = TOKEN_RE.match(token.strip())
    if match is None or match.group(1) != KINDS.get(kind):
        raise AuthError(f"invalid {kind} token")
    record = await store.get_token(match.group(2))
    # Compare even when the record is missing, so timing says nothing about which ids exist.
    expected = record.secret_hash if record is not None else "0" * 64
    if not hmac.compare_digest(expected, hash_secret(token.strip())) or record is None:
        raise AuthError(f"invalid {kind} token")
    now = time.time() if now is None else now
    if record.revoked_at is not None:
        raise AuthError("token revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise AuthError("token expired")
    return record


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
