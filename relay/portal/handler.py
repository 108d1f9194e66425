"""The portal: the relay's web pages for people, under ``/portal``, and the release page a pull printer's QR
code opens, ``/release/{printer}``.

Server-rendered (Jinja2, autoescaped); the only script is ``static/portal.js``, which follows job states
live (Server-Sent Events). A sign-in is a ``WebSession`` in the store: the cookie carries a random secret
(HttpOnly, SameSite=Lax, Secure with the ``__Host-`` prefix behind TLS), the store its SHA-256, so every
replica knows it and a copy of the database opens none. Each request reads the session and the user: an
expired, revoked or disabled one is back at the sign-in page at once. Every form carries a CSRF token
derived from the secret of the cookie it goes with (403 without it). Tenant admins also get the console
(relay/portal/admin.py).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import trio

from relay import audit, qr
from relay.auth import new_token, validate_name
from relay.capabilities import OptionRefused, validate_option
from relay.jobs import Job, JobState
from relay.lifecycle import JobLifecycle
from relay.portal import web
from relay.portal.multipart import MultipartReader, boundary_of
from relay.portal.oidc import OidcClient, OidcError, open_client_secret
from relay.secretbox import SecretBox, SecretBoxError
from relay.store.base import Conflict, Notice, OidcProvider, Store, UserRecord, WebSession
from relay.submit import FORMAT_RE, MAX_COPIES, MAX_TITLE, Intake, Submission, SubmitError
from relay.users import People, SignInError, TooManyFailures, new_user, normal_email
from service.http.message import HTTPError, Request, Response, format_bytes

log = logging.getLogger("printrelay.portal")

HERE = Path(__file__).parent
STATIC_TYPES = {"portal.css": "text/css; charset=utf-8", "portal.js": "text/javascript; charset=utf-8"}
# Fixed notes a redirect may ask a page to show (``?m=``): nothing a link can make the portal say.
MESSAGES = {
    "printed": "Your document is on its way to the printer.",
    "held": "Your document waits at the printer: scan the code on the printer to release it there.",
    "released": "Released: your document is on its way to the printer.",
    "canceled": "The job is canceled.",
    "signed-out": "You are signed out.",
    "expired": "Your session ended. Sign in again to go on where you were.",
    "disabled": "This account is disabled. Ask your administrator.",
    "token-revoked": "The token is revoked: it no longer works anywhere.",
    "user-created": "The user is created.",
    "user-changed": "The user is changed.",
    "printer-changed": "The printer is changed.",
}
DISABLED = "this user is disabled"  # relay/users.py's SignInError for a disabled account
JOBS_SHOWN = 50
MAX_WATCHED = 100  # jobs one page follows live
WATCH_QUEUE = 64  # changes a page's stream may lag behind before it is told to reconnect
SSE_KEEPALIVE = 15.0
TOUCH_EVERY = 60.0  # seconds between writes of a session's last_seen_at
OIDC_FLOW_TTL = 600  # seconds to finish signing in at the provider
MAX_FIELD = 1024  # bytes of a field of the print form
PRINT_FIELDS = ("csrf", "printer", "copies", "title", "hold", "sides")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOKEN_LIFETIMES = {"30d": 30 * 86400.0, "90d": 90 * 86400.0, "365d": 365 * 86400.0, "never": None}
MAX_LABEL = 200

Route = Callable[[web.Visit, re.Match[str]], Awaitable[Response]]


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at)) if at else "—"


def _size(n: int) -> str:
    return format_bytes(n)


class Portal:
    def __init__(
        self,
        store: Store,
        people: People,
        jobs: JobLifecycle,
        intake: Intake,
        secrets_at_rest: SecretBox,
        *,
        public_url: str = "",
        tls: bool = False,
        session_ttl: float = 12 * 3600.0,
        max_upload: int = 100 * 1024**2,
        oidc: OidcClient | None = None,
    ) -> None:
        from relay.portal.admin import Console

        self.store = store
        self.people = people
        self.jobs = jobs
        self.intake = intake
        self.secrets = secrets_at_rest
        self.public_url = public_url
        self.tls = tls
        self.session_ttl = session_ttl
        self.max_upload = min(max_upload, intake.limits.max_job_bytes)
        self.oidc = oidc or OidcClient()
        self.cookies = web.CookieNames(secure=tls or public_url.startswith("https://"))
        self.now: Callable[[], float] = time.time  # sessions expire by this clock
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._env.filters["when"] = _when
        self._env.filters["size"] = _size
        # The live streams of the pages open now: by the job they follow, and by whose they are.
        self._watchers: dict[str, set[trio.MemorySendChannel[dict[str, str]]]] = defaultdict(set)
        self._streams: dict[str, set[trio.MemorySendChannel[dict[str, str]]]] = defaultdict(set)
        console = Console(self)
        # (method, path, who may: "static" | "anyone" | "user" | "admin", handler)
        self.routes: list[tuple[str, re.Pattern[str], str, Route]] = [
            ("GET", re.compile(r"^/portal/?$"), "anyone", self.home),
            ("GET", re.compile(r"^/portal/static/(?P<name>[a-z]+\.(?:css|js))$"), "static", self.static),
            ("GET", re.compile(r"^/portal/sign-in$"), "anyone", self.sign_in_page),
            ("POST", re.compile(r"^/portal/sign-in$"), "anyone", self.sign_in),
            ("GET", re.compile(r"^/portal/oidc/start$"), "anyone", self.oidc_start),
            ("GET", re.compile(r"^/portal/oidc/callback$"), "anyone", self.oidc_callback),
            ("POST", re.compile(r"^/portal/sign-out$"), "user", self.sign_out),
            ("GET", re.compile(r"^/portal/jobs$"), "user", self.jobs_page),
            ("GET", re.compile(r"^/portal/events$"), "user", self.events),
            ("POST", re.compile(r"^/portal/jobs/(?P<job>[^/]+)/(?P<action>cancel|release)$"), "user",
             self.job_action),
            ("GET", re.compile(r"^/portal/print$"), "user", self.print_page),
            ("POST", re.compile(r"^/portal/print$"), "user", self.print_file),
            ("GET", re.compile(r"^/portal/tokens$"), "user", self.tokens_page),
            ("POST", re.compile(r"^/portal/tokens$"), "user", self.create_token),
            ("POST", re.compile(r"^/portal/tokens/(?P<token>[^/]+)/revoke$"), "user", self.revoke_token),
            ("GET", re.compile(r"^/release/(?P<printer>[^/]+)$"), "user", self.release_page),
            ("POST", re.compile(r"^/release/(?P<printer>[^/]+)$"), "user", self.release),
            *[(method, pattern, "admin", route) for method, pattern, route in console.routes],
        ]  # fmt: skip

    # --- requests -------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        allowed: list[str] = []
        for route_method, pattern, access, route in self.routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            visit = web.Visit(request) if access == "static" else await self._visit(request)
            try:
                if access in ("user", "admin") and visit.user is None:
                    return self._to_sign_in(visit)
                if access == "admin" and not visit.is_admin:
                    raise HTTPError(403, "this page is for the tenant's administrators")
                return await route(visit, match)
            except HTTPError as exc:
                return self.error_page(visit, exc)
            except SubmitError as exc:
                return self.error_page(visit, HTTPError(exc.refusal.value, exc.message))
        visit = web.Visit(request)
        if allowed:
            return self.error_page(
                visit, HTTPError(405, f"method {request.method} not allowed", [("allow", ", ".join(allowed))])
            )
        return self.error_page(visit, HTTPError(404, f"no such page: {request.path[:200]}"))

    async def _visit(self, request: Request) -> web.Visit:
        """Who the request is: the session its cookie names, if that is live and its user active."""
        visit = web.Visit(request)
        secret = web.cookies(request).get(self.cookies.session)
        if not secret:
            return visit
        session = (
            await self.store.get_web_session(web.secret_id(secret)) if web.SECRET_RE.match(secret) else None
        )
        now = self.now()
        user = await self.people.user(session.user_id) if session is not None else None
        active = (
            user is not None
            and session is not None
            and user.tenant == session.tenant
            and user.state == "active"
        )
        if session is None or session.revoked_at is not None or session.expires_at <= now or not active:
            if session is not None and not active and session.revoked_at is None:
                # Disabled (by the console, the API or the CLI): every session of theirs ends now, for good.
                await self.store.revoke_web_sessions(user_id=session.user_id, at=now)
            visit.ended = "disabled" if session is not None and not active else "expired"
            visit.set_cookies.append(self.cookies.clear(self.cookies.session))
            return visit
        assert user is not None and session is not None
        visit.user, visit.session, visit.secret = user, session, secret
        if now - session.last_seen_at >= TOUCH_EVERY:
            await self.store.touch_web_session(session.id, now)
        return visit

    def _to_sign_in(self, visit: web.Visit) -> Response:
        """Not signed in: the sign-in page, which sends the person back to this page afterwards (after a
        form, to the page the form was on: an action is never carried out unseen after a new sign-in)."""
        request = visit.request
        if request.path == "/portal/events":
            # A page's live stream: refused, cookie left alone; the page reloads and that says why.
            return Response(401, [("content-type", "text/plain"), ("cache-control", "no-store")], b"sign in")
        back = request.path
        if request.method not in ("GET", "HEAD"):
            referer = urllib.parse.urlsplit(request.headers.get("referer") or "")
            back = referer.path
        query = {"next": web.local_path(back)}
        if visit.ended:
            query["m"] = visit.ended
        location = "/portal/sign-in?" + urllib.parse.urlencode(query)
        return web.redirect(location, [("set-cookie", c) for c in visit.set_cookies])

    # --- pages ----------------------------------------------------------------------------------

    def page(self, visit: web.Visit, template: str, code: int = 200, **context: Any) -> Response:
        values: dict[str, Any] = {
            "visit": visit,
            "user": visit.user,
            "is_admin": visit.is_admin,
            "csrf": visit.csrf,
            "message": MESSAGES.get(visit.query("m") or "", ""),
            "error": "",
            "path": visit.request.path,
        }
        values.update(context)
        html = self._env.get_template(template).render(values)
        headers = [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            *web.SECURITY_HEADERS,
            *(("set-cookie", c) for c in visit.set_cookies),
        ]
        return Response(code, headers, html.encode())

    def error_page(self, visit: web.Visit, exc: HTTPError) -> Response:
        response = self.page(visit, "error.html", exc.status, status=exc.status, error=exc.message)
        response.headers += exc.headers
        return response

    async def home(self, visit: web.Visit, match: re.Match[str]) -> Response:
        return web.redirect("/portal/jobs" if visit.user else "/portal/sign-in")

    async def static(self, visit: web.Visit, match: re.Match[str]) -> Response:
        name = match["name"]
        if name not in STATIC_TYPES:
            raise HTTPError(404, f"no such file: {name}")
        body = await trio.Path(HERE / "static" / name).read_bytes()
        headers = [("content-type", STATIC_TYPES[name]), ("cache-control", "public, max-age=300")]
        return Response(200, [*headers, *web.SECURITY_HEADERS], body)

    # --- signing in and out ---------------------------------------------------------------------

    def _form_secret(self, visit: web.Visit) -> str:
        """The secret the sign-in form's CSRF token derives from (a cookie, set here when missing)."""
        secret = web.cookies(visit.request).get(self.cookies.form, "")
        if not web.SECRET_RE.match(secret):
            secret = web.new_secret()
            visit.set_cookies.append(self.cookies.set(self.cookies.form, secret))
        return secret

    async def _provider(self, tenant: str) -> OidcProvider | None:
        try:
            validate_name("tenant", tenant)
        except ValueError:
            return None
        return await self.store.get_oidc_provider(tenant)

    def _oidc_link(self, next_page: str, **which: str) -> str:
        return "/portal/oidc/start?" + urllib.parse.urlencode({**which, "next": next_page})

    async def sign_in_page(self, visit: web.Visit, match: re.Match[str]) -> Response:
        next_page = web.local_path(visit.query("next"))
        if visit.user is not None:
            return web.redirect(next_page)
        csrf = web.csrf_token(self._form_secret(visit))
        tenant = visit.query("tenant") or ""
        provider = await self._provider(tenant) if tenant else None
        return self.page(
            visit, "sign_in.html", csrf=csrf, next=next_page, step="email", email="",
            provider=_provider_name(provider),
            oidc_link=self._oidc_link(next_page, tenant=tenant) if provider else "",
        )  # fmt: skip

    async def sign_in(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        secret = web.cookies(visit.request).get(self.cookies.form, "")
        web.check_csrf(form, secret if web.SECRET_RE.match(secret) else None)
        next_page = web.local_path(form.get("next"))
        csrf = web.csrf_token(secret)
        shown: dict[str, Any] = {"csrf": csrf, "next": next_page, "provider": "", "oidc_link": ""}
        try:
            email = normal_email(form.get("email", "")[:320])
        except ValueError:
            shown.update(step="email", email=form.get("email", "")[:320])
            return self.page(
                visit, "sign_in.html", 400, **shown, error="Enter your email, like ann@example.com."
            )
        found = await self.store.find_user(email)
        provider = await self.store.get_oidc_provider(found.tenant) if found is not None else None
        # The second step looks the same for an unknown email as for a known one without a provider.
        shown.update(step="password", email=email, provider=_provider_name(provider),
                     oidc_link=self._oidc_link(next_page, email=email) if provider else "")  # fmt: skip
        if "password" not in form:
            return self.page(visit, "sign_in.html", **shown)
        client = visit.request.client[0] if visit.request.client else ""
        try:
            user = await self.people.sign_in(email, form["password"], client)
        except TooManyFailures as exc:
            response = self.page(
                visit, "sign_in.html", 429, **shown, error=f"{str(exc)[:1].upper()}{str(exc)[1:]}."
            )
            response.headers.append(("retry-after", str(exc.retry_after)))
            return response
        except SignInError as exc:
            if str(exc) == DISABLED:
                return self.page(visit, "sign_in.html", 403, **shown, error=MESSAGES["disabled"])
            return self.page(visit, "sign_in.html", 401, **shown, error="Wrong email or password.")
        return await self._start_session(visit, user, "password", next_page)

    async def _start_session(self, visit: web.Visit, user: UserRecord, via: str, next_page: str) -> Response:
        secret, now = web.new_secret(), self.now()
        session = WebSession(
            id=web.secret_id(secret), tenant=user.tenant, user_id=user.id, created_at=now,
            expires_at=now + self.session_ttl, last_seen_at=now, via=via,
        )  # fmt: skip
        await self.store.add_web_session(session)
        if visit.session is not None:  # signing in again: the session before ends
            await self.store.revoke_web_sessions(session_id=visit.session.id, at=now)
        log.info("portal sign-in by %s (%s)", user.email, via, extra={"tenant": user.tenant})
        cookie = self.cookies.set(self.cookies.session, secret, max_age=int(self.session_ttl))
        return web.redirect(
            next_page, [*(("set-cookie", c) for c in visit.set_cookies), ("set-cookie", cookie)]
        )

    async def sign_out(self, visit: web.Visit, match: re.Match[str]) -> Response:
        web.check_csrf(await web.read_form(visit.request), visit.secret)
        assert visit.session is not None
        await self.store.revoke_web_sessions(session_id=visit.session.id, at=self.now())
        return web.redirect(
            "/portal/sign-in?m=signed-out", [("set-cookie", self.cookies.clear(self.cookies.session))]
        )

    async def oidc_start(self, visit: web.Visit, match: re.Match[str]) -> Response:
        """Off to the tenant's provider: the flow's secrets go with the browser, sealed, in a cookie."""
        next_page = web.local_path(visit.query("next"))
        tenant = visit.query("tenant") or ""
        email = (visit.query("email") or "")[:320]
        if email:
            found = await self.store.find_user(email.strip().lower())
            tenant = found.tenant if found is not None else ""
        provider = await self._provider(tenant) if tenant else None
        if provider is None:
            raise HTTPError(
                404, "there is no sign-in provider for this organisation: sign in with your password"
            )
        try:
            discovery = await self.oidc.discover(provider.issuer)
        except OidcError as exc:
            raise HTTPError(502, str(exc)) from None
        state, nonce, verifier = (secrets.token_urlsafe(n) for n in (24, 24, 48))
        redirect_uri = f"{qr.base_url(self.public_url, visit.request, tls=self.tls)}/portal/oidc/callback"
        flow = {
            "tenant": tenant, "issuer": provider.issuer, "state": state, "nonce": nonce, "verifier": verifier,
            "next": next_page, "redirect_uri": redirect_uri, "until": self.now() + OIDC_FLOW_TTL,
        }  # fmt: skip
        location = self.oidc.authorization_url(
            discovery,
            provider,
            redirect_uri=redirect_uri,
            state=state,
            nonce=nonce,
            verifier=verifier,
            login_hint=email,
        )
        sealed = self.secrets.seal(json.dumps(flow), "portal-oidc-flow")
        return web.redirect(
            location, [("set-cookie", self.cookies.set(self.cookies.oidc, sealed, OIDC_FLOW_TTL))]
        )

    async def oidc_callback(self, visit: web.Visit, match: re.Match[str]) -> Response:
        visit.set_cookies.append(self.cookies.clear(self.cookies.oidc))  # one use, whatever comes of it
        sealed = web.cookies(visit.request).get(self.cookies.oidc, "")
        try:
            flow = (
                json.loads(self.secrets.open(sealed, "portal-oidc-flow"))
                if sealed.startswith("sealed:")
                else {}
            )
        except (SecretBoxError, ValueError):
            flow = {}
        if not isinstance(flow, dict) or not flow or float(flow.get("until", 0)) < self.now():
            raise HTTPError(
                400,
                "this sign-in is not under way any more (it took too long, or cookies are off): start again",
            )
        if not secrets.compare_digest((visit.query("state") or "").encode(), str(flow["state"]).encode()):
            raise HTTPError(400, "this answer from the sign-in provider is not for this sign-in: start again")
        if visit.query("iss") not in (None, flow["issuer"]):  # RFC 9207: an answer from another provider
            raise HTTPError(400, "this answer comes from another sign-in provider: start again")
        if visit.query("error"):
            error = (visit.query("error_description") or visit.query("error") or "")[:200]
            raise HTTPError(401, f"the sign-in provider did not sign you in: {error}")
        provider = await self.store.get_oidc_provider(str(flow["tenant"]))
        if provider is None or provider.issuer != flow["issuer"]:
            raise HTTPError(404, "the organisation's sign-in provider changed meanwhile: start again")
        code = visit.query("code") or ""
        if not 0 < len(code) <= 2048:
            raise HTTPError(400, "the sign-in provider sent no authorization code")
        try:
            client_secret = open_client_secret(self.secrets, provider)
        except SecretBoxError:
            raise HTTPError(
                500, "the organisation's client secret does not open with this relay's key"
            ) from None
        try:
            discovery = await self.oidc.discover(provider.issuer)
            identity = await self.oidc.finish(
                discovery, provider, client_secret, code=code,
                redirect_uri=str(flow["redirect_uri"]), verifier=str(flow["verifier"]),
                nonce=str(flow["nonce"]),
            )  # fmt: skip
        except OidcError as exc:
            raise HTTPError(401, f"signing in with the provider failed: {exc}") from None
        try:
            email = normal_email(identity.email)
        except ValueError:
            raise HTTPError(401, "the sign-in provider's email claim is not an email address") from None
        user = await self._oidc_user(provider, email)
        return await self._start_session(visit, user, "oidc", web.local_path(str(flow["next"])))

    async def _oidc_user(self, provider: OidcProvider, email: str) -> UserRecord:
        """The tenant's user with this email; a new one when the provider may create users."""
        user = await self.store.find_user(email)
        if user is None and provider.create_users:
            user = new_user(provider.tenant, email, now=self.now())
            try:
                await self.store.add_user(user)
                audit.record("user.created", tenant=user.tenant, actor=f"oidc:{provider.issuer}",
                             target=f"user:{user.id}", email=user.email, role=user.role)  # fmt: skip
            except Conflict:  # created meanwhile (a second tab)
                user = await self.store.find_user(email)
        if user is None or user.tenant != provider.tenant:
            raise HTTPError(403, f"{email} is not a user of this organisation: ask your administrator")
        if user.state != "active":
            raise HTTPError(403, MESSAGES["disabled"])
        return user

    # --- my jobs --------------------------------------------------------------------------------

    def may_see(self, visit: web.Visit, job: Job) -> bool:
        return visit.is_admin or job.owner == visit.signed_in.id

    async def visible_job(self, visit: web.Visit, job_id: str) -> Job:
        job = await self.store.get_job(visit.signed_in.tenant, job_id) if JOB_ID_RE.match(job_id) else None
        # Another person's job is "not found", exactly as one that does not exist.
        if job is None or not self.may_see(visit, job):
            raise HTTPError(404, f"job {job_id[:64]} not found")
        return job

    async def jobs_page(self, visit: web.Visit, match: re.Match[str]) -> Response:
        user = visit.signed_in
        jobs = await self.store.list_jobs(user.tenant, owner=user.id, limit=JOBS_SHOWN)
        return self.page(visit, "jobs.html", jobs=jobs, back="/portal/jobs")

    async def job_action(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        job = await self.visible_job(visit, match["job"])
        back = web.local_path(form.get("back"))
        principal = visit.principal
        if match["action"] == "cancel":
            reason = f"canceled by {principal.actor}"
            done = None if job.state.final else await self.jobs.cancel(job, reason)
            if done is None:
                raise HTTPError(409, f"the job is already {job.state}")
            audit.record(
                "job.canceled", tenant=job.tenant, actor=audit.actor(principal), target=f"job:{job.id}",
                printer_id=job.printer_id, state=str(done.state),
            )  # fmt: skip
            return web.redirect(f"{back}?m=canceled")
        await self.release_job(visit, job)
        return web.redirect(f"{back}?m=released")

    async def release_job(self, visit: web.Visit, job: Job, printer_id: str | None = None) -> Job:
        principal = visit.principal
        if job.state is not JobState.HELD:
            raise HTTPError(409, f"the job is {job.state}, not held")
        try:
            done = await self.jobs.release(job, printer_id, f"released by {principal.actor}")
        except (LookupError, ValueError) as exc:
            raise HTTPError(409, str(exc).strip("'\"")) from None
        if done is None:
            raise HTTPError(409, "the job is not held any more")
        audit.record("job.released", tenant=job.tenant, actor=audit.actor(principal), target=f"job:{job.id}",
                     printer_id=done.printer_id)  # fmt: skip
        return done

    # --- live job states ------------------------------------------------------------------------

    def heard(self, notice: Notice) -> None:
        """A change committed here or on another replica. A job's: tell the pages that follow it. A user's
        (disabled, say): their pages' streams end, and the pages come back through the session check."""
        if notice.kind == "job":
            event = {
                "id": notice.key,
                "state": str(notice.data["state"]),
                "message": str(notice.data["message"]),
            }
            channels = self._watchers.get(notice.key, set())
        elif notice.kind in ("users", "resync"):
            event = {"reconnect": "1"}
            every = notice.kind == "resync" or not notice.key  # SQLite: another process changed some user
            channels = set().union(*self._streams.values()) if every else self._streams.get(notice.key, set())
        else:
            return
        for channel in list(channels):
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                channel.close()  # the page reconnects and reads the states afresh

    def _forget(self, keys: list[str], channel: trio.MemorySendChannel[dict[str, str]], user_id: str) -> None:
        for found, key in [(self._watchers, job_id) for job_id in keys] + [(self._streams, user_id)]:
            channels = found.get(key)
            if channels is not None:
                channels.discard(channel)
                if not channels:
                    del found[key]

    async def events(self, visit: web.Visit, match: re.Match[str]) -> Response:
        """Server-Sent Events: each listed job's state now, then its changes, until all are final. The
        stream ends early (``reconnect``) when the session ends or the user changes."""
        user, session = visit.signed_in, visit.session
        assert session is not None
        job_ids = list(dict.fromkeys(visit.request.query.get("job", [])))
        if not 0 < len(job_ids) <= MAX_WATCHED:
            raise HTTPError(400, f"follow 1 to {MAX_WATCHED} jobs")
        send, receive = trio.open_memory_channel[dict[str, str]](WATCH_QUEUE)
        for job_id in job_ids:  # before reading the states, so that no change falls in between
            self._watchers[job_id].add(send)
        self._streams[user.id].add(send)
        try:
            found = [await self.visible_job(visit, job_id) for job_id in job_ids]
        except BaseException:
            self._forget(job_ids, send, user.id)
            raise
        session_ends = trio.current_time() + max(0.0, session.expires_at - self.now())

        def sse(event: str, data: dict[str, str]) -> bytes:
            return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

        async def stream() -> AsyncIterator[bytes]:
            try:
                open_jobs = {job.id for job in found if not job.state.final}
                for job in found:
                    yield sse("state", {"id": job.id, "state": str(job.state), "message": ""})
                while open_jobs:
                    with trio.move_on_at(min(trio.current_time() + SSE_KEEPALIVE, session_ends)) as idle:
                        event = await receive.receive()
                    if idle.cancelled_caught:
                        if trio.current_time() >= session_ends:
                            yield sse("reconnect", {})  # the page reloads: the sign-in, then back
                            return
                        yield b": keep-alive\n\n"
                    elif "reconnect" in event:
                        yield sse("reconnect", {})
                        return
                    else:
                        yield sse("state", event)
                        if JobState(event["state"]).final:
                            open_jobs.discard(event["id"])
                yield sse("done", {})
            except trio.EndOfChannel:
                yield sse("reconnect", {})
            finally:
                self._forget(job_ids, send, user.id)
                send.close()
                receive.close()

        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
            ("x-accel-buffering", "no"),
        ]
        return Response(200, [*headers, *web.SECURITY_HEADERS], stream())

    # --- printing from the browser ----------------------------------------------------------------

    async def print_page(self, visit: web.Visit, match: re.Match[str]) -> Response:
        printers = await self.store.list_printers(visit.signed_in.tenant)
        return self.page(visit, "print.html", printers=printers, max_upload=self.max_upload,
                         chosen=visit.query("printer") or "")  # fmt: skip

    async def print_file(self, visit: web.Visit, match: re.Match[str]) -> Response:
        """The form streams: its small fields first, then the file, which goes into the spool as it comes."""
        request, user = visit.request, visit.signed_in
        length = request.body.content_length
        if length is not None and length > self.max_upload + 64 * 1024:
            raise HTTPError(
                413, f"the file is larger than this portal takes ({format_bytes(self.max_upload)})"
            )
        reader = MultipartReader(request.body, boundary_of(request.headers.get("content-type")))
        fields: dict[str, str] = {}
        while (part := await reader.next_part()) is not None:
            if part.filename is None:
                if part.name not in PRINT_FIELDS:
                    raise HTTPError(400, f"unknown form field {part.name[:40]!r}")
                fields[part.name] = await reader.read(MAX_FIELD)
                continue
            if part.name != "file":
                raise HTTPError(400, f"unknown file field {part.name[:40]!r}")
            web.check_csrf(fields, visit.secret)  # before a byte of the file is kept
            submission = await self._submission(user, fields, part.filename, part.content_type)
            job, _ = await self.intake.accept(submission, self._bounded(reader.stream()))
            log.info(
                "job %s printed from the portal by %s", job.id, user.email, extra={"tenant": user.tenant}
            )
            return web.redirect(
                "/portal/jobs?m=held" if job.state is JobState.HELD else "/portal/jobs?m=printed"
            )
        web.check_csrf(fields, visit.secret)
        raise HTTPError(400, "choose a file to print")

    async def _submission(
        self, user: UserRecord, fields: dict[str, str], filename: str, content_type: str
    ) -> Submission:
        printer = await self.store.get_printer(user.tenant, fields.get("printer", ""))
        if printer is None:
            raise HTTPError(404, f"printer {fields.get('printer', '')[:64]!r} not found")
        try:
            copies = int(fields.get("copies") or "1")
        except ValueError:
            raise HTTPError(400, "copies must be a whole number") from None
        if not 1 <= copies <= MAX_COPIES:
            raise HTTPError(400, f"copies must be between 1 and {MAX_COPIES}")
        document_format = content_type.split(";")[0].strip().lower() or "application/octet-stream"
        if not FORMAT_RE.match(document_format):
            document_format = "application/octet-stream"  # the printer sniffs it
        options: dict[str, str] = {}
        if fields.get("sides"):
            try:
                options["sides"] = validate_option("sides", fields["sides"])
            except OptionRefused as exc:
                raise HTTPError(400, exc.message) from None
        name = re.split(r"[\\/]", filename)[-1]
        title = (
            (fields.get("title") or "").strip() or "".join(c for c in name if c.isprintable()) or "untitled"
        )
        return Submission(
            tenant=user.tenant, printer_id=printer.id, title=title[:MAX_TITLE],
            document_format=document_format, copies=copies, user=user.email, owner=user.id,
            hold=fields.get("hold") == "on", options=options,  # a pull printer's: held by the intake
        )  # fmt: skip

    async def _bounded(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in chunks:
            seen += len(chunk)
            if seen > self.max_upload:
                raise HTTPError(
                    413, f"the file is larger than this portal takes ({format_bytes(self.max_upload)})"
                )
            yield chunk
        if seen == 0:
            raise HTTPError(400, "the file is empty")

    # --- my tokens ------------------------------------------------------------------------------

    async def tokens_page(self, visit: web.Visit, match: re.Match[str], new_secret: str = "") -> Response:
        user = visit.signed_in
        tokens = await self.store.list_tokens(user.tenant, user_id=user.id)
        return self.page(visit, "tokens.html", tokens=tokens, new_secret=new_secret, now=self.now(),
                         lifetimes=list(TOKEN_LIFETIMES))  # fmt: skip

    async def create_token(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        user = visit.signed_in
        label, lifetime = token_fields(form)
        secret, record = new_token(user.tenant, "user", user_id=user.id, label=label, expires_in=lifetime)
        await self.store.add_token(record)
        audit.record(
            "token.created",
            tenant=user.tenant,
            actor=audit.actor(visit.principal),
            target=f"token:{record.id}",
            kind="user",
            label=label or None,
            expires_at=record.expires_at,
        )
        # The secret is shown on this page only; the relay keeps its hash.
        return await self.tokens_page(visit, match, new_secret=secret)

    async def revoke_token(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        user = visit.signed_in
        record = await self.store.get_token(match["token"][:64])
        mine = record is not None and record.tenant == user.tenant and record.user_id == user.id
        if record is None or not (mine or (visit.is_admin and record.tenant == user.tenant)):
            raise HTTPError(404, f"token {match['token'][:64]} not found")
        if record.revoked_at is None:
            await self.store.revoke_token(record.id, time.time())
            audit.record("token.revoked", tenant=user.tenant, actor=audit.actor(visit.principal),
                         target=f"token:{record.id}")  # fmt: skip
        return web.redirect(f"{web.local_path(form.get('back'), '/portal/tokens')}?m=token-revoked")

    # --- the release page (a pull printer's QR code) ---------------------------------------------

    async def release_page(self, visit: web.Visit, match: re.Match[str]) -> Response:
        user = visit.signed_in
        printer = await self.store.get_printer(user.tenant, match["printer"])
        if printer is None:
            raise HTTPError(404, f"printer {match['printer'][:64]} not found")
        held = await self.store.list_jobs(
            user.tenant, printer_id=printer.id, state=JobState.HELD, owner=user.id, limit=MAX_WATCHED
        )
        return self.page(visit, "release.html", printer=printer, jobs=held)

    async def release(self, visit: web.Visit, match: re.Match[str]) -> Response:
        form = await web.read_form(visit.request)
        web.check_csrf(form, visit.secret)
        user = visit.signed_in
        printer = await self.store.get_printer(user.tenant, match["printer"])
        if printer is None:
            raise HTTPError(404, f"printer {match['printer'][:64]} not found")
        if form.get("all"):
            jobs = await self.store.list_jobs(
                user.tenant, printer_id=printer.id, state=JobState.HELD, owner=user.id, limit=MAX_WATCHED
            )
        else:
            job = await self.visible_job(visit, form.get("job", ""))
            if job.owner != user.id or job.printer_id != printer.id:
                raise HTTPError(404, f"job {job.id} not found at printer {printer.id}")
            jobs = [job]
        for job in jobs:
            await self.release_job(visit, job)
        return web.redirect(f"/release/{urllib.parse.quote(printer.id, safe='')}?m=released")


def token_fields(form: dict[str, str]) -> tuple[str, float | None]:
    """A new token's label and lifetime from a form."""
    label = form.get("label", "").strip()
    if len(label) > MAX_LABEL or any(not c.isprintable() for c in label):
        raise HTTPError(400, f"a label has at most {MAX_LABEL} printable characters")
    expires = form.get("expires", "90d")
    if expires not in TOKEN_LIFETIMES:
        raise HTTPError(400, f"expires must be one of {', '.join(TOKEN_LIFETIMES)}")
    return label, TOKEN_LIFETIMES[expires]


def _provider_name(provider: OidcProvider | None) -> str:
    return urllib.parse.urlsplit(provider.issuer).netloc if provider is not None else ""


__all__ = ["Portal"]
