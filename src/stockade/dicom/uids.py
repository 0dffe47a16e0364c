"""UID rules of PS3.5 section 9 and Stockade's own UIDs."""

from __future__ import annotations

import re

from stockade import __version__

#: Stockade's Implementation Class UID (PS3.7 D.3.3.2), under the UUID-derived root 2.25
#: (PS3.5 B.2), so that it needs no registered organisation root.
IMPLEMENTATION_CLASS_UID = "2.25.154600825903957199555680793624513970947"
#: Implementation Version Name (PS3.7 D.3.3.2.2): at most 16 characters.
IMPLEMENTATION_VERSION_NAME = ("STOCKADE_" + __version__)[:16]

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


def uid_problem(value: str | None) -> str | None:
    """Say what is wrong with a UID, or return None if it is valid.

    PS3.5 9.1: components of digits separated by periods, no leading zero in a component of
    more than one digit, at most 64 characters in all. Padding (a trailing NUL or space) must
    already be removed.
    """
    if value is None or value == "":
        return "is missing"
    if len(value) > MAX_UID_LENGTH:
        return f"is {len(value)} characters long (PS3.5 9.1 allows at most 64)"
    if not _UID.fullmatch(value):
        shown = value.encode("ascii", "backslashreplace").decode("ascii")[:80]
        return f"{shown!r} is not digits and dots with no leading zeros (PS3.5 9.1)"
    return None


def is_valid_uid(value: str | None) -> bool:
    """Return True if *value* is a valid UID per PS3.5 9.1."""
    return uid_problem(value) is None


def ae_title_problem(value: str) -> str | None:
    """Say what is wrong with an AE title (PS3.5 6.2, AE VR), or return None.

    At most 16 characters of the default repertoire, no backslash or control characters, not
    all spaces.
    """
    if not value.strip() or len(value) > 16:
        return "must be 1 to 16 characters"
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in value):
        return "must be printable ASCII without backslash"
    return None
