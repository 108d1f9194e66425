"""The portal's HTTP pieces: cookies, CSRF tokens, forms, redirects and the headers every page carries."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import urllib.parse
from dataclasses import dataclass, field

from relay.auth import Principal
from relay.credentials import person
from relay.store.base import UserRecord, WebSession
from service.http.message import HTTPError, Request, Response

MAX_FORM = 64 * 1024  # a urlencoded form (sign-in, a button): far less in practice
MAX_COOKIES = 50
SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
# Where a sign-in may send a person back to: a page of this portal, never another site ("//evil").
LOCAL_PATH_RE = re.compile(r"^/(?:portal|release)(?:/[A-Za-z0-9._~%-]+)*/?$")

# No inline script or style anywhere: the portal's own files only, and forms post to the portal alone.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
]


@dataclass(frozen=True)
class CookieNames:
    """Behind TLS cookies are Secure and take the ``__Host-`` prefix (no subdomain can set or widen them)."""

    secure: bool

    def _name(self, base: str) -> str:
        return f"__Host-{base}" if self.secure else base

    @property
    def session(self) -> str:
        return self._name("pr_session")

    @property
    def form(self) -> str:  # binds the sign-in form's CSRF token before there is a session
        return self._name("pr_form")

    @property
    def oidc(self) -> str:  # the sealed state of an OpenID Connect sign-in under way
        return self._name("pr_oidc")

    def set(self, name: str, value: str, max_age: int | None = None) -> str:
        cookie = f"{name}={value}; Path=/; HttpOnly; SameSite=Lax"
        if self.secure:
            cookie += "; Secure"
        if max_age is not None:
            cookie += f"; Max-Age={max_age}"
        return cookie

    def clear(self, name: str) -> str:
        return self.set(name, "", max_age=0)


def cookies(request: Request) -> dict[str, str]:
    """The request's cookies by name (the first of a name wins), at most MAX_COOKIES."""
    found: dict[str, str] = {}
    for header in request.headers.get_all("cookie"):
        for pair in header.split(";"):
            name, eq, value = pair.strip().partition("=")
            if eq and name and name not in found:
                found[name] = value.strip().strip('"')
                if len(found) >= MAX_COOKIES:
                    return found
    return found


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def secret_id(secret: str) -> str:
    """What the store keeps of a session's secret: its SHA-256, so a copy of the database opens nothing."""
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    """A form's token, derived from the secret of the cookie it goes with: another site can read neither."""
    digest = hashlib.sha256(b"printrelay portal csrf\0" + secret.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def check_csrf(form: dict[str, str], secret: str | None) -> None:
    sent = form.get("csrf", "")
    if secret is None or not secrets.compare_digest(sent.encode(), csrf_token(secret).encode()):
        raise HTTPError(
            403, "this form was not sent from the portal's own page, or it is out of date: go back, reload "
            "the page and try again",
        )  # fmt: skip


def local_path(value: str | None, default: str = "/portal/jobs") -> str:
    """``value`` if it is a page of the portal, else ``default``: no redirect leaves the relay."""
    if value and len(value) <= 512 and LOCAL_PATH_RE.match(value) and ".." not in value:
        return value
    return default


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the last of a name wins); 400 for anything else."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise HTTPError(400, f"expected a form (application/x-www-form-urlencoded), not {media[:60]!r}")
    body = await request.body.read(MAX_FORM, limit_name="max_form_body")
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "the form is not valid UTF-8") from None
    if len(fields) > 50:
        raise HTTPError(400, "too many form fields")
    return {name: values[-1] for name, values in fields.items()}


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """303 See Other: after a form, the browser GETs the next page (a reload repeats nothing)."""
    return Response(303, [("location", location), ("cache-control", "no-store"), *(headers or [])], b"")


@dataclass
class Visit:
    """One request to the portal: who sent it (if signed in) and the cookies to set on the answer."""

    request: Request
    user: UserRecord | None = None
    session: WebSession | None = None
    secret: str | None = None  # the session cookie's secret: what the forms' CSRF tokens derive from
    ended: str = ""  # why a session cookie the request carried no longer counts: "expired" or "disabled"
    set_cookies: list[str] = field(default_factory=list)

    @property
    def signed_in(self) -> UserRecord:
        if self.user is None:
            raise HTTPError(401, "sign in first")
        return self.user

    @property
    def principal(self) -> Principal:
        return person(self.signed_in, token_id="")

    @property
    def is_admin(self) -> bool:
        return self.user is not None and self.user.role == "admin"

    @property
    def csrf(self) -> str:
        return csrf_token(self.secret) if self.secret else ""

    def query(self, name: str) -> str | None:
        values = self.request.query.get(name)
        return values[-1] if values else None
