"""Metrics of relay and connector: label classes, then real expositions after a run of jobs in one process,
checked by ``promtool check metrics`` and by value."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
import trio
import trio.testing
from fixtures_printers import RawSink
from fixtures_relay import RelayStack
from prometheus_client.parser import text_string_to_metric_families

from connector.ops import ops_listener as connector_ops
from relay.jobs import JobState
from relay.metrics import (
    MAX_PRINTER_SERIES,
    RelayMetrics,
    close_reason_label,
    finish_reason,
    http_route,
    registration_failure_label,
    route_template,
)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), float("nan"))


def promtool_check(text: str) -> None:
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- label classes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "message", "reason"),
    [
        (JobState.COMPLETED, "printed", "printed"),
        (JobState.COMPLETED, "printed (already delivered earlier; not printed again)", "duplicate"),
        (JobState.FAILED, "gave up after 5 attempts: printer busy", "attempts_exhausted"),
        (JobState.FAILED, "payload integrity check failed: chunk 3", "integrity"),
        (JobState.FAILED, "cannot open the job's data key: unknown key", "key_unavailable"),
        (JobState.FAILED, "document-format not supported", "printer_refused"),
        (JobState.CANCELED, "canceled at the printer", "printer"),
        (JobState.CANCELED, "canceled by alice", "client"),
        (JobState.EXPIRED, "not delivered before expires_at", "ttl"),
    ],
)
def test_finish_reasons_are_a_closed_set(state: JobState, message: str, reason: str) -> None:
    assert finish_reason(state, message) == reason


@pytest.mark.parametrize(
    ("text", "label"),
    [
        (None, "relay_shutdown"),
        ("transport lost: connection reset", "transport_lost"),
        ("peer closed the tunnel", "peer_closed"),
        ("peer sent GOAWAY (NO_ERROR)", "peer_goaway"),
        ("peer silent for 46 s (dead_after=45)", "peer_dead"),
        ("peer is not reading: 9 bytes pending exceed max_pending_output=8", "peer_slow"),
        ("registration failed: inventory answered 500", "registration_failed"),
        ("token revoked", "token_invalidated"),
        ("stream resets exceed max_resets_per_second=100 (rapid reset)", "protocol_error"),
        ("something new", "other"),
    ],
)
def test_session_close_reasons_are_a_closed_set(text: str | None, label: str) -> None:
    assert close_reason_label(text) == label


def test_registration_failure_labels() -> None:
    assert registration_failure_label("token revoked") == "revoked"
    assert registration_failure_label("missing bearer token") == "missing"
    assert registration_failure_label("unknown token") == "invalid"


def test_routes_are_templates_never_ids() -> None:
    pattern = re.compile(r"^/v1/printers/(?P<printer>[^/]+)/jobs$")
    assert route_template(pattern) == "/v1/printers/{printer}/jobs"
    assert http_route("/v1/printers/p-123/jobs", [pattern]) == "/v1/printers/{printer}/jobs"
    assert http_route("/ipp/print/office", [pattern]) == "/ipp/print/{printer}"
    assert http_route("/no/such/thing/42", [pattern]) == "unmatched"


def test_printer_labels_are_bounded() -> None:
    from relay.jobs import Job

    metrics = RelayMetrics(per_printer=True)
    for i in range(MAX_PRINTER_SERIES + 10):
        job = Job(id=f"j{i}", tenant="t", printer_id=f"p{i}", state=JobState.FAILED)
        metrics.job_finished(job, "refused")
    names = {s.labels["printer"] for m in metrics.printer_jobs_finished.collect() for s in m.samples}
    assert len(names) == MAX_PRINTER_SERIES + 1 and "other" in names
    # without the switch no printer id is ever exported
    plain = RelayMetrics()
    plain.job_finished(Job(id="j", tenant="t", printer_id="secret-printer", state=JobState.FAILED), "x")
    from prometheus_client import generate_latest

    assert b"secret-printer" not in generate_latest(plain.registry)


def test_queue_time_is_a_first_dispatch_only() -> None:
    """A job sent again after an attempt given back (busy printer, stopping connector, relay restart) has
    attempts at 1 again: it must not be timed as queued since its creation once more."""
    from relay.jobs import Job

    metrics = RelayMetrics()
    first = Job(id="j", tenant="t", printer_id="p", state=JobState.SENDING, attempts=1, created_at=100.0)
    metrics.job_dispatched(first, 101.0)
    given_back = Job(id="j", tenant="t", printer_id="p", state=JobState.SENDING, attempts=1, created_at=100.0,
                     last_error="printer refused the job: server-error-busy")  # fmt: skip
    for at in (110.0, 130.0, 170.0):
        metrics.job_dispatched(given_back, at)
    [family] = [f for f in metrics.queue_time.collect()]
    counts = {s.name: s.value for s in family.samples}
    assert counts["printrelay_job_queue_seconds_count"] == 1
    assert counts["printrelay_job_queue_seconds_sum"] == 1.0


# --- expositions after real jobs --------------------------------------------------------------------


async def test_relay_and_connector_expositions(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    relay = relay_stack.relay
    connector = await relay_stack.start_connector({"label": raw_sink.uri, "dead": "socket://127.0.0.1:9"})
    relay_port = await relay_stack.nursery.start(relay.health.listener().serve, "127.0.0.1", 0)
    connector_port = await relay_stack.nursery.start(connector_ops(connector).serve, "127.0.0.1", 0)
    bodies = [b"x" * 1000, b"y" * 200_000, b"z" * 5]
    async with relay_stack.client() as client:
        ids = []
        for body in bodies:
            r = await client.post("/v1/printers/label/jobs", content=body)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        assert (await client.get("/v1/jobs/nope")).status_code == 404
        # larger than INLINE_MAX, so its payload is a spool file (smaller ones live in the database)
        held = await client.post("/v1/printers/label/jobs?hold=true", content=b"later" * 20_000)
        assert held.status_code == 201
    for job_id in ids:
        assert (await relay_stack.wait_job(job_id))["state"] == "completed"
    await raw_sink.wait_for(len(bodies))

    async with httpx.AsyncClient(timeout=10) as http:
        relay_text = (await http.get(f"http://127.0.0.1:{relay_port}/metrics")).text
        connector_text = (await http.get(f"http://127.0.0.1:{connector_port}/metrics")).text
        assert (await http.get(f"http://127.0.0.1:{relay_port}/healthz")).status_code == 200
        assert (await http.get(f"http://127.0.0.1:{relay_port}/readyz")).json() == {"status": "ready"}
        assert (await http.get(f"http://127.0.0.1:{relay_port}/jobs")).status_code == 404
        assert (await http.post(f"http://127.0.0.1:{relay_port}/metrics")).status_code == 405
        with trio.fail_after(10):
            while not connector.registered:  # the relay subscribes to events just after registration
                await trio.testing.wait_all_tasks_blocked()
        assert (await http.get(f"http://127.0.0.1:{connector_port}/readyz")).json() == {"status": "ready"}
    promtool_check(relay_text)
    promtool_check(connector_text)

    assert value(relay_text, "printrelay_jobs_submitted_total") == 4
    assert value(relay_text, "printrelay_jobs_finished_total", state="completed", reason="printed") == 3
    assert value(relay_text, "printrelay_job_delivery_seconds_count") == 3
    assert value(relay_text, "printrelay_job_queue_seconds_count") == 3
    assert value(relay_text, "printrelay_jobs", state="held") == 1
    assert value(relay_text, "printrelay_jobs", state="queued") == 0
    assert value(relay_text, "printrelay_queue_oldest_job_age_seconds") == 0
    assert value(relay_text, "printrelay_connected_connectors") == 1
    assert value(relay_text, "printrelay_tunnel_sessions") == 1
    assert value(relay_text, "printrelay_connectors", state="online") == 1
    assert value(relay_text, "printrelay_tunnel_sessions_opened_total") == 1
    assert value(relay_text, "printrelay_tunnel_job_streams") == 0
    assert value(relay_text, "printrelay_tunnel_payload_sent_bytes_total") > sum(map(len, bodies))
    assert value(relay_text, "printrelay_tunnel_sent_bytes_total") > sum(map(len, bodies))
    assert value(relay_text, "printrelay_tunnel_received_bytes_total") > 0
    assert value(relay_text, "printrelay_spool_files") == 1  # the held job's payload
    assert value(relay_text, "printrelay_spool_filesystem_size_bytes") > 0
    route = "/v1/printers/{printer}/jobs"
    assert value(relay_text, "printrelay_http_requests_total", route=route, code="201") == 4
    assert value(relay_text, "printrelay_http_requests_total", route="/v1/jobs/{job}", code="404") == 1
    assert value(relay_text, "printrelay_http_request_duration_seconds_count", route=route) == 4
    assert value(relay_text, "printrelay_ready") == 1
    assert 'component="relay"' in relay_text and "printrelay_build_info" in relay_text
    assert not any(job_id in relay_text for job_id in ids)

    assert value(connector_text, "printrelay_connector_tunnel_sessions") == 1
    completed = value(
        connector_text, "printrelay_connector_deliveries_total", backend="socket", result="completed"
    )
    assert completed == 3
    assert value(connector_text, "printrelay_connector_delivery_seconds_count", backend="socket") == 3
    assert value(connector_text, "printrelay_connector_printer_sent_bytes_total", backend="socket") == sum(
        map(len, bodies)
    )
    assert value(connector_text, "printrelay_connector_ledger_entries") == 3
    assert (
        value(connector_text, "printrelay_connector_printers", state="offline")
        + value(connector_text, "printrelay_connector_printers", state="unknown")
        >= 1
    )
    assert 'component="connector"' in connector_text


async def test_session_close_and_reconnect_are_counted(relay_stack: RelayStack, raw_sink: RawSink) -> None:
    relay = relay_stack.relay
    connector = await relay_stack.start_connector({"label": raw_sink.uri})
    [session] = relay.registry.sessions()
    session.h2.close("relay going away for a test")
    with trio.fail_after(10):
        while connector.tunnel.sessions_opened < 2 or not relay.registry.sessions():
            await relay.registry.changed.wait()
    port = await relay_stack.nursery.start(relay.health.listener().serve, "127.0.0.1", 0)
    cport = await relay_stack.nursery.start(connector_ops(connector).serve, "127.0.0.1", 0)
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        ctext = (await http.get(f"http://127.0.0.1:{cport}/metrics")).text
    assert value(text, "printrelay_tunnel_sessions_opened_total") == 2
    assert value(text, "printrelay_tunnel_sessions_closed_total", reason="relay_shutdown") == 1
    assert value(ctext, "printrelay_connector_tunnel_sessions_opened_total") == 2
    assert value(ctext, "printrelay_connector_tunnel_reconnects_total", reason="session_ended") == 1


async def test_relay_not_ready_when_store_fails(relay_stack: RelayStack) -> None:
    relay = relay_stack.relay
    port = await relay_stack.nursery.start(relay.health.listener().serve, "127.0.0.1", 0)

    async def broken() -> None:
        raise OSError("disk I/O error")

    relay.store.check_writable = broken  # type: ignore[method-assign]
    async with httpx.AsyncClient(timeout=10) as http:
        ready = await http.get(f"http://127.0.0.1:{port}/readyz")
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        public = await http.get(f"{relay_stack.api_url}/readyz")
    assert ready.status_code == 503 and "store not writable: disk I/O error" in ready.json()["reason"]
    assert public.status_code == 503  # the public probe tells the same
    assert value(text, "printrelay_ready") == 0
