"""``printrelay printers``: list, adopt, change and remove printers at a relay (needs a printers:admin
token)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import httpx

from printrelay.client import SubmitFailed, _error


def add_printers_parser(commands: Any) -> None:
    printers = commands.add_parser("printers", help="list, adopt, change and remove printers at a relay")
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
    pull_option(adopt)
    adopt.set_defaults(run=run_adopt)

    change = actions.add_parser("set", help="change a printer the relay serves (no connector asked)")
    common(change)
    change.add_argument("printer_id")
    pull_option(change, required=True)
    change.set_defaults(run=run_set)

    remove = actions.add_parser("remove", help="stop serving a printer")
    common(remove)
    remove.add_argument("printer_id")
    remove.set_defaults(run=run_remove)


def pull_option(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--pull", action=argparse.BooleanOptionalAction, required=required,
        help="a pull printer holds every job until its owner (or a tenant admin) releases it"
        + ("" if required else " (default: leave as it is; a new printer is not one)"),
    )  # fmt: skip


def _client(args: argparse.Namespace) -> httpx.Client:
    if not args.token:
        raise SubmitFailed("an API token is required: --token or PRINTRELAY_API_TOKEN")
    return httpx.Client(base_url=args.relay, timeout=30, headers={"authorization": f"Bearer {args.token}"})


def _call(args: argparse.Namespace, method: str, path: str, *, optional: bool = False, **kw: Any) -> Any:
    """The answer's JSON; ``optional``: a 403 (the token lacks the scope) is an empty answer, not an error."""
    try:
        with _client(args) as client:
            response = client.request(method, path, **kw)
    except httpx.ConnectError:
        raise SubmitFailed(f"relay unreachable at {args.relay}") from None
    except httpx.HTTPError as exc:
        raise SubmitFailed(f"talking to the relay failed: {exc}") from None
    if optional and response.status_code == 403:
        return {}
    if response.status_code >= 400:
        raise SubmitFailed(_error(response))
    return response.json() if response.content else {}


def run_list(args: argparse.Namespace) -> int:
    printers = _call(args, "GET", "/v1/printers")["printers"]
    # Discovered candidates need printers:admin; an ordinary API token lists the printers alone.
    candidates = _call(args, "GET", "/v1/candidates", optional=True).get("candidates", [])
    if args.json:
        print(json.dumps({"printers": printers, "candidates": candidates}, indent=2))
        return 0
    print(f"{'PRINTER':<20} {'CONNECTOR':<18} {'STATE':<10} {'PULL':<5} KIND")
    for p in printers:
        pull = "yes" if p.get("pull") else "no"
        print(f"{p['id']:<20} {p['connector_id']:<18} {p['state']:<10} {pull:<5} {p.get('kind', '')}")
    if candidates:
        print(f"\n{'CANDIDATE URI':<48} {'CONNECTOR':<18} NAME")
        for c in candidates:
            print(f"{c.get('uri', ''):<48} {c.get('connector_id', ''):<18} {c.get('name', '')}")
    return 0


def run_adopt(args: argparse.Namespace) -> int:
    body: dict[str, str | bool] = {"uri": args.uri}
    if args.printer_id:
        body["id"] = args.printer_id
    if args.connector_id:
        body["connector_id"] = args.connector_id
    if args.pull is not None:
        body["pull"] = args.pull
    printer = _call(args, "POST", "/v1/printers", json=body)
    print(printer.get("id", ""))
    return 0


def run_set(args: argparse.Namespace) -> int:
    printer = _call(args, "POST", "/v1/printers", json={"id": args.printer_id, "pull": args.pull})
    print(f"{printer['id']}: {'a pull printer' if printer.get('pull') else 'not a pull printer'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    _call(args, "DELETE", f"/v1/printers/{args.printer_id}")
    return 0
