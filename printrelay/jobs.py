"""``printrelay jobs list|show|cancel|release|watch``: a relay's jobs from the command line.

A readable table by default, ``--json`` for scripts (the API's own objects, one document per command).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx

from printrelay.api_client import SubmitFailed, add_relay_arguments, call, client, error_text
from printrelay.client import FINAL

MAX_LIST = 500  # the API's page size limit


def add_jobs_arguments(jobs: argparse.ArgumentParser) -> None:
    actions = jobs.add_subparsers(metavar="ACTION")

    listing = actions.add_parser("list", help="jobs, newest first (a person's token: their own)")
    add_relay_arguments(listing)
    listing.add_argument("--state", help="only jobs in this state (queued, held, completed, ...)")
    listing.add_argument("--printer", dest="printer_id", help="only jobs for this printer")
    listing.add_argument("--user", help="only jobs submitted by or for this user")
    listing.add_argument("--since", help="created at or after (ISO 8601, e.g. 2026-12-06T08:00:00Z)")
    listing.add_argument("--until", help="created before (ISO 8601)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default %(default)s)")
    listing.add_argument("--all", action="store_true", help="every matching job, page after page")
    listing.add_argument("--json", action="store_true", help="print the jobs as a JSON list")
    listing.set_defaults(run=run_list)

    for name, what, run in (
        ("show", "one job and its history", run_show),
        ("cancel", "cancel a job (one on its way is stopped where the printer allows)", run_cancel),
        ("release", "release a held job to print", run_release),
        ("watch", "follow a job's changes live until it is final", run_watch),
    ):
        action = actions.add_parser(name, help=what)
        add_relay_arguments(action)
        action.add_argument("job_id")
        if name == "release":
            action.add_argument("--printer", dest="printer_id", help="print on this printer of the connector")
        if name != "watch":
            action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(run=run)


def _table(jobs: list[dict[str, Any]]) -> None:
    print(f"{'JOB':<28} {'STATE':<10} {'PRINTER':<16} {'USER':<24} {'CREATED':<20} TITLE")
    for job in jobs:
        created = (job.get("created_at") or "")[:19].replace("T", " ")
        print(f"{job['id']:<28} {job['state']:<10} {job['printer_id']:<16} {job.get('user') or '':<24} "
              f"{created:<20} {job.get('title') or ''}")  # fmt: skip


def run_list(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 100_000:
        raise SubmitFailed("--limit must be between 1 and 100000")
    filters = {name: value for name in ("state", "printer_id", "user", "since", "until")
               if (value := getattr(args, name)) is not None}  # fmt: skip
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page_size = min(MAX_LIST, args.limit - len(found)) if not args.all else MAX_LIST
        params = {**filters, "limit": str(page_size), **({"after": cursor} if cursor else {})}
        page = call(args, "GET", "/v1/jobs", params=params)
        found += page["jobs"]
        cursor = page.get("next")
        if cursor is None or (not args.all and len(found) >= args.limit):
            break
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        _table(found)
    return 0


def run_show(args: argparse.Namespace) -> int:
    job = call(args, "GET", f"/v1/jobs/{args.job_id}")
    events = call(args, "GET", f"/v1/jobs/{args.job_id}/events")["events"]
    if args.json:
        print(json.dumps({**job, "events": events}, indent=2))
        return 0
    for key in ("id", "state", "printer_id", "title", "user", "size", "copies", "attempts", "hold_reason",
                "last_error", "options", "created_at", "completed_at", "expires_at"):  # fmt: skip
        if job.get(key) not in (None, "", {}):
            print(f"{key + ':':<14} {job[key]}")
    print("history:")
    for event in events:
        print(f"  {event['at']}  {event['state']:<10} {event.get('message') or ''}")
    return 0


def _changed(args: argparse.Namespace, job: dict[str, Any], verb: str) -> int:
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(f"job {job['id']} {verb}: {job['state']}")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    return _changed(args, call(args, "POST", f"/v1/jobs/{args.job_id}/cancel"), "canceled")


def run_release(args: argparse.Namespace) -> int:
    body = {"printer_id": args.printer_id} if args.printer_id else None
    return _changed(args, call(args, "POST", f"/v1/jobs/{args.job_id}/release", json=body), "released")


def run_watch(args: argparse.Namespace) -> int:
    """Server-Sent Events, printed a line each; exits 0 when the job completes, 1 otherwise."""
    try:
        with client(args, timeout=httpx.Timeout(60, read=None)) as http, http.stream(
            "GET", f"/v1/jobs/{args.job_id}/watch"
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.read()
                raise SubmitFailed(error_text(response))
            state = ""
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "state" not in event:
                    raise SubmitFailed(f"watching stopped: {event.get('error', event)}")
                state = event["state"]
                print(f"{event['at']}  {state:<10} {event.get('message') or ''}", flush=True)
    except httpx.ConnectError:
        raise SubmitFailed(f"relay unreachable at {args.relay}") from None
    except httpx.HTTPError as exc:
        raise SubmitFailed(f"talking to the relay failed: {exc}") from None
    if state not in FINAL:
        raise SubmitFailed(f"the relay closed the stream while job {args.job_id} was {state or 'unknown'}")
    return 0 if state == "completed" else 1
