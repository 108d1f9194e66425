"""Locust users for a printrelay relay: submit, pull-print (hold, release), poll, cancel.

Locust drives the relay over its public REST API only (Locust runs on gevent; the connectors are
simulated by ``loadtest/swarm.py`` in a trio process). Run it headless, as ``loadtest/run.py`` does:

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:8080 \\
        --api-token pra_... --record jobs.ndjson --csv out/locust

Options (flag, or the environment variable in brackets):

* ``--api-token`` [PRLOAD_API_TOKEN]: an API token with the ``jobs:submit`` and ``jobs:read`` scopes;
* ``--record`` [PRLOAD_RECORD]: NDJSON file of what the users did (see below), which ``run.py`` judges
  together with the relay's final job states and what the sink printers received;
* ``--large-ratio`` [PRLOAD_LARGE_RATIO]: share of documents of 1 to ``--max-large-mib`` MiB (default 0.05);
  the others are 10 to 200 KiB;
* ``--max-large-mib`` [PRLOAD_MAX_LARGE_MIB]: the largest document (default 20);
* ``--think-min`` / ``--think-max`` [PRLOAD_THINK_MIN/MAX]: seconds each user waits between tasks.

Every document starts with a tag line (``PRLOAD <tag>``), so the printers can say which job arrived, and the
job's title is ``prload-<tag>``, so the relay's job list says which job is which. Each intent is recorded
*before* its request is sent (``submitting``, ``releasing``, ``canceling``) and each answer after it
(``accepted``/``held``, ``released``, ``canceled`` with the status): when Locust stops a user mid-request,
the record still says what may have happened, and the relay's final state says what did.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from locust import FastHttpUser, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # locust imports this file by path
from loadtest.documents import TITLE_PREFIX, MiB, block, tag_line

SMALL = (10 * 1024, 200 * 1024)
# One pseudo-random block that documents are cut from (incompressible, like PDFs and rasters), without
# paying for random bytes on every job; the tag line makes every document distinct. It is a function of
# _SEED, so the judge can rebuild any document from its record.
_SEED = int.from_bytes(os.urandom(6), "big")
_block = block(_SEED, 21 * MiB)
_record_lock = threading.Lock()
_printers: list[str] = []


def _options(parser: LocustArgumentParser) -> None:
    parser.add_argument("--api-token", env_var="PRLOAD_API_TOKEN", default="", help="relay API token")
    parser.add_argument("--record", env_var="PRLOAD_RECORD", default="", help="NDJSON job record file")
    parser.add_argument("--large-ratio", env_var="PRLOAD_LARGE_RATIO", type=float, default=0.05)
    parser.add_argument("--max-large-mib", env_var="PRLOAD_MAX_LARGE_MIB", type=float, default=20.0)
    parser.add_argument("--think-min", env_var="PRLOAD_THINK_MIN", type=float, default=0.1)
    parser.add_argument("--think-max", env_var="PRLOAD_THINK_MAX", type=float, default=1.0)


events.init_command_line_parser.add_listener(_options)  # type: ignore[no-untyped-call]


def _record(environment: Environment, **entry: Any) -> None:
    path = environment.parsed_options.record if environment.parsed_options else ""
    if not path:
        return
    line = json.dumps(entry, separators=(",", ":")) + "\n"
    with _record_lock, open(path, "a") as file:
        file.write(line)


class PrintUser(FastHttpUser):
    """Someone printing: mostly straight to a printer, some pull prints, some changes of mind."""

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        return random.uniform(options.think_min, options.think_max)

    def on_start(self) -> None:
        token = self.environment.parsed_options.api_token
        self.headers = {"Authorization": f"Bearer {token}"}
        self.recent: deque[str] = deque(maxlen=20)
        self.held: deque[tuple[str, str]] = deque()
        if not _printers:
            with self.client.get("/v1/printers", headers=self.headers, catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"cannot list printers: {response.status_code}")
                    return
                _printers.extend(p["id"] for p in response.json()["printers"])

    def _document(self) -> tuple[str, int, bytes]:
        """A new document: its tag, the offset of its payload in the block, its bytes."""
        global _block
        options = self.environment.parsed_options
        if random.random() < options.large_ratio:
            size = random.randint(MiB, int(options.max_large_mib * MiB))
        else:
            size = random.randint(*SMALL)
        if size + MiB > len(_block):
            _block = block(_SEED, size + MiB)  # --max-large-mib above the block: a longer one, same prefix
        offset = random.randrange(0, len(_block) - size)
        tag = uuid.uuid4().hex
        return tag, offset, tag_line(tag) + _block[offset : offset + size]

    def _submit(self, *, hold: bool) -> tuple[str, str] | None:
        if not _printers:
            return None
        printer = random.choice(_printers)
        tag, offset, body = self._document()
        query = "?hold=true" if hold else ""
        name = "/v1/printers/[id]/jobs" + query
        url = f"/v1/printers/{printer}/jobs?title={TITLE_PREFIX}{tag}" + ("&hold=true" if hold else "")
        _record(
            self.environment, event="submitting", tag=tag, printer=printer, hold=hold, at=time.time(),
            size=len(body), sha256=hashlib.sha256(body).hexdigest(), seed=_SEED, offset=offset,
        )  # fmt: skip
        # geventhttpclient sends bytes as they are; locust's stub only names str and dict
        with self.client.post(
            url, data=body, name=name, catch_response=True,  # type: ignore[arg-type]
            headers={**self.headers, "Content-Type": "application/octet-stream"},
        ) as response:  # fmt: skip
            if response.status_code != 201:
                response.failure(f"submit answered {response.status_code}: {response.text[:200]}")
                return None
            job_id = response.json()["id"]
        _record(self.environment, event="held" if hold else "accepted", tag=tag, job=job_id, at=time.time())
        self.recent.append(job_id)
        return tag, job_id

    @task(20)
    def print_document(self) -> None:
        self._submit(hold=False)

    @task(3)
    def pull_print(self) -> None:
        """Submit held; release it on a later visit (to the same printer, as at a release station)."""
        if self.held and random.random() < 0.7:
            tag, job_id = self.held.popleft()
            _record(self.environment, event="releasing", tag=tag, job=job_id, at=time.time())
            with self.client.post(
                f"/v1/jobs/{job_id}/release", name="/v1/jobs/[id]/release", headers=self.headers,
                catch_response=True,
            ) as response:  # fmt: skip
                if response.status_code != 200:
                    response.failure(f"release answered {response.status_code}: {response.text[:200]}")
                    return
            _record(self.environment, event="released", tag=tag, job=job_id, at=time.time())
            return
        submitted = self._submit(hold=True)
        if submitted:
            self.held.append(submitted)

    @task(1)
    def abandon_pull_print(self) -> None:
        """A held job nobody comes for: cancel it. It must never print."""
        submitted = self.held.popleft() if self.held else self._submit(hold=True)
        if submitted is None:
            return
        tag, job_id = submitted
        _record(self.environment, event="canceling", tag=tag, job=job_id, at=time.time(), held=True)
        with self.client.post(
            f"/v1/jobs/{job_id}/cancel", name="/v1/jobs/[id]/cancel (held)", headers=self.headers,
            catch_response=True,
        ) as response:  # fmt: skip
            _record(self.environment, event="canceled", tag=tag, job=job_id, at=time.time(),
                    status=response.status_code)  # fmt: skip
            if response.status_code != 200:
                response.failure(f"cancel answered {response.status_code}: {response.text[:200]}")

    @task(1)
    def change_of_mind(self) -> None:
        """Cancel a job just sent: it may already be printing or printed (409), which is fine."""
        submitted = self._submit(hold=False)
        if submitted is None:
            return
        tag, job_id = submitted
        _record(self.environment, event="canceling", tag=tag, job=job_id, at=time.time(), held=False)
        with self.client.post(
            f"/v1/jobs/{job_id}/cancel", name="/v1/jobs/[id]/cancel (queued)", headers=self.headers,
            catch_response=True,
        ) as response:  # fmt: skip
            _record(self.environment, event="canceled", tag=tag, job=job_id, at=time.time(),
                    status=response.status_code)  # fmt: skip
            if response.status_code == 409:
                response.success()  # too late: it completed
            elif response.status_code != 200:
                response.failure(f"cancel answered {response.status_code}: {response.text[:200]}")

    @task(10)
    def poll_status(self) -> None:
        if not self.recent:
            return
        job_id = random.choice(self.recent)
        with self.client.get(
            f"/v1/jobs/{job_id}", name="/v1/jobs/[id]", headers=self.headers, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status answered {response.status_code}")

    @task(1)
    def list_jobs(self) -> None:
        self.client.get("/v1/jobs?limit=20", name="/v1/jobs", headers=self.headers)

    def on_stop(self) -> None:
        # Jobs still held when the test ends stay held: run.py checks that none of them printed.
        self.held.clear()
