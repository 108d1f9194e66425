"""Who a request is, from its ``Authorization`` header: one place for the REST API and the IPP endpoint.

* ``Bearer <api token>``: an application, with the token's scopes, on all of its tenant's jobs.
* ``Bearer <user token>``, or HTTP Basic ``email:<user token>``: a person, through one of their own tokens
  (what print clients keep instead of the password).
* HTTP Basic ``email:password``: a person (relay/users.py verifies and rate-limits it).
* HTTP Basic ``tenant:<api token>``: an application through an IPP client that only knows Basic.

A person's principal carries their role, read when the request comes (not when the token was made): a user
acts on their own jobs, a tenant admin on all of the tenant's. A disabled user is refused at once, whichever
way they authenticate.
"""

from __future__ import annotations

import base64
import binascii

from relay.auth import USER_SCOPES, AuthError, Principal, TokenLookup, authenticate, token_kind, token_record
from relay.store.base import UserRecord
from relay.users import People, SignInError, TooManyFailures
from service.http.message import HTTPError, Request

MAX_CREDENTIALS = 2048  # bytes of an Authorization header's credentials


class Credentials:
    def __init__(self, tokens: TokenLookup, people: People) -> None:
        self._tokens = tokens
        self._people = people

    async def of_request(
        self, request: Request, challenge: list[tuple[str, str]], authorization: str | None = None
    ) -> Principal:
        """The request's principal, from ``authorization`` (default: its header); 401 with ``challenge``,
        or 429 with Retry-After after too many failed sign-ins."""
        header = request.headers.get("authorization") if authorization is None else authorization
        try:
            return await self.principal(header, request.client[0] if request.client else "")
        except TooManyFailures as exc:
            raise HTTPError(429, str(exc), [("retry-after", str(exc.retry_after))]) from None
        except AuthError as exc:
            raise HTTPError(401, str(exc), challenge) from None

    async def principal(self, authorization: str | None, client: str) -> Principal:
        """The principal these credentials prove; :class:`AuthError` (or :class:`TooManyFailures`, a 429)."""
        if not authorization:
            raise AuthError("credentials required: a Bearer token, or HTTP Basic (email and password)")
        if len(authorization) > MAX_CREDENTIALS:
            raise AuthError(f"credentials longer than {MAX_CREDENTIALS} bytes")
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            return await self._token(value.strip())
        if scheme.lower() != "basic":
            raise AuthError(f"unsupported authentication scheme {scheme[:20]!r}")
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed Basic credentials") from None
        name, colon, secret = decoded.partition(":")
        if not colon:
            raise AuthError("malformed Basic credentials")
        if "@" not in name:  # tenant:api-token
            principal = await authenticate(self._tokens, secret, kind="api")
            if name != principal.tenant:
                # Same answer as a bad token: which tenant a token belongs to is not ours to tell.
                raise AuthError("invalid api token")
            return principal
        if token_kind(secret) == "user":
            principal = await self._token(secret)
            if principal.email != name.strip().lower():
                raise AuthError("invalid user token")
            return principal
        try:
            user = await self._people.sign_in(name, secret, client)
        except TooManyFailures:
            raise
        except SignInError as exc:
            raise AuthError(str(exc)) from None
        return person(user, token_id="")

    async def _token(self, token: str) -> Principal:
        kind = token_kind(token)
        if kind != "user":
            return await authenticate(self._tokens, token, kind="api")
        record = await token_record(self._tokens, token, kind="user")
        user = await self._people.user(record.user_id or "")
        if user is None or user.tenant != record.tenant:
            raise AuthError("invalid user token")
        if user.state != "active":
            raise AuthError("this user is disabled")
        return person(user, token_id=record.id)


def person(user: UserRecord, *, token_id: str) -> Principal:
    return Principal(
        tenant=user.tenant,
        kind="user",
        token_id=token_id,
        scopes=USER_SCOPES[user.role],
        user_id=user.id,
        email=user.email,
    )
