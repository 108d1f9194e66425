"""``printrelay printers``: list, adopt and remove printers at a relay (needs a printers:admin token)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import httpx

from printrelay.client import SubmitFailed, _error


def add_printers_parser(commands: Any) -> None:
    printers = commands.add_parser("printers", help="list, adopt and remove printers at a relay")
    actions = printers.add_subparsers(metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--relay", default=os.environ.get("PRINTRELAY_RELAY_URL", "http://127.0.0.1:8080"),
                            help="the relay's API URL (env PRINTRELAY_RELAY_URL)")  # fmt: skip
        parser.add_argument("--token", default=os.environ.get("PRINTRELAY_API_TOKEN"),
                            help="API token, printers:admin scope (env PRINTRELAY_API_TOKEN)")  # fmt: skip

    listing = actions.add_parser("list", help="printers and the candidates connectors discovered")
    common(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=run_list)

    adopt = actions.add_parser("adopt", help="make a discovered (or any) printer printable, no restart")
    common(adopt)
    adopt.add_argument("uri", help="the printer URI, as a connector reported it (see 'printers list')")
    adopt.add_argument("--id", dest="printer_id", help="printer id (default: derived from the printer)")
    adopt.add_argument(
        "--connector", dest="connector_id", help="which connector serves it (default: the finder)"
    )
    adopt.set_defaults(run=run_adopt)

    remove = actions.add_parser("remove", help="stop serving a printer")
    common(remove)
    remove.add_argument("printer_id")
    remove.set_defaults(run=run_remove)


def _client(args: argparse.Namespace) -> httpx.Client:
    if not args.token:
        raise SubmitFailed("an API token is required: --token or PRINTRELAY_API_TOKEN")
    return httpx.Client(base_url=args.relay, timeout=30, headers={"authorization": f"Bearer {args.token}"})


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    try:
        with _client(args) as client:
            response = client.request(method, path, **kw)
    except httpx.ConnectError:
        raise SubmitFailed(f"relay unreachable at {args.relay}") from None
    except httpx.HTTPError as exc:
        raise SubmitFailed(f"talking to the relay failed: {exc}") from None
    if response.status_code >= 400:
        raise SubmitFailed(_error(response))
    return response.json() if response.content else {}


def run_list(args: argparse.Namespace) -> int:
    printers = _call(args, "GET", "/v1/printers")["printers"]
    candidates = _call(args, "GET", "/v1/candidates").get("candidates", [])
    if args.json:
        print(json.dumps({"printers": printers, "candidates": candidates}, indent=2))
        return 0
    print(f"{'PRINTER':<20} {'CONNECTOR':<18} {'STATE':<10} KIND")
    for p in printers:
        print(f"{p['id']:<20} {p['connector_id']:<18} {p['state']:<10} {p.get('kind', '')}")
    if candidates:
        print(f"\n{'CANDIDATE URI':<48} {'CONNECTOR':<18} NAME")
        for c in candidates:
            print(f"{c.get('uri', ''):<48} {c.get('connector_id', ''):<18} {c.get('name', '')}")
    return 0


def run_adopt(args: argparse.Namespace) -> int:
    body: dict[str, str] = {"uri": args.uri}
    if args.printer_id:
        body["id"] = args.printer_id
    if args.connector_id:
        body["connector_id"] = args.connector_id
    printer = _call(args, "POST", "/v1/printers", json=body)
    print(printer.get("id", ""))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/v1/printers/{args.printer_id}")
    return 0
