"""The REST API's people: who am I, my own tokens (print clients keep one instead of my password), and a
tenant admin's users. Another tenant's user, or a token that is not mine, answers 404 like one that does not
exist."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any, Protocol

from relay import audit
from relay.auth import Principal, new_token
from relay.store.base import Conflict, TokenRecord, TokenStore, UserRecord, UserStore, WebStore
from relay.users import ROLES, hash_password, new_user
from service import bounded_json
from service.http.message import HTTPError, Request, Response
from service.settings import parse_duration

MAX_BODY = 16 * 1024
MAX_LABEL = 200
MAX_TOKEN_LIFETIME = 365 * 86400.0

PEOPLE_ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
    ("GET", re.compile(r"^/v1/me$"), "", "me"),
    ("GET", re.compile(r"^/v1/me/tokens$"), "", "list_my_tokens"),
    ("POST", re.compile(r"^/v1/me/tokens$"), "", "create_my_token"),
    ("DELETE", re.compile(r"^/v1/me/tokens/(?P<token>[^/]+)$"), "", "revoke_my_token"),
    ("GET", re.compile(r"^/v1/users$"), "admin", "list_users"),
    ("POST", re.compile(r"^/v1/users$"), "admin", "create_user"),
    ("GET", re.compile(r"^/v1/users/(?P<user>[^/]+)$"), "admin", "get_user"),
    ("POST", re.compile(r"^/v1/users/(?P<user>[^/]+)$"), "admin", "change_user"),
)


class PeopleStore(UserStore, TokenStore, WebStore, Protocol):
    pass


def token_view(record: TokenRecord) -> dict[str, Any]:
    """A token as its owner sees it listed: never its secret."""
    return {
        "id": record.id,
        "label": record.label,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
    }


async def _json_body(request: Request, limit_name: str = "max_user_body") -> Mapping[str, Any]:
    body = await request.body.read(MAX_BODY, limit_name=limit_name)
    if not body.strip():
        return {}
    try:
        data = bounded_json.loads(body)
    except ValueError as exc:
        raise HTTPError(400, f"the body must be a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return data


def _text(data: Mapping[str, Any], name: str, default: str = "") -> str:
    value = data.get(name, default)
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string")
    return value


def _only(data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise HTTPError(400, f"unknown field {unknown[0]!r}; the fields are {', '.join(known)}")


def token_terms(data: Mapping[str, Any]) -> tuple[str, float | None]:
    """A new token's ``label`` and lifetime (``expires_in``, e.g. ``90d``; None: no expiry) from a body."""
    label = _text(data, "label")
    if len(label) > MAX_LABEL:
        raise HTTPError(400, f"label is longer than {MAX_LABEL} characters")
    expires_in = None
    if "expires_in" in data:
        try:
            expires_in = parse_duration(_text(data, "expires_in"))
        except ValueError as exc:
            raise HTTPError(400, f"expires_in: {exc}") from None
        if not 0 < expires_in <= MAX_TOKEN_LIFETIME:
            raise HTTPError(400, "expires_in must be between 1 s and 365 days")
    return label, expires_in


