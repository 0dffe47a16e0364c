"""Users, tokens and sessions in the index database (threat model SR-2, SR-5, SR-7).

Passwords are kept only as argon2id hashes; tokens and session secrets only as their SHA-256
(they are 256-bit random values, so a fast hash is enough, and a lookup by digest compares
nothing in Python). A secret is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, func, insert, select, update

from stockade.auth.passwords import check_policy, hash_password
from stockade.auth.roles import Role
from stockade.errors import ConfigError, NotFound, StockadeError
from stockade.index.schema import tokens, users
from stockade.query import Scope

if TYPE_CHECKING:
    from stockade.settings import Settings

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: Prefix of Stockade API tokens (so that they can be recognised, e.g. by secret scanners).
TOKEN_PREFIX = "stk_"  # noqa: S105 - a prefix, not a secret
#: Failed logins before the account is locked, and the first lock (doubling after that).
LOCK_AFTER = 5
FIRST_LOCK = timedelta(seconds=30)
MAX_LOCK = timedelta(hours=1)


class UserExists(StockadeError):
    """A user of that name exists already (HTTP 409)."""

    http_status = 409
    code = "user-exists"


def check_name(name: str) -> str:
    """Return *name* if it is a valid user name (lower case letters, digits, ``._-``, at
    most 64 characters), else raise ConfigError."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            "a user name is 1 to 64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def scope_json(scope: Scope | None) -> str | None:
    """The stored form of a scope."""
    if scope is None:
        return None
    return json.dumps({"studies": sorted(scope.studies), "patients": sorted(scope.patients)})


def scope_from_json(text: str | None) -> Scope | None:
    """The scope stored as *text* (None: everything)."""
    if not text:
        return None
    data = json.loads(text)
    return Scope(frozenset(data.get("studies", ())), frozenset(data.get("patients", ())))


