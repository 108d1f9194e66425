"""People: users of a tenant, their passwords, and proving to be one of them.

Passwords are hashed with argon2id (RFC 9106's second recommended parameters, argon2-cffi's defaults: 64 MiB,
3 passes), about 0.2 s of one core: worth it for a person's password, far too much to pay on every request
of a print client that sends HTTP Basic with each one. So a password that was right is remembered for a
minute, as a SHA-256 of the password under a per-process random key, and a user's change (disabled,
password changed) anywhere forgets it at once. Failed sign-ins are counted per account and per client
address; too many in a window are refused before any hashing (429), which also bounds the CPU an attacker
can make the relay spend.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import argon2
import trio

from relay.auth import validate_name
from relay.store.base import Notice, UserRecord, UserStore

ROLES = ("user", "admin")
EMAIL_RE = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9.-]{1,189}\.[A-Za-z0-9-]{2,63}$")
MIN_PASSWORD, MAX_PASSWORD = 10, 1024
MAX_NAME = 200

REMEMBER_FOR = 60.0  # seconds a right password is not hashed again
FAILURE_WINDOW = 900.0  # failed sign-ins are counted over this long...
MAX_FAILURES_PER_ACCOUNT = 10  # ...and this many lock the account's password sign-in for the window
MAX_FAILURES_PER_CLIENT = 50  # ...or this many from one address, whatever accounts they name
HASHING_AT_ONCE = 2  # argon2 takes 64 MiB each: bound the memory and the cores they take

_hasher = argon2.PasswordHasher()


@functools.cache
def _nobody() -> str:
    """A hash nobody's password matches, verified when the email is unknown, so that the time taken does not
    say which emails exist. Made by the first :class:`People`, not at import: the CLI imports this module."""
    return _hasher.hash(secrets.token_urlsafe(32))


class SignInError(Exception):
    """The credentials are wrong, or the account cannot sign in; the message is safe to show."""


class TooManyFailures(SignInError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def normal_email(email: str) -> str:
    """The email as stored: trimmed, lower case; a clear error when it is not one."""
    email = email.strip().lower()
    if len(email) > 254 or not EMAIL_RE.match(email):
        raise ValueError(f"not an email address: {email[:80]!r}")
    return email


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ValueError(f"a password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")


async def hash_password(password: str) -> str:
    check_password_rules(password)
    return await trio.to_thread.run_sync(_hasher.hash, password)


def new_user(
    tenant: str,
    email: str,
    *,
    name: str = "",
    role: str = "user",
    password_hash: str = "",
    now: float | None = None,
) -> UserRecord:
    """A user record to store, its fields checked."""
    validate_name("tenant", tenant)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise ValueError(f"a name has at most {MAX_NAME} printable characters")
    return UserRecord(
        id=f"usr_{secrets.token_hex(8)}",
        tenant=tenant,
        email=normal_email(email),
        name=name.strip(),
        role=role,
        password_hash=password_hash,
        created_at=time.time() if now is None else now,
    )


@dataclass
class _Failures:
    count: int = 0
    since: float = 0.0


class FailureCounter:
    """Failed sign-ins per key (an account, an address) within a window; bounded in memory."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, _Failures] = {}

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again (0: it may)."""
        found = self._failures.get(key)
        if found is None or now - found.since >= self.window:
            return 0.0
        return found.since + self.window - now if found.count >= self.limit else 0.0

    def failed(self, key: str, now: float) -> None:
        found = self._failures.get(key)
        if found is None or now - found.since >= self.window:
            if len(self._failures) >= self.max_keys:
                del self._failures[next(iter(self._failures))]  # the oldest
            self._failures.pop(key, None)
            found = self._failures[key] = _Failures(0, now)
        found.count += 1

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


class People:
    """Users as authentication sees them: looked up through the store (a short cache on PostgreSQL, where
    every replica hears of a change as a ``users`` notice), passwords verified with the limits above."""

    def __init__(self, store: UserStore, *, cache_ttl: float = 0.0) -> None:
        self._store = store
        self._ttl = cache_ttl  # 0: read the store every time (SQLite: the CLI's changes show at once)
        self._users: dict[str, tuple[UserRecord, float]] = {}
        self._remembered: dict[bytes, tuple[str, float]] = {}  # keyed password -> (user id, until)
        self._key = secrets.token_bytes(32)
        self._per_account = FailureCounter(MAX_FAILURES_PER_ACCOUNT, FAILURE_WINDOW)
        self._per_client = FailureCounter(MAX_FAILURES_PER_CLIENT, FAILURE_WINDOW)
        self._hashing = trio.CapacityLimiter(HASHING_AT_ONCE)
        self.failures = 0  # counted for /metrics
        # Made now, before any sign-in: one that had to make it would be slower, saying its email is unknown.
        _nobody()

    async def user(self, user_id: str) -> UserRecord | None:
        now = time.monotonic()
        found = self._users.get(user_id)
        if found is not None and found[1] > now:
            return found[0]
        user = await self._store.get_user(user_id)
        if user is not None and self._ttl > 0:
            if len(self._users) >= 10_000:
                self._users.clear()
            self._users[user_id] = (user, now + self._ttl)
        return user

    def heard(self, notice: Notice) -> None:
        if notice.kind == "users" and notice.key:
            self._users.pop(notice.key, None)
            self._remembered = {k: v for k, v in self._remembered.items() if v[0] != notice.key}
        elif notice.kind in ("users", "tokens", "resync"):  # SQLite: another process wrote; look again
            self._users.clear()
            self._remembered.clear()

    async def sign_in(self, email: str, password: str, client: str) -> UserRecord:
        """The active user whose email and password these are; :class:`SignInError` otherwise."""
        now = time.time()
        email = email.strip().lower()
        wait = max(self._per_account.blocked_for(email, now), self._per_client.blocked_for(client, now))
        if wait:
            raise TooManyFailures(
                f"too many failed sign-ins: try again in {int(wait) + 1} s "
                f"(at most {MAX_FAILURES_PER_ACCOUNT} per account in {int(FAILURE_WINDOW // 60)} minutes)",
                int(wait) + 1,
            )
        keyed = hmac.new(self._key, f"{email}\0{password}".encode(), hashlib.sha256).digest()
        remembered = self._remembered.get(keyed)
        if remembered is not None and remembered[1] > time.monotonic():
            user = await self.user(remembered[0])
            if user is not None and user.state == "active":
                return user
        found = await self._store.find_user(email) if len(email) <= 254 else None
        stored = found.password_hash if found is not None and found.password_hash else _nobody()
        async with self._hashing:
            right = await trio.to_thread.run_sync(_verify, stored, password[:MAX_PASSWORD])
        if not right or found is None:
            self.failures += 1
            self._per_account.failed(email, now)
            self._per_client.failed(client, now)
            raise SignInError("wrong email or password")
        if found.state != "active":
            raise SignInError("this user is disabled")
        self._per_account.succeeded(email)
        if len(self._remembered) >= 10_000:
            self._remembered.clear()
        self._remembered[keyed] = (found.id, time.monotonic() + REMEMBER_FOR)
        return found


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (argon2.exceptions.VerifyMismatchError, argon2.exceptions.InvalidHashError):
        return False
