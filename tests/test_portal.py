"""The portal (/portal) and the release page (/release/{printer}) as people use them: a headless Chromium
signs in, prints a file and watches it print through a real connector to a RAW printer, releases held jobs
from the page a printer's QR code opens, and a tenant admin works the console. Then what must not work:
wrong passwords, disabled users, forms without their CSRF token, sessions past their end, and pages
without their security headers."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fixtures_browser import Browser, chromium, screenshots  # noqa: F401  (fixtures)
from fixtures_printers import RawSink
from fixtures_relay import RelayStack
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from test_users import ADA, ANN, BOB, PASSWORD, as_user, make_users

from relay import qr
from relay.portal import web
from relay.portal.multipart import MultipartReader, boundary_of
from service.http.message import HTTPError

TEMPLATES = Path(__file__).resolve().parent.parent / "relay" / "portal" / "templates"
SIGN_IN = "form[action='/portal/sign-in']"


@pytest.fixture
async def browser(chromium: WebDriver, relay_stack: RelayStack, screenshots: Path) -> Browser:  # noqa: F811
    return Browser(chromium, relay_stack.api_url, screenshots)


async def sign_in(
    b: Browser, email: str, password: str = PASSWORD, *, start: str | None = "/portal/jobs"
) -> None:
    """From a page that needs a sign-in, through both steps of the sign-in form."""
    if start is not None:
        await b.get(start)
    assert (await b.path()).startswith("/portal/sign-in"), await b.path()
    await b.fill("#email", email)
    await b.submit(SIGN_IN)
    await b.fill("#password", password)
    await b.submit(SIGN_IN)


async def held_job(stack: RelayStack, email: str, printer: str, body: bytes, title: str = "") -> str:
    async with as_user(stack, email) as person:
        made = await person.post(f"/v1/printers/{printer}/jobs", params={"hold": "true", "title": title or
                                 body.decode()}, content=body)  # fmt: skip
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


async def job_state(stack: RelayStack, job_id: str) -> str:
    async with stack.client() as app:
        return str((await app.get(f"/v1/jobs/{job_id}")).json()["state"])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def following(driver: WebDriver) -> bool:
    """The page's live stream is open (portal.js marks it): the relay follows its jobs for it."""
    return bool(driver.execute_script("return document.documentElement.dataset.live === 'on'"))


async def test_sign_in_print_a_file_and_watch_it_print(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser, tmp_path: Path
) -> None:
    stack, b = relay_stack, browser
    ids = await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    await b.get("/portal")
    assert await b.path() == "/portal/sign-in"
    await b.screenshot("portal-sign-in")
    await sign_in(b, ANN)
    assert await b.path() == "/portal/jobs"
    assert ANN in await b.text("header")

    document = tmp_path / "quarterly report.txt"
    document.write_bytes(b"Quarterly report\n" * 200)
    await b.get("/portal/print")
    await b.screenshot("portal-print")
    await b.click("#hold")  # held first, so that the page shows it before it prints
    await b.run(lambda: b.driver.find_element("css selector", "#file").send_keys(str(document)))
    await b.submit("form[action='/portal/print']")
    assert await b.path() == "/portal/jobs?m=held"
    row = await b.find("tr[data-job-id]")
    job_id = await b.run(row.get_attribute, "data-job-id")
    state = f"tr[data-job-id='{job_id}'] [data-role=state]"
    assert await b.text(state) == "held" and "quarterly report.txt" in await b.text("tbody")
    await b.screenshot("portal-jobs")
    async with stack.client() as app:
        job = (await app.get(f"/v1/jobs/{job_id}")).json()
    assert job["owner"] == ids[ANN] and job["user"] == ANN and job["state"] == "held"
    assert job["document_format"] == "text/plain" and job["size"] == document.stat().st_size

    # Released elsewhere (Ann's print client): the open page follows the job live, without a reload.
    await b.wait(following, "the page to follow its jobs live")
    await b.script("window.stillTheSamePage = true")
    async with as_user(stack, ANN) as ann:
        assert (await ann.post(f"/v1/jobs/{job_id}/release")).status_code == 200
    await b.wait_text(state, "completed", within=30)
    assert await b.script("return window.stillTheSamePage") is True
    assert await b.find_all(f"tr[data-job-id='{job_id}'] form:not([hidden])") == []  # nothing left to do
    (printed,) = await raw_sink.wait_for(1)
    assert printed.sha256 == sha(document.read_bytes())
    assert await b.console_errors() == []  # nothing refused by the Content-Security-Policy


