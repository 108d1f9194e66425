"""Pull printers: every job to one is held until its owner (or a tenant admin) releases it, to that printer
or another of the same connector that can print it; a held job nobody releases expires after held_job_ttl
and its document is erased. Over REST and IPP, with a real connector and RAW printer, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import time
from typing import Any

import httpx
import pytest
import trio
from fixtures_printers import IppEvePrinterFactory, RawSink
from fixtures_processes import printrelay
from fixtures_relay import RelayStack
from test_ipp_endpoint import JOB, Ipp, offline_printer
from test_users import ADA, ANN, BOB, as_user, make_users

from ipp import JobState as IppJobState
from ipp import Operation, Status, ValueTag
from printrelay.api_client import SubmitFailed
from printrelay.client import _follow
from relay.config import RelayConfig
from relay.jobs import AWAITING_RELEASE
from service.settings import load

BACKENDS = pytest.mark.parametrize("relay_backend", ["sqlite", "postgres"])
DAY = 86400.0
HELD_TTL = 6.0  # short enough to wait for, long enough (on a loaded host) to release a job before it passes


def epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def make_pull(client: httpx.AsyncClient, printer_id: str, pull: bool = True) -> dict[str, Any]:
    reply = await client.post("/v1/printers", json={"id": printer_id, "pull": pull})
    assert reply.status_code == 200, reply.text
    printer: dict[str, Any] = reply.json()
    assert printer["id"] == printer_id and printer["pull"] is pull
    return printer


async def submit(client: httpx.AsyncClient, printer_id: str, body: bytes, **params: str) -> dict[str, Any]:
    reply = await client.post(f"/v1/printers/{printer_id}/jobs", params=params, content=body)
    assert reply.status_code == 201, reply.text
    job: dict[str, Any] = reply.json()
    return job


async def release(client: httpx.AsyncClient, job_id: str, printer_id: str | None = None) -> httpx.Response:
    body = {"printer_id": printer_id} if printer_id else None
    return await client.post(f"/v1/jobs/{job_id}/release", json=body)


@BACKENDS
async def test_a_pull_printer_holds_jobs_until_their_owner_releases_them(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    stack = relay_stack
    ids = await make_users(stack)
    await stack.start_connector({"label": raw_sink.uri, "spare": raw_sink.uri})
    async with stack.client() as app, as_user(stack, ANN) as ann, as_user(stack, BOB) as bob:
        await make_pull(app, "label")
        assert (await app.get("/v1/printers/label")).json()["pull"] is True
        assert (await app.get("/v1/printers/spare")).json()["pull"] is False

        document = os.urandom(150_000)  # larger than a payload kept with the row: a spooled file
        job = await submit(ann, "label", document, hold="false")  # the printer decides, not the client
        assert job["state"] == "held" and job["owner"] == ids[ANN]
        assert job["hold_reason"] == AWAITING_RELEASE
        # a held job waits at most held_job_ttl (default 1 day), not job_ttl (14 days)
        assert abs(epoch(job["expires_at"]) - epoch(job["created_at"]) - DAY) < 1
        (accepted,) = (await ann.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
        assert accepted["state"] == "held" and accepted["message"].endswith(f"{AWAITING_RELEASE} label")

        # The dispatcher is at work (a job to the other printer prints) but leaves the held one alone.
        other = await submit(app, "spare", b"not a pull printer")
        assert other["state"] == "queued" and other["hold_reason"] is None
        assert (await stack.wait_job(other["id"]))["state"] == "completed"
        (printed,) = await raw_sink.wait_for(1)
        assert printed.path.read_bytes() == b"not a pull printer"
        assert (await ann.get(f"/v1/jobs/{job['id']}")).json()["state"] == "held"

        # Another user cannot release it (nor learn it exists); its owner can.
        refused = await release(bob, job["id"])
        assert refused.status_code == 404 and refused.json()["error"] == f"job {job['id']} not found"
        released = await release(ann, job["id"])
        assert released.status_code == 200, released.text
        queued = released.json()
        assert queued["state"] in ("queued", "sending", "printing", "completed")
        assert queued["hold_reason"] is None and queued["last_error"] is None
        # released: it has job_ttl (14 days) from now to be delivered
        assert abs(epoch(queued["expires_at"]) - time.time() - 14 * DAY) < 60
        done = await stack.wait_job(job["id"])
        assert done["state"] == "completed", done
        assert done["last_error"] is None
        _, delivered = await raw_sink.wait_for(2)
        assert delivered.sha256 == hashlib.sha256(document).hexdigest()
        history = (await ann.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
        assert history[1]["state"] == "queued" and history[1]["message"] == f"released by {ANN}"
        again = await release(ann, job["id"])
        assert again.status_code == 409 and again.json()["error"] == f"job {job['id']} is completed, not held"


@BACKENDS
async def test_a_tenant_admin_releases_a_users_job_and_ipp_jobs_are_held_too(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"label": raw_sink.uri})
    async with stack.client() as app:
        await make_pull(app, "label")
    # Over IPP, as Bob: held as well, pending-held with the reason as its job-state-message.
    ipp = Ipp(stack, "label", auth=(BOB, "correct horse battery"))
    response = await ipp.print_job(b"%PDF-1.4 bob's label")
    assert response.code == Status.SUCCESSFUL_OK, response
    number = response.value(JOB, "job-id")
    assert isinstance(number, int)
    attributes = await ipp.send(ipp.request(Operation.GET_JOB_ATTRIBUTES, job_id=(ValueTag.INTEGER, number)))
    assert attributes.value(JOB, "job-state") == IppJobState.PENDING_HELD
    assert attributes.value(JOB, "job-state-message") == AWAITING_RELEASE
    async with as_user(stack, BOB) as bob, as_user(stack, ANN) as ann, as_user(stack, ADA) as ada:
        (job,) = (await bob.get("/v1/jobs")).json()["jobs"]
        assert job["state"] == "held" and job["user"] == BOB and job["hold_reason"] == AWAITING_RELEASE
        assert (await release(ann, job["id"])).status_code == 404
        released = await release(ada, job["id"])  # a tenant admin may release anyone's job
        assert released.status_code == 200, released.text
    assert (await stack.wait_job(job["id"]))["state"] == "completed"
    (document,) = await raw_sink.wait_for(1)
    assert document.path.read_bytes() == b"%PDF-1.4 bob's label"
    assert await ipp.wait_state(number, (IppJobState.COMPLETED,)) == IppJobState.COMPLETED


@BACKENDS
async def test_release_to_another_printer_of_the_same_connector_that_can_print_it(
    relay_stack: RelayStack, raw_sink: RawSink, ippeveprinter_factory: IppEvePrinterFactory
) -> None:
    stack = relay_stack
    await stack.start_connector({"label": raw_sink.uri, "spare": raw_sink.uri})
    await stack.start_connector({"far": raw_sink.uri}, connector_id="site-2")
    pdf_only = ippeveprinter_factory("pdf-only", formats=("application/pdf",))
    async with stack.client() as app:
        adopted = await app.post(
            "/v1/printers", json={"uri": pdf_only.uri, "id": "eve", "connector_id": "site-1", "pull": True}
        )
        assert adopted.status_code == 201, adopted.text
        assert adopted.json()["pull"] is True
        assert "text/plain" not in adopted.json()["capabilities"]["document_formats"]
        await make_pull(app, "label")
        document = b"plain text, as a RAW printer takes it\n" * 100
        reply = await app.post(
            "/v1/printers/label/jobs", content=document, headers={"content-type": "text/plain"}
        )
        assert reply.status_code == 201, reply.text
        job = reply.json()
        assert job["state"] == "held"

        sealed = await release(app, job["id"], "far")
        assert sealed.status_code == 409
        assert sealed.json()["error"] == (
            "printer far is served by connector site-2, but the job is sealed to connector site-1; "
            "submit it again for that printer"
        )
        unable = await release(app, job["id"], "eve")
        assert unable.status_code == 409
        assert unable.json()["error"].startswith(
            "printer eve cannot print this job: document-format text/plain is not supported by this printer"
        )
        missing = await release(app, job["id"], "nowhere")
        assert missing.status_code == 404 and missing.json()["error"] == "printer nowhere not found"
        still = (await app.get(f"/v1/jobs/{job['id']}")).json()
        assert still["state"] == "held" and still["printer_id"] == "label"
        assert still["hold_reason"] == AWAITING_RELEASE

        moved = await app.post(f"/v1/jobs/{job['id']}/release", params={"printer_id": "spare"})
        assert moved.status_code == 200, moved.text
        assert moved.json()["printer_id"] == "spare"
    done = await stack.wait_job(job["id"])
    assert done["state"] == "completed" and done["printer_id"] == "spare"
    (delivered,) = await raw_sink.wait_for(1)
    assert delivered.sha256 == hashlib.sha256(document).hexdigest()


@BACKENDS
@pytest.mark.parametrize("relay_overrides", [{"held_job_ttl": HELD_TTL}])
async def test_held_jobs_nobody_releases_expire_and_are_erased(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    stack = relay_stack
    spool = stack.relay.spool
    await stack.start_connector({"label": raw_sink.uri, "spare": raw_sink.uri})
    async with stack.client() as app:
        await make_pull(app, "label")
        spooled = await submit(app, "label", os.urandom(spool.inline_max + 1000))
        inline = await submit(app, "label", b"a few bytes kept with the job's row")
        asked = await submit(app, "spare", b"held with hold=true", hold="true", expires_in="30d")
        saved = await submit(app, "label", b"released in time")
        released = await release(app, saved["id"])
        assert released.status_code == 200, released.text
        for job in (spooled, inline, asked):
            assert job["state"] == "held"
            # held_job_ttl bounds the wait for a release, whatever expires_in asked
            assert abs(epoch(job["expires_at"]) - epoch(job["created_at"]) - HELD_TTL) < 0.01
        assert epoch(released.json()["expires_at"]) > time.time() + 13 * DAY
        # the payloads are there while the jobs wait
        async for chunk in spool.open(spooled["id"]):
            assert chunk
            break
        assert await stack.relay.store.get_payload(inline["id"]) is not None

        for job in (spooled, inline, asked):
            done = await stack.wait_job(job["id"], states=("expired",), within=HELD_TTL + 20)
            assert done["state"] == "expired" and done["hold_reason"] is None
            events = (await app.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
            assert events[-1]["message"] == "not released before expires_at; its document is erased"
        # A pull printer's job no longer says it waits, but why it ended (also its IPP job-state-message);
        # one held with hold=true had no hold reason to replace.
        expired = (await app.get(f"/v1/jobs/{inline['id']}")).json()
        assert expired["last_error"] == "not released before expires_at; its document is erased"
        assert (await app.get(f"/v1/jobs/{asked['id']}")).json()["last_error"] is None
    with pytest.raises(FileNotFoundError):
        async for _ in spool.open(spooled["id"]):
            pass
    assert await stack.relay.store.get_payload(inline["id"]) is None
    assert (await stack.wait_job(saved["id"]))["state"] == "completed"
    (document,) = await raw_sink.wait_for(1)
    assert document.path.read_bytes() == b"released in time"


@BACKENDS
async def test_a_connectors_reports_never_reset_pull(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    stack = relay_stack
    connector = await stack.stoppable_connector({"label": raw_sink.uri})
    async with stack.client() as app:
        await make_pull(app, "label")
        connector.cancel()
        with trio.fail_after(10):
            while stack.relay.registry.sessions():
                await stack.relay.registry.changed.wait()
        assert (await app.get("/v1/printers/label")).json()["pull"] is True
        # the pull flag is the relay's: changed while the connector is away, no connector asked
        await make_pull(app, "label", False)
        await make_pull(app, "label", True)

        await stack.stoppable_connector({"label": raw_sink.uri})  # registers: its inventory is stored
        back = (await app.get("/v1/printers/label")).json()
        assert back["online"] is True and back["pull"] is True
        job = await submit(app, "label", b"still a pull printer")
        assert job["state"] == "held" and job["hold_reason"] == AWAITING_RELEASE


async def test_pull_requests_are_validated(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    stack = relay_stack
    await make_users(stack)
    await stack.start_connector({"label": raw_sink.uri})
    async with stack.client() as app:
        for body, status, error in (
            ({"id": "label", "pull": "yes"}, 400, 'pull must be true or false, not "yes"'),
            ({"id": "label", "pull": 1}, 400, "pull must be true or false, not 1"),
            ({"id": "nowhere", "pull": True}, 404, "printer nowhere not found"),
            ({"pull": True}, 400, 'to make a printer a pull printer or not, {"id": ..., "pull": true|false}'),
        ):
            reply = await app.post("/v1/printers", json=body)
            assert reply.status_code == status and error in reply.json()["error"], (body, reply.text)
        assert (await app.get("/v1/printers/label")).json()["pull"] is False
        assert (await app.delete("/v1/printers/label")).status_code == 200
        gone = await app.post("/v1/printers", json={"id": "label", "pull": True})
        assert gone.status_code == 404 and gone.json()["error"] == "printer label not found"
    weak = await stack.token("api", scopes=("jobs:submit", "jobs:read"))
    async with stack.client(weak) as client, as_user(stack, ANN) as ann:
        for who in (client, ann):
            reply = await who.post("/v1/printers", json={"id": "label", "pull": True})
            assert reply.status_code == 403, reply.text


async def test_an_ipp_job_to_a_pull_printer_stays_held_when_its_last_document_arrives(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    stack = relay_stack
    await stack.start_connector({"label": raw_sink.uri})
    async with stack.client() as app:
        await make_pull(app, "label")
        ipp = Ipp(stack, "label")
        number = (await ipp.send(ipp.request(Operation.CREATE_JOB))).value(JOB, "job-id")
        assert isinstance(number, int)
        number_attr = (ValueTag.INTEGER, number)
        sent = await ipp.send(
            ipp.request(Operation.SEND_DOCUMENT, job_id=number_attr, last_document=(ValueTag.BOOLEAN, False)),
            b"%PDF-1.4 in two steps",
        )
        assert sent.code == Status.SUCCESSFUL_OK, sent
        closed = await ipp.send(ipp.request(Operation.CLOSE_JOB, job_id=number_attr))
        assert closed.code == Status.SUCCESSFUL_OK, closed
        # its last document came, but it waits for a person at the printer, as every job there does
        (job,) = (await app.get("/v1/jobs")).json()["jobs"]
        assert job["state"] == "held" and job["hold_reason"] == AWAITING_RELEASE
        assert await ipp.job_state(number) == IppJobState.PENDING_HELD
        assert (await release(app, job["id"])).status_code == 200
    assert (await stack.wait_job(job["id"]))["state"] == "completed"
    (document,) = await raw_sink.wait_for(1)
    assert document.path.read_bytes() == b"%PDF-1.4 in two steps"


async def test_a_job_set_aside_waits_at_most_held_job_ttl(relay_stack: RelayStack) -> None:
    stack = relay_stack
    await offline_printer(stack, "away")  # its connector holds no session: the job stays queued
    async with stack.client() as app:
        job = await submit(app, "away", b"printed later")
        assert abs(epoch(job["expires_at"]) - epoch(job["created_at"]) - 14 * DAY) < 1
        queued = await stack.relay.store.get_job("acme", job["id"])
        assert queued is not None
        held = await stack.relay.jobs.hold(queued, "held by a person")
        assert held is not None and held.state == "held" and held.expires_at is not None
        assert abs(held.expires_at - time.time() - DAY) < 60
        released = await release(app, job["id"])
        assert released.status_code == 200, released.text
        assert abs(epoch(released.json()["expires_at"]) - time.time() - 14 * DAY) < 60


async def test_the_cli_makes_printers_pull_printers(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    stack = relay_stack
    await stack.start_connector({"label": raw_sink.uri})
    where = ("--relay", stack.api_url, "--token", stack.api_token)
    made = await trio.to_thread.run_sync(lambda: printrelay("printers", "set", "label", "--pull", *where))
    assert made.stdout == "label: a pull printer\n"
    listing = await trio.to_thread.run_sync(lambda: printrelay("printers", "list", *where))
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["PRINTER", "CONNECTOR", "STATE", "PULL", "KIND"]
    name, connector, _, pull, *_ = row.split()
    assert (name, connector, pull) == ("label", "site-1", "yes")
    adopted = await trio.to_thread.run_sync(
        lambda: printrelay("printers", "adopt", raw_sink.uri, "--id", "desk", "--pull", *where)
    )
    assert adopted.stdout == "desk\n"
    refused = await trio.to_thread.run_sync(
        lambda: printrelay("printers", "set", "nowhere", "--no-pull", *where, check=False)
    )
    assert refused.returncode != 0 and "printer nowhere not found" in refused.stderr
    async with stack.client() as app:
        assert (await app.get("/v1/printers/desk")).json()["pull"] is True
        assert (await submit(app, "desk", b"held at the desk"))["state"] == "held"
    ordinary = await stack.token("api", "acme")  # jobs:submit, jobs:read: no candidates, but the printers
    listed = await trio.to_thread.run_sync(
        lambda: printrelay("printers", "list", "--relay", stack.api_url, "--token", ordinary)
    )
    assert {line.split()[0] for line in listed.stdout.splitlines()[1:]} == {"label", "desk"}


async def test_submit_wait_keeps_waiting_for_a_release_at_the_printer(
    relay_stack: RelayStack, raw_sink: RawSink, tmp_path: Any
) -> None:
    stack = relay_stack
    await stack.start_connector({"label": raw_sink.uri})
    document = tmp_path / "label.txt"
    document.write_bytes(b"released while submit waits")
    async with stack.client() as app:
        await make_pull(app, "label")
        done = trio.Event()
        result: list[Any] = []

        async def submit_and_wait() -> None:
            where = ("--relay", stack.api_url, "--token", stack.api_token)
            result.append(await trio.to_thread.run_sync(
                lambda: printrelay("submit", *where, "--printer", "label", "--wait", "--timeout", "60",
                                   str(document), check=False)
            ))  # fmt: skip
            done.set()

        held_ids: list[str] = []
        arrived = trio.Event()

        def heard(notice: Any) -> None:  # the relay's own change notices: the job was accepted, held
            if notice.kind == "job" and notice.data.get("state") == "held":
                held_ids.append(notice.key)
                arrived.set()

        stack.relay.store.on_notice(heard)
        stack.nursery.start_soon(submit_and_wait)
        with trio.fail_after(30):
            await arrived.wait()
        assert not done.is_set()  # held at the printer: the CLI still waits
        held = [{"id": held_ids[0]}]
        assert (await release(app, held[0]["id"])).status_code == 200
        with trio.fail_after(30):
            await done.wait()
    assert result[0].returncode == 0, result[0].stderr
    assert result[0].stdout.strip() == held[0]["id"]
    (printed,) = await raw_sink.wait_for(1)
    assert printed.sha256 == hashlib.sha256(b"released while submit waits").hexdigest()


def test_held_job_ttl_is_a_bounded_duration() -> None:
    assert RelayConfig().held_job_ttl == DAY
    loaded = load(RelayConfig, argparse.Namespace(), environ={"PRINTRELAY_HELD_JOB_TTL": "2h"})
    assert loaded.held_job_ttl == 7200.0
    with pytest.raises(ValueError, match=r"^held_job_ttl must be between 1s and 365d, not 500ms$"):
        RelayConfig(held_job_ttl=0.5)
    with pytest.raises(ValueError, match=r"^held_job_ttl must be between 1s and 365d, not 400d$"):
        RelayConfig(held_job_ttl=400 * DAY)


def test_submit_wait_does_not_stop_at_a_job_awaiting_its_release() -> None:
    """``_follow`` alone, against a relay that answers held (awaiting release) twice, then completed: no
    timing decides whether the held branch runs."""

    def relay_answering(*answers: dict[str, Any]) -> httpx.Client:
        states = iter(answers)
        transport = httpx.MockTransport(
            lambda request: httpx.Response(200, json={"id": "j1", **next(states)})
        )
        return httpx.Client(base_url="http://relay", transport=transport)

    awaiting = {"state": "held", "hold_reason": AWAITING_RELEASE}
    with relay_answering(awaiting, awaiting, {"state": "completed"}) as client:
        assert _follow(client, "pra_x", {"id": "j1", "state": "held"}, 30.0, False) == 0
    unknown = {"state": "held", "hold_reason": "outcome unknown: the connector stopped"}
    with (
        relay_answering(unknown) as client,
        pytest.raises(SubmitFailed, match="release it to print it again"),
    ):
        _follow(client, "pra_x", {"id": "j1", "state": "queued"}, 30.0, False)
