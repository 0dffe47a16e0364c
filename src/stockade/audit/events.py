"""Typed audit events (modelled on DICOM PS3.15 A.5 / IHE ATNA event types).

The core emits these, so every adapter (DIMSE, DICOMweb, CLI) produces identical records.
``docs/audit-events.md`` lists them; a test fails when one is undocumented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who did it: an application entity, a network address, a user, or this process."""

    ae_title: str | None = None
    address: str | None = None
    user: str | None = None
    via: str = "internal"  # dimse | import | web | cli | internal


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """Base of every audit event."""

    actor: Actor
    outcome: str = "success"  # success | failure (PS3.15 A.5.1 EventOutcomeIndicator 0 / 4)
    time: str = field(default_factory=_now)

    @property
    def type(self) -> str:
        """The event type name, as written in the record."""
        return type(self).__name__

    def as_record(self) -> dict[str, Any]:
        """A JSON-ready record."""
        data = dataclasses.asdict(self)
        return {"type": self.type, **data}


@dataclass(frozen=True, kw_only=True)
class InstanceStored(AuditEvent):
    """An object was stored, found to be a duplicate, or replaced another (ATNA: DICOM
    Instances Transferred, PS3.15 A.5.3.7, action Create/Update)."""

    study_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    patient_id: str | None
    result: str  # stored | duplicate | replaced
    preamble: str


@dataclass(frozen=True, kw_only=True)
class InstanceRejected(AuditEvent):
    """An object was refused by the ingest pipeline (outcome: failure)."""

    reason: str
    code: str
    sop_instance_uid: str | None = None


@dataclass(frozen=True, kw_only=True)
class AssociationRejected(AuditEvent):
    """A DIMSE association request was refused (ATNA: Security Alert, PS3.15 A.5.3.11)."""

    reason: str


@dataclass(frozen=True, kw_only=True)
class SecurityAlert(AuditEvent):
    """Something suspicious was found in input, e.g. an executable preamble (PS3.15
    A.5.3.11): one event per finding of the hidden-payload inspection, with the policy's
    action (alert, strip, quarantine, reject) and, when quarantined, the quarantine id."""

    finding: str
    detail: str
    sop_instance_uid: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    where: str | None = None
    action: str | None = None
    quarantine_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class QueryPerformed(AuditEvent):
    """A query ran (ATNA: Query, PS3.15 A.5.3.10); outcome failure when it was refused.

    The query keys are recorded (they may name a patient: the trail is PHI, mode 0600)."""

    level: str
    keys: dict[str, str]
    matches: int
    truncated: bool = False
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class ApplicationActivity(AuditEvent):
    """The archive started or stopped (PS3.15 A.5.3.1)."""

    action: str  # start | stop


@dataclass(frozen=True, kw_only=True)
class NodeChanged(AuditEvent):
    """A DICOM peer was added, changed or removed (configuration change)."""

    name: str
    action: str  # add | edit | remove
    detail: str | None = None  # edit: what changed, "field old -> new"


@dataclass(frozen=True, kw_only=True)
class IntegrityChecked(AuditEvent):
    """``stockade verify`` ran (outcome failure if anything disagreed)."""

    checked: int
    problems: int


@dataclass(frozen=True, kw_only=True)
class InstancesRetrieved(AuditEvent):
    """Stored instances were sent: C-GET, C-MOVE, ``stockade send`` (ATNA: DICOM Instances
    Transferred, PS3.15 A.5.3.7). One record per operation; outcome failure when any
    sub-operation failed or the operation was cancelled."""

    service: str  # get | move | send
    destination: str | None  # AE title the instances went to
    level: str
    keys: dict[str, str]
    study_uids: list[str]
    patient_ids: list[str]
    located: int
    completed: int
    warning: int
    failed: int
    cancelled: bool = False
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class InstancesDeleted(AuditEvent):
    """Stored instances were deleted: a study, a series or one instance (ATNA: DICOM Study
    Deleted, PS3.15 A.5.3.8, for a study; DICOM Instances Accessed, A.5.3.6, action Delete,
    otherwise). Written in the same transaction as the deletion."""

    level: str
    keys: dict[str, str]
    study_uids: list[str]
    patient_ids: list[str]
    deleted: int
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class InstancesExported(AuditEvent):
    """Stored instances left the archive as files (a download, a ZIP, media) rather than
    over a DICOM service (ATNA: Data Export, PS3.15 A.5.3.4)."""

    destination: str
    format: str
    study_uids: list[str]
    patient_ids: list[str]
    count: int
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class StudyShared(AuditEvent):
    """Access to a study was granted to someone outside its usual audience, e.g. a share
    link (ATNA: Security Alert, PS3.15 A.5.3.11, Object Security Attributes Changed)."""

    study_uid: str
    patient_id: str | None
    recipient: str
    expires: str | None = None
    action: str = "grant"  # grant | revoke


@dataclass(frozen=True, kw_only=True)
class UserLogin(AuditEvent):
    """A user signed in, or failed to (ATNA: User Authentication, PS3.15 A.5.3.12, Login).

    ``actor.user`` is the name given; the password or token never appears anywhere."""

    method: str  # password | token | ...
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class UserLogout(AuditEvent):
    """A session ended (ATNA: User Authentication, PS3.15 A.5.3.12, Logout)."""

    reason: str  # logout | expired | revoked


@dataclass(frozen=True, kw_only=True)
class UserChanged(AuditEvent):
    """A user account was created, changed or removed (ATNA: Security Alert, PS3.15
    A.5.3.11, User Security Attributes Changed). Never carries the password itself."""

    target: str
    action: str  # create | update | password | roles | disable | delete
    detail: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConfigurationChanged(AuditEvent):
    """A setting of the running archive was changed through Stockade (ATNA: Security Alert,
    PS3.15 A.5.3.11, Software Configuration). Values of secrets are never recorded."""

    setting: str
    action: str  # set | reset
    value: str | None = None


@dataclass(frozen=True, kw_only=True)
class AuditLogUsed(AuditEvent):
    """The audit trail was read or verified (ATNA: Audit Log Used, PS3.15 A.5.3.2)."""

    action: str  # list | verify
    filters: dict[str, str] = field(default_factory=dict)
    records: int = 0
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class QuarantineChanged(AuditEvent):
    """An administrator released a quarantined object into the archive or deleted it
    (PS3.15 A.5.3.11 Security Alert; the object's findings were alerted on arrival)."""

    action: str  # release | delete
    quarantine_id: str
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    patient_id: str | None = None
    reason: str | None = None


EVENT_TYPES: tuple[type[AuditEvent], ...] = (
    InstanceStored,
    InstanceRejected,
    AssociationRejected,
    SecurityAlert,
    QueryPerformed,
    ApplicationActivity,
    NodeChanged,
    IntegrityChecked,
    InstancesRetrieved,
    InstancesDeleted,
    InstancesExported,
    StudyShared,
    UserLogin,
    UserLogout,
    UserChanged,
    ConfigurationChanged,
    AuditLogUsed,
    QuarantineChanged,
)

#: Event types by name (the ``type`` of a stored record).
BY_NAME: dict[str, type[AuditEvent]] = {e.__name__: e for e in EVENT_TYPES}
