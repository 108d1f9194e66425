"""GET /v1/jobs a page at a time: newest first, every job exactly once while new ones arrive, filters by
state, printer, user and creation time, and clear errors for a bad cursor or time."""

from __future__ import annotations

import datetime

import pytest
import trio
from fixtures_relay import RelayStack
from test_ipp_endpoint import offline_printer

pytestmark = pytest.mark.parametrize("relay_backend", ["sqlite", "postgres"])


async def test_pages_hold_every_job_once_while_new_ones_arrive(relay_stack: RelayStack) -> None:
    await offline_printer(relay_stack)  # jobs stay queued: nothing changes under the listing
    async with relay_stack.client() as client:
        first = [
            (await client.post("/v1/printers/away/jobs", params={"user": f"u{n % 3}"}, content=b"x")).json()[
                "id"
            ]
            for n in range(23)
        ]
        seen: list[str] = []
        cursor = None
        pages = 0
        with trio.fail_after(60):
            while True:
                params = {"limit": 5, **({"after": cursor} if cursor else {})}
                page = (await client.get("/v1/jobs", params=params)).json()
                seen += [job["id"] for job in page["jobs"]]
                pages += 1
                if pages == 2:  # jobs arriving meanwhile are newer: they belong before the first page
                    for _ in range(4):
                        await client.post("/v1/printers/away/jobs", content=b"late")
                cursor = page["next"]
                if cursor is None:
                    break
        assert seen == list(reversed(first)) and pages == 5  # newest first, each once, 5+5+5+5+3
        mine = (await client.get("/v1/jobs", params={"user": "u1", "limit": 500})).json()
        assert [j["id"] for j in mine["jobs"]] == [
            i for n, i in reversed(list(enumerate(first))) if n % 3 == 1
        ]
        assert mine["next"] is None
        created = (await client.get(f"/v1/jobs/{first[10]}")).json()["created_at"]
        since = (await client.get("/v1/jobs", params={"since": created, "limit": 500})).json()["jobs"]
        assert [j["id"] for j in since][-13:] == list(reversed(first[10:]))
        moment = datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        until = (await client.get("/v1/jobs", params={"until": str(moment), "limit": 500})).json()["jobs"]
        assert [j["id"] for j in until] == list(reversed(first[:10]))
        for params, message in [
            ({"after": "bm90IGEgY3Vyc29y"}, "after must be the next cursor of a previous page"),
            ({"after": "x" * 300}, "after must be the next cursor"),
            ({"since": "yesterday"}, "since must be an ISO 8601 time"),
            ({"limit": "501"}, "limit"),
        ]:
            response = await client.get("/v1/jobs", params=params)
            assert response.status_code == 400 and message in response.json()["error"], response.text
