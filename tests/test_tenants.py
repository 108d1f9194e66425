"""Tenant isolation over every REST endpoint, the IPP endpoint and the tunnel.

Two tenants, ``acme`` and ``globex``, each with a connector serving a printer called ``office`` (printer
ids are per tenant) on its own RAW sink; acme also has ``a-only``. For each REST route globex aims at
acme's ids and must get exactly what an id that does not exist gets: 404 (or, for a connector id, the
same "not connected" answer), never a hint that acme's id exists.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fixtures_printers import RawSink
from fixtures_relay import RelayStack, no_streams
from test_device_events import open_stream
from test_ipp_endpoint import Ipp

from connector.tunnel import TunnelClient
from ipp import DelimiterTag, Operation, Status, ValueTag
from relay.auth import new_token
from relay.users import new_user
from tunnel.wsstream import WebSocketRejected

MISSING = "zz-no-such-id"


@pytest.fixture
async def sink_b(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[RawSink]:
    directory = tmp_path / "sink-b"
    directory.mkdir()
    sink = RawSink(directory)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, sink._handle, 0, host="127.0.0.1"))
    sink.port = listeners[0].socket.getsockname()[1]
    yield sink


class Tenants:
    def __init__(self, stack: RelayStack, globex_token: str) -> None:
        self.stack = stack
        self.acme = stack.client()
        self.globex = stack.client(globex_token)
        self.globex_token = globex_token


@pytest.fixture
async def tenants(relay_stack: RelayStack, raw_sink: RawSink, sink_b: RawSink) -> AsyncIterator[Tenants]:
    await relay_stack.start_connector({"office": raw_sink.uri, "a-only": raw_sink.uri}, connector_id="site-a")
    await relay_stack.start_connector({"office": sink_b.uri}, tenant="globex", connector_id="site-b")
    globex_token = await relay_stack.token("api", "globex", scopes=("admin",))
    t = Tenants(relay_stack, globex_token)
    async with t.acme, t.globex:
        yield t


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_rest_matrix_other_tenants_ids_look_like_missing_ones(
    tenants: Tenants, raw_sink: RawSink
) -> None:
    acme, globex = tenants.acme, tenants.globex
    queued = await acme.post("/v1/printers/office/jobs", content=b"acme's document\n")
    held = await acme.post("/v1/printers/office/jobs?hold=true", content=b"acme's held document\n")
    assert queued.status_code == held.status_code == 201
    job, held_job = queued.json()["id"], held.json()["id"]
    hook = await acme.post("/v1/webhooks", json={"url": "https://hooks.acme.example/print"})
    assert hook.status_code == 201, hook.text
    ann = await acme.post("/v1/users", json={"email": "ann@acme.example", "password": "ann's password"})
    assert ann.status_code == 201, ann.text
    await raw_sink.wait_for(1)
    # A person of each tenant, with a token of their own.
    ann_token, ann_record = new_token("acme", "user", user_id=ann.json()["id"])
    await tenants.stack.relay.store.add_token(ann_record)
    gus = new_user("globex", "gus@globex.example")
    await tenants.stack.relay.store.add_user(gus)
    gus_token, gus_record = new_token("globex", "user", user_id=gus.id)
    await tenants.stack.relay.store.add_token(gus_record)
    # A child tenant of acme's (the integrator API), with a token.
    child = (await acme.post("/v1/tenants", json={"name": "acme's customer"})).json()["id"]
    child_token = (await acme.post(f"/v1/tenants/{child}/tokens", json={})).json()["id"]

    # (method, path with {id}, the id of acme's, body)
    cases: list[tuple[str, str, str, Any]] = [
        ("POST", "/v1/printers/{id}/jobs", "a-only", b"globex tries acme's printer"),
        ("GET", "/v1/printers/{id}", "a-only", None),
        ("GET", "/v1/printers/{id}/qr.svg", "a-only", None),
        ("GET", "/v1/printers/{id}/qr.png", "a-only", None),
        ("DELETE", "/v1/printers/{id}", "a-only", None),
        ("GET", "/v1/jobs/{id}", job, None),
        ("GET", "/v1/jobs/{id}/events", job, None),
        ("GET", "/v1/jobs/{id}/watch", job, None),
        ("POST", "/v1/jobs/{id}/cancel", held_job, None),
        ("POST", "/v1/jobs/{id}/release", held_job, None),
        ("POST", "/v1/printers", "site-a", {"uri": raw_sink.uri, "id": "stolen", "connector_id": "{id}"}),
        ("DELETE", "/v1/webhooks/{id}", hook.json()["id"], None),
        ("GET", "/v1/users/{id}", ann.json()["id"], None),
        ("POST", "/v1/users/{id}", ann.json()["id"], {"state": "disabled"}),
        ("GET", "/v1/tenants/{id}", child, None),
        ("GET", "/v1/tenants/{id}/tokens", child, None),
        ("POST", "/v1/tenants/{id}/tokens", child, {"label": "stolen"}),
        ("DELETE", "/v1/tenants/{id}/tokens/" + child_token, child, None),
        ("GET", "/v1/tenants/{id}/usage", child, None),
        ("GET", "/v1/tenants/{id}", "acme", None),  # another top-level tenant: not globex's child
    ]
    routes = {(m, p.pattern) for m, p, _, _ in tenants.stack.relay.api.routes}
    covered: set[tuple[str, str]] = set()
    for method, template, acme_id, body in cases:
        answers = []
        for some_id in (acme_id, MISSING):
            path = template.format(id=some_id)
            kwargs: dict[str, Any] = {}
            if isinstance(body, bytes):
                kwargs["content"] = body
            elif isinstance(body, dict):
                kwargs["json"] = {k: v.format(id=some_id) for k, v in body.items()}
            response = await globex.request(method, path, **kwargs)
            assert response.status_code == 404, (method, path, response.text)
            answers.append((response.status_code, response.json()["error"].replace(some_id, "ID")))
            covered |= {(m, p) for m, p in routes if m == method and re.match(p, path)}
        assert answers[0] == answers[1], (method, template, answers)

    # Listings show only the caller's own.
    listed = {(p["id"], p["connector_id"]) for p in (await globex.get("/v1/printers")).json()["printers"]}
    assert listed == {("office", "site-b")}
    assert (await globex.get("/v1/jobs")).json()["jobs"] == []
    assert (await globex.get("/v1/jobs?printer_id=office")).json()["jobs"] == []
    assert all(
        c["connector_id"] == "site-b" for c in (await globex.get("/v1/candidates")).json()["candidates"]
    )
    assert (await globex.get("/v1/webhooks")).json()["webhooks"] == []
    own = await globex.post("/v1/webhooks", json={"url": "https://hooks.globex.example/print"})
    assert own.status_code == 201
    assert [u["email"] for u in (await globex.get("/v1/users")).json()["users"]] == ["gus@globex.example"]
    made = await globex.post("/v1/users", json={"email": "gail@globex.example"})
    assert made.status_code == 201
    assert (await globex.get("/v1/tenants")).json()["tenants"] == []
    own_child = await globex.post("/v1/tenants", json={"name": "globex's customer"})
    assert own_child.status_code == 201
    # Its own child, and acme's child's token: unknown there, like a token that does not exist.
    answers = [
        (r.status_code, r.json()["error"].replace(some_id, "ID"))
        for some_id in (child_token, MISSING)
        for r in [await globex.delete(f"/v1/tenants/{own_child.json()['id']}/tokens/{some_id}")]
    ]
    assert answers[0] == answers[1] and answers[0][0] == 404, answers
    # /v1/me and a person's own tokens act on the caller alone: gus cannot reach ann's token.
    async with tenants.stack.client(gus_token) as gus_client:
        assert (await gus_client.get("/v1/me")).json()["tenant"] == "globex"
        assert (await gus_client.get("/v1/me/tokens")).json()["tokens"][0]["id"] == gus_record.id
        assert (await gus_client.post("/v1/me/tokens", json={})).status_code == 201
        answers = [
            (r.status_code, r.json()["error"].replace(some_id, "ID"))
            for some_id in (ann_record.id, MISSING)
            for r in [await gus_client.delete(f"/v1/me/tokens/{some_id}")]
        ]
        assert answers[0] == answers[1] and answers[0][0] == 404, answers
    async with tenants.stack.client(ann_token) as ann_client:
        assert (await ann_client.get("/v1/me")).json()["user"]["email"] == "ann@acme.example"
    assert [h["id"] for h in (await acme.get("/v1/webhooks")).json()["webhooks"]] == [hook.json()["id"]]
    lists = (r"^/v1/printers$", r"^/v1/jobs$", r"^/v1/candidates$", r"^/v1/webhooks$", r"^/v1/users$")
    lists += (r"^/v1/tenants$",)
    covered |= {(m, p) for m, p in routes if m == "GET" and p in lists}
    covered |= {("POST", r"^/v1/webhooks$"), ("POST", r"^/v1/users$"), ("POST", r"^/v1/tenants$")}
    covered |= {(m, p) for m, p in routes if p.startswith("^/v1/me")}
    # a tenant's stream shows its own events only: test_event_streams_show_only_their_tenant
    covered |= {("GET", r"^/v1/events$")}
    assert covered == routes, f"routes without an isolation case: {routes - covered}"

    # Nothing of acme's changed.
    assert (await acme.get(f"/v1/jobs/{held_job}")).json()["state"] == "held"
    assert (await acme.get("/v1/printers/a-only")).json()["state"] != "removed"
    assert (await acme.get("/v1/printers/stolen")).status_code == 404
    assert (await acme.get(f"/v1/users/{ann.json()['id']}")).json()["state"] == "active"
    child_tokens = (await acme.get(f"/v1/tenants/{child}/tokens")).json()["tokens"]
    assert [t["revoked_at"] for t in child_tokens] == [None]
    assert [t["id"] for t in (await acme.get("/v1/tenants")).json()["tenants"]] == [child]


async def test_event_streams_show_only_their_tenant(tenants: Tenants) -> None:
    """GET /v1/events of globex sees nothing of acme's job changes and device events, and the reverse."""
    stack = tenants.stack
    acme_events = await open_stream(stack)
    globex_events = await open_stream(stack, tenants.globex_token)
    acme_job = (await tenants.acme.post("/v1/printers/office/jobs", content=b"acme's\n")).json()["id"]
    assert (await tenants.acme.delete("/v1/printers/a-only")).status_code == 200  # printer.removed
    await acme_events.wait_until(
        lambda: "completed" in acme_events.jobs(acme_job) and "printer.removed" in acme_events.names()
    )
    # globex's own events, made after acme's: once its stream shows them, acme's would have come before.
    globex_job = (await tenants.globex.post("/v1/printers/office/jobs", content=b"globex's\n")).json()["id"]
    await globex_events.wait_until(lambda: "completed" in globex_events.jobs(globex_job))
    assert globex_events.jobs(acme_job) == [] and "printer.removed" not in globex_events.names()
    assert {d["data"].get("job_id") for _, d in globex_events.events} == {globex_job}
    later = (await tenants.acme.post("/v1/printers/office/jobs", content=b"acme's again\n")).json()["id"]
    await acme_events.wait_until(lambda: "completed" in acme_events.jobs(later))
    assert acme_events.jobs(globex_job) == []


