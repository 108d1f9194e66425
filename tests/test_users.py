"""People: users of a tenant sign in with their email and password (or a token of their own), own the jobs
they submit, and see and act on those alone; tenant admins manage users and see every job. Over REST and
over IPP (ipptool as two users), on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinter, RawSink, run_ipptool
from fixtures_processes import printrelay
from fixtures_relay import RelayStack

from relay.store.base import Notice
from relay.users import MAX_FAILURES_PER_ACCOUNT, FailureCounter, People, new_user

ANN, BOB, ADA = "ann@example.com", "bob@example.com", "ada@example.com"
PASSWORD = "correct horse battery"


@pytest.fixture(params=["sqlite", "postgres"])
def relay_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def as_user(stack: RelayStack, email: str, password: str = PASSWORD) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url, auth=(email, password), timeout=30)


async def make_users(stack: RelayStack) -> dict[str, str]:
    """Ann and Bob (users) and Ada (a tenant admin), created by the admin token; their ids by email."""
    ids = {}
    async with stack.client() as admin:
        for email, role in ((ANN, "user"), (BOB, "user"), (ADA, "admin")):
            body = {"email": email.upper(), "name": email[:3], "role": role, "password": PASSWORD}
            made = await admin.post("/v1/users", json=body)
            assert made.status_code == 201, made.text
            assert made.json()["email"] == email and made.json()["has_password"] is True
            ids[email] = made.json()["id"]
    return ids


async def test_users_own_their_jobs_and_see_no_one_elses(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    stack = relay_stack
    ids = await make_users(stack)
    await stack.start_connector({"labels": raw_sink.uri})
    async with as_user(stack, ANN) as ann, as_user(stack, BOB) as bob, as_user(stack, ADA) as ada:
        me = (await ann.get("/v1/me")).json()
        assert me["kind"] == "user" and me["user"]["email"] == ANN and me["user"]["role"] == "user"
        # requesting a user name on someone else's behalf does not change who owns the job
        submitted = await ann.post("/v1/printers/labels/jobs", params={"user": "bob", "hold": "true"},
                                   content=b"ann's label")  # fmt: skip
        assert submitted.status_code == 201, submitted.text
        job = submitted.json()
        assert job["user"] == ANN and job["owner"] == ids[ANN]
        path = f"/v1/jobs/{job['id']}"
        # Bob: not found (not forbidden), for every way in; his list is empty
        for response in (
            await bob.get(path), await bob.get(f"{path}/events"), await bob.post(f"{path}/cancel"),
            await bob.post(f"{path}/release"), await bob.get(f"{path}/watch"),
        ):  # fmt: skip
            assert response.status_code == 404, response.text
            assert response.json()["error"] == f"job {job['id']} not found"
        assert (await bob.get("/v1/jobs")).json()["jobs"] == []
        assert (await bob.get("/v1/users")).status_code == 403
        # Ann sees hers; Ada (admin) and the API token see all, and Ada may release it
        assert [j["id"] for j in (await ann.get("/v1/jobs")).json()["jobs"]] == [job["id"]]
        assert [j["id"] for j in (await ada.get("/v1/jobs")).json()["jobs"]] == [job["id"]]
        async with stack.client() as app:
            assert (await app.get(path)).json()["owner"] == ids[ANN]
        released = await ada.post(f"{path}/release")
        assert released.status_code == 200, released.text
        (document,) = await raw_sink.wait_for(1, within=20)
        assert document.size == len(b"ann's label")
        bob_job = await bob.post("/v1/printers/labels/jobs", content=b"bob's")
        assert bob_job.status_code == 201 and bob_job.json()["owner"] == ids[BOB]
        assert {j["id"] for j in (await ada.get("/v1/jobs")).json()["jobs"]} == {
            job["id"],
            bob_job.json()["id"],
        }


async def test_wrong_passwords_are_counted_and_then_refused_before_hashing(relay_stack: RelayStack) -> None:
    await make_users(relay_stack)
    async with as_user(relay_stack, ANN, "not the password") as wrong:
        for _ in range(MAX_FAILURES_PER_ACCOUNT):
            response = await wrong.get("/v1/jobs")
            assert response.status_code == 401 and response.json()["error"] == "wrong email or password"
            assert "Basic" in response.headers["www-authenticate"]
        refused = await wrong.get("/v1/jobs")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "too many failed sign-ins" in refused.json()["error"]
    async with as_user(relay_stack, ANN) as right:  # the right password is refused too while locked
        assert (await right.get("/v1/jobs")).status_code == 429
    async with as_user(relay_stack, "nobody@example.com") as unknown:  # no hint that the email is unknown
        response = await unknown.get("/v1/jobs")
        assert response.status_code == 401 and response.json()["error"] == "wrong email or password"


def test_failure_counter_window_and_bound() -> None:
    counter = FailureCounter(limit=3, window=60, max_keys=2)
    for _ in range(3):
        counter.failed("a", 100.0)
    assert counter.blocked_for("a", 110.0) == 50.0 and counter.blocked_for("a", 160.0) == 0.0
    counter.failed("b", 100.0)
    counter.failed("c", 100.0)  # the oldest key goes: memory stays bounded whatever names are tried
    assert counter.blocked_for("a", 110.0) == 0.0 and set(counter._failures) == {"b", "c"}


async def test_a_disabled_user_is_refused_at_once_by_password_and_by_token(relay_stack: RelayStack) -> None:
    stack = relay_stack
    ids = await make_users(stack)
    async with as_user(stack, ANN) as ann:
        made = await ann.post("/v1/me/tokens", json={"label": "laptop", "expires_in": "30d"})
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        assert token.startswith("pru_") and made.json()["label"] == "laptop"
        assert [t["id"] for t in (await ann.get("/v1/me/tokens")).json()["tokens"]] == [made.json()["id"]]
    token_client = stack.client(token)
    basic_token = httpx.AsyncClient(base_url=stack.api_url, auth=(ANN, token), timeout=30)
    async with token_client, basic_token, as_user(stack, ANN) as ann, as_user(stack, ADA) as ada:
        for client in (token_client, basic_token, ann):
            assert (await client.get("/v1/jobs")).status_code == 200
        assert (await ada.post(f"/v1/users/{ids[ADA]}", json={"state": "disabled"})).status_code == 409
        disabled = await ada.post(f"/v1/users/{ids[ANN]}", json={"state": "disabled"})
        assert disabled.status_code == 200 and disabled.json()["state"] == "disabled"
        for client in (token_client, basic_token, ann):
            response = await client.get("/v1/jobs")
            assert response.status_code == 401 and response.json()["error"] == "this user is disabled"
        assert (await ada.post(f"/v1/users/{ids[ANN]}", json={"state": "active"})).status_code == 200
        assert (await ann.get("/v1/jobs")).status_code == 200
        # a token revoked one by one
        revoked = await ann.delete(f"/v1/me/tokens/{made.json()['id']}")
        assert revoked.status_code == 204
        response = await token_client.get("/v1/jobs")
        assert response.status_code == 401 and response.json()["error"] == "token revoked"
        # Bob cannot see or revoke Ann's tokens
    async with as_user(stack, BOB) as bob:
        assert (await bob.delete(f"/v1/me/tokens/{made.json()['id']}")).status_code == 404


async def test_user_admin_requests_are_checked(relay_stack: RelayStack) -> None:
    ids = await make_users(relay_stack)
    async with as_user(relay_stack, ADA) as ada, relay_stack.client() as app:
        cases: list[tuple[Any, int, str]] = [
            (ada.post("/v1/users", json={"email": ANN}), 409, f"a user with the email {ANN} exists"),
            (ada.post("/v1/users", json={"email": "x@example.com", "password": "short"}), 400, "10 to 1024"),
            (ada.post("/v1/users", json={"email": "not-an-email"}), 400, "not an email address"),
            (
                ada.post("/v1/users", json={"email": "y@example.com", "role": "root"}),
                400,
                "role must be one of",
            ),
            (ada.post("/v1/users", json={"email": "y@example.com", "tenant": "other"}), 400, "unknown field"),
            (ada.post(f"/v1/users/{ids[ADA]}", json={"role": "user"}), 409, "cannot take their own admin"),
            (ada.get("/v1/users/usr_0000000000000000"), 404, "not found"),
            (app.post("/v1/me/tokens", json={}), 403, "only a user has tokens of their own"),
            (ada.post("/v1/me/tokens", json={"expires_in": "2y"}), 400, "expires_in"),
        ]
        for call, status, message in cases:
            response = await call
            assert response.status_code == status, response.text
            assert message in response.json()["error"], response.text
        listed = (await app.get("/v1/users")).json()["users"]
        assert [u["email"] for u in listed] == [ADA, ANN, BOB] and "password_hash" not in listed[0]
        changed = await app.post(f"/v1/users/{ids[BOB]}", json={"password": "a new password here"})
        assert changed.status_code == 200
    async with as_user(relay_stack, BOB) as old, as_user(relay_stack, BOB, "a new password here") as new:
        assert (await old.get("/v1/me")).status_code == 401
        assert (await new.get("/v1/me")).status_code == 200
    async with relay_stack.client(await relay_stack.token("api", "other", scopes=("admin",))) as other:
        assert (await other.get(f"/v1/users/{ids[ANN]}")).status_code == 404  # another tenant's user


async def test_people_cache_forgets_a_changed_user_at_once() -> None:
    class Store:
        def __init__(self) -> None:
            self.reads = 0

        async def get_user(self, user_id: str) -> Any:
            self.reads += 1
            return new_user("acme", "ann@example.com") if user_id == "usr_1" else None

    store = Store()
    people = People(store, cache_ttl=60)  # type: ignore[arg-type]
    assert await people.user("nobody") is None and await people.user("nobody") is None
    assert store.reads == 2  # nothing cached for a user that does not exist
    await people.user("usr_1")
    for notice in (Notice("users", "usr_1"), Notice("users", ""), Notice("tokens", ""), Notice("resync", "")):
        before = store.reads
        await people.user("usr_1")
        assert store.reads == before  # kept...
        people.heard(notice)
        await people.user("usr_1")
        assert store.reads == before + 1, notice  # ...and read again once a change is heard
        people.heard(Notice("users", "usr_2"))  # another user's change keeps it
        await people.user("usr_1")
        assert store.reads == before + 1


# --- the CLI, and over IPP -----------------------------------------------------------------------


def test_cli_users_and_their_tokens(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "relay")]
    created = printrelay(
        "user", "create", *data, "--create", "--tenant", "acme", "--email", "Ann@Example.com",
        "--role", "admin", "--password-stdin", input=PASSWORD + "\n",
    )  # fmt: skip
    assert created.stdout.startswith("usr_")
    listed = printrelay("user", "list", *data, "--tenant", "acme").stdout
    assert "ann@example.com" in listed and "admin" in listed
    again = printrelay("user", "create", *data, "--tenant", "acme", "--email", "ann@example.com", check=False)
    assert again.returncode == 1 and "a user with the email ann@example.com exists" in again.stderr
    token = printrelay("token", "create", *data, "--tenant", "acme", "--kind", "user", "--user", ANN)
    assert token.stdout.startswith("pru_")
    wrong = printrelay(
        "token", "create", *data, "--tenant", "other", "--kind", "user", "--user", ANN, check=False
    )
    assert wrong.returncode == 1 and "no user ann@example.com in tenant other" in wrong.stderr
    disabled = printrelay("user", "disable", *data, "--tenant", "acme", "--email", ANN)
    assert "user ann@example.com disabled" in disabled.stderr
    assert "disabled" in printrelay("user", "list", *data, "--tenant", "acme").stdout
    bad = printrelay(
        "user",
        "create",
        *data,
        "--tenant",
        "acme",
        "--email",
        "x@example.com",
        "--password-stdin",
        check=False,
    )
    assert bad.returncode == 1 and "a password must have 10 to 1024 characters" in bad.stderr


PRINT_AS = """
{
    NAME "Print-Job as $who"
    OPERATION Print-Job
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR name requesting-user-name someone-else
    ATTR name job-name "$who's job"
    ATTR mimeMediaType document-format text/plain
    FILE document.txt
    STATUS successful-ok
    EXPECT job-id OF-TYPE integer
}
"""

OTHERS_JOB = """
{
    NAME "Get-Job-Attributes of another's job"
    OPERATION Get-Job-Attributes
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR integer job-id $job
    STATUS client-error-not-found
}
{
    NAME "Cancel-Job of another's job"
    OPERATION Cancel-Job
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR integer job-id $job
    STATUS client-error-not-found
}
{
    NAME "Get-Jobs shows my jobs only"
    OPERATION Get-Jobs
    GROUP operation-attributes-tag
    ATTR charset attributes-charset utf-8
    ATTR naturalLanguage attributes-natural-language en
    ATTR uri printer-uri $uri
    ATTR keyword which-jobs all
    ATTR boolean my-jobs false
    ATTR keyword requested-attributes job-id,job-originating-user-name
    STATUS successful-ok
    EXPECT job-originating-user-name WITH-ALL-VALUES "$email"
    EXPECT !job-id WITH-VALUE $job
}
"""


async def test_two_users_over_ipp(
    relay_stack: RelayStack, ippeveprinter: IppEvePrinter, tmp_path: Path
) -> None:
    if shutil.which("ipptool") is None:
        pytest.fail("ipptool is not installed (Debian package cups-ipp-utils)")
    await make_users(relay_stack)
    await relay_stack.start_connector({"eve": ippeveprinter.uri})
    port = relay_stack.api_url.rsplit(":", 1)[1]
    (tmp_path / "document.txt").write_text("hello from a person\n")
    (tmp_path / "print.test").write_text(PRINT_AS)
    (tmp_path / "others.test").write_text(OTHERS_JOB)

    def uri(email: str) -> str:
        return f"ipp://{quote(email, safe='')}:{quote(PASSWORD)}@127.0.0.1:{port}/ipp/print/eve"

    for email in (ANN, BOB):
        code, report = await trio.to_thread.run_sync(
            partial(run_ipptool, uri(email), tmp_path / "print.test", tmp_path, who=email)
        )
        assert code == 0, report
    async with as_user(relay_stack, ADA) as ada:
        jobs = (await ada.get("/v1/jobs")).json()["jobs"]
    assert sorted(j["user"] for j in jobs) == [ANN, BOB]  # requesting-user-name did not decide
    numbers = await relay_stack.relay.store.ipp_job_numbers(
        "acme", "eve", [j["id"] for j in jobs if j["user"] == ANN], 0.0
    )
    (ann_job,) = numbers.values()
    code, report = await trio.to_thread.run_sync(
        lambda: run_ipptool(uri(BOB), tmp_path / "others.test", tmp_path, job=str(ann_job), email=BOB)
    )
    assert code == 0 and "[FAIL]" not in report, report
    wrong = f"ipp://{quote(ANN, safe='')}:wrong-password@127.0.0.1:{port}/ipp/print/eve"
    code, report = await trio.to_thread.run_sync(
        lambda: run_ipptool(wrong, tmp_path / "print.test", tmp_path, who="mallory")
    )
    assert code != 0 and re.search(r"Print-Job as mallory.*\[FAIL\]", report), report
    async with as_user(relay_stack, ADA) as ada:  # the wrong password stored nothing
        assert len((await ada.get("/v1/jobs")).json()["jobs"]) == 2
