"""Structured logs: one JSON object per line with job_id, connector_id and tenant where they apply; the
terminal format shows the same context."""

from __future__ import annotations

import json
import logging

import pytest
from fixtures_printers import RawSink
from fixtures_relay import RelayStack

from service.logs import JsonFormatter, TextFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("printrelay.relay", logging.INFO, __file__, 1, "job %s done", ("j1",), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_context() -> None:
    line = JsonFormatter().format(record(job_id="j1", tenant="acme", connector_id="site-1"))
    entry = json.loads(line)
    assert "\n" not in line
    assert (entry["msg"], entry["level"], entry["logger"]) == ("job j1 done", "info", "printrelay.relay")
    assert (entry["job_id"], entry["tenant"], entry["connector_id"]) == ("j1", "acme", "site-1")
    assert "printer_id" not in entry  # absent context stays absent


def test_text_lines_show_the_context() -> None:
    line = TextFormatter().format(record(job_id="j1", tenant="acme"))
    assert line.endswith("printrelay.relay: job j1 done [job_id=j1 tenant=acme]")
    assert TextFormatter().format(record()).endswith("job j1 done")


async def test_a_job_can_be_followed_through_the_logs(
    relay_stack: RelayStack, raw_sink: RawSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="printrelay")
    await relay_stack.start_connector({"label": raw_sink.uri})
    async with relay_stack.client() as client:
        job = (await client.post("/v1/printers/label/jobs", content=b"hello")).json()
    assert (await relay_stack.wait_job(job["id"]))["state"] == "completed"
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    about_job = [e for e in lines if e.get("job_id") == job["id"]]
    loggers = {e["logger"] for e in about_job}
    # accepted at the relay, printed at the connector, finished at the relay
    assert {"printrelay.relay.submit", "printrelay.connector", "printrelay.relay.jobs"} <= loggers, about_job
    relay_side = [e for e in about_job if e["logger"].startswith("printrelay.relay")]
    assert all(e["tenant"] == "acme" and e["printer_id"] == "label" for e in relay_side), relay_side
    assert all(e["connector_id"] == "site-1" for e in relay_side), relay_side
    registered = [e for e in lines if "registered" in e["msg"]]
    assert registered and registered[0]["connector_id"] == "site-1" and registered[0]["tenant"] == "acme"
