"""``printrelay``: one command for both sides.

printrelay serve       run a relay
printrelay connector   run a connector on the printers' network
printrelay token ...   create, list and revoke tokens (works while the relay runs)
printrelay db ...      the relay's database: migrate, status
printrelay user ...    the people of a tenant: create, list, disable, enable
printrelay tenant oidc a tenant's OpenID Connect sign-in: set, show, remove
printrelay printers    list, adopt, change and remove printers at a relay
printrelay client      add a relay printer to this machine's CUPS
printrelay submit      print a file through a relay
printrelay jobs ...    list, show, cancel, release and watch jobs at a relay
printrelay demo        relay + connector + printer in one command
"""

from __future__ import annotations

# Start-up is kept cheap: this module imports the standard library alone, and a command imports what it needs
# when it runs (the relay's and the connector's code take a second to import; tests and people run many short
# commands). tests/test_cli.py checks that `token list --help` stays clear of both.
import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import trio

    from relay.store.base import Store, TokenRecord

T = TypeVar("T")


class CommandError(Exception):
    """A one-line message for the user; the command exits 1 without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        return 130
    except BaseException as raised:
        exc = _sole(raised)
        if isinstance(exc, CommandError | ValueError) or _one_line(exc):
            print(f"printrelay: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise


# Errors that are one line for the user too, by module: only an imported module can have raised its own, so
# one that was not imported is not imported to ask.
_ONE_LINE_ERRORS = (
    ("printrelay.api_client", "SubmitFailed"),
    ("relay.store.base", "StoreError"),
    ("service.listen", "ListenError"),
    ("service.settings", "SettingsError"),
)


def _one_line(exc: BaseException) -> bool:
    return any(
        (module := sys.modules.get(name)) is not None and isinstance(exc, getattr(module, error))
        for name, error in _ONE_LINE_ERRORS
    )


def _dispatch(argv: list[str]) -> int:
    # Commands of their own under `connector`, whose other flags configure the running connector.
    if argv[:2] == ["connector", "discover"]:
        from connector.discovery import main_discover

        return main_discover(argv[2:])
    if argv[:2] == ["connector", "systemd-unit"]:
        from printrelay.systemd_unit import main_systemd_unit

        return main_systemd_unit(argv[2:])
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("printrelay")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _sole(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member groups, as trio's nurseries raise them."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Every command's parser; given the ``argv`` it will parse, the options of the command it names alone:
    the others are listed by name and help, all that ``printrelay --help`` or a mistyped command shows."""
    parser = argparse.ArgumentParser(
        prog="printrelay",
        description="Print through a cloud relay to printers on networks nobody can reach from outside.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(metavar="COMMAND")
    # The top level has flags without values alone, so its first other argument is the command argparse runs.
    named = None if argv is None else next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (help_text, add) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        if argv is None or name == named:
            if isinstance(add, str):
                module, _, function = add.partition(":")
                add = getattr(importlib.import_module(module), function)
            add(command)
    return parser


class _Version(argparse.Action):
    """``--version``, looked up only when asked: reading the installed packages' metadata takes 0.1 s."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show program's version number and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(f"printrelay {_version()}")
        parser.exit()


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    from relay.config import RelayConfig
    from service.settings import add_arguments

    serve.description = (
        "Run a relay. Every flag can also come from PRINTRELAY_<FLAG> or a --config TOML file; flags win."
    )
    add_arguments(serve, RelayConfig)
    serve.set_defaults(run=run_serve)


def add_connector_arguments(connector: argparse.ArgumentParser) -> None:
    from connector.config import ConnectorConfig
    from service.settings import add_arguments

    connector.description = (
        "Run a connector: it dials the relay and delivers jobs to the printers given with --printer."
    )
    add_arguments(connector, ConnectorConfig)
    connector.set_defaults(run=run_connector)


def add_db_arguments(db: argparse.ArgumentParser) -> None:
    actions = db.add_subparsers(metavar="ACTION")
    migrate = actions.add_parser(
        "migrate", help="bring the database to this version's schema (serve does it too, at start)"
    )
    _store_arguments(migrate)
    migrate.set_defaults(run=run_db_migrate)
    status = actions.add_parser("status", help="the database's schema version next to this printrelay's")
    _store_arguments(status)
    status.set_defaults(run=run_db_status)


def add_token_arguments(token: argparse.ArgumentParser) -> None:
    from service.settings import parse_duration

    actions = token.add_subparsers(metavar="ACTION")
    create = actions.add_parser("create", help="create a token and print it (shown once)")
    _store_arguments(create)
    create.add_argument("--tenant", required=True, help="the tenant the token belongs to")
    create.add_argument("--kind", choices=("api", "connector", "user"), required=True)
    create.add_argument("--user", dest="user_email", help="kind user: the email of the user it is for")
    create.add_argument(
        "--connector", dest="connector_id", help="connector id (kind connector; default: new)"
    )
    create.add_argument(
        "--scopes", default="", help="comma-separated: jobs:submit,jobs:read,printers:admin,admin"
    )
    create.add_argument("--expires-in", type=parse_duration, help="e.g. 90d; default: never")
    create.add_argument("--label", default="", help="a note shown in listings")
    create.set_defaults(run=run_token_create)
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    _store_arguments(listing)
    listing.add_argument("--tenant")
    listing.set_defaults(run=run_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    _store_arguments(revoke)
    revoke.add_argument("token_id", help="the id shown by 'token list' (the part after pra_/prc_)")
    revoke.set_defaults(run=run_token_revoke)


# Every command, in the order `printrelay --help` lists them: its help, and what adds its options (for the
# commands of other modules "module:function", so that the module is imported only when its command runs).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | str]] = {
    "serve": ("run a relay", add_serve_arguments),
    "connector": ("run a connector", add_connector_arguments),
    "db": ("the relay's database: schema version, migrations", add_db_arguments),
    "token": ("manage tokens", add_token_arguments),
    "submit": ("print a file through a relay", "printrelay.client:add_submit_arguments"),
    "jobs": ("list, show, cancel, release and watch jobs at a relay", "printrelay.jobs:add_jobs_arguments"),
    "client": ("this computer as a relay client", "printrelay.client_install:add_client_arguments"),
    "printers": (
        "list, adopt, change and remove printers at a relay",
        "printrelay.printers:add_printers_arguments",
    ),
    "user": ("manage the people of a tenant", "printrelay.users:add_user_arguments"),
    "tenant": ("a tenant's settings: its OpenID Connect sign-in", "printrelay.tenants:add_tenant_arguments"),
    "demo": (
        "relay + connector + printer in one command, and a test print",
        "printrelay.demo:add_demo_arguments",
    ),
}


# --- serve / connector ------------------------------------------------------------------------------


def run_serve(args: argparse.Namespace) -> int:
    import trio

    from relay.config import RelayConfig
    from service.logs import setup_logging
    from service.settings import load

    config = load(RelayConfig, args)
    setup_logging(config.log_level, config.log_format)
    from relay.app import Relay
    from relay.runtime import MemoryReturn, tune_gc

    tune_gc()

    async def serve() -> None:
        relay = Relay(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            nursery.start_soon(MemoryReturn().run)  # process-wide, so here and not in Relay
            await _drain_then_stop(nursery.cancel_scope, relay.drain, config.drain_grace)

    trio.run(serve)
    return 0


def run_connector(args: argparse.Namespace) -> int:
    import trio

    from connector.config import ConnectorConfig, with_token
    from service.logs import setup_logging
    from service.settings import load

    config = with_token(load(ConnectorConfig, args))
    if not config.token:
        raise CommandError(
            "a connector token is required: --token-file FILE (or PRINTRELAY_TOKEN_FILE), "
            "--token or PRINTRELAY_TOKEN"
        )
    setup_logging(config.log_level, config.log_format)
    from connector.app import Connector

    async def serve() -> None:
        connector = Connector(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(connector.run)
            await _drain_then_stop(nursery.cancel_scope, connector.drain, config.drain_grace)

    trio.run(serve)
    return 0


async def _drain_then_stop(
    scope: trio.CancelScope, drain: Callable[[float], Awaitable[None]], grace: float
) -> None:
    """SIGTERM or SIGINT: drain within ``grace`` seconds, then stop; a second signal stops at once."""
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            break
        async with trio.open_nursery() as nursery:

            async def stop_on_second_signal() -> None:
                async for _ in signals:
                    scope.cancel()

            nursery.start_soon(stop_on_second_signal)
            await drain(grace)
            scope.cancel()


# --- tokens and the database --------------------------------------------------------------------------


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("PRINTRELAY_DATA_DIR", "printrelay-data")),
        help="the relay's --data-dir (env PRINTRELAY_DATA_DIR; SQLite)",
    )  # fmt: skip
    parser.add_argument(
        "--database-url", default=os.environ.get("PRINTRELAY_DATABASE_URL", ""),
        help="the relay's --database-url, postgresql://... (env PRINTRELAY_DATABASE_URL); beats --data-dir",
    )  # fmt: skip
    parser.add_argument(
        "--create", action="store_true",
        help="make the --data-dir if it does not exist (without it a mistyped path is an error, not a new "
        "empty relay)",
    )  # fmt: skip


def _with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]]) -> T:
    """Open the relay's store as the relay would (migrating it first), run ``work``, close it."""
    import trio

    from relay.store import store_for

    if not args.database_url and not args.data_dir.exists() and not args.create:
        raise CommandError(
            f"no relay data directory at {args.data_dir}: give the relay's --data-dir (or "
            "PRINTRELAY_DATA_DIR), or add --create to start a new one"
        )

    async def run() -> T:
        try:
            store = store_for(args.data_dir, args.database_url)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    return trio.run(run)


def _schema(args: argparse.Namespace, *, migrate: bool) -> tuple[int, int, list[int]]:
    """(the database's schema version, this printrelay's, versions applied now)."""
    from relay.store import is_postgres_url

    if args.database_url:
        if not is_postgres_url(args.database_url):
            raise CommandError("--database-url must be a postgresql:// URL")
        from relay.store import postgres

        with postgres.connect(args.database_url) as pg:
            applied = postgres.migrate(pg) if migrate else []
            return postgres.schema_version(pg), postgres.SCHEMA_VERSION, applied
    from relay.config import RelayConfig
    from relay.store import sqlite

    path = RelayConfig(data_dir=args.data_dir).database_path
    if not migrate and not path.exists():
        return 0, sqlite.SCHEMA_VERSION, []
    conn = sqlite.open_sqlite(path)
    try:
        applied = sqlite.migrate(conn) if migrate else []
        return sqlite.schema_version(conn), sqlite.SCHEMA_VERSION, applied
    finally:
        conn.close()


def run_db_migrate(args: argparse.Namespace) -> int:
    version, _, applied = _schema(args, migrate=True)
    if applied:
        print(f"migrated to schema version {version} (applied {', '.join(map(str, applied))})")
    else:
        print(f"schema version {version}: up to date")
    return 0


def run_db_status(args: argparse.Namespace) -> int:
    """Exit 0 when the database is at this version's schema, 1 when it is behind or newer."""
    version, code, _ = _schema(args, migrate=False)
    if version == code:
        print(f"schema version {version}: up to date")
        return 0
    if version < code:
        print(f"schema version {version}, this printrelay needs {code}: run 'printrelay db migrate'")
    else:
        print(f"schema version {version} is newer than this printrelay's {code}: run the newer version")
    return 1


def _audit(action: str, *, tenant: str, target: str, **details: object) -> None:
    """Token commands write the audit entry to their own stderr (the relay is another process)."""
    from relay import audit
    from service.logs import setup_logging

    setup_logging("info", "auto")
    audit.record(action, tenant=tenant, actor="cli", target=target, **details)


def run_token_create(args: argparse.Namespace) -> int:
    from relay.auth import new_token

    if (args.kind == "user") != bool(args.user_email):
        raise CommandError("--user EMAIL goes with --kind user, and only with it")
    scopes = tuple(s.strip() for s in args.scopes.split(",") if s.strip())

    async def create(store: Store) -> tuple[str, TokenRecord]:
        user_id = None
        if args.kind == "user":
            user = await store.find_user(args.user_email.strip().lower())
            if user is None or user.tenant != args.tenant:
                raise CommandError(f"no user {args.user_email} in tenant {args.tenant}")
            user_id = user.id
        made = new_token(
            args.tenant,
            args.kind,
            scopes=scopes,
            connector_id=args.connector_id,
            label=args.label,
            expires_in=args.expires_in,
            user_id=user_id,
        )
        await store.add_token(made[1])
        return made

    secret, record = _with_store(args, create)
    _audit(
        "token.created", tenant=record.tenant, target=f"token:{record.id}", kind=record.kind,
        scopes=",".join(record.scopes) or None, connector_id=record.connector_id, label=record.label or None,
        expires_at=record.expires_at,
    )  # fmt: skip
    print(secret)
    detail = {
        "connector": f"connector {record.connector_id}", "user": f"user {args.user_email}"
    }.get(record.kind, "scopes " + ",".join(record.scopes))  # fmt: skip
    print(
        f"token {record.id} for tenant {record.tenant} ({record.kind}, {detail}); shown once", file=sys.stderr
    )
    return 0


def run_token_list(args: argparse.Namespace) -> int:
    tokens = _with_store(args, lambda store: store.list_tokens(args.tenant))
    print(f"{'ID':<12} {'TENANT':<16} {'KIND':<10} {'SCOPES / CONNECTOR':<36} {'CREATED':<20} STATUS")
    now = time.time()
    for t in tokens:
        status = (
            "revoked" if t.revoked_at else "expired" if t.expires_at and t.expires_at <= now else "active"
        )
        what = {"connector": t.connector_id, "user": t.user_id}.get(t.kind, ",".join(t.scopes))
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created_at))
        print(f"{t.id:<12} {t.tenant:<16} {t.kind:<10} {what or '':<36} {created:<20} {status}")
    return 0


def run_token_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Store) -> str | None:
        record = await store.get_token(args.token_id)
        if record is None or not await store.revoke_token(args.token_id, time.time()):
            return None
        return record.tenant

    tenant = _with_store(args, revoke)
    if tenant is None:
        raise CommandError(f"no active token with id {args.token_id}")
    # Every running relay hears of it (PostgreSQL NOTIFY; SQLite's data_version within 2 s) and closes the
    # revoked token's sessions.
    _audit("token.revoked", tenant=tenant, target=f"token:{args.token_id}")
    print(f"token {args.token_id} revoked", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Run as ``python -m printrelay.cli`` this module is ``__main__``, and the command modules that import
    # ``printrelay.cli`` get a second copy with its own exception classes: run the importable copy.
    from printrelay.cli import main as importable_main

    sys.exit(importable_main())
