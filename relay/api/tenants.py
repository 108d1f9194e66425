"""The integrator API: a tenant's child tenants, their tokens and their usage (PrintNode's child accounts).

A tenant's ``admin`` creates children, each an ordinary tenant of its own (``t_`` + a random id, never a
chosen name, so no child can take the name of an existing tenant), and gives each API and connector tokens:
a child token sees only its own tenant's printers and jobs, as every token does. The parent manages its
own children only: the id of any other tenant (itself, its parent, a sibling, another's child) answers 404
exactly like an id that does not exist. Nesting is one level: a child cannot create children, so what a
tenant governs is one lookup, and an integrator's customers are not integrators. A tenant with no record
(tokens made by ``printrelay token create``) is a top-level tenant.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Protocol

from relay import audit
from relay.api.people import _json_body, _only, _text, token_terms, token_view
from relay.api.query import int_param, one, time_param
from relay.auth import API_SCOPES, Principal, new_token
from relay.jobs import JobState, _iso
from relay.store.base import TenantRecord, TenantStore, TokenRecord, TokenStore
from service.http.message import HTTPError, Request, Response

MAX_NAME = 200
MAX_PAGE = 500
# tokens of one child that are not revoked: a child's token listing is one page, and a runaway script of an
# integrator stops here rather than filling the table
MAX_CHILD_TOKENS = 100
CHILD_KINDS = ("api", "connector")  # what an integrator's customer runs: applications and connectors

TENANT = r"(?P<tenant>[^/]+)"
TENANT_ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
    ("GET", re.compile(r"^/v1/tenants$"), "admin", "list_tenants"),
    ("POST", re.compile(r"^/v1/tenants$"), "admin", "create_tenant"),
    ("GET", re.compile(rf"^/v1/tenants/{TENANT}$"), "admin", "get_tenant"),
    ("GET", re.compile(rf"^/v1/tenants/{TENANT}/tokens$"), "admin", "list_tokens"),
    ("POST", re.compile(rf"^/v1/tenants/{TENANT}/tokens$"), "admin", "create_token"),
    ("DELETE", re.compile(rf"^/v1/tenants/{TENANT}/tokens/(?P<token>[^/]+)$"), "admin", "revoke_token"),
    ("GET", re.compile(rf"^/v1/tenants/{TENANT}/usage$"), "admin", "usage"),
)


class TenantsStore(TenantStore, TokenStore, Protocol):
    pass


def new_child(parent: str, name: str, now: float | None = None) -> TenantRecord:
    """A child tenant of ``parent`` named ``name`` (free text, shown to its parent only)."""
    name = name.strip()
    if not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise ValueError(f"name must be 1 to {MAX_NAME} printable characters")
    return TenantRecord(
        id=f"t_{secrets.token_hex(10)}",
        parent=parent,
        name=name,
        created_at=time.time() if now is None else now,
    )


def child_token_view(record: TokenRecord) -> dict[str, Any]:
    """A child's token as its parent sees it listed: never its secret."""
    return {
        **token_view(record),
        "kind": record.kind,
        "scopes": list(record.scopes),
        "connector_id": record.connector_id,
    }