async def test_release_at_the_printer_from_its_qr_code(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri, "lobby": raw_sink.uri})
    assert await stack.relay.store.set_printer_pull("acme", "office", True)
    first = await held_job(stack, ANN, "office", b"ann's first page\n")
    second = await held_job(stack, ANN, "office", b"ann's second page\n")
    elsewhere = await held_job(stack, ANN, "lobby", b"ann's job for the lobby\n")
    bobs = await held_job(stack, BOB, "office", b"bob's page\n")

    # The code on the printer: exactly the URL of its release page.
    url = f"{stack.api_url}/release/office"
    async with stack.client() as app:
        svg, png = (
            await app.get("/v1/printers/office/qr.svg"),
            await app.get("/v1/printers/office/qr.png?scale=3"),
        )
        assert svg.status_code == png.status_code == 200
        assert svg.headers["content-type"] == "image/svg+xml" and svg.content == qr.image(url, "svg")[0]
        assert png.headers["content-type"] == "image/png" and png.content == qr.image(url, "png", 3)[0]
        assert (await app.get("/v1/printers/office/qr.png?scale=99")).status_code == 400
        assert (await app.get("/v1/printers/nowhere/qr.svg")).status_code == 404

    # Scanned by someone not signed in: the sign-in, then straight back to the printer's page.
    await b.get(url)
    assert await b.path() == "/portal/sign-in?next=%2Frelease%2Foffice"
    await sign_in(b, ANN, start=None)
    assert await b.path() == "/release/office"
    listed = [await b.run(li.get_attribute, "data-job-id") for li in await b.find_all("ul.held li")]
    assert sorted(listed) == sorted([first, second])  # not Bob's, not the lobby's
    await b.screenshot("portal-release")
    await b.submit(f"ul.held li[data-job-id='{first}'] form")
    assert await b.path() == "/release/office?m=released"
    (printed,) = await raw_sink.wait_for(1, within=20)
    assert printed.sha256 == sha(b"ann's first page\n")
    await b.submit("form.release-all")
    await raw_sink.wait_for(2, within=20)
    assert raw_sink.documents[1].sha256 == sha(b"ann's second page\n")
    assert "You have no jobs waiting at this printer" in await b.text()
    assert [await job_state(stack, j) for j in (elsewhere, bobs)] == ["held", "held"]
    # Another tenant's printer id, or one that does not exist: not found.
    await b.get("/release/nowhere")
    assert "Not found" in await b.text("h1")


