"""The console: a tenant admin's pages of the portal (connectors, printers and their QR codes, the queue,
users, tokens). The same rules as the REST API (relay/api): the same store calls, audit entries and limits.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from relay import audit, qr
from relay.auth import API_SCOPES, new_token, validate_name
from relay.jobs import JobState
from relay.portal import web
from relay.portal.handler import MAX_WATCHED, token_fields
from relay.store.base import Conflict, ConnectorRecord
from relay.users import ROLES, hash_password, new_user
from service.http.message import HTTPError, Response

if TYPE_CHECKING:
    from relay.portal.handler import Portal, Route

MAX_CONNECTORS = 500
OPEN_STATES = (JobState.HELD, JobState.QUEUED, JobState.SENDING, JobState.PRINTING)


class Console:
    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.routes: list[tuple[str, re.Pattern[str], Route]] = [
            ("GET", re.compile(r"^/portal/admin/?$"), self.home),
            ("GET", re.compile(r"^/portal/admin/connectors$"), self.connectors),
            ("GET", re.compile(r"^/portal/admin/printers$"), self.printers),
            ("POST", re.compile(r"^/portal/admin/printers/(?P<printer>[^/]+)/pull$"), self.set_pull),
            ("GET", re.compile(r"^/portal/admin/printers/(?P<printer>[^/]+)/qr\.(?P<kind>svg|png)$"),
             self.qr_code),
            ("GET", re.compile(r"^/portal/admin/qr-sheet$"), self.qr_sheet),
            ("GET", re.compile(r"^/portal/admin/queue$"), self.queue),
            ("GET", re.compile(r"^/portal/admin/users$"), self.users),
            ("POST", re.compile(r"^/portal/admin/users$"), self.create_user),
            ("POST", re.compile(r"^/portal/admin/users/(?P<user>[^/]+)/state$"), self.set_user_state),
            ("GET", re.compile(r"^/portal/admin/tokens$"), self.tokens),
            ("POST", re.compile(r"^/portal/admin/tokens$"), self.create_token),
        ]  # fmt: skip

    async def home(self, visit: web.Visit, match: re.Match[str]) -> Response:
        return web.redirect("/portal/admin/queue")

    # --- connectors and printers ----------------------------------------------------------------

    async def connectors(self, visit: web.Visit, match: re.Match[str]) -> Response:
        tenant = visit.signed_in.tenant
        printers = await self.portal.store.list_printers(tenant)
        tokens = await self.portal.store.list_tokens(tenant)
        # A connector is known by its token (it may never have connected) or by the printers it serves.
        by_token = {t.connector_id for t in tokens if t.kind == "connector" and t.revoked_at is None}
        ids = sorted({c for c in by_token if c} | {p.connector_id for p in printers})[:MAX_CONNECTORS]
        found: list[tuple[ConnectorRecord, int]] = []
        for connector_id in ids:
            record = await self.portal.store.get_connector(tenant, connector_id)
            record = record or ConnectorRecord(tenant=tenant, id=connector_id)
            found.append((record, sum(1 for p in printers if p.connector_id == connector_id)))
        return self.portal.page(visit, "admin_connectors.html", connectors=found)

    async def printers(self, visit: web.Visit, match: re.Match[str]) -> Response:
        printers = await self.portal.store.list_printers(visit.signed_in.tenant)
        return self.portal.page(visit, "admin_printers.html", printers=printers)

    async def set_pull(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        tenant, printer_id = visit.signed_in.tenant, match["printer"]
        pull = form.get("pull") == "on"
        if not await self.portal.store.set_printer_pull(tenant, printer_id, pull):
            raise HTTPError(404, f"printer {printer_id[:64]} not found")
        audit.record("printer.changed", tenant=tenant, actor=audit.actor(visit.principal),
                     target=f"printer:{printer_id}", pull=pull)  # fmt: skip
        return web.redirect("/portal/admin/printers?m=printer-changed")

    def _release_url(self, visit: web.Visit, printer_id: str) -> str:
        return qr.release_url(
            qr.base_url(self.portal.public_url, visit.request, tls=self.portal.tls), printer_id
        )

    async def qr_code(self, visit: web.Visit, match: re.Match[str]) -> Response:
        printer = await self.portal.store.get_printer(visit.signed_in.tenant, match["printer"])
        if printer is None:
            raise HTTPError(404, f"printer {match['printer'][:64]} not found")
        body, content_type = qr.image(
            self._release_url(visit, printer.id), match["kind"], qr.scale_param(visit.request)
        )
        disposition = f'inline; filename="release-{printer.id}.{match["kind"]}"'
        return Response(200, [("content-type", content_type), ("content-disposition", disposition),
                              ("cache-control", "no-store"), *web.SECURITY_HEADERS], body)  # fmt: skip

    async def qr_sheet(self, visit: web.Visit, match: re.Match[str]) -> Response:
        """A page to print and cut: one code per pull printer, to stick on the printer."""
        printers = [p for p in await self.portal.store.list_printers(visit.signed_in.tenant) if p.pull]
        codes = [(p, url, qr.inline_svg(url)) for p in printers for url in [self._release_url(visit, p.id)]]
        return self.portal.page(visit, "qr_sheet.html", codes=codes)

    # --- the queue --------------------------------------------------------------------------------

    async def queue(self, visit: web.Visit, match: re.Match[str]) -> Response:
        tenant = visit.signed_in.tenant
        jobs = []
        for state in OPEN_STATES:
            jobs += await self.portal.store.list_jobs(tenant, state=state, limit=MAX_WATCHED)
        jobs.sort(key=lambda job: job.created_at)
        return self.portal.page(visit, "admin_queue.html", jobs=jobs, back="/portal/admin/queue")

    # --- users ------------------------------------------------------------------------------------

    async def users(
        self, visit: web.Visit, match: re.Match[str], *, error: str = "", status: int = 200
    ) -> Response:
        users = await self.portal.store.list_users(visit.signed_in.tenant)
        return self.portal.page(visit, "admin_users.html", status, users=users, roles=ROLES, error=error)

    async def create_user(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        tenant = visit.signed_in.tenant
        password = form.get("password", "")
        try:
            user = new_user(tenant, form.get("email", "")[:320], name=form.get("name", ""),
                            role=form.get("role", "user"), now=time.time())  # fmt: skip
            if password:
                user.password_hash = await hash_password(password)
        except ValueError as exc:
            return await self.users(visit, match, error=str(exc), status=400)
        try:
            await self.portal.store.add_user(user)
        except Conflict:
            return await self.users(
                visit, match, error=f"a user with the email {user.email} exists", status=409
            )
        audit.record("user.created", tenant=tenant, actor=audit.actor(visit.principal),
                     target=f"user:{user.id}", email=user.email, role=user.role)  # fmt: skip
        return web.redirect("/portal/admin/users?m=user-created")

    async def set_user_state(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        admin = visit.signed_in
        user = await self.portal.store.get_user(match["user"][:64])
        if user is None or user.tenant != admin.tenant:
            raise HTTPError(404, f"user {match['user'][:64]} not found")
        state = form.get("state", "")
        if state not in ("active", "disabled"):
            raise HTTPError(400, f"state must be active or disabled, not {state[:20]!r}")
        if user.id == admin.id and state == "disabled":
            raise HTTPError(409, "you cannot disable yourself (ask another admin)")
        now = time.time()
        user.state, user.disabled_at = state, (now if state == "disabled" else None)
        await self.portal.store.update_user(user)
        if state == "disabled":
            await self.portal.store.revoke_web_sessions(user_id=user.id, at=now)  # signed out everywhere
        audit.record("user.changed", tenant=admin.tenant, actor=audit.actor(visit.principal),
                     target=f"user:{user.id}", changed="state", role=user.role, state=state)  # fmt: skip
        return web.redirect("/portal/admin/users?m=user-changed")

    # --- tokens -----------------------------------------------------------------------------------

    async def tokens(self, visit: web.Visit, match: re.Match[str], *, new_secret: str = "") -> Response:
        tenant = visit.signed_in.tenant
        tokens = await self.portal.store.list_tokens(tenant)
        emails = {u.id: u.email for u in await self.portal.store.list_users(tenant)}
        return self.portal.page(
            visit, "admin_tokens.html", tokens=tokens, emails=emails, new_secret=new_secret, now=time.time(),
            scopes=API_SCOPES, lifetimes=["30d", "90d", "365d", "never"],
        )  # fmt: skip

    async def create_token(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        tenant = visit.signed_in.tenant
        label, lifetime = token_fields(form)
        kind = form.get("kind", "api")
        if kind not in ("api", "connector"):
            raise HTTPError(400, f"kind must be api or connector, not {kind[:20]!r}")
        scopes = tuple(s for s in API_SCOPES if form.get(f"scope-{s}") == "on")
        connector_id = form.get("connector_id", "").strip() or None
        try:
            if kind == "connector" and connector_id:
                validate_name("connector id", connector_id)
            secret, record = new_token(tenant, kind, scopes=scopes, connector_id=connector_id, label=label,
                                       expires_in=lifetime)  # fmt: skip
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        await self.portal.store.add_token(record)
        audit.record(
            "token.created", tenant=tenant, actor=audit.actor(visit.principal), target=f"token:{record.id}",
            kind=kind, scopes=",".join(record.scopes) or None, connector_id=record.connector_id,
            label=label or None, expires_at=record.expires_at,
        )  # fmt: skip
        # The secret is shown on this page only; the relay keeps its hash.
        return await self.tokens(visit, match, new_secret=secret)