class TenantsApi:
    def __init__(self, store: TenantsStore, *, max_children: int) -> None:
        self._store = store
        self._max_children = max_children

    async def _child(self, principal: Principal, tenant_id: str) -> TenantRecord:
        tenant = await self._store.get_tenant(tenant_id)
        if tenant is None or tenant.parent != principal.tenant:
            raise HTTPError(404, f"tenant {tenant_id} not found")
        return tenant

    async def list_tenants(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        limit = int_param(request, "limit", 100, 1, MAX_PAGE)
        # One more than asked tells whether a next page exists; its cursor is the last child shown.
        found = await self._store.list_tenants(principal.tenant, after=one(request, "after"), limit=limit + 1)
        page, more = found[:limit], len(found) > limit
        return Response.json({"tenants": [t.public() for t in page], "next": page[-1].id if more else None})

    async def create_tenant(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        data = await _json_body(request, "max_admin_body")
        _only(data, ("name",))
        if await self._store.get_tenant(principal.tenant) is not None:
            raise HTTPError(
                403, f"tenant {principal.tenant} is a child tenant: only a top-level tenant has children"
            )
        try:
            child = new_child(principal.tenant, _text(data, "name"))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        if not await self._store.add_tenant(child, self._max_children):
            raise HTTPError(
                409,
                f"tenant {principal.tenant} has {self._max_children} child tenants already "
                f"(max_child_tenants={self._max_children})",
            )
        audit.record(
            "tenant.created", tenant=principal.tenant, actor=audit.actor(principal),
            target=f"tenant:{child.id}", name=child.name,
        )  # fmt: skip
        return Response.json(child.public(), 201, [("location", f"/v1/tenants/{child.id}")])

    async def get_tenant(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        return Response.json((await self._child(principal, match["tenant"])).public())

    async def list_tokens(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        child = await self._child(principal, match["tenant"])
        tokens = await self._store.list_tokens(child.id)
        return Response.json({"tokens": [child_token_view(t) for t in tokens]})

    async def create_token(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """An API token (``scopes``) or a connector token (``connector_id``) of the child; the secret is in
        this answer only."""
        child = await self._child(principal, match["tenant"])
        data = await _json_body(request, "max_admin_body")
        _only(data, ("kind", "scopes", "connector_id", "label", "expires_in"))
        kind = _text(data, "kind", "api")
        if kind not in CHILD_KINDS:
            raise HTTPError(400, f"kind must be {' or '.join(CHILD_KINDS)}, not {kind[:40]!r}")
        scopes = data.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise HTTPError(400, f"scopes must be a list of scopes: {', '.join(API_SCOPES)}")
        if kind != "api" and scopes:
            raise HTTPError(400, "scopes are for API tokens; a connector token serves its printers only")
        if kind != "connector" and "connector_id" in data:
            raise HTTPError(400, "connector_id is for connector tokens")
        connector_id = _text(data, "connector_id") or None
        label, expires_in = token_terms(data)
        try:
            secret, record = new_token(
                child.id, kind, scopes=tuple(dict.fromkeys(scopes)), connector_id=connector_id, label=label,
                expires_in=expires_in,
            )  # fmt: skip
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        active = [t for t in await self._store.list_tokens(child.id) if t.revoked_at is None]
        if len(active) >= MAX_CHILD_TOKENS:
            raise HTTPError(
                409, f"tenant {child.id} has {len(active)} tokens that are not revoked, the most a child may "
                f"have ({MAX_CHILD_TOKENS}); revoke one first",
            )  # fmt: skip
        await self._store.add_token(record)
        audit.record(
            "token.created", tenant=child.id, actor=audit.actor(principal), target=f"token:{record.id}",
            kind=kind, scopes=",".join(record.scopes) or None, connector_id=record.connector_id,
            label=label or None, expires_at=record.expires_at, parent=principal.tenant,
        )  # fmt: skip
        # The secret is shown this once; the relay keeps only its hash.
        return Response.json({"token": secret, "tenant": child.id, **child_token_view(record)}, 201)

    async def revoke_token(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Revoke a token of the child: refused from the next request on, on every replica; a connector's
        session closes."""
        child = await self._child(principal, match["tenant"])
        record = await self._store.get_token(match["token"])
        if record is None or record.tenant != child.id:
            raise HTTPError(404, f"token {match['token']} not found")
        if record.revoked_at is None:
            await self._store.revoke_token(record.id, time.time())
            audit.record(
                "token.revoked", tenant=child.id, actor=audit.actor(principal), target=f"token:{record.id}",
                parent=principal.tenant,
            )  # fmt: skip
        return Response(204, [], b"")

    async def usage(self, request: Request, principal: Principal, match: re.Match[str]) -> Response:
        """Jobs the child submitted in [since, until) and their documents' bytes, in all and by state."""
        child = await self._child(principal, match["tenant"])
        since, until = time_param(request, "since"), time_param(request, "until")
        if since is not None and until is not None and until < since:
            raise HTTPError(400, "until must not be before since")
        totals = await self._store.tenant_job_totals(child.id, since=since, until=until)
        by_state = {}
        for state in JobState:
            jobs, size = totals.get(state.value, (0, 0))
            by_state[state.value] = {"jobs": jobs, "bytes": size}
        return Response.json(
            {
                "tenant": child.id,
                "since": _iso(since),
                "until": _iso(until),
                "jobs": sum(jobs for jobs, _ in totals.values()),
                "bytes": sum(size for _, size in totals.values()),
                "by_state": by_state,
            }
        )
