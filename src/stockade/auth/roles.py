"""Roles and what each may do (threat model SR-16; ``docs/security.md`` has the table).

Permissions are checked in one place, :func:`stockade.auth.policy.require`; deny by default:
a role has exactly the permissions listed here.
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    """Things a user may be allowed to do."""

    VIEW = "view"  # search, metadata, rendered images and thumbnails
    DOWNLOAD = "download"  # DICOM objects, frames and bulk data
    UPLOAD = "upload"  # STOW-RS, uploads
    DELETE = "delete"
    MODIFY = "modify"  # change stored objects (metadata corrections)
    SHARE = "share"  # share links for patients and outside doctors
    ADMIN = "admin"  # users, nodes, settings, quarantine
    READ_AUDIT = "read-audit"


class Role(StrEnum):
    """The roles of Stockade users."""

    ADMIN = "admin"
    RADIOLOGIST = "radiologist"
    TECHNOLOGIST = "technologist"
    REFERRER = "referrer"
    AUDITOR = "auditor"


P = Permission
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.RADIOLOGIST: frozenset({P.VIEW, P.DOWNLOAD, P.UPLOAD, P.MODIFY, P.SHARE}),
    Role.TECHNOLOGIST: frozenset({P.VIEW, P.DOWNLOAD, P.UPLOAD, P.MODIFY}),
    Role.REFERRER: frozenset({P.VIEW, P.DOWNLOAD}),
    Role.AUDITOR: frozenset({P.READ_AUDIT}),
}
"""What each role may do."""


def permissions_markdown() -> str:
    """The role/permission table (``docs/security.md``; a test keeps it current)."""
    head = "| role | " + " | ".join(p.value for p in Permission) + " |"
    rule = "|---|" + "---|" * len(Permission)
    rows = [head, rule]
    for role in Role:
        marks = " | ".join("yes" if p in PERMISSIONS[role] else "-" for p in Permission)
        rows.append(f"| `{role.value}` | {marks} |")
    return "\n".join(rows) + "\n"
