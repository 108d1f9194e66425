"""What the CLI's API commands share: where the relay is, the token, one call with one-line errors."""

from __future__ import annotations

import argparse
import os
from typing import Any

import httpx


class SubmitFailed(Exception):
    """A one-line answer from (or about) the relay; the CLI prints it and exits 1."""


def error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"


def add_relay_arguments(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument("--relay", default=os.environ.get("PRINTRELAY_RELAY_URL", "http://127.0.0.1:8080"),
                        help="the relay's API URL (env PRINTRELAY_RELAY_URL)")  # fmt: skip
    what = f"API token, {scope}" if scope else "API token"
    parser.add_argument("--token", default=os.environ.get("PRINTRELAY_API_TOKEN"),
                        help=f"{what} (env PRINTRELAY_API_TOKEN)")  # fmt: skip


def client(args: argparse.Namespace, **kw: Any) -> httpx.Client:
    if not args.token:
        raise SubmitFailed("an API token is required: --token or PRINTRELAY_API_TOKEN")
    headers = {"authorization": f"Bearer {args.token}"}
    return httpx.Client(base_url=args.relay, timeout=kw.pop("timeout", 30), headers=headers, **kw)


def call(args: argparse.Namespace, method: str, path: str, *, optional: bool = False, **kw: Any) -> Any:
    """The answer's JSON; ``optional``: a 403 (the token lacks the scope) is an empty answer, not an error."""
    try:
        with client(args) as http:
            response = http.request(method, path, **kw)
    except httpx.ConnectError:
        raise SubmitFailed(f"relay unreachable at {args.relay}") from None
    except httpx.HTTPError as exc:
        raise SubmitFailed(f"talking to the relay failed: {exc}") from None
    if optional and response.status_code == 403:
        return {}
    if response.status_code >= 400:
        raise SubmitFailed(error_text(response))
    return response.json() if response.content else {}