async def test_same_printer_id_two_tenants_jobs_never_cross(
    tenants: Tenants, raw_sink: RawSink, sink_b: RawSink
) -> None:
    a = await tenants.acme.post("/v1/printers/office/jobs", content=b"for acme's office\n")
    b = await tenants.globex.post("/v1/printers/office/jobs", content=b"for globex's office\n")
    assert a.status_code == b.status_code == 201
    (doc_a,) = await raw_sink.wait_for(1)
    (doc_b,) = await sink_b.wait_for(1)
    assert doc_a.sha256 == _sha(b"for acme's office\n")
    assert doc_b.sha256 == _sha(b"for globex's office\n")
    assert (await tenants.acme.get(f"/v1/jobs/{b.json()['id']}")).status_code == 404


async def test_tokens_of_one_kind_do_not_open_the_other_door(tenants: Tenants) -> None:
    stack = tenants.stack
    connector_token = await stack.token("connector", connector_id="site-a")
    async with stack.client(connector_token) as client:
        assert (await client.get("/v1/printers")).status_code == 401

    tunnel = TunnelClient(stack.tunnel_url, stack.api_token, no_streams)
    with pytest.raises(WebSocketRejected) as info:
        await tunnel._one_session()
    assert info.value.status_code == 401

    # A scoped token: reading is not submitting, and not administering printers.
    reader = await stack.token("api", "acme", scopes=("jobs:read",))
    async with stack.client(reader) as client:
        assert (await client.get("/v1/printers")).status_code == 200
        assert (await client.post("/v1/printers/office/jobs", content=b"x")).status_code == 403
        assert (await client.get("/v1/candidates")).status_code == 403


