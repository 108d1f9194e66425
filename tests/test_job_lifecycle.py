"""Issue 3: encrypted at rest, hold/release, cancel, retries, expiry, idempotency, limits."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from collections.abc import AsyncGenerator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
import trio.testing
from fixtures_postgres import PostgresServer
from fixtures_printers import IppEvePrinter, RawSink, free_port
from fixtures_relay import RelayStack
from test_ipp_endpoint import offline_printer

from connector.delivery.document import VerifiedDocument
from tunnel.session import H2Stream


@pytest.fixture
def relay_overrides() -> dict[str, Any]:
    return {"retry_base": 0.2, "retry_cap": 1.0, "max_job_bytes": 8 * 1024 * 1024}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def submit(client: httpx.AsyncClient, printer: str, body: bytes, **params: str) -> dict[str, Any]:
    response = await client.post(f"/v1/printers/{printer}/jobs", params=params, content=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def test_the_document_is_never_readable_at_the_relay_and_is_erased_after_printing(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    marker = b"MARKER-" + os.urandom(12).hex().encode()
    body = (b"lorem ipsum " * 5000) + marker + (b" dolor" * 5000)
    async with relay_stack.client() as client:
        job = await submit(client, "label", body, hold="true")
        data_dir = relay_stack.relay.config.data_dir
        spooled = files_under(data_dir)
        assert any(p.suffix == ".sealed" for p in spooled)
        for path in spooled:  # SQLite files, WAL and the spool
            assert marker not in path.read_bytes(), path
        assert (await client.post(f"/v1/jobs/{job['id']}/release")).status_code == 200
    assert (await relay_stack.wait_job(job["id"]))["state"] == "completed"
    [printed] = await raw_sink.wait_for(1)
    assert printed.path.read_bytes() == body
    assert not [p for p in files_under(data_dir) if p.suffix == ".sealed"]


@pytest.mark.parametrize("tamper", ["flip", "swap", "truncate"])
async def test_a_tampered_payload_fails_with_an_integrity_error_and_prints_nothing(
    relay_stack: RelayStack, raw_sink: RawSink, tamper: str, caplog: pytest.LogCaptureFixture
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    body = os.urandom(700_000)  # three 256 KiB chunks
    async with relay_stack.client() as client:
        job = await submit(client, "label", body, hold="true")
        [path] = [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]
        data = bytearray(path.read_bytes())
        record = 4 + 1 + 12 + 256 * 1024 + 16
        if tamper == "flip":
            data[record + 100] ^= 0x01
        elif tamper == "swap":
            data[: 2 * record] = data[record : 2 * record] + data[:record]
        else:
            del data[2 * record :]
        path.write_bytes(bytes(data))
        await client.post(f"/v1/jobs/{job['id']}/release")
    done = await relay_stack.wait_job(job["id"])
    assert done["state"] == "failed"
    assert "integrity" in done["last_error"]
    assert raw_sink.documents == []
    assert any(
        r.levelno == logging.ERROR and "failed its integrity check" in r.getMessage() for r in caplog.records
    )


async def test_a_payload_lost_from_the_spool_fails_the_job_and_is_not_taken_for_a_cancel(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        job = await submit(client, "label", os.urandom(700_000), hold="true")
        [path] = [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]
        path.unlink()
        await client.post(f"/v1/jobs/{job['id']}/release")
    done = await relay_stack.wait_job(job["id"])
    assert done["state"] == "failed", done
    assert "missing" in done["last_error"] and done["attempts"] == 1
    assert raw_sink.documents == []


async def test_hold_release_to_another_printer_of_the_same_connector(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"a": "socket://127.0.0.1:9", "b": raw_sink.uri})
    async with relay_stack.client() as client:
        job = await submit(client, "a", b"pull me", hold="true")
        assert job["state"] == "held"
        response = await client.post(f"/v1/jobs/{job['id']}/release", json={"printer_id": "b"})
        assert response.status_code == 200, response.text
        assert response.json()["printer_id"] == "b"
        again = await client.post(f"/v1/jobs/{job['id']}/release")
        assert again.status_code == 409
    assert (await relay_stack.wait_job(job["id"]))["state"] == "completed"
    assert (await raw_sink.wait_for(1))[0].path.read_bytes() == b"pull me"


async def test_release_to_a_printer_of_another_connector_is_refused(
    relay_stack: RelayStack, raw_sink: RawSink
) -> None:
    await relay_stack.start_connector({"a": raw_sink.uri}, connector_id="site-1")
    await relay_stack.start_connector({"far": raw_sink.uri}, connector_id="site-2")
    async with relay_stack.client() as client:
        job = await submit(client, "a", b"x", hold="true")
        response = await client.post(f"/v1/jobs/{job['id']}/release", params={"printer_id": "far"})
        assert response.status_code == 409
        assert "sealed to connector site-1" in response.json()["error"]
        missing = await client.post(f"/v1/jobs/{job['id']}/release", params={"printer_id": "nope"})
        assert missing.status_code == 404


async def test_cancel_before_sending_never_prints(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        held = await submit(client, "label", b"held", hold="true")
        response = await client.post(f"/v1/jobs/{held['id']}/cancel")
        assert response.status_code == 200 and response.json()["state"] == "canceled"
        assert (await client.post(f"/v1/jobs/{held['id']}/cancel")).status_code == 409
        assert (await client.post(f"/v1/jobs/{held['id']}/release")).status_code == 409
        # the queue keeps working, and the canceled job never reached the printer
        after = await submit(client, "label", b"after")
    await relay_stack.wait_job(after["id"])
    assert [d.path.read_bytes() for d in await raw_sink.wait_for(1)] == [b"after"]
    assert not [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]


async def test_a_cancel_after_the_whole_payload_was_sent_is_a_cancel_not_an_integrity_error(
    relay_stack: RelayStack,
    raw_sink: RawSink,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The relay sent the whole payload (END_STREAM) and the cancel's RST_STREAM(CANCEL) follows before the
    connector read it: the reset drops the unread body, which must not pass for a truncated payload."""
    connector = await relay_stack.start_connector({"label": raw_sink.uri})
    spool = relay_stack.relay.spool
    real_open, real_receive = spool.open, connector._receive_verified
    sent_whole, reading, delivered = trio.Event(), trio.Event(), trio.Event()
    outcomes: list[str] = []

    async def spool_open(job_id: str, **kw: Any) -> AsyncGenerator[bytes, None]:
        async for chunk in real_open(job_id, **kw):
            yield chunk
        sent_whole.set()  # the dispatcher ends the stream next, before it awaits anything

    async def receive_once_reset(stream: H2Stream, dek: bytes, job_id: str) -> VerifiedDocument:
        reading.set()
        await stream.wait_closed()  # the connector gets to the body only after the reset
        return await real_receive(stream, dek, job_id)

    def delivery_done(backend: str, result: str, seconds: float) -> None:
        outcomes.append(result)
        delivered.set()

    monkeypatch.setattr(spool, "open", spool_open)
    monkeypatch.setattr(connector, "_receive_verified", receive_once_reset)
    monkeypatch.setattr(connector.metrics, "delivery_done", delivery_done)
    caplog.set_level(logging.INFO, logger="printrelay.connector")
    async with relay_stack.client() as client:
        # Above inline_max (streamed from the spool), below the window a stream starts with (sent unread).
        job = await submit(client, "label", os.urandom(100_000))
        with trio.fail_after(10):
            await sent_whole.wait()
            await reading.wait()
        canceled = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    with trio.fail_after(10):
        await delivered.wait()
    assert outcomes == ["canceled"]
    entry = await connector.ledger.get(job["id"])
    assert entry is not None and (entry.state, entry.message) == ("canceled", "canceled by the relay")
    ours = [r for r in caplog.records if r.name == "printrelay.connector" and job["id"] in r.getMessage()]
    assert [r.levelno for r in ours] == [logging.INFO] and "canceled by the relay" in ours[0].getMessage()
    assert raw_sink.documents == []


