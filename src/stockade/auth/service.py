"""Authentication: who is calling (threat model SR-7, SR-16).

Four ways in, one result, a :class:`Principal`:

- a browser session (``login`` with a user name and password; a cookie carries the session
  secret, and state-changing requests also carry its CSRF secret);
- a Stockade bearer token (``stockade token create``);
- HTTP Basic, for DICOMweb tools that know nothing else (the adapter allows it only over TLS or
  loopback);
- an OIDC/JWT bearer token from an external identity provider, checked against a configured
  key set (issuer, audience, expiry, algorithm allow-list).

Failed logins back off: after :data:`~stockade.auth.users.LOCK_AFTER` failures the account is
locked for 30 s, doubling up to an hour. Every login, failed login and logout is a
``UserLogin``/``UserLogout`` audit event; the password or token never appears anywhere.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from stockade.audit.events import Actor, AuditEvent, UserLogin, UserLogout
from stockade.auth.passwords import dummy_hash, verify_password
from stockade.auth.roles import PERMISSIONS, Permission, Role
from stockade.auth.users import User, UserStore, digest
from stockade.errors import NotAuthenticated, NotAuthorized
from stockade.query import Scope
from stockade.settings import Settings

log = logging.getLogger(__name__)
_WRONG = "wrong user name or password"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes
    ----------
    user : str
    role : Role
    scope : Scope or None
        The studies and patients the caller may see; None: all.
    method : str
        ``session``, ``token``, ``basic`` or ``oidc``.
    must_change : bool
        The password must be changed before anything else (first login).
    session_id : int or None
        The session's id, for logout.
    """

    user: str
    role: Role
    scope: Scope | None
    method: str
    must_change: bool = False
    session_id: int | None = None

    def may(self, permission: Permission) -> bool:
        """Whether the role allows *permission*."""
        return permission in PERMISSIONS[self.role]

    def actor(self, address: str | None) -> Actor:
        """The audit actor."""
        return Actor(user=self.user, address=address, via="web")


def require(principal: Principal, permission: Permission) -> None:
    """The one policy point for permissions: raise NotAuthorized (403) unless *principal*
    may do *permission* (deny by default)."""
    if principal.must_change:
        raise NotAuthorized("the password must be changed first (POST /auth/password)")
    if not principal.may(permission):
        raise NotAuthorized(f"role {principal.role.value} may not {permission.value}")