async def test_the_console_of_a_tenant_admin(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    ids = await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    await held_job(stack, ANN, "office", b"waiting in the queue\n", "budget.pdf")
    await sign_in(b, ADA, start="/portal/admin/queue")
    assert await b.path() == "/portal/admin/queue"
    queued = await b.text("table.jobs tbody")
    assert "budget.pdf" in queued and ANN in queued and "held" in queued
    await b.screenshot("console-queue")

    await b.get("/portal/admin/connectors")
    connector = await b.text("tr[data-connector-id='site-1']")
    assert "online" in connector and "0.1.0" in connector
    await b.screenshot("console-connectors")

    await b.get("/portal/admin/printers")
    assert "push" in await b.text("tr[data-printer-id='office']")
    await b.submit("tr[data-printer-id='office'] form")
    assert await b.path() == "/portal/admin/printers?m=printer-changed"
    assert "pull" in await b.text("tr[data-printer-id='office'] .mode")
    office = await stack.relay.store.get_printer("acme", "office")
    assert office is not None and office.pull
    await b.screenshot("console-printers")
    await b.get("/portal/admin/qr-sheet")
    codes = await b.find_all("figure.code")
    assert len(codes) == 1 and f"{stack.api_url}/release/office" in await b.text("figure.code")
    assert len(await b.find_all("figure.code svg path")) == 1
    await b.screenshot("console-qr-sheet")

    await b.get("/portal/admin/users")
    await b.fill("#new-email", "cy@example.com")
    await b.fill("#new-password", "cy's long password")
    await b.submit("form[action='/portal/admin/users']")
    assert await b.path() == "/portal/admin/users?m=user-created"
    async with as_user(stack, "cy@example.com", "cy's long password") as cy:
        assert (await cy.get("/v1/me")).json()["user"]["role"] == "user"
    await b.submit(f"tr[data-user-id='{ids[BOB]}'] form")
    bob = await stack.relay.store.get_user(ids[BOB])
    assert bob is not None and bob.state == "disabled"
    assert "disabled" in await b.text(f"tr[data-user-id='{ids[BOB]}']")
    await b.screenshot("console-users")

    # A token shown once, used, then revoked: it stops at once.
    await b.get("/portal/admin/tokens")
    await b.fill("#label", "nightly reports")
    await b.submit("form[action='/portal/admin/tokens']")
    secret = await b.run((await b.find("#new-token")).get_attribute, "value")
    assert secret.startswith("pra_")
    async with stack.client(secret) as app:
        assert (await app.get("/v1/printers")).status_code == 200
    token_id = secret.split("_")[1]
    await b.submit(f"tr[data-token-id='{token_id}'] form")
    assert await b.path() == "/portal/admin/tokens?m=token-revoked"
    async with stack.client(secret) as app:
        refused = await app.get("/v1/printers")
    assert refused.status_code == 401 and refused.json()["error"] == "token revoked"
    assert "revoked" in await b.text(f"tr[data-token-id='{token_id}']")
    await b.screenshot("console-tokens")
    assert await b.console_errors() == []


async def test_a_user_makes_and_revokes_a_token_of_their_own(
    relay_stack: RelayStack, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    await make_users(stack)
    await sign_in(b, ANN, start="/portal/tokens")
    await b.fill("#label", "laptop")
    await b.submit("form[action='/portal/tokens']")
    secret = await b.run((await b.find("#new-token")).get_attribute, "value")
    assert secret.startswith("pru_")
    async with httpx.AsyncClient(base_url=stack.api_url, auth=(ANN, secret)) as laptop:
        assert (await laptop.get("/v1/me")).json()["user"]["email"] == ANN
        await b.get("/portal/tokens")  # shown once: a reload does not show it again
        assert await b.find_all("#new-token") == []
        await b.submit(f"tr[data-token-id='{secret.split('_')[1]}'] form")
        assert (await laptop.get("/v1/me")).status_code == 401


async def test_wrong_password_disabled_users_and_forms_without_their_token(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    ids = await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    job_id = await held_job(stack, ANN, "office", b"followed live\n")
    people = stack.relay.people
    failures = people.failures
    await sign_in(b, ANN, "not the password")
    assert "Wrong email or password." in await b.text(".error")
    assert people.failures == failures + 1  # counted, as every failed sign-in is (relay/users.py)
    async with httpx.AsyncClient(base_url=stack.api_url) as client:  # the answer is a 401
        page = await client.get("/portal/sign-in")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        form = {"csrf": csrf[1], "email": ANN, "password": "still not it", "next": "/portal/jobs"}
        wrong = await client.post("/portal/sign-in", data=form)
        assert wrong.status_code == 401 and "Wrong email or password." in wrong.text
        assert people.failures == failures + 2
        assert (await client.post("/portal/sign-in", data={**form, "csrf": "x"})).status_code == 403

    async with stack.client() as app:
        assert (await app.post(f"/v1/users/{ids[BOB]}", json={"state": "disabled"})).status_code == 200
    await b.get("/portal/sign-in")
    await sign_in(b, BOB, start=None)
    assert "This account is disabled." in await b.text(".error")

    # Signed in, then disabled through the API: the open page goes to the sign-in by itself (its live
    # stream ends and the session check refuses it), and the session is revoked for good.
    await b.get("/portal/sign-in")
    await sign_in(b, ANN, start=None)
    assert await b.path() == "/portal/jobs"
    assert await b.text(f"tr[data-job-id='{job_id}'] [data-role=state]") == "held"
    await b.wait(following, "the page to follow its jobs live")
    cookie = await b.cookie("pr_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    async with stack.client() as app:
        assert (await app.post(f"/v1/users/{ids[ANN]}", json={"state": "disabled"})).status_code == 200
    await b.wait(lambda d: "/portal/sign-in?" in d.current_url, "the open page to go to the sign-in")
    assert await b.path() == "/portal/sign-in?next=%2Fportal%2Fjobs&m=disabled"
    assert "This account is disabled." in await b.text(".note")
    session = await stack.relay.store.get_web_session(web.secret_id(cookie["value"]))
    assert session is not None and session.revoked_at is not None
    async with stack.client() as app:  # enabled again, the old session stays revoked
        assert (await app.post(f"/v1/users/{ids[ANN]}", json={"state": "active"})).status_code == 200
    await b.run(b.driver.add_cookie, {"name": "pr_session", "value": cookie["value"], "path": "/"})
    await b.get("/portal/jobs")
    assert (await b.path()).startswith("/portal/sign-in")

    # A form whose CSRF token was taken out (as a forged form from another site has none): 403, nothing done.
    await sign_in(b, ADA, start="/portal/tokens")
    await b.script("document.querySelector(\"form[action='/portal/tokens'] input[name=csrf]\").remove()")
    await b.submit("form[action='/portal/tokens']")
    assert "Not allowed (403)" in await b.text("h1")
    assert "not sent from the portal's own page" in await b.text(".error")
    assert [t for t in await stack.relay.store.list_tokens("acme") if t.user_id == ids[ADA]] == []
    session_cookie = await b.cookie("pr_session")
    assert session_cookie is not None
    jar = {"pr_session": session_cookie["value"]}
    async with httpx.AsyncClient(base_url=stack.api_url, cookies=jar) as client:
        assert (await client.post("/portal/tokens", data={"label": "forged"})).status_code == 403
        assert (
            await client.post("/portal/tokens", data={"label": "forged", "csrf": "wrong"})
        ).status_code == 403
        right = web.csrf_token(session_cookie["value"])
        assert (await client.post("/portal/tokens", data={"label": "mine", "csrf": right})).status_code == 200


async def test_an_expired_session_goes_back_to_sign_in_and_nothing_is_lost(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    job_id = await held_job(stack, ANN, "office", b"a job to keep\n")
    await sign_in(b, ANN)
    cancel = f"tr[data-job-id='{job_id}'] form[action$='/cancel']"
    assert await b.find_all(cancel)
    old = await b.cookie("pr_session")
    assert old is not None
    await b.wait(following, "the page to follow its jobs live")
    # Time passes beyond the session's end (portal_session_ttl); the page is still open.
    ttl = stack.relay.config.portal_session_ttl
    stack.relay.portal.now = lambda: time.time() + ttl + 1
    await b.submit(cancel)
    assert await b.path() == "/portal/sign-in?next=%2Fportal%2Fjobs&m=expired"
    assert "Your session ended" in await b.text(".note")
    assert await job_state(stack, job_id) == "held"  # the action was not carried out unseen
    await sign_in(b, ANN, start=None)
    assert await b.path() == "/portal/jobs"  # back where they were, the job as it was
    assert await b.text(f"tr[data-job-id='{job_id}'] [data-role=state]") == "held"
    new = await b.cookie("pr_session")
    assert new is not None and new["value"] != old["value"]
    await b.submit(cancel)
    assert await b.path() == "/portal/jobs?m=canceled"
    assert await job_state(stack, job_id) == "canceled"


async def test_every_field_is_labelled_and_the_keyboard_is_enough(
    relay_stack: RelayStack, raw_sink: RawSink, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    assert await stack.relay.store.set_printer_pull("acme", "office", True)
    await held_job(stack, ADA, "office", b"printed by keys alone\n")

    async def keys(*typed: str) -> None:
        await b.run(lambda: b.driver.switch_to.active_element.send_keys(*typed))

    # Sign in and release a job with the keyboard only: the focus starts where it is needed.
    def focused(element_id: str) -> Callable[[WebDriver], bool]:
        return lambda d: bool(d.execute_script("return document.activeElement.id") == element_id)

    await b.get("/release/office")
    await b.wait(focused("email"), "the email field to have the focus")
    await keys(ADA, Keys.ENTER)
    await b.wait(focused("password"), "the password step, its field focused")
    await keys(PASSWORD, Keys.ENTER)
    await b.wait(lambda d: "/release/office" in d.current_url, "the release page")
    order = []
    for _ in range(30):
        await keys(Keys.TAB)
        order.append(await b.script("const e = document.activeElement; return e.id || e.textContent.trim()"))
        if order[-1].startswith("Print all"):
            break
    assert order[0] == "Skip to content" and "Sign out" in order, order
    await keys(Keys.ENTER)
    await b.wait(lambda d: d.current_url.endswith("?m=released"), "the release")
    await raw_sink.wait_for(1, within=20)

    problems = []
    for page in ("/portal/jobs", "/portal/print", "/portal/tokens", "/release/office", "/portal/admin/queue",
                 "/portal/admin/printers", "/portal/admin/qr-sheet", "/portal/admin/connectors",
                 "/portal/admin/users", "/portal/admin/tokens", "/portal/sign-in"):  # fmt: skip
        await b.get(page)
        problems += [f"{page}: {p}" for p in await b.script(UNLABELLED)]
    assert problems == []
    assert await b.console_errors() == []


# Fields without a label, buttons and links without a name, SVGs without a title.
UNLABELLED = """
const problems = [];
for (const e of document.querySelectorAll("input:not([type=hidden]), select, textarea")) {
  if (!e.labels || e.labels.length === 0) problems.push("no label: " + e.outerHTML.slice(0, 80));
}
for (const e of document.querySelectorAll("button, a")) {
  if (!e.textContent.trim()) problems.push("no name: " + e.outerHTML.slice(0, 80));
}
for (const e of document.querySelectorAll("svg")) {
  if (!e.querySelector("title")) problems.push("no title: svg");
}
return problems;
"""


@pytest.mark.parametrize("relay_overrides", [{"public_url": "https://print.example.com",
                                              "portal_max_upload_bytes": 4096}])  # fmt: skip
async def test_pages_are_secure_by_default(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"office": raw_sink.uri})
    async with httpx.AsyncClient(base_url=stack.api_url) as client:
        page = await client.get("/portal/sign-in")
        assert page.status_code == 200 and page.headers["content-security-policy"] == web.CSP
        assert "'unsafe-inline'" not in web.CSP and "script-src 'self'" in web.CSP
        assert (
            page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        )
        # Behind TLS (public_url https): Secure cookies with the __Host- prefix (sent here by hand: a client
        # sends Secure cookies over https only).
        form_secret = assert_cookie(page, "__Host-pr_form", secure=True)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        form = {"csrf": csrf[1], "email": ANN, "password": PASSWORD, "next": "//evil.example/x"}
        signed_in = await client.post("/portal/sign-in", data=form, headers=jar(__Host_pr_form=form_secret))
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/portal/jobs"  # not away
        secret = assert_cookie(signed_in, "__Host-pr_session", secure=True)
        session = await stack.relay.store.get_web_session(web.secret_id(secret))
        assert session is not None and session.via == "password"
        assert session.expires_at - session.created_at == stack.relay.config.portal_session_ttl
        # A QR code points at the public URL.
        cookies = jar(__Host_pr_session=secret)
        qr_sheet = await client.get("/portal/admin/qr-sheet", headers=cookies)
        assert qr_sheet.status_code == 403  # Ann is no admin
        async with stack.client() as app:
            svg = await app.get("/v1/printers/office/qr.svg")
        assert svg.content == qr.image("https://print.example.com/release/office", "svg")[0]

        # Uploads are bounded (portal_max_upload_bytes), and the form's fields are checked first.
        token = web.csrf_token(secret)
        fields: dict[str, Any] = {"csrf": token, "printer": "office"}
        big = await client.post("/portal/print", data=fields, files={"file": ("big.bin", b"x" * 5000)},
                                headers=cookies)  # fmt: skip
        assert big.status_code == 413 and "4 KiB" in big.text
        nowhere = await client.post("/portal/print", data={**fields, "printer": "nowhere"},
                                    files={"file": ("a.txt", b"x")}, headers=cookies)  # fmt: skip
        assert nowhere.status_code == 404
        one_byte = {"file": ("a.txt", b"x")}
        forged = await client.post(
            "/portal/print", data={"printer": "office"}, files=one_byte, headers=cookies
        )
        assert forged.status_code == 403
        empty = await client.post(
            "/portal/print", data=fields, files={"file": ("a.txt", b"")}, headers=cookies
        )
        assert empty.status_code == 400
        hi = {"file": ("a.txt", b"hi\n")}
        ok = await client.post("/portal/print", data={**fields, "copies": "2"}, files=hi, headers=cookies)
        assert ok.status_code == 303 and ok.headers["location"] == "/portal/jobs?m=printed"
        async with as_user(stack, ANN) as ann:
            (job,) = (await ann.get("/v1/jobs")).json()["jobs"]
        assert job["title"] == "a.txt" and job["copies"] == 2 and job["size"] == 3

        # Sign-out revokes the session in the store.
        jobs_page = await client.get("/portal/jobs", headers=cookies)
        assert jobs_page.status_code == 200 and "no-store" in jobs_page.headers["cache-control"]
        out = await client.post("/portal/sign-out", data={"csrf": token}, headers=cookies)
        assert out.status_code == 303
        session = await stack.relay.store.get_web_session(web.secret_id(secret))
        assert session is not None and session.revoked_at is not None
        again = await client.get("/portal/jobs", headers=cookies)
        assert again.status_code == 303 and again.headers["location"].startswith("/portal/sign-in")


def jar(**cookies: str) -> dict[str, str]:
    """A Cookie header (``__Host_x`` names the cookie ``__Host-x``)."""
    return {"cookie": "; ".join(f"{k.replace('__Host_', '__Host-')}={v}" for k, v in cookies.items())}


def assert_cookie(response: httpx.Response, name: str, *, secure: bool) -> str:
    (header,) = [h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}=")]
    attributes = {a.strip().split("=")[0].lower() for a in header.split(";")[1:]}
    assert {"httponly", "path"} <= attributes and "samesite=lax" in header.lower()
    assert ("secure" in attributes) == secure
    return header.split(";")[0].split("=", 1)[1]


def test_the_pages_have_no_inline_script_or_style() -> None:
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert not re.search(r"\sstyle\s*=|<style", text), template.name


# --- the print form's multipart reader -------------------------------------------------------------------

BOUNDARIES = st.text(alphabet="abcXYZ0189'()+_,-./:=?", min_size=1, max_size=70)


@st.composite
def forms(draw: st.DrawFn) -> tuple[bytes, bytes, dict[str, str], bytes, list[int]]:
    boundary = draw(BOUNDARIES).encode()
    fields = draw(
        st.dictionaries(st.sampled_from(["csrf", "printer", "copies", "title"]), st.text(max_size=40))
    )
    # Files that hold pieces of the delimiter, cut anywhere, must come out as they went in.
    pieces = st.one_of(st.binary(max_size=300), st.just(b"\r\n--" + boundary[: draw(st.integers(0, 70))]))
    payload = b"".join(draw(st.lists(pieces, max_size=8)))
    assume(b"\r\n--" + boundary not in b"\r\n" + payload)  # a sender picks a boundary its content lacks
    body = b"".join(
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
        + value.encode() + b"\r\n" for name, value in fields.items()
    ) + b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.pdf"\r\n' \
        b"Content-Type: application/pdf\r\n\r\n" + payload + b"\r\n--" + boundary + b"--\r\n"  # fmt: skip
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    return boundary, body, fields, payload, cuts


@given(form=forms())
@settings(max_examples=300, deadline=None)
def test_multipart_reader_gives_back_what_was_sent_however_it_is_cut(
    form: tuple[bytes, bytes, dict[str, str], bytes, list[int]],
) -> None:
    boundary, body, fields, payload, cuts = form
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]

    async def read() -> tuple[dict[str, str], bytes, str]:
        async def source() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        reader = MultipartReader(source(), boundary)
        got: dict[str, str] = {}
        while (part := await reader.next_part()) is not None:
            if part.filename is None:
                got[part.name] = await reader.read(1024)
            else:
                data = b"".join([chunk async for chunk in reader.stream()])
                assert await reader.next_part() is None
                return got, data, part.content_type
        raise AssertionError("no file part")

    got, data, content_type = trio.run(read)
    assert got == fields and data == payload and content_type == "application/pdf"


async def test_multipart_reader_refuses_malformed_bodies() -> None:
    async def parts(body: bytes, boundary: bytes = b"b") -> None:
        async def source() -> AsyncIterator[bytes]:
            yield body

        reader = MultipartReader(source(), boundary)
        while await reader.next_part() is not None:
            pass

    cases = [
        (b"no boundary at all", "no boundary"),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--", "without a name"),
        (b"--b\r\nContent-Disposition: attachment; name=x\r\n\r\nx\r\n--b--", "must be form-data"),
        (b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\ncut short", "ends inside a part"),
        (b"--bjunk", "junk after a boundary"),
        (b"--b\r\n" + b"X: y\r\n" * 2000, "part headers over"),
        (
            b"".join(b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n\r\n" for _ in range(30)),
            "too many",
        ),
    ]
    for body, complaint in cases:
        with pytest.raises(HTTPError) as raised:
            await parts(body)
        assert raised.value.status == 400 and complaint in raised.value.message, (body[:40], raised.value)
    for content_type in ("text/plain", "multipart/form-data", None):
        with pytest.raises(HTTPError):
            boundary_of(content_type)
    assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"
