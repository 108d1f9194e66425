"""``printrelay printers``: list printers at a relay (any API token); adopt, change and remove them (a
printers:admin token)."""

from __future__ import annotations

import argparse
import json

from printrelay.api_client import add_relay_arguments, call


def add_printers_arguments(printers: argparse.ArgumentParser) -> None:
    actions = printers.add_subparsers(metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        add_relay_arguments(parser, "printers:admin scope to change printers")

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


def run_list(args: argparse.Namespace) -> int:
    printers = call(args, "GET", "/v1/printers")["printers"]
    # Discovered candidates need printers:admin; an ordinary API token lists the printers alone.
    candidates = call(args, "GET", "/v1/candidates", optional=True).get("candidates", [])
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
    printer = call(args, "POST", "/v1/printers", json=body)
    print(printer.get("id", ""))
    return 0


def run_set(args: argparse.Namespace) -> int:
    printer = call(args, "POST", "/v1/printers", json={"id": args.printer_id, "pull": args.pull})
    print(f"{printer['id']}: {'a pull printer' if printer.get('pull') else 'not a pull printer'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    call(args, "DELETE", f"/v1/printers/{args.printer_id}")
    return 0
