"""``printrelay submit``: print a file through a relay, with progress on a terminal."""

from __future__ import annotations

import argparse
import mimetypes
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from printrelay.api_client import SubmitFailed, add_relay_arguments, error_text
from relay.jobs import AWAITING_RELEASE

CHUNK = 256 * 1024
FINAL = ("completed", "failed", "canceled", "expired")


def add_submit_arguments(submit: argparse.ArgumentParser) -> None:
    add_relay_arguments(submit)
    submit.add_argument("--printer", required=True, help="printer id")
    submit.add_argument("--title", help="job title (default: the file name)")
    submit.add_argument("--copies", type=int, default=1)
    submit.add_argument(
        "--format", dest="document_format", help="document MIME type (default: from the name)"
    )
    submit.add_argument(
        "--hold", action="store_true", help="hold the job until it is released (pull printing)"
    )
    submit.add_argument("--sides", choices=("one-sided", "two-sided-long-edge", "two-sided-short-edge"))
    submit.add_argument("--media", help="paper size, e.g. iso_a4_210x297mm or na_letter_8.5x11in")
    submit.add_argument("--color", dest="print_color_mode", choices=("color", "monochrome", "auto"),
                        help="print-color-mode")  # fmt: skip
    submit.add_argument("--pages", dest="page_ranges", help="page ranges, e.g. 1-3 or 2")
    submit.add_argument("--idempotency-key", help="submit at most once under this key")
    submit.add_argument("--wait", action="store_true", help="follow the job to its final state")
    submit.add_argument(
        "--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds"
    )
    submit.add_argument(
        "--url", help="print the document at this http(s) or ftp URL: the relay fetches it (instead of FILE)"
    )
    submit.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="with --url: a header the relay sends to the URL's origin (repeatable), e.g. an Authorization",
    )  # fmt: skip
    submit.add_argument("file", type=Path, nargs="?", help="the document ('-' for standard input)")
    submit.set_defaults(run=run_submit)


def _chunks(source: BinaryIO, total: int | None, show: bool) -> Iterator[bytes]:
    sent = 0
    started = time.monotonic()
    while chunk := source.read(CHUNK):
        sent += len(chunk)
        if show:
            _progress(sent, total, time.monotonic() - started)
        yield chunk
    if show:
        sys.stderr.write("\n")


