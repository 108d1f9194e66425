"""The integrator API (relay/api/tenants.py): a tenant's admin makes child tenants, gives them API and
connector tokens, revokes them and reads their usage; a child sees nothing of its parent's or its
siblings', and every admin action is in the audit log.

A real relay (in the test's nursery, on free ports) and a real connector dialing it with a token the
parent made over the API, serving a RAW sink.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

MISSING = "t_00000000000000000000"
DOCUMENT = b"%!PS\n(a child's document) show showpage\n"


async def make_child(client: httpx.AsyncClient, name: str) -> str:
    made = await client.post("/v1/tenants", json={"name": name})
    assert made.status_code == 201, made.text
    child: str = made.json()["id"]
    assert made.headers["location"] == f"/v1/tenants/{child}"
    return child


async def child_token(client: httpx.AsyncClient, child: str, **body: Any) -> dict[str, Any]:
    made = await client.post(f"/v1/tenants/{child}/tokens", json=body)
    assert made.status_code == 201, made.text
    answer: dict[str, Any] = made.json()
    return answer


def audit_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.__dict__["audit"] for r in caplog.records if r.name == "printrelay.audit"]


async def same_as_missing(client: httpx.AsyncClient, method: str, template: str, other_id: str) -> None:
    """``other_id`` (a tenant the caller does not govern) answers exactly what an unknown id does."""
    answers = []
    for some_id in (other_id, MISSING):
        response = await client.request(method, template.format(id=some_id), json={"name": "x"})
        answers.append((response.status_code, response.json()["error"].replace(some_id, "ID")))
    assert answers[0] == answers[1] and answers[0][0] == 404, (method, template, answers)


@pytest.mark.parametrize("relay_backend", ["sqlite", "postgres"])
async def test_a_child_prints_on_its_own_printers_and_sees_nothing_of_others(
    relay_stack: RelayStack, raw_sink: RawSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="printrelay.audit")
    stack = relay_stack
    await stack.start_connector({"office": raw_sink.uri}, connector_id="hq")
    parent_actor = f"token:{stack.api_token.split('_')[1]}"
    async with stack.client() as parent:
        parent_job = (await parent.post("/v1/printers/office/jobs", content=b"the parent's own\n")).json()
        first, second = await make_child(parent, "Customer A"), await make_child(parent, "Customer B")
        assert first.startswith("t_") and first != second
        listed = (await parent.get("/v1/tenants")).json()
        assert [(t["id"], t["name"], t["parent"]) for t in listed["tenants"]] == [
            (first, "Customer A", "acme"),
            (second, "Customer B", "acme"),
        ]
        assert listed["next"] is None
        assert (await parent.get(f"/v1/tenants/{first}")).json()["name"] == "Customer A"

        # The child's own connector, with a token its parent made, and API tokens for its application.
        connector = await child_token(parent, first, kind="connector", connector_id="a-site", label="shop")
        assert connector["token"].startswith("prc_") and connector["connector_id"] == "a-site"
        app = await child_token(parent, first, label="their app")
        assert app["token"].startswith("pra_") and app["scopes"] == ["jobs:submit", "jobs:read"]
        admin = await child_token(parent, first, scopes=["admin"], expires_in="30d")
        assert admin["expires_at"] is not None and app["tenant"] == first
        tokens = await parent.get(f"/v1/tenants/{first}/tokens")
        assert {t["id"]: t["kind"] for t in tokens.json()["tokens"]} == {
            connector["id"]: "connector", app["id"]: "api", admin["id"]: "api"
        }  # fmt: skip
        for made in (connector, app, admin):  # the secret was shown once: never in a listing
            assert made["token"] not in tokens.text and made["token"].split("_")[2] not in tokens.text
        assert "token" not in tokens.json()["tokens"][0]
    await stack.start_connector({"office": raw_sink.uri}, tenant=first, connector_id="a-site",
                                token=connector["token"])  # fmt: skip

    async with stack.client(app["token"]) as child, stack.client(admin["token"]) as child_admin:
        printers = (await child.get("/v1/printers")).json()["printers"]
        assert [(p["id"], p["connector_id"]) for p in printers] == [("office", "a-site")]
        submitted = await child.post("/v1/printers/office/jobs?title=invoice", content=DOCUMENT)
        assert submitted.status_code == 201, submitted.text
        job = submitted.json()["id"]
        with trio.fail_after(30):
            async for state in stack.watch(child, job):
                if state in ("completed", "failed"):
                    break
        assert (await child.get(f"/v1/jobs/{job}")).json()["state"] == "completed"
        assert [d.size for d in raw_sink.documents].count(len(DOCUMENT)) == 1

        # Nothing of the parent's: its job and printer are unknown ids; its lists hold the child's only.
        assert (await child.get(f"/v1/jobs/{parent_job['id']}")).status_code == 404
        assert [j["id"] for j in (await child.get("/v1/jobs")).json()["jobs"]] == [job]
        # The child's admin governs its own tenant, and no other: not itself, its parent, its sibling.
        assert (await child_admin.get("/v1/tenants")).json() == {"tenants": [], "next": None}
        refused = await child_admin.post("/v1/tenants", json={"name": "grandchild"})
        assert refused.status_code == 403 and "only a top-level tenant" in refused.json()["error"]
        for other in (first, "acme", second):
            for method, template in (
                ("GET", "/v1/tenants/{id}"), ("GET", "/v1/tenants/{id}/tokens"),
                ("POST", "/v1/tenants/{id}/tokens"), ("GET", "/v1/tenants/{id}/usage"),
            ):  # fmt: skip
                await same_as_missing(child_admin, method, template, other)

    async with stack.client() as parent:
        # The parent reads its child's usage; it does not see the child's jobs as its own.
        assert (await parent.get(f"/v1/jobs/{job}")).status_code == 404
        usage = (await parent.get(f"/v1/tenants/{first}/usage")).json()
        assert (usage["tenant"], usage["jobs"], usage["bytes"]) == (first, 1, len(DOCUMENT))
        assert usage["by_state"]["completed"] == {"jobs": 1, "bytes": len(DOCUMENT)}
        assert usage["by_state"]["queued"] == {"jobs": 0, "bytes": 0}
        later = await parent.get(f"/v1/tenants/{first}/usage", params={"since": "2100-01-01T00:00:00Z"})
        assert (later.json()["jobs"], later.json()["since"]) == (0, "2100-01-01T00:00:00.000Z")
        sibling = (await parent.get(f"/v1/tenants/{second}/usage")).json()
        assert (sibling["jobs"], sibling["bytes"]) == (0, 0)

        # A sibling's token sees nothing of the first child's.
        other_app = await child_token(parent, second, scopes=["jobs:read"])
        async with stack.client(other_app["token"]) as sibling_client:
            assert (await sibling_client.get("/v1/printers")).json()["printers"] == []
            assert (await sibling_client.get(f"/v1/jobs/{job}")).status_code == 404
            assert (await sibling_client.get("/v1/jobs")).json()["jobs"] == []

        # Revoking works at once; another child's token id is unknown in this child.
        assert (await parent.delete(f"/v1/tenants/{first}/tokens/{other_app['id']}")).status_code == 404
        assert (await parent.delete(f"/v1/tenants/{first}/tokens/{app['id']}")).status_code == 204
        async with stack.client(app["token"]) as child:
            assert (await child.get("/v1/printers")).status_code == 401
        revoked = {
            t["id"]: t["revoked_at"]
            for t in (await parent.get(f"/v1/tenants/{first}/tokens")).json()["tokens"]
        }
        assert revoked[app["id"]] is not None and revoked[admin["id"]] is None
        # ... and the connector's session closes when its token is revoked.
        (session,) = [s for s in stack.relay.registry.sessions() if s.principal.tenant == first]
        assert (await parent.delete(f"/v1/tenants/{first}/tokens/{connector['id']}")).status_code == 204
        with trio.fail_after(10):
            while session in stack.relay.registry.sessions():
                await stack.relay.registry.changed.wait()

    entries = [e for e in audit_entries(caplog) if e["action"] != "connector.session_closed"]
    assert [(e["action"], e["tenant"], e["target"]) for e in entries] == [
        ("tenant.created", "acme", f"tenant:{first}"),
        ("tenant.created", "acme", f"tenant:{second}"),
        ("token.created", first, f"token:{connector['id']}"),
        ("token.created", first, f"token:{app['id']}"),
        ("token.created", first, f"token:{admin['id']}"),
        ("token.created", second, f"token:{other_app['id']}"),
        ("token.revoked", first, f"token:{app['id']}"),
        ("token.revoked", first, f"token:{connector['id']}"),
    ]
    assert all(e["actor"] == parent_actor for e in entries)
    assert all(e["parent"] == "acme" for e in entries if e["action"].startswith("token."))
    assert entries[2]["kind"] == "connector" and entries[2]["connector_id"] == "a-site"
    assert entries[4]["scopes"] == "admin"
    assert all(connector["token"] not in str(e) for e in audit_entries(caplog))


async def test_only_an_admin_manages_children(relay_stack: RelayStack) -> None:
    reader = await relay_stack.token("api", scopes=("jobs:submit", "jobs:read", "printers:admin"))
    async with relay_stack.client(reader) as client:
        for method, path in (("GET", "/v1/tenants"), ("POST", "/v1/tenants")):
            refused = await client.request(method, path, json={"name": "x"})
            assert refused.status_code == 403 and "admin" in refused.json()["error"], refused.text


async def test_requests_are_bounded_and_errors_name_the_limit(relay_stack: RelayStack) -> None:
    async with relay_stack.client() as client:
        child = await make_child(client, "  Spaces around are trimmed  ")
        assert (await client.get(f"/v1/tenants/{child}")).json()["name"] == "Spaces around are trimmed"
        bad_children: list[tuple[Any, str]] = [
            ({"name": "n" * 201}, "1 to 200 printable characters"),
            ({"name": ""}, "1 to 200 printable characters"),
            ({"name": "tab\there"}, "printable"),
            ({"name": 5}, "name must be a string"),
            ({"name": "x", "id": "acme"}, "unknown field 'id'; the fields are name"),
            ([1, 2], "a JSON object"),
        ]
        for body, message in bad_children:
            refused = await client.post("/v1/tenants", json=body)
            assert refused.status_code == 400 and message in refused.json()["error"], (body, refused.text)
        too_big = await client.post("/v1/tenants", content=b'{"name": "' + b"x" * 20_000 + b'"}')
        assert too_big.status_code == 413 and "max_admin_body" in too_big.json()["error"]
        bad_tokens: list[tuple[dict[str, Any], str]] = [
            ({"kind": "user"}, "kind must be api or connector"),
            ({"scopes": ["root"]}, "unknown scope 'root'; scopes are jobs:submit, jobs:read"),
            ({"scopes": "admin"}, "scopes must be a list"),
            ({"kind": "connector", "scopes": ["admin"]}, "scopes are for API tokens"),
            ({"connector_id": "a-site"}, "connector_id is for connector tokens"),
            ({"kind": "connector", "connector_id": "../x"}, "invalid connector id"),
            ({"label": "l" * 201}, "label is longer than 200 characters"),
            ({"expires_in": "2000d"}, "expires_in must be between 1 s and 365 days"),
            ({"secret": "mine"}, "unknown field 'secret'"),
        ]
        for body, message in bad_tokens:
            refused = await client.post(f"/v1/tenants/{child}/tokens", json=body)
            assert refused.status_code == 400 and message in refused.json()["error"], (body, refused.text)
        assert (await client.get(f"/v1/tenants/{child}/tokens")).json()["tokens"] == []  # none was made
        for params, message in (
            ({"since": "yesterday"}, "since must be an ISO 8601 time"),
            ({"since": "2026-02-01", "until": "2026-01-01"}, "until must not be before since"),
            ({"since": "NaN"}, "since must be in the years 1 to 9999"),
            ({"until": "1e300"}, "until must be in the years 1 to 9999"),
        ):
            refused = await client.get(f"/v1/tenants/{child}/usage", params=params)
            assert refused.status_code == 400 and message in refused.json()["error"], refused.text
        refused = await client.get("/v1/tenants", params={"limit": "0"})
        assert refused.status_code == 400 and "limit must be between 1 and 500" in refused.json()["error"]


@pytest.mark.parametrize("relay_overrides", [{"max_child_tenants": 2}])
async def test_children_come_in_pages_up_to_max_child_tenants(relay_stack: RelayStack) -> None:
    async with relay_stack.client() as client:
        made = [await make_child(client, f"customer {n}") for n in range(2)]
        refused = await client.post("/v1/tenants", json={"name": "one too many"})
        assert refused.status_code == 409, refused.text
        assert "has 2 child tenants already (max_child_tenants=2)" in refused.json()["error"]
        first = (await client.get("/v1/tenants", params={"limit": 1})).json()
        assert [t["id"] for t in first["tenants"]] == made[:1] and first["next"] == made[0]
        rest = (await client.get("/v1/tenants", params={"limit": 1, "after": first["next"]})).json()
        assert [t["id"] for t in rest["tenants"]] == made[1:] and rest["next"] is None