class PeopleApi:
    def __init__(self, store: PeopleStore) -> None:
        self._store = store

    # --- me -------------------------------------------------------------------------------------

    async def me(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        found: dict[str, Any] = {
            "tenant": principal.tenant,
            "kind": principal.kind,
            "scopes": list(principal.scopes),
        }
        if principal.user_id:
            user = await self._store.get_user(principal.user_id)
            if user is not None:
                found["user"] = user.public()
        else:
            found["token_id"] = principal.token_id
        return Response.json(found)

    def _person(self, principal: Principal) -> str:
        if not principal.user_id:
            raise HTTPError(403, "only a user has tokens of their own (an API token is not a person)")
        return principal.user_id

    async def list_my_tokens(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        user_id = self._person(principal)
        tokens = await self._store.list_tokens(principal.tenant, user_id=user_id)
        return Response.json({"tokens": [token_view(t) for t in tokens]})

    async def create_my_token(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        user_id = self._person(principal)
        data = await _json_body(request)
        _only(data, ("label", "expires_in"))
        label, expires_in = token_terms(data)
        secret, record = new_token(
            principal.tenant, "user", user_id=user_id, label=label, expires_in=expires_in
        )
        await self._store.add_token(record)
        audit.record(
            "token.created", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"token:{record.id}", kind="user", label=label or None, expires_at=record.expires_at,
        )  # fmt: skip
        # The secret is shown this once; the relay keeps only its hash.
        return Response.json({"token": secret, **token_view(record)}, 201)

    async def revoke_my_token(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        user_id = self._person(principal)
        record = await self._store.get_token(match["token"])
        if record is None or record.user_id != user_id or record.tenant != principal.tenant:
            raise HTTPError(404, f"token {match['token']} not found")
        if record.revoked_at is None:
            await self._store.revoke_token(record.id, time.time())
            audit.record(
                "token.revoked",
                tenant=principal.tenant,
                actor=audit.actor(principal),
                target=f"token:{record.id}",
            )
        return Response(204, [], b"")

    # --- a tenant admin's users ------------------------------------------------------------------

    async def list_users(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        users = await self._store.list_users(principal.tenant)
        return Response.json({"users": [u.public() for u in users]})

    async def create_user(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        data = await _json_body(request)
        _only(data, ("email", "name", "role", "password"))
        password = _text(data, "password")
        try:
            user = new_user(
                principal.tenant,
                _text(data, "email"),
                name=_text(data, "name"),
                role=_text(data, "role", "user"),
            )
            if password:
                user.password_hash = await hash_password(password)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        try:
            await self._store.add_user(user)
        except Conflict:
            raise HTTPError(409, f"a user with the email {user.email} exists") from None
        audit.record(
            "user.created", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"user:{user.id}", email=user.email, role=user.role,
        )  # fmt: skip
        return Response.json(user.public(), 201, [("location", f"/v1/users/{user.id}")])

    async def _user(self, principal: Principal, user_id: str) -> UserRecord:
        user = await self._store.get_user(user_id)
        if user is None or user.tenant != principal.tenant:
            raise HTTPError(404, f"user {user_id} not found")
        return user

    async def get_user(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        return Response.json((await self._user(principal, match["user"])).public())

    async def change_user(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Change a user's name, role, state (``active`` or ``disabled``: at once, on every replica) or
        password."""
        user = await self._user(principal, match["user"])
        data = await _json_body(request)
        _only(data, ("name", "role", "state", "password"))
        changed: list[str] = []
        if "name" in data:
            user.name = _text(data, "name").strip()
            changed.append("name")
        if "role" in data:
            role = _text(data, "role")
            if role not in ROLES:
                raise HTTPError(400, f"role must be one of {', '.join(ROLES)}, not {role!r}")
            if user.id == principal.user_id and role != "admin":
                raise HTTPError(409, "a tenant admin cannot take their own admin role (ask another admin)")
            user.role = role
            changed.append("role")
        if "state" in data:
            state = _text(data, "state")
            if state not in ("active", "disabled"):
                raise HTTPError(400, f"state must be active or disabled, not {state!r}")
            if user.id == principal.user_id and state == "disabled":
                raise HTTPError(409, "a user cannot disable themselves")
            user.state = state
            user.disabled_at = time.time() if state == "disabled" else None
            changed.append("state")
        if "password" in data:
            try:
                user.password_hash = await hash_password(_text(data, "password"))
            except ValueError as exc:
                raise HTTPError(400, str(exc)) from None
            changed.append("password")
        if changed:
            await self._store.update_user(user)
            if "state" in changed and user.state == "disabled":
                # Their portal sessions end now, not at their next request (tokens and passwords are
                # refused by the user's state already).
                await self._store.revoke_web_sessions(user_id=user.id, at=time.time())
            audit.record(
                "user.changed", tenant=principal.tenant, actor=audit.actor(principal),
                target=f"user:{user.id}", changed=",".join(changed), role=user.role, state=user.state,
            )  # fmt: skip
        return Response.json(user.public())
