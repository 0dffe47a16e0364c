"""Account administration (``stockade user``, ``stockade token``), each change audited as a
``UserChanged`` event (PS3.15 A.5.3.11, User Security Attributes Changed); secrets never are."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from stockade.audit.events import Actor, AuditEvent, UserChanged
from stockade.auth.passwords import generate_password
from stockade.auth.roles import Role
from stockade.auth.users import Token, User, UserStore
from stockade.errors import Conflict
from stockade.query import Scope


class Accounts:
    """Creates and changes users and tokens."""

    def __init__(
        self,
        users: UserStore,
        audit: Callable[[AuditEvent], None],
        data_dir: Path | None = None,
    ) -> None:
        self.users = users
        self.audit = audit
        self.data_dir = data_dir

    def _changed(self, actor: Actor, target: str, action: str, detail: str | None = None) -> None:
        self.audit(UserChanged(actor=actor, target=target, action=action, detail=detail))

    def add(
        self,
        name: str,
        role: Role,
        password: str,
        actor: Actor,
        *,
        must_change: bool = False,
        scope: Scope | None = None,
    ) -> User:
        """Create a user."""
        user = self.users.add(name, role, password, must_change=must_change, scope=scope)
        self._changed(actor, name, "create", f"role {role.value}")
        return user

    def first_admin(self, actor: Actor) -> str | None:
        """With no user at all, create ``admin`` with a random one-time password that must be
        changed at first login; return that password (None when users exist)."""
        if self.users.list():
            return None
        password = generate_password()
        self.add("admin", Role.ADMIN, password, actor, must_change=True)
        return password

    def set_password(
        self, name: str, password: str, actor: Actor, *, must_change: bool = False
    ) -> None:
        """Replace a user's password (ends the user's sessions)."""
        self.users.set_password(name, password, must_change=must_change)
        self._changed(actor, name, "password")
        if name == "admin" and self.data_dir is not None:
            (self.data_dir / INITIAL_PASSWORD_FILE).unlink(missing_ok=True)

    def set_disabled(self, name: str, disabled: bool, actor: Actor) -> None:
        """Disable or enable a user."""
        self.users.set_disabled(name, disabled)
        self._changed(actor, name, "disable" if disabled else "enable")

    def set_role(self, name: str, role: Role, actor: Actor) -> None:
        """Give a user another role; the last enabled administrator keeps the admin role.

        Raises
        ------
        Conflict
            *name* is the last enabled administrator and *role* is not ``admin``.
        """
        user = self.users.get(name)
        if user.role is Role.ADMIN and role is not Role.ADMIN:
            others = [
                u
                for u in self.users.list()
                if u.role is Role.ADMIN and not u.disabled and u.name != name
            ]
            if not others:
                raise Conflict(f"{name} is the last administrator; add another one first")
        self.users.set_role(name, role)
        self._changed(actor, name, "role", f"{user.role.value} -> {role.value}")

    def set_scope(self, name: str, scope: Scope | None, actor: Actor) -> None:
        """Limit a user to studies and patients, or lift the limit."""
        self.users.set_scope(name, scope)
        detail = (
            None
            if scope is None
            else f"{len(scope.studies)} studies, {len(scope.patients)} patients"
        )
        self._changed(actor, name, "scope", detail)

    def create_token(
        self, name: str, lifetime: timedelta, label: str, actor: Actor
    ) -> tuple[str, Token]:
        """An API token for *name*: the secret (shown once) and the stored token."""
        user = self.users.get(name)
        secret, _csrf, token = self.users.issue(user, "api", label, lifetime)
        self._changed(actor, name, "token", f"token {token.id} until {token.expires_at:%Y-%m-%d}")
        return secret, token

    def revoke_token(self, token_id: int, actor: Actor) -> Token:
        """Revoke a token."""
        token = self.users.revoke(token_id)
        self._changed(actor, token.user, "revoke", f"token {token.id}")
        return token


#: Where the first administrator's one-time password can be read once (mode 0600).
INITIAL_PASSWORD_FILE = "initial-admin-password"  # noqa: S105 - a file name


def bootstrap(accounts: Accounts, data_dir: Path) -> str | None:
    """On the first start (no user at all), create ``admin`` with a random one-time password
    that must be changed at first login, write it to ``<data_dir>/initial-admin-password``
    (0600, removed when the password is changed) and print it once on standard error.
    There is never a default password (threat model SR-2). Returns the password, if made."""
    password = accounts.first_admin(Actor(via="internal"))
    if password is None:
        return None
    path = data_dir / INITIAL_PASSWORD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(password + "\n")
    sys.stderr.write(
        "\nStockade created the administrator 'admin' with this one-time password (also in "
        f"{path}, mode 0600, until it is changed):\n\n    {password}\n\nIt must be changed at "
        "first login (POST /auth/password, or: stockade user passwd admin).\n\n"
    )
    sys.stderr.flush()
    return password