async def test_cancel_a_queued_job_of_an_unreachable_printer(relay_stack: RelayStack) -> None:
    await relay_stack.start_connector({"label": f"socket://127.0.0.1:{free_port()}"}, status_interval=0.2)
    async with relay_stack.client() as client:
        job = await submit(client, "label", b"never")
        assert job["state"] == "queued"
        response = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["state"] == "canceled"
        history = (await client.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
    assert history[-1]["state"] == "canceled"
    assert not [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]


async def test_cancel_while_printing_cancels_the_job_at_the_ipp_printer(
    relay_stack: RelayStack, ippeveprinter_factory: Any
) -> None:
    printer: IppEvePrinter = ippeveprinter_factory(held=True)  # prints until released
    await relay_stack.start_connector({"office": printer.uri})
    async with relay_stack.client() as client:
        response = await client.post(
            "/v1/printers/office/jobs", content=b"%PDF-1.4\n" + os.urandom(5000),
            headers={"content-type": "application/pdf"},
        )  # fmt: skip
        job = response.json()
        await relay_stack.wait_job(job["id"], states=("printing",))
        canceled = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["state"] == "canceled"
    # The printer hears about it: its job stops printing (Cancel-Job), and once the printer is let go it
    # ends canceled, not completed. Polling an external process: there is no event to wait on.
    with trio.fail_after(20):
        while "processing-to-stop-point" not in (await printer.jobs())[-1][1]:  # noqa: ASYNC110
            await trio.sleep(0.05)
    printer.release()
    with trio.fail_after(20):
        while (states := await printer.job_states()) and states[-1] not in (7, 8):  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert states[-1] == 7  # canceled


async def test_a_printer_that_is_down_holds_its_jobs_until_it_comes_back(
    relay_stack: RelayStack, raw_sink: RawSink, nursery: trio.Nursery, tmp_path: Path
) -> None:
    port = free_port()
    printers = {"label": f"socket://127.0.0.1:{port}", "spare": raw_sink.uri}
    await relay_stack.start_connector(printers, status_interval=0.2)
    async with relay_stack.client() as client:
        # The connector reports the printer unreachable; its jobs wait instead of burning attempts.
        with trio.fail_after(10):
            while (await client.get("/v1/printers/label")).json()["printer_state"] != "offline":  # noqa: ASYNC110
                await trio.sleep(0.05)
        jobs = [await submit(client, "label", f"job {i}".encode()) for i in range(3)]
        # A later job of the same connector printed: the dispatcher has claimed past the held ones (it
        # claims in order of creation), so none of them was left untried by chance.
        witness = await submit(client, "spare", b"witness")
        assert (await relay_stack.wait_job(witness["id"]))["state"] == "completed"
        for job in jobs:
            current = (await client.get(f"/v1/jobs/{job['id']}")).json()
            assert current["state"] == "queued" and current["attempts"] == 0, current
    sink = RawSink(tmp_path / "late")
    sink.directory.mkdir()
    await nursery.start(partial(trio.serve_tcp, sink._handle, port, host="127.0.0.1"))
    sink.port = port
    for job in jobs:
        assert (await relay_stack.wait_job(job["id"], within=30))["state"] == "completed"
    assert sorted(d.path.read_bytes() for d in await sink.wait_for(3)) == [b"job 0", b"job 1", b"job 2"]


def test_a_busy_printer_is_asked_again_as_long_as_it_has_been_busy() -> None:
    """By time, not by answers: a backlog refused within a second waits a second, not a minute."""
    from connector.app import BUSY_RETRY_CAP, PrinterEntry

    printer = PrinterEntry(spec=None, backend=None)  # type: ignore[arg-type]
    assert [printer.retry_when_busy(100.0 + dt) for dt in (0, 0.01, 0.02)] == [1.0, 1.0, 1.0]
    assert printer.retry_when_busy(130.0) == 30.0
    assert printer.retry_when_busy(1000.0) == BUSY_RETRY_CAP
    printer.busy_since = None  # it took a job
    assert printer.retry_when_busy(2000.0) == 1.0


@pytest.mark.parametrize("relay_overrides", [{"retry_base": 0.2, "retry_cap": 0.5, "max_attempts": 1}])
async def test_a_printer_busy_with_another_job_spends_no_attempts(
    relay_stack: RelayStack, ippeveprinter_factory: Any
) -> None:
    """A printer's "busy" is its state, not the job's fault: a job waits through as many such answers as it
    takes (as CUPS does), keeping the reason, where it used to fail after max_attempts of them: any long job
    from elsewhere, or one still printing when the connector restarted, failed the jobs behind it."""
    # ippeveprinter takes one job at a time and answers others server-error-busy; this one prints the
    # first until the test has seen the second refused.
    printer: IppEvePrinter = ippeveprinter_factory(held=True)
    await relay_stack.start_connector({"a": printer.uri, "b": printer.uri})
    pdf = {"content-type": "application/pdf"}
    async with relay_stack.client() as client:
        first = (await client.post("/v1/printers/a/jobs", content=b"%PDF-1.4\n1", headers=pdf)).json()
        await relay_stack.wait_job(first["id"], states=("printing",))
        second = (await client.post("/v1/printers/b/jobs", content=b"%PDF-1.4\n2", headers=pdf)).json()
        with trio.fail_after(30):
            refused = 0
            async for state in relay_stack.watch(client, second["id"]):  # queued, (sending, queued) x n
                refused += state == "queued"
                if refused == 3:  # two "busy" answers: more than max_attempts
                    break
        job = (await client.get(f"/v1/jobs/{second['id']}")).json()
        assert job["state"] == "queued" and job["attempts"] == 0, job
        assert "busy" in job["last_error"]
        # The connector's wait, not the relay's retry_base (0.2 s here): 1 s, growing while it stays busy.
        events = (await client.get(f"/v1/jobs/{second['id']}/events")).json()["events"]
        waits = [e["message"].rsplit("; ", 1)[1] for e in events if "busy" in e["message"]]
        assert waits[0] == "trying again in 1 s" and len(waits) == 2, events
        assert (await client.get(f"/v1/jobs/{first['id']}")).json()["state"] == "printing"
    printer.release()
    assert (await relay_stack.wait_job(second["id"], within=60))["state"] == "completed"
    assert (await relay_stack.wait_job(first["id"]))["state"] == "completed"


async def test_undelivered_jobs_expire_and_are_erased(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    connector = await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        job = await submit(client, "label", b"too late", hold="true", expires_in="1s")
        assert job["expires_at"] is not None
        assert (
            await client.post("/v1/printers/label/jobs", params={"expires_in": "soon"}, content=b"x")
        ).status_code == 400
    done = await relay_stack.wait_job(job["id"], states=("expired",), within=10)
    assert done["state"] == "expired"
    assert not [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]
    assert connector is not None


async def test_idempotency_key(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        headers = {"idempotency-key": "order-1234"}
        first = await client.post("/v1/printers/label/jobs", content=b"invoice", headers=headers)
        second = await client.post("/v1/printers/label/jobs", content=b"invoice", headers=headers)
        other = await client.post("/v1/printers/label/jobs", content=b"different", headers=headers)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert other.status_code == 409
    await relay_stack.wait_job(first.json()["id"])
    assert len(await raw_sink.wait_for(1)) == 1


async def test_watch_streams_every_state_change(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        job = await submit(client, "label", b"watched", hold="true")
        states: list[str] = []
        async with trio.open_nursery() as nursery:

            async def follow() -> None:
                async for state in relay_stack.watch(client, job["id"]):
                    states.append(state)

            nursery.start_soon(follow)
            with trio.fail_after(10):
                while states != ["held"]:
                    await trio.testing.wait_all_tasks_blocked()
            await client.post(f"/v1/jobs/{job['id']}/release")
    assert states == ["held", "queued", "sending", "printing", "completed"]
    async with relay_stack.client() as client:
        history = (await client.get(f"/v1/jobs/{job['id']}/events")).json()["events"]
    assert [e["state"] for e in history] == states


async def test_size_limits(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    await relay_stack.start_connector({"label": raw_sink.uri})
    limit = relay_stack.relay.config.max_job_bytes
    async with relay_stack.client() as client:
        declared = await client.post(
            "/v1/printers/label/jobs", headers={"content-length": str(limit + 1)}, content=b"x" * (limit + 1)
        )
        assert declared.status_code == 413
        assert "max_job_bytes=8 MiB" in declared.json()["error"]

        async def growing() -> Any:
            for _ in range(limit // 65536 + 2):
                yield b"y" * 65536

        chunked = await client.post("/v1/printers/label/jobs", content=growing())
        assert chunked.status_code == 413
        listed = (await client.get("/v1/jobs")).json()["jobs"]
    assert listed == []
    assert not files_under(relay_stack.relay.config.spool_dir / "tmp")


@pytest.mark.parametrize("relay_overrides", [{"tenant_max_jobs": 2}])
async def test_quota_of_undelivered_jobs(relay_stack: RelayStack) -> None:
    await relay_stack.start_connector({"label": "socket://127.0.0.1:9"})
    async with relay_stack.client() as client:
        for _ in range(2):
            await submit(client, "label", b"q", hold="true")
        third = await client.post("/v1/printers/label/jobs", params={"hold": "true"}, content=b"q")
    assert third.status_code == 429
    assert "tenant_max_jobs=2" in third.json()["error"]
    assert third.headers["retry-after"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_disk_full_answers_507_and_keeps_earlier_jobs(
    nursery: trio.Nursery, small_disk: Path, raw_sink: RawSink
) -> None:
    from fixtures_relay import RelayStack as Stack

    from relay.app import Relay
    from relay.auth import new_token
    from relay.config import RelayConfig

    relay = Relay(RelayConfig(listen=("127.0.0.1", 0), tunnel_listen=("127.0.0.1", 0), data_dir=small_disk))
    addresses = await nursery.start(relay.run)
    token, record = new_token("acme", "api", scopes=("admin",))
    await relay.store.add_token(record)
    api = f"http://127.0.0.1:{addresses.http_port}"
    tunnel = f"ws://127.0.0.1:{addresses.tunnel_port}/v1/tunnel"
    stack = Stack(relay, api, tunnel, token, nursery, small_disk.parent)
    await stack.start_connector({"label": raw_sink.uri})
    async with stack.client() as client:
        early = await submit(client, "label", b"accepted before the disk filled", hold="true")
        response = await client.post("/v1/printers/label/jobs", content=os.urandom(3 * 1024 * 1024))
        assert response.status_code == 507, response.text
        assert "disk full" in response.json()["error"]
        assert (await client.post(f"/v1/jobs/{early['id']}/release")).status_code == 200
    assert (await stack.wait_job(early["id"]))["state"] == "completed"
    [document] = await raw_sink.wait_for(1)
    assert document.sha256 == hashlib.sha256(b"accepted before the disk filled").hexdigest()


async def test_a_watcher_that_leaves_does_not_cut_off_the_others(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack, "p")
    async with relay_stack.client() as client:
        job = (await client.post("/v1/printers/p/jobs", params={"hold": "true"}, content=b"x")).json()
        first, second = relay_stack.watch(client, job["id"]), relay_stack.watch(client, job["id"])
        with trio.fail_after(10):
            assert await anext(first) == "held" and await anext(second) == "held"
        await first.aclose()  # one watcher goes away
        await trio.testing.wait_all_tasks_blocked()
        await client.post(f"/v1/jobs/{job['id']}/cancel")
        with trio.fail_after(10):
            assert await anext(second) == "canceled"  # the other still hears
        await second.aclose()


@pytest.mark.parametrize("relay_backend", ["postgres"])
async def test_the_document_is_never_readable_in_the_database_and_is_erased_after_printing(
    relay_stack: RelayStack, raw_sink: RawSink, postgres_server: PostgresServer, postgres_url: str
) -> None:
    """With PostgreSQL, a payload larger than 64 KiB is chunk rows in the database: sealed there too. The
    marker is looked for in the server's files on disk (tables and WAL, after a checkpoint)."""
    await relay_stack.start_connector({"label": raw_sink.uri})
    marker = b"MARKER-" + os.urandom(12).hex().encode()
    body = (b"lorem ipsum " * 50_000) + marker + (b" dolor" * 50_000)
    with psycopg.connect(postgres_url, autocommit=True) as db:
        async with relay_stack.client() as client:
            job = await submit(client, "label", body, hold="true")
            chunks = db.execute("SELECT COUNT(*), SUM(length(data)) FROM payload_chunks").fetchone()
            assert chunks is not None and chunks[0] >= 1 and chunks[1] > len(body)
            db.execute("CHECKPOINT")
            for path in files_under(postgres_server.data):
                assert marker not in path.read_bytes(), path
            assert (await client.post(f"/v1/jobs/{job['id']}/release")).status_code == 200
        assert (await relay_stack.wait_job(job["id"]))["state"] == "completed"
        [printed] = await raw_sink.wait_for(1)
        assert printed.path.read_bytes() == body
        assert db.execute("SELECT COUNT(*) FROM payload_chunks").fetchone() == (0,)  # erased with the state
    assert not [p for p in files_under(relay_stack.relay.config.data_dir) if p.suffix == ".sealed"]