def digest(secret: str) -> str:
    """SHA-256 of a token or session secret (what is stored)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class User:
    """A stored user (never with the hash)."""

    id: int
    name: str
    role: Role
    must_change: bool
    disabled: bool
    failed_logins: int
    locked_until: datetime | None
    scope: Scope | None
    created_at: datetime


@dataclass(frozen=True)
class Token:
    """A stored token or session (never with the secret)."""

    id: int
    user: str
    kind: str
    label: str
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes: they were stored in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _user(row: Any) -> User:
    return User(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        must_change=bool(row.must_change),
        disabled=bool(row.disabled),
        failed_logins=row.failed_logins,
        locked_until=_aware(row.locked_until),
        scope=scope_from_json(row.scope),
        created_at=_aware(row.created_at) or datetime.now(UTC),
    )


#: Token columns, labelled apart from the user's (both tables have ``id`` and dates).
_TOKEN_COLUMNS = (
    tokens.c.id.label("token_id"),
    tokens.c.kind,
    tokens.c.label,
    tokens.c.created_at.label("token_created_at"),
    tokens.c.expires_at,
    tokens.c.last_used_at,
    tokens.c.revoked_at,
)


def _token_of(row: Any, user: str) -> Token:
    return Token(
        id=row.token_id,
        user=user,
        kind=row.kind,
        label=row.label,
        created_at=_aware(row.token_created_at) or datetime.now(UTC),
        expires_at=_aware(row.expires_at) or datetime.now(UTC),
        last_used_at=_aware(row.last_used_at),
        revoked_at=_aware(row.revoked_at),
    )


class UserStore:
    """Users, tokens and sessions on the index's database engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # users ---------------------------------------------------------------------------------

    def any_user(self) -> bool:
        """Whether at least one enabled user exists."""
        with self.engine.connect() as conn:
            count = conn.execute(
                select(func.count()).select_from(users).where(users.c.disabled == 0)
            ).scalar_one()
        return bool(count)

    def add(
        self,
        name: str,
        role: Role,
        password: str,
        *,
        must_change: bool = False,
        scope: Scope | None = None,
    ) -> User:
        """Create a user (the password checked against the policy, then hashed).

        Raises
        ------
        ConfigError
            A bad name.
        WeakPassword
            The policy refuses the password.
        UserExists
        """
        check_name(name)
        check_policy(password, name)
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            if conn.execute(select(users.c.id).where(users.c.name == name)).first():
                raise UserExists(f"user {name} exists already")
            conn.execute(
                insert(users).values(
                    name=name,
                    role=role.value,
                    password_hash=hash_password(password),
                    must_change=int(must_change),
                    disabled=0,
                    failed_logins=0,
                    locked_until=None,
                    scope=scope_json(scope),
                    created_at=now,
                    password_changed_at=now,
                )
            )
        return self.get(name)

    def get(self, name: str) -> User:
        """The user called *name* (NotFound when there is none)."""
        found = self.find(name)
        if found is None:
            raise NotFound(f"no user {name[:64]}")
        return found[0]

    def find(self, name: str) -> tuple[User, str] | None:
        """The user called *name* and its password hash, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name[:64])).first()
        return None if row is None else (_user(row), row.password_hash)

    def list(self) -> list[User]:
        """Every user, by name."""
        with self.engine.connect() as conn:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.name))]

    def set_password(self, name: str, password: str, *, must_change: bool = False) -> None:
        """Replace a password (policy-checked); unlocks the account; ends its sessions."""
        check_policy(password, name)
        user = self.get(name)
        with self.engine.begin() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(
                    password_hash=hash_password(password),
                    must_change=int(must_change),
                    failed_logins=0,
                    locked_until=None,
                    password_changed_at=datetime.now(UTC),
                )
            )
            conn.execute(
                update(tokens)
                .where(tokens.c.user_pk == user.id, tokens.c.kind == "session")
                .values(revoked_at=datetime.now(UTC))
            )

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (every token and session stops working) or enable a user."""
        user = self.get(name)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(disabled=int(disabled)))

    def set_role(self, name: str, role: Role) -> None:
        """Give a user another role (it applies from the user's next request)."""
        user = self.get(name)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(role=role.value))

    def set_scope(self, name: str, scope: Scope | None) -> None:
        """Limit a user to some studies and patients (None: everything)."""
        user = self.get(name)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.id == user.id).values(scope=scope_json(scope)))

    def failed(self, user: User) -> datetime | None:
        """Count a failed login; return when the account is locked until, if it now is."""
        count = user.failed_logins + 1
        until = None
        if count >= LOCK_AFTER:
            until = datetime.now(UTC) + min(FIRST_LOCK * 2 ** (count - LOCK_AFTER), MAX_LOCK)
        with self.engine.begin() as conn:
            conn.execute(
                update(users)
                .where(users.c.id == user.id)
                .values(failed_logins=count, locked_until=until)
            )
        return until

    def succeeded(self, user: User) -> None:
        """Reset the failed-login count."""
        if user.failed_logins or user.locked_until:
            with self.engine.begin() as conn:
                conn.execute(
                    update(users)
                    .where(users.c.id == user.id)
                    .values(failed_logins=0, locked_until=None)
                )

    # tokens and sessions ---------------------------------------------------------------------

    def issue(
        self, user: User, kind: str, label: str, lifetime: timedelta
    ) -> tuple[str, str | None, Token]:
        """Make a token (``api``) or a session (``session``, with a CSRF secret).

        Returns the secret (shown once), the CSRF secret of a session, and the stored token.
        """
        secret = (TOKEN_PREFIX if kind == "api" else "") + secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32) if kind == "session" else None
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            pk = conn.execute(
                insert(tokens)
                .values(
                    digest=digest(secret),
                    user_pk=user.id,
                    kind=kind,
                    label=label[:64],
                    csrf_digest=digest(csrf) if csrf else None,
                    created_at=now,
                    expires_at=now + lifetime,
                    last_used_at=None,
                    revoked_at=None,
                )
                .returning(tokens.c.id)
            ).scalar_one()
        return secret, csrf, self._token(pk)

    def _token(self, pk: int) -> Token:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_TOKEN_COLUMNS, users.c.name)
                .join(users, users.c.id == tokens.c.user_pk)
                .where(tokens.c.id == pk)
            ).one()
        return _token_of(row, row.name)

    def resolve(self, secret: str, kind: str) -> tuple[User, Token, str | None] | None:
        """The user, token and CSRF digest of a live secret of *kind*, or None (unknown,
        revoked, expired, or its user disabled). One query: this runs on every request."""
        if len(secret) > 256:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_TOKEN_COLUMNS, tokens.c.csrf_digest, users)
                .join(users, users.c.id == tokens.c.user_pk)
                .where(tokens.c.digest == digest(secret), tokens.c.kind == kind)
            ).first()
        if row is None:
            return None
        user = _user(row)
        token = _token_of(row, user.name)
        if token.revoked_at or token.expires_at <= datetime.now(UTC) or user.disabled:
            return None
        return user, token, row.csrf_digest

    def touch(self, token: Token) -> None:
        """Record a use of *token* (at most once a minute per token)."""
        now = datetime.now(UTC)
        if token.last_used_at is None or now - token.last_used_at > timedelta(minutes=1):
            with self.engine.begin() as conn:
                conn.execute(update(tokens).where(tokens.c.id == token.id).values(last_used_at=now))

    def revoke(self, token_id: int) -> Token:
        """Revoke a token or session by id."""
        with self.engine.begin() as conn:
            done = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            ).rowcount
        if not done:
            raise NotFound(f"no live token {token_id}")
        return self._token(token_id)

    def tokens_of(self, name: str | None = None) -> Iterator[Token]:
        """API tokens (of one user), newest first."""
        stmt = select(tokens.c.id).where(tokens.c.kind == "api").order_by(tokens.c.id.desc())
        if name is not None:
            stmt = stmt.join(users, users.c.id == tokens.c.user_pk).where(users.c.name == name)
        with self.engine.connect() as conn:
            ids = [r.id for r in conn.execute(stmt)]
        for pk in ids:
            yield self._token(pk)

    def purge(self) -> int:
        """Delete sessions that ended more than a day ago."""
        cutoff = datetime.now(UTC) - timedelta(days=1)
        with self.engine.begin() as conn:
            return conn.execute(
                delete(tokens).where(tokens.c.kind == "session", tokens.c.expires_at < cutoff)
            ).rowcount


def any_user(settings: Settings) -> bool:
    """Whether the index named by *settings* holds an enabled user (False before its first
    migration). For start-up checks that run before the archive is built."""
    from sqlalchemy import inspect

    from stockade.index.sql import make_engine

    engine = make_engine(settings.index_url)
    try:
        if not inspect(engine).has_table("users"):
            return False
        return UserStore(engine).any_user()
    finally:
        engine.dispose()
