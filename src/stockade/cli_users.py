"""``stockade user`` and ``stockade token``: accounts and API tokens (threat model SR-2, SR-7).

A thin adapter over :attr:`Archive.accounts <stockade.archive.Archive.accounts>`. Passwords
come from a prompt (twice, not echoed) or, for scripts, one line on standard input
(``--password-stdin``); never from the command line, where other users could read them. A
token is printed alone on standard output, once.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from datetime import timedelta

from rich.console import Console

from stockade.archive import Archive
from stockade.audit.events import Actor
from stockade.auth.roles import Role
from stockade.errors import ConfigError
from stockade.query import Scope

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)
_DURATION = re.compile(r"(\d{1,5})([dh])")
#: Longest token lifetime.
MAX_TOKEN_DAYS = 366


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``user`` and ``token`` to the ``stockade`` parser."""
    user = sub.add_parser("user", help="manage users")
    u_sub = user.add_subparsers(dest="user_command", required=True)
    add = u_sub.add_parser("add", help="create a user (the password is asked for)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--must-change", action="store_true", help="change it at first login")
    passwd = u_sub.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.add_argument("--must-change", action="store_true")
    role = u_sub.add_parser("role", help="give a user another role")
    role.add_argument("name")
    role.add_argument("role", choices=[r.value for r in Role])
    for name, text in (("disable", "disable a user"), ("enable", "enable a user")):
        u_sub.add_parser(name, help=text).add_argument("name")
    u_sub.add_parser("list", help="list users")
    scope = u_sub.add_parser("scope", help="limit a user to studies and patients")
    scope.add_argument("name")
    scope.add_argument("--study", action="append", default=[], help="Study Instance UID")
    scope.add_argument("--patient", action="append", default=[], help="Patient ID")
    scope.add_argument("--all", action="store_true", help="lift the limit")
    token = sub.add_parser("token", help="manage API tokens")
    t_sub = token.add_subparsers(dest="token_command", required=True)
    create = t_sub.add_parser("create", help="create a token; prints it alone, once")
    create.add_argument("user")
    create.add_argument("--expires", default="30d", help="lifetime: 30d, 12h (at most 366d)")
    create.add_argument("--label", default="api", help="what the token is for")
    listing = t_sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("user", nargs="?")
    revoke = t_sub.add_parser("revoke", help="revoke a token")
    revoke.add_argument("id", type=int)


def _actor() -> Actor:
    return Actor(user=os.environ.get("USER"), via="cli")


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def lifetime(text: str) -> timedelta:
    """``30d`` or ``12h`` as a duration (at most :data:`MAX_TOKEN_DAYS` days)."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ConfigError("--expires takes a number of days or hours: 30d, 12h")
    amount = int(match.group(1))
    span = timedelta(days=amount) if match.group(2) == "d" else timedelta(hours=amount)
    if span > timedelta(days=MAX_TOKEN_DAYS) or span <= timedelta(0):
        raise ConfigError(f"a token lives at most {MAX_TOKEN_DAYS} days")
    return span


def user(archive: Archive, args: argparse.Namespace) -> int:
    """Run ``stockade user ...``."""
    accounts, command = archive.accounts, args.user_command
    if command == "add":
        password = _password(args.password_stdin)
        accounts.add(args.name, Role(args.role), password, _actor(), must_change=args.must_change)
        out.print(f"created {args.name} ({args.role})", markup=False)
    elif command == "passwd":
        password = _password(args.password_stdin)
        accounts.set_password(args.name, password, _actor(), must_change=args.must_change)
        out.print(f"password of {args.name} changed; its sessions ended", markup=False)
    elif command == "role":
        accounts.set_role(args.name, Role(args.role), _actor())
        out.print(f"{args.name} is now {args.role}", markup=False)
    elif command in ("disable", "enable"):
        accounts.set_disabled(args.name, command == "disable", _actor())
        out.print(f"{args.name} {command}d", markup=False)
    elif command == "scope":
        if args.all == bool(args.study or args.patient):
            raise ConfigError("give --study/--patient values, or --all")
        scope = None if args.all else Scope(frozenset(args.study), frozenset(args.patient))
        accounts.set_scope(args.name, scope, _actor())
        out.print(f"scope of {args.name} set", markup=False)
    else:
        for u in archive.users.list():
            state = "disabled" if u.disabled else "locked" if u.locked_until else "active"
            scoped = "scoped" if u.scope is not None else "all studies"
            change = ", must change password" if u.must_change else ""
            out.print(f"{u.name}  {u.role.value}  {state}  {scoped}{change}", markup=False)
    return 0


def token(archive: Archive, args: argparse.Namespace) -> int:
    """Run ``stockade token ...``."""
    command = args.token_command
    if command == "create":
        secret, made = archive.accounts.create_token(
            args.user, lifetime(args.expires), args.label, _actor()
        )
        err.print(f"token {made.id} for {made.user}, until {made.expires_at:%Y-%m-%d %H:%M} UTC")
        sys.stdout.write(secret + "\n")
        return 0
    if command == "revoke":
        gone = archive.accounts.revoke_token(args.id, _actor())
        out.print(f"revoked token {gone.id} of {gone.user}", markup=False)
        return 0
    for t in archive.users.tokens_of(args.user):
        state = "revoked" if t.revoked_at else f"until {t.expires_at:%Y-%m-%d %H:%M}"
        out.print(f"{t.id}  {t.user}  {t.label}  {state}", markup=False)
    return 0
