"""The index seam: what the archive asks of its database."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from stockade.query import Found, Query

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from stockade.errors import StockadeError


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the index keeps about one stored instance (and its parents)."""

    attributes: dict[str, str | int | None]
    sha256: str
    blob_key: str
    size: int
    transfer_syntax: str
    preamble: str
    trailing_bytes: int
    origin: str
    sender_ae: str | None
    sender_address: str | None
    received_at: datetime
    #: (staging area, token) when the row commits before the blob is durable: the index
    #: then keeps a journal entry until :meth:`Index.published` is called.
    staging: tuple[str, str] | None = None

    def get(self, keyword: str) -> str | int | None:
        """An indexed attribute by keyword."""
        return self.attributes.get(keyword)

    def text(self, keyword: str) -> str | None:
        """An indexed text attribute by keyword (None when absent)."""
        value = self.attributes.get(keyword)
        return None if value is None else str(value)


class Outcome(StrEnum):
    """What recording an instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class Recorded:
    """The result of :meth:`Index.record`."""

    outcome: Outcome
    replaced_blob_key: str | None = None


@dataclass(frozen=True)
class StoredInstance:
    """An instance as the index knows it (for verification and retrieval)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    blob_key: str
    sha256: str
    size: int
    patient_id: str | None = None


@dataclass(frozen=True)
class JournalEntry:
    """An instance whose index row committed while its blob was being synced."""

    token: str
    area: str
    sop_instance_uid: str
    sha256: str


@dataclass(frozen=True)
class Node:
    """A configured DICOM peer (a remote application entity)."""

    name: str
    ae_title: str
    host: str
    port: int
    allow: frozenset[str] = field(default_factory=frozenset)
    #: The peer talks DICOM TLS (PS3.15 Annex B, BCP 195 RFC 8996 profile): connections to
    #: it use TLS, and its associations are admitted over the TLS listener only.
    tls: bool = False
    #: SHA-256 (hex) of the client certificate the peer must present over DICOM TLS, which
    #: binds that certificate to its AE title; None: any certificate the CA signed.
    cert_sha256: str | None = None


class Index(Protocol):
    """What the archive needs from its database."""

    #: The database engine: users, tokens and the audit trail live in the same database.
    engine: Engine

    def migrate(self) -> None:
        """Bring the schema to the newest version."""

    def record(self, record: InstanceRecord, *, allow_replace: bool) -> Recorded:
        """Record an instance with its patient, study and series, in one transaction."""

    def record_all(
        self, records: Sequence[InstanceRecord], *, allow_replace: bool
    ) -> list[Recorded | StockadeError]:
        """Record several instances, each with its parents, sharing transactions: each
        result is the instance's :class:`Recorded` or the error that refused it alone."""

    def find_instance(self, sop_instance_uid: str) -> StoredInstance | None:
        """The stored instance with this SOP Instance UID, if any."""

    def is_blob_indexed(self, key: str) -> bool:
        """True if an instance refers to this blob key."""

    def instances(self) -> Iterator[StoredInstance]:
        """Every stored instance (streamed)."""

    def counts(self) -> dict[str, int]:
        """Numbers of patients, studies, series and instances."""

    def stored_bytes(self) -> int:
        """The bytes of every stored object."""

    def published(self, token: str) -> None:
        """The blob staged as *token* is durable and published: its journal entry may go."""

    def forget_instance(self, sop_instance_uid: str) -> None:
        """Remove an instance whose blob was lost before it was acknowledged."""

    def delete_instances(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        before_commit: Callable[[Any, list[StoredInstance]], None] | None = None,
    ) -> list[StoredInstance]:
        """Delete a study, series or instance in one transaction; queue the blobs for
        deletion; run *before_commit* in that transaction. Returns what was deleted."""

    def staging_journal(self) -> list[JournalEntry]:
        """Instances recorded while their blob was being synced, not yet marked published."""

    def drop_journal(self, tokens: list[str]) -> None:
        """Remove journal entries (after recovery has dealt with them)."""

    def find(self, query: Query) -> Found:
        """The matches of a query (PS3.4 C.2.2.2), one page of them."""

    def updated_series(
        self, since: datetime | None, until: datetime
    ) -> list[tuple[str, str, datetime]]:
        """Series of the studies updated in (*since*, *until*], oldest update first."""

    def locate(self, query: Query) -> list[StoredInstance]:
        """The stored instances below the entities *query* matches (at most
        ``query.limit + 1``), in series and instance order: what a retrieve sends."""

    def queued_deletions(self) -> list[str]:
        """Blob keys whose deletion was decided but not yet done."""

    def forget_deletion(self, key: str) -> None:
        """Mark a queued blob deletion done."""

    def add_node(self, node: Node) -> None:
        """Add a DICOM peer; its name must be new."""

    def remove_node(self, name: str) -> bool:
        """Remove a DICOM peer; False if there was none by that name."""

    def replace_node(self, name: str, node: Node) -> bool:
        """Replace the peer *name* by *node* (which may be renamed) in one transaction;
        False if there was none by that name."""

    def nodes(self) -> list[Node]:
        """All configured DICOM peers."""

    def close(self) -> None:
        """Release connections."""
