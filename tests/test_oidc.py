"""Signing in to the portal with a tenant's OpenID Connect provider: a real provider (npm oidc-provider v9,
tests/oidc/server.mjs on Node.js) and a real browser through its login and consent pages. The provider is
configured with ``printrelay tenant oidc set``; a person is matched by email to a user of the tenant, or
created when the provider may create users; forged or replayed answers are refused."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from fixtures_browser import Browser, chromium, screenshots  # noqa: F401  (fixtures)
from fixtures_relay import RelayStack
from selenium.webdriver.remote.webdriver import WebDriver
from test_users import ANN, make_users

from relay.portal import web
from relay.portal.oidc import seal_client_secret
from relay.secretbox import SecretBox
from relay.store.base import OidcProvider
from relay.users import new_user

# Whichever test first needs the provider installs it from npm (its own timeout 300 s): above that.
pytestmark = pytest.mark.timeout(400)

PACKAGE = "oidc-provider@9"
SERVER = Path(__file__).resolve().parent / "oidc" / "server.mjs"
START_TIMEOUT = 20.0


def install_oidc_provider() -> Path:
    """npm oidc-provider, installed from the npm registry once into a cache directory and reused."""
    for tool, package in (("node", "nodejs"), ("npm", "npm")):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} is missing: install the Debian package {package} (scripts/install-system-deps.sh)"
            )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "printrelay-tests"
    home = cache / "oidc-provider-9"
    if not (home / "node_modules" / "oidc-provider" / "package.json").exists():
        staging = cache / f"oidc-provider-9.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / "package.json").write_text('{"private": true}\n')
        installed = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", PACKAGE],
            cwd=staging, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if installed.returncode != 0:
            pytest.fail(f"npm install {PACKAGE} failed:\n{installed.stdout}{installed.stderr}")
        shutil.rmtree(home, ignore_errors=True)
        staging.rename(home)
    shutil.copyfile(SERVER, home / "server.mjs")  # beside its node_modules, where its import resolves
    return home


@dataclass
class Provider:
    issuer: str
    client_id: str
    client_secret: str
    output: bytearray

    def record(self, tenant: str, box: SecretBox, *, create_users: bool = False) -> OidcProvider:
        return OidcProvider(
            tenant=tenant, issuer=self.issuer, client_id=self.client_id,
            client_secret_sealed=seal_client_secret(box, tenant, self.client_secret),
            create_users=create_users,
        )  # fmt: skip


@pytest.fixture
async def provider(relay_stack: RelayStack, nursery: trio.Nursery) -> AsyncIterator[Provider]:
    home = await trio.to_thread.run_sync(install_oidc_provider)
    client_secret = secrets.token_urlsafe(24)
    env = {
        **os.environ, "CLIENT_ID": "printrelay", "CLIENT_SECRET": client_secret,
        "REDIRECT_URI": f"{relay_stack.api_url}/portal/oidc/callback",
    }  # fmt: skip
    process = await trio.lowlevel.open_process(
        ["node", "server.mjs"], cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    output = bytearray()
    try:
        with trio.fail_after(START_TIMEOUT):
            while (found := re.search(rb"listening on (\d+)\n", output)) is None:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"the OpenID Connect provider stopped:\n{output.decode()}")
                output += chunk

        async def drain() -> None:  # what it says later, kept for failures; its pipe never fills
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some():
                output.extend(chunk)

        nursery.start_soon(drain)
        yield Provider(f"http://127.0.0.1:{int(found[1])}", "printrelay", client_secret, output)
    finally:
        process.terminate()
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def browser(chromium: WebDriver, relay_stack: RelayStack, screenshots: Path) -> Browser:  # noqa: F811
    return Browser(chromium, relay_stack.api_url, screenshots)


async def at_the_provider(b: Browser, provider: Provider, login: str) -> None:
    """The provider's own pages: its login form, then its consent."""
    await b.wait(lambda d: d.current_url.startswith(provider.issuer), "the provider's login page")
    await b.fill("input[name=login]", login)
    await b.fill("input[name=password]", "whatever the provider wants")
    await b.submit("form")
    if (await b.path()).startswith("/interaction/"):  # consent to the relay reading the email
        await b.submit("form")


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "printrelay.tenants", "tenant", "oidc", *args], input=stdin,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_sign_in_with_the_organisations_provider(
    relay_stack: RelayStack, provider: Provider, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    ids = await make_users(stack)
    data = ["--data-dir", str(stack.relay.config.data_dir), "--tenant", "acme"]
    identity = ["--issuer", provider.issuer, "--client-id", provider.client_id, "--client-secret-stdin"]
    made = await trio.to_thread.run_sync(
        partial(cli, "set", *data, *identity, stdin=provider.client_secret + "\n")
    )
    assert made.returncode == 0, made.stderr
    stored = await stack.relay.store.get_oidc_provider("acme")
    assert stored is not None and stored.issuer == provider.issuer and not stored.create_users
    assert provider.client_secret.encode() not in stored.client_secret_sealed  # sealed with the relay's key
    shown = await trio.to_thread.run_sync(partial(cli, "show", *data))
    assert (
        shown.returncode == 0
        and provider.issuer in shown.stdout
        and provider.client_secret not in shown.stdout
    )
    bad = await trio.to_thread.run_sync(partial(cli, "set", *data, "--issuer", "http://idp.example.com",
                                                "--client-id", "x"))  # fmt: skip
    assert bad.returncode == 1 and "must use https" in bad.stderr

    # Ann's email leads to her organisation's provider; she signs in there and lands where she was going.
    await b.get("/portal/tokens")
    await b.fill("#email", ANN)
    await b.submit("form[action='/portal/sign-in']")
    link = await b.find("#oidc")
    assert await b.run(lambda: link.text) == f"Sign in with {urllib.parse.urlsplit(provider.issuer).netloc}"
    await b.screenshot("portal-sign-in-provider")
    await b.click("#oidc")
    await at_the_provider(b, provider, ANN)
    await b.wait(lambda d: d.current_url == f"{stack.api_url}/portal/tokens", "the portal, signed in")
    assert ANN in await b.text("header")
    cookie = await b.cookie("pr_session")
    assert cookie is not None
    session = await stack.relay.store.get_web_session(web.secret_id(cookie["value"]))
    assert session is not None and session.via == "oidc" and session.user_id == ids[ANN]
    assert await b.cookie("pr_oidc") is None  # the flow's cookie is used once
    await b.console_errors()  # (the provider's own pages ask for web fonts this machine cannot reach)
    await b.get("/portal/jobs")
    assert await b.console_errors() == []

    removed = await trio.to_thread.run_sync(partial(cli, "remove", *data))
    assert removed.returncode == 0 and await stack.relay.store.get_oidc_provider("acme") is None


async def test_new_people_are_created_or_refused_as_the_tenant_says(
    relay_stack: RelayStack, provider: Provider, browser: Browser
) -> None:
    stack, b = relay_stack, browser
    store = stack.relay.store
    await make_users(stack)
    gus = new_user("globex", "gus@globex.example")
    await store.add_user(gus)
    await store.set_oidc_provider(provider.record("acme", stack.relay.secrets_at_rest, create_users=True))

    async def sign_in_as(login: str) -> str:
        await b.run(b.driver.execute_cdp_cmd, "Network.clearBrowserCookies", {})  # a new person each time
        await b.get("/portal/sign-in?tenant=acme")
        await b.click("#oidc")
        await at_the_provider(b, provider, login)
        await b.wait(lambda d: d.current_url.startswith(stack.api_url), "back at the relay")
        return await b.text()

    await sign_in_as("newbie@example.com")
    assert await b.path() == "/portal/jobs"
    newbie = await store.find_user("newbie@example.com")
    assert (
        newbie is not None and newbie.tenant == "acme" and newbie.role == "user" and not newbie.password_hash
    )
    assert "is not a user of this organisation" in await sign_in_as("gus@globex.example")  # another tenant's
    assert "has not verified this email" in await sign_in_as("unverified@example.com")
    assert await store.find_user("unverified@example.com") is None
    await store.set_oidc_provider(provider.record("acme", stack.relay.secrets_at_rest, create_users=False))
    assert "is not a user of this organisation" in await sign_in_as("stranger@example.com")
    assert await store.find_user("stranger@example.com") is None
    await sign_in_as("newbie@example.com")  # an existing user still gets in
    assert await b.path() == "/portal/jobs"


async def test_forged_and_replayed_answers_are_refused(relay_stack: RelayStack, provider: Provider) -> None:
    stack = relay_stack
    await stack.relay.store.set_oidc_provider(provider.record("acme", stack.relay.secrets_at_rest))
    async with httpx.AsyncClient(base_url=stack.api_url) as relay, httpx.AsyncClient() as idp:
        nothing = await relay.get("/portal/oidc/callback", params={"code": "x", "state": "y"})
        assert nothing.status_code == 400 and "not under way" in nothing.text
        assert (await relay.get("/portal/oidc/start", params={"tenant": "globex"})).status_code == 404

        async def start() -> tuple[str, str]:
            started = await relay.get(
                "/portal/oidc/start", params={"tenant": "acme", "next": "/portal/print"}
            )
            assert started.status_code == 303
            location = started.headers["location"]
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
            assert location.startswith(f"{provider.issuer}/auth?")
            assert query["code_challenge_method"] == ["S256"] and query["scope"] == ["openid email"]
            return location, query["state"][0]

        _, state = await start()
        wrong = await relay.get("/portal/oidc/callback", params={"code": "x", "state": "forged"})
        assert wrong.status_code == 400 and "not for this sign-in" in wrong.text
        _, state = await start()
        mixed_up = await relay.get(
            "/portal/oidc/callback", params={"code": "x", "state": state, "iss": "http://127.0.0.1:1"}
        )
        assert mixed_up.status_code == 400 and "another sign-in provider" in mixed_up.text
        _, state = await start()
        bogus = await relay.get("/portal/oidc/callback", params={"code": "not-a-code", "state": state})
        assert bogus.status_code == 401 and "signing in with the provider failed" in bogus.text

        # A real code through the provider's pages over plain HTTP; then the same answer again.
        location, state = await start()
        answer = await through_the_provider(idp, location, ANN)
        params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(answer).query))
        await make_users(stack)
        flow_cookie = relay.cookies.get("pr_oidc")
        done = await relay.get("/portal/oidc/callback", params=params)
        assert done.status_code == 303 and done.headers["location"] == "/portal/print"
        relay.cookies.set("pr_oidc", flow_cookie or "")  # the browser sends the old flow back
        replayed = await relay.get("/portal/oidc/callback", params=params)
        assert replayed.status_code == 401, replayed.text  # the provider will not trade a code twice


async def through_the_provider(idp: httpx.AsyncClient, location: str, login: str) -> str:
    """The provider's login and consent over plain HTTP; the redirect back to the relay it ends with."""
    with trio.fail_after(20):
        for _ in range(10):
            response = await idp.get(location)
            if response.status_code in (302, 303):
                location = urllib.parse.urljoin(location, response.headers["location"])
                if "/portal/oidc/callback" in location:
                    return location
                continue
            action = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            assert action is not None, response.text
            fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', response.text))
            if 'name="login"' in response.text:
                fields.update(login=login, password="x")
            posted = await idp.post(urllib.parse.urljoin(location, action[1]), data=fields)
            assert posted.status_code in (302, 303), posted.text
            location = urllib.parse.urljoin(location, posted.headers["location"])
            if "/portal/oidc/callback" in location:
                return location
    raise AssertionError("the provider never sent the browser back")