async def test_ipp_endpoint_isolation(tenants: Tenants, raw_sink: RawSink) -> None:
    stack = tenants.stack
    acme = Ipp(stack, "office")
    printed = await acme.print_job(b"%PDF-1.4 acme over ipp\n")
    assert printed.code == Status.SUCCESSFUL_OK
    number = printed.value(DelimiterTag.JOB_ATTRIBUTES, "job-id")
    assert isinstance(number, int)

    globex_office = Ipp(stack, "office", auth=("globex", tenants.globex_token))
    jobs = await globex_office.send(
        globex_office.request(Operation.GET_JOBS, which_jobs=(ValueTag.KEYWORD, "all"))
    )
    assert jobs.code == Status.SUCCESSFUL_OK
    assert not [g for g in jobs.groups if g.tag == DelimiterTag.JOB_ATTRIBUTES]
    for operation in (Operation.GET_JOB_ATTRIBUTES, Operation.CANCEL_JOB):
        answer = await globex_office.send(globex_office.request(operation, job_id=(ValueTag.INTEGER, number)))
        assert answer.code == Status.CLIENT_ERROR_NOT_FOUND, operation

    globex_a_only = Ipp(stack, "a-only", auth=("globex", tenants.globex_token))
    answer = await globex_a_only.send(globex_a_only.request(Operation.GET_PRINTER_ATTRIBUTES))
    assert answer.code == Status.CLIENT_ERROR_NOT_FOUND

    # globex's token presented as acme's: the same 401 as a wrong token.
    impostor = Ipp(stack, "office", auth=("acme", tenants.globex_token))
    reply = await impostor.post_raw(b"\x02\x00\x00\x0b\x00\x00\x00\x01\x03")
    assert reply.status_code == 401
    assert await acme.job_state(number) in (3, 5, 9)  # acme's job untouched by globex's cancel


async def test_connector_cannot_claim_another_tenants_printers(tenants: Tenants, sink_b: RawSink) -> None:
    """globex's connector reports a printer id acme uses (``a-only``): it becomes globex's ``a-only``;
    acme's printer, its connector and its jobs are unaffected."""
    stack = tenants.stack
    await stack.start_connector({"a-only": sink_b.uri}, tenant="globex", connector_id="site-b2")
    acme_printer = (await tenants.acme.get("/v1/printers/a-only")).json()
    assert acme_printer["connector_id"] == "site-a"
    globex_printer = (await tenants.globex.get("/v1/printers/a-only")).json()
    assert globex_printer["connector_id"] == "site-b2"
    response = await tenants.acme.post("/v1/printers/a-only/jobs", content=b"stays with acme\n")
    assert response.status_code == 201
    job = await stack.wait_job(response.json()["id"], within=15)
    assert job["state"] == "completed"
    assert sink_b.documents == []