def _progress(sent: int, total: int | None, elapsed: float) -> None:
    rate = sent / elapsed / 1e6 if elapsed > 0 else 0.0
    if total:
        width = 30
        filled = int(width * sent / total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\ruploading [{bar}] {sent * 100 // total:3d}% {sent / 1e6:.1f} MB {rate:.1f} MB/s")
    else:
        sys.stderr.write(f"\ruploading {sent / 1e6:.1f} MB {rate:.1f} MB/s")
    sys.stderr.flush()


def run_submit(args: argparse.Namespace) -> int:
    if not args.token:
        raise SubmitFailed("an API token is required: --token or PRINTRELAY_API_TOKEN")
    try:
        return _submit(args)
    except httpx.ConnectError:
        raise SubmitFailed(f"relay unreachable at {args.relay}") from None
    except httpx.TimeoutException:
        raise SubmitFailed(f"relay at {args.relay} did not answer in time") from None
    except httpx.HTTPError as exc:
        raise SubmitFailed(f"talking to the relay failed: {exc}") from None
    except OSError as exc:
        raise SubmitFailed(f"cannot read {args.file}: {exc.strerror or exc}") from None


def _source_body(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON body of a print from a URL (the relay fetches; see docs/api.md)."""
    headers: dict[str, str] = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise SubmitFailed(f"--header {header!r} must read 'Name: value'")
        headers[name.strip()] = value.strip()
    body: dict[str, Any] = {"source_url": args.url}
    if headers:
        body["source_headers"] = headers
    if args.document_format:
        body["document_format"] = args.document_format
    return body


def _submit(args: argparse.Namespace) -> int:
    if (args.url is None) == (args.file is None):
        raise SubmitFailed("give a FILE to upload or --url for the relay to fetch (one of them)")
    if args.header and args.url is None:
        raise SubmitFailed("--header goes with --url")
    path: Path = args.file or Path(Path(urllib.parse.urlsplit(args.url).path).name or "document")
    stdin = str(path) == "-"
    document_format = args.document_format or (
        "application/octet-stream"
        if stdin
        else mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )
    params: dict[str, str] = {
        "title": args.title or ("stdin" if stdin else path.name),
        "copies": str(args.copies),
    }
    if args.hold:
        params["hold"] = "true"
    # Print options, checked by the relay against what the printer supports (400 naming the one it lacks).
    options = {"sides": args.sides, "media": args.media, "print-color-mode": args.print_color_mode,
               "page-ranges": args.page_ranges}  # fmt: skip
    params.update({name: value for name, value in options.items() if value})
    headers = {"authorization": f"Bearer {args.token}", "content-type": document_format}
    if args.idempotency_key:
        headers["idempotency-key"] = args.idempotency_key
    show = sys.stderr.isatty()
    with httpx.Client(base_url=args.relay, timeout=httpx.Timeout(60, connect=10)) as client:
        if args.url is not None:
            # the relay answers once it has fetched the document: as long as its fetch_timeout
            response = client.post(
                f"/v1/printers/{args.printer}/jobs", params=params, json=_source_body(args),
                headers={k: v for k, v in headers.items() if k != "content-type"},
                timeout=httpx.Timeout(None),
            )  # fmt: skip
            return _answered(client, args, response, show)
        source: BinaryIO = sys.stdin.buffer if stdin else path.open("rb")
        with source:
            total = None if stdin else os.fstat(source.fileno()).st_size
            if total is not None:
                headers["content-length"] = str(total)
            response = client.post(
                f"/v1/printers/{args.printer}/jobs",
                params=params,
                headers=headers,
                content=_chunks(source, total, show),
            )
        return _answered(client, args, response, show)


def _answered(client: httpx.Client, args: argparse.Namespace, response: httpx.Response, show: bool) -> int:
    if response.status_code not in (200, 201):
        raise SubmitFailed(error_text(response))
    job = response.json()
    print(job["id"])
    if not args.wait:
        return 0
    return _follow(client, args.token, job, args.timeout, show)


def _follow(client: httpx.Client, token: str, job: dict[str, Any], timeout: float, show: bool) -> int:
    deadline = time.monotonic() + timeout
    state = job["state"]
    if show:
        sys.stderr.write(f"job {job['id']}: {state}\n")
    told = False
    while state not in FINAL:
        if time.monotonic() > deadline:
            raise SubmitFailed(f"job {job['id']} still {state} after {timeout:.0f} s")
        time.sleep(0.25)
        response = client.get(f"/v1/jobs/{job['id']}", headers={"authorization": f"Bearer {token}"})
        if response.status_code != 200:
            raise SubmitFailed(error_text(response))
        job = response.json()
        if job["state"] != state:
            state = job["state"]
            if show:
                sys.stderr.write(f"job {job['id']}: {state}\n")
        if state == "held" and job.get("hold_reason") == AWAITING_RELEASE:
            if show and not told:
                sys.stderr.write(f"job {job['id']}: {AWAITING_RELEASE}\n")
            told = True  # a person releases it at the printer: keep waiting
        elif state == "held" and job.get("hold_reason"):
            # Only a person can decide this one: waiting longer would not change it.
            raise SubmitFailed(
                f"job {job['id']} held: {job['hold_reason']}; release it to print it again "
                f"(POST /v1/jobs/{job['id']}/release) or cancel it"
            )
    if state != "completed":
        raise SubmitFailed(f"job {job['id']} {state}: {job.get('last_error') or 'no reason given'}")
    return 0
