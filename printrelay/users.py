"""``printrelay user create|list|disable|enable``: people of a tenant, managed next to the relay's store."""

from __future__ import annotations

import argparse
import sys
import time

from printrelay.cli import CommandError, _audit, _store_arguments, _with_store
from relay.store.base import Conflict, Store
from relay.users import ROLES, check_password_rules, hash_password, new_user, normal_email


def add_user_arguments(user: argparse.ArgumentParser) -> None:
    actions = user.add_subparsers(metavar="ACTION")
    create = actions.add_parser("create", help="create a user (prints its id)")
    _store_arguments(create)
    create.add_argument("--tenant", required=True, help="the tenant the user belongs to")
    create.add_argument("--email", required=True, help="the email they sign in with (unique on the relay)")
    create.add_argument("--name", default="", help="a display name")
    create.add_argument("--role", choices=ROLES, default="user", help="user (their own jobs) or admin")
    create.add_argument(
        "--password-stdin", action="store_true",
        help="read their password from standard input (one line; a terminal asks twice, hidden)",
    )  # fmt: skip
    create.set_defaults(run=run_user_create)
    listing = actions.add_parser("list", help="list a tenant's users")
    _store_arguments(listing)
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(run=run_user_list)
    for action, state, what in (
        ("disable", "disabled", "a disabled user's passwords and tokens stop working at once"),
        ("enable", "active", "let a disabled user sign in again"),
    ):
        command = actions.add_parser(action, help=what)
        _store_arguments(command)
        command.add_argument("--tenant", required=True)
        command.add_argument("--email", required=True)
        command.set_defaults(run=run_user_state, state=state)


def _read_password() -> str:
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise CommandError("the two passwords differ")
        return first
    line = sys.stdin.readline(4096)
    return line.rstrip("\r\n")


def run_user_create(args: argparse.Namespace) -> int:
    import trio

    try:
        user = new_user(args.tenant, args.email, name=args.name, role=args.role)
        if args.password_stdin:
            password = _read_password()
            check_password_rules(password)
            user.password_hash = trio.run(hash_password, password)
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    async def add(store: Store) -> None:
        try:
            await store.add_user(user)
        except Conflict:
            raise CommandError(f"a user with the email {user.email} exists") from None

    _with_store(args, add)
    _audit("user.created", tenant=user.tenant, target=f"user:{user.id}", email=user.email, role=user.role)
    print(user.id)
    print(f"user {user.email} ({user.role}) in tenant {user.tenant}", file=sys.stderr)
    return 0


def run_user_list(args: argparse.Namespace) -> int:
    users = _with_store(args, lambda store: store.list_users(args.tenant))
    print(f"{'ID':<21} {'EMAIL':<32} {'ROLE':<6} {'STATE':<9} {'PASSWORD':<9} NAME")
    for u in users:
        password = "yes" if u.password_hash else "no"
        print(f"{u.id:<21} {u.email:<32} {u.role:<6} {u.state:<9} {password:<9} {u.name}")
    return 0


def run_user_state(args: argparse.Namespace) -> int:
    try:
        email = normal_email(args.email)
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    async def change(store: Store) -> str | None:
        user = await store.find_user(email)
        if user is None or user.tenant != args.tenant:
            return None
        user.state = args.state
        user.disabled_at = time.time() if args.state == "disabled" else None
        await store.update_user(user)
        if args.state == "disabled":
            await store.revoke_web_sessions(user_id=user.id, at=time.time())
        return user.id

    user_id = _with_store(args, change)
    if user_id is None:
        raise CommandError(f"no user {email} in tenant {args.tenant}")
    # Every running relay hears of it (PostgreSQL NOTIFY; SQLite's data_version within 2 s).
    _audit("user.changed", tenant=args.tenant, target=f"user:{user_id}", changed="state", state=args.state)
    print(f"user {email} {args.state}", file=sys.stderr)
    return 0
