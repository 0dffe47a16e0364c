"""Passwords: argon2id hashes (RFC 9106) and the password policy (threat model SR-5, SR-7).

Only ``$argon2id$`` strings are stored. The policy refuses passwords shorter than
:data:`MIN_LENGTH`, longer than :data:`MAX_LENGTH` (hashing cost), containing the user name,
or found in a list of common and breached passwords shipped with Stockade.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from importlib import resources

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from stockade.errors import StockadeError

MIN_LENGTH = 12
MAX_LENGTH = 1024

#: argon2id with the RFC 9106 second recommended parameter set (64 MiB, 3 passes).
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4, type=Type.ID)


class WeakPassword(StockadeError):
    """A password the policy refuses (HTTP 400)."""

    http_status = 400
    code = "weak-password"


@lru_cache(maxsize=1)
def _common() -> frozenset[str]:
    text = resources.files("stockade.auth").joinpath("common-passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip().lower() for line in text.splitlines() if line.strip() and line[0] != "#"
    )


def check_policy(password: str, user: str) -> None:
    """Raise :class:`WeakPassword` (saying why, never echoing it) unless *password* is
    acceptable for *user*."""
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"a password has at most {MAX_LENGTH} characters")
    lowered = password.lower()
    if user and user.lower() in lowered:
        raise WeakPassword("a password must not contain the user name")
    if lowered in _common() or lowered.rstrip("0123456789!.?") in _common():
        raise WeakPassword("this password is in the list of common and breached passwords")
    if len(set(password)) < 5:
        raise WeakPassword("a password needs at least 5 different characters")


def hash_password(password: str) -> str:
    """The argon2id hash of *password* (a ``$argon2id$...`` string)."""
    return _hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """Whether *password* matches the argon2id hash *stored* (constant time in the hash)."""
    if not stored.startswith("$argon2id$"):
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether *stored* uses older parameters than Stockade's current ones."""
    return _hasher.check_needs_rehash(stored)


@lru_cache(maxsize=1)
def dummy_hash() -> str:
    """A hash of a random password: verifying against it costs what a real verification
    costs, so an unknown user name takes as long to refuse as a wrong password."""
    return hash_password(secrets.token_urlsafe(24))


def generate_password() -> str:
    """A random one-time password (about 120 bits, URL-safe characters)."""
    return secrets.token_urlsafe(20)
