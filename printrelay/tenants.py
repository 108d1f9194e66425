"""``printrelay tenant oidc set|show|remove``: a tenant's OpenID Connect provider for the portal's sign-in.

The client secret is read from standard input (never a flag: flags show in process listings) and stored
sealed with the relay's secret key (``--secret-key-file``, by default DATA_DIR/secret.key, the relay's own),
so the database alone does not reveal it. Register the relay at the provider with the redirect URI
``{public_url}/portal/oidc/callback`` and the scopes ``openid email``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from printrelay.cli import CommandError, _store_arguments, _with_store
from relay.auth import validate_name
from relay.store.base import OidcProvider, Store, StoreError

MAX_CLIENT_ID = 255
MAX_SECRET = 4096


def add_tenant_arguments(tenant: argparse.ArgumentParser) -> None:
    oidc = tenant.add_subparsers(metavar="WHAT").add_parser(
        "oidc", help="the tenant's OpenID Connect provider (portal sign-in)"
    )
    actions = oidc.add_subparsers(metavar="ACTION")
    put = actions.add_parser(
        "set", help="set (or replace) the provider; the client secret is read from standard input"
    )
    _arguments(put)
    put.add_argument("--issuer", required=True, help="the provider's issuer URL (https://...)")
    put.add_argument("--client-id", required=True, help="the relay's client id at the provider")
    put.add_argument(
        "--client-secret-stdin", action="store_true",
        help="read the client secret from standard input (one line); without it: a public client (PKCE only)",
    )  # fmt: skip
    put.add_argument("--email-claim", default="email", help="the claim holding the email (default email)")
    put.add_argument(
        "--create-users", action="store_true",
        help="a sign-in with an email that is no user yet creates one (role user) in the tenant",
    )  # fmt: skip
    put.add_argument(
        "--no-check", dest="check", action="store_false",
        help="do not fetch the provider's configuration to check the issuer first",
    )  # fmt: skip
    put.set_defaults(run=run_oidc_set)
    show = actions.add_parser("show", help="the tenant's provider (never the secret)")
    _arguments(show)
    show.set_defaults(run=run_oidc_show)
    remove = actions.add_parser("remove", help="remove the provider: people sign in with passwords only")
    _arguments(remove)
    remove.set_defaults(run=run_oidc_remove)


def _arguments(parser: argparse.ArgumentParser) -> None:
    _store_arguments(parser)
    parser.add_argument("--tenant", required=True)
    parser.add_argument(
        "--secret-key-file", type=Path,
        help="the relay's --secret-key-file (default DATA_DIR/secret.key); it seals the client secret",
    )  # fmt: skip


def _tenant(args: argparse.Namespace) -> str:
    try:
        return validate_name("tenant", args.tenant)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def run_oidc_set(args: argparse.Namespace) -> int:
    import trio

    from relay.portal.oidc import OidcClient, OidcError, check_issuer, seal_client_secret
    from relay.secretbox import SecretBox, SecretBoxError

    tenant = _tenant(args)
    try:
        issuer = check_issuer(args.issuer)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    client_id = args.client_id.strip()
    if not 0 < len(client_id) <= MAX_CLIENT_ID or not client_id.isprintable():
        raise CommandError(f"--client-id must have 1 to {MAX_CLIENT_ID} printable characters")
    if not args.email_claim.isidentifier():
        raise CommandError(f"--email-claim must be a claim name, not {args.email_claim[:40]!r}")
    secret = ""
    if args.client_secret_stdin:
        secret = sys.stdin.readline(MAX_SECRET + 2).rstrip("\r\n")
        if not secret:
            raise CommandError("--client-secret-stdin: standard input had no secret")
    if args.check:
        try:
            trio.run(OidcClient().discover, issuer)
        except OidcError as exc:
            raise CommandError(f"{issuer}: {exc} (--no-check skips this)") from None
    try:
        box = SecretBox.load_or_create(args.secret_key_file or args.data_dir / "secret.key")
    except (SecretBoxError, OSError) as exc:
        raise CommandError(str(exc)) from None
    provider = OidcProvider(
        tenant=tenant, issuer=issuer, client_id=client_id,
        client_secret_sealed=seal_client_secret(box, tenant, secret) if secret else b"",
        email_claim=args.email_claim, create_users=args.create_users, created_at=time.time(),
    )  # fmt: skip

    async def put(store: Store) -> None:
        await store.set_oidc_provider(provider)

    _with_store(args, put)
    new_users = "creates users" if provider.create_users else "existing users only"
    print(f"tenant {tenant} signs in with {issuer} (client {client_id}, {new_users})", file=sys.stderr)
    return 0


def run_oidc_show(args: argparse.Namespace) -> int:
    tenant = _tenant(args)
    provider = _with_store(args, lambda store: store.get_oidc_provider(tenant))
    if provider is None:
        raise CommandError(f"tenant {tenant} has no OpenID Connect provider")
    print(f"issuer        {provider.issuer}")
    print(f"client_id     {provider.client_id}")
    print(f"client_secret {'(sealed)' if provider.client_secret_sealed else '(none: public client)'}")
    print(f"email_claim   {provider.email_claim}")
    print(f"create_users  {'yes' if provider.create_users else 'no'}")
    return 0


def run_oidc_remove(args: argparse.Namespace) -> int:
    tenant = _tenant(args)
    if not _with_store(args, lambda store: store.delete_oidc_provider(tenant)):
        raise CommandError(f"tenant {tenant} has no OpenID Connect provider")
    print(f"tenant {tenant}: OpenID Connect sign-in removed", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m printrelay.tenants tenant oidc ...`` (the same as ``printrelay tenant oidc ...``)."""
    from printrelay import cli

    parser = argparse.ArgumentParser(prog="printrelay")
    add_tenant_arguments(
        parser.add_subparsers(metavar="COMMAND").add_parser("tenant", help=cli.COMMANDS["tenant"][0])
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except BaseException as raised:
        exc = cli._sole(raised)
        if isinstance(exc, CommandError | ValueError | StoreError):
            print(f"printrelay: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