class Authenticator:
    """Turns credentials into a :class:`Principal`, auditing what it must."""

    def __init__(
        self, settings: Settings, users: UserStore, audit: Callable[[AuditEvent], None]
    ) -> None:
        self.settings = settings
        self.users = users
        self.audit = audit
        self._keys: Any = None

    def _principal(self, user: User, method: str, session_id: int | None = None) -> Principal:
        return Principal(user.name, user.role, user.scope, method, user.must_change, session_id)

    # passwords -----------------------------------------------------------------------------

    def check_password(self, name: str, password: str, address: str | None, method: str) -> User:
        """Verify a user name and password, with back-off; audit a failure.

        Raises
        ------
        NotAuthenticated
            Unknown user, wrong password, disabled or locked account (one message for the
            first three, so that names cannot be probed).
        """
        actor = Actor(user=name[:64], address=address, via="web")
        found = self.users.find(name)
        if found is None:
            verify_password(dummy_hash(), password)  # the same cost as a real check
            self._failed(actor, method, "unknown user")
            raise NotAuthenticated(_WRONG)
        user, stored = found
        now = datetime.now(UTC)
        if user.locked_until is not None and user.locked_until > now:
            self._failed(actor, method, "locked after repeated failures")
            wait = int((user.locked_until - now).total_seconds()) + 1
            raise NotAuthenticated(f"too many failed logins: try again in {wait} s")
        if not verify_password(stored, password) or user.disabled:
            locked = self.users.failed(user) if not user.disabled else None
            reason = "disabled" if user.disabled else "wrong password"
            if locked is not None:
                reason += f"; locked until {locked.isoformat(timespec='seconds')}"
            self._failed(actor, method, reason)
            raise NotAuthenticated(_WRONG)
        self.users.succeeded(user)
        return user

    def _failed(self, actor: Actor, method: str, reason: str) -> None:
        self.audit(UserLogin(actor=actor, outcome="failure", method=method, reason=reason))

    def login(self, name: str, password: str, address: str | None) -> tuple[Principal, str, str]:
        """Open a browser session: the principal, the session secret and the CSRF secret."""
        user = self.check_password(name, password, address, "password")
        lifetime = timedelta(seconds=self.settings.session_max_age)
        secret, csrf, token = self.users.issue(user, "session", "browser", lifetime)
        if csrf is None:  # issue() makes one for every session
            raise RuntimeError("a session without a CSRF secret")
        self.audit(
            UserLogin(actor=Actor(user=user.name, address=address, via="web"), method="password")
        )
        return self._principal(user, "session", token.id), secret, csrf

    def logout(self, principal: Principal, address: str | None) -> None:
        """End a browser session."""
        if principal.session_id is not None:
            self.users.revoke(principal.session_id)
        self.audit(UserLogout(actor=principal.actor(address), reason="logout"))

    def basic(self, name: str, password: str, address: str | None) -> Principal:
        """HTTP Basic credentials (each request; only failures are audited)."""
        return self._principal(self.check_password(name, password, address, "basic"), "basic")

    # secrets ------------------------------------------------------------------------------

    def session(
        self, secret: str, csrf: str | None, unsafe: bool, address: str | None
    ) -> Principal:
        """A browser session from its cookie; *unsafe* requests (not GET/HEAD/OPTIONS) must
        carry the session's CSRF secret.

        Raises
        ------
        NotAuthenticated
            Unknown, revoked, expired or idle session.
        NotAuthorized
            An unsafe request without the right CSRF secret.
        """
        found = self.users.resolve(secret, "session")
        if found is None:
            raise NotAuthenticated("the session has ended; log in again")
        user, token, csrf_digest = found
        idle = timedelta(seconds=self.settings.session_idle_timeout)
        last = token.last_used_at or token.created_at
        if datetime.now(UTC) - last > idle:
            self.users.revoke(token.id)
            self.audit(
                UserLogout(
                    actor=Actor(user=user.name, address=address, via="web"), reason="expired"
                )
            )
            raise NotAuthenticated("the session expired after inactivity; log in again")
        if unsafe and not (csrf and csrf_digest and hmac.compare_digest(digest(csrf), csrf_digest)):
            raise NotAuthorized("missing or wrong X-CSRF-Token for this session")
        self.users.touch(token)
        return self._principal(user, "session", token.id)

    def token(self, secret: str, address: str | None) -> Principal:
        """A Stockade bearer token, or an OIDC/JWT token when one is configured."""
        if secret.count(".") == 2 and self.settings.oidc_issuer:
            return self.oidc(secret, address)
        found = self.users.resolve(secret, "api")
        if found is None:
            self._failed(
                Actor(address=address, via="web"), "token", "unknown, revoked or expired token"
            )
            raise NotAuthenticated("the bearer token is not valid")
        user, token, _ = found
        self.users.touch(token)
        return self._principal(user, "token")

    # OIDC ---------------------------------------------------------------------------------

    def oidc(self, jwt_text: str, address: str | None) -> Principal:
        """An OIDC ID or access token (a JWT, RFC 7519) checked against the JWKS file.

        The token must be signed with an allowed algorithm by a key of the set, come from
        ``oidc_issuer`` for ``oidc_audience``, and be within its validity. Its
        ``oidc_username_claim`` names a Stockade user, whose role and scope apply.
        """
        import jwt

        settings = self.settings
        try:
            header = jwt.get_unverified_header(jwt_text)
            key = self._key(str(header.get("kid", "")))
            claims = jwt.decode(
                jwt_text,
                key=key,
                algorithms=[a.strip() for a in settings.oidc_algorithms.split(",") if a.strip()],
                audience=settings.oidc_audience,
                issuer=settings.oidc_issuer,
                options={"require": ["exp", "iss", "aud"]},
                leeway=30,
            )
        except (jwt.PyJWTError, ValueError, KeyError) as exc:
            self._failed(
                Actor(address=address, via="web"), "oidc", f"invalid token: {type(exc).__name__}"
            )
            raise NotAuthenticated("the identity provider's token is not valid") from None
        name = str(claims.get(settings.oidc_username_claim, ""))[:64]
        found = self.users.find(name)
        if found is None or found[0].disabled:
            self._failed(
                Actor(user=name, address=address, via="web"), "oidc", "no such Stockade user"
            )
            raise NotAuthenticated("the identity provider's user is not a Stockade user")
        return self._principal(found[0], "oidc")

    def _key(self, kid: str) -> Any:
        import jwt

        if self._keys is None:
            path = Path(self.settings.oidc_jwks_file)
            self._keys = jwt.PyJWKSet.from_dict(json.loads(path.read_text(encoding="utf-8")))
        for key in self._keys.keys:
            if not kid or key.key_id == kid:
                return key
        raise KeyError("no key of the configured set has this key id")
