"""Tables of the index (SQLAlchemy Core). Alembic migrations create and evolve them.

Columns hold the attributes of :data:`stockade.dicom.attributes.INDEXED`; person names also have
a case-folded ``*_key`` column so that case-insensitive and wildcard matching (PS3.4 C.2.2.2)
run in SQL on an index.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = BigInteger().with_variant(Integer, "sqlite")

patients = Table(
    "patients",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False),
    Column("patient_name", String(324)),
    Column("patient_name_key", String(324)),
    Column("birth_date", String(8)),
    Column("sex", String(16)),
    Column("num_studies", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "issuer"),
    Index(None, "patient_name_key"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("patient_pk", Id, ForeignKey("patients.id"), nullable=False, index=True),
    Column("study_date", String(8), index=True),
    Column("study_time", String(16)),
    Column("accession_number", String(16), index=True),
    Column("study_id", String(16)),
    Column("description", String(64)),
    Column("referring_name", String(324)),
    Column("referring_name_key", String(324)),
    Column("modalities", String(256)),
    Column("num_series", Integer, nullable=False),
    Column("num_instances", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), nullable=False, unique=True),
    Column("study_pk", Id, ForeignKey("studies.id"), nullable=False, index=True),
    Column("modality", String(16), index=True),
    Column("series_number", Integer),
    Column("description", String(64)),
    Column("body_part", String(16)),
    Column("series_date", String(8)),
    Column("series_time", String(16)),
    Column("num_instances", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("series_pk", Id, ForeignKey("series.id"), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("frames", Integer),
    Column("transfer_syntax", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("blob_key", String(96), nullable=False, index=True),
    Column("preamble", String(16), nullable=False),
    Column("trailing_bytes", BigInteger, nullable=False),
    Column("origin", String(16), nullable=False),
    Column("sender_ae", String(16)),
    Column("sender_address", String(64)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("ae_title", String(16), nullable=False),
    Column("host", String(253), nullable=False),
    Column("port", Integer, nullable=False),
    Column("allow", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # The peer talks DICOM TLS: Stockade connects to it with TLS and admits it only over
    # the TLS listener (migration 0005).
    Column("tls", Boolean, nullable=False, server_default=false()),
    Column("cert_sha256", String(64)),
)

blob_deletions = Table(
    "blob_deletions",
    metadata,
    Column("blob_key", String(96), primary_key=True),
    Column("queued_at", DateTime(timezone=True), nullable=False),
)

#: Instances whose index row committed while their staged blob was still being synced
#: (``index/record.py``); an entry outlives publication a little and is then dropped.
staging_journal = Table(
    "staging_journal",
    metadata,
    Column("token", String(32), primary_key=True),
    Column("area", String(64), nullable=False, index=True),
    Column("instance_pk", Id, nullable=False),
    Column("sha256", String(64), nullable=False),
)

#: The audit trail (``audit/trail.py``): append-only, one linear hash chain over all
#: processes. ``record`` is the canonical JSON the hash covers; the other columns are
#: copies of its fields for filtering, checked against it by verification.
audit_record = Table(
    "audit_record",
    metadata,
    Column("seq", Id, primary_key=True, autoincrement=False),
    Column("time", String(40), nullable=False, index=True),
    Column("type", String(40), nullable=False, index=True),
    Column("outcome", String(16), nullable=False),
    Column("actor_user", String(128), index=True),
    Column("actor_ae", String(16), index=True),
    Column("actor_address", String(64)),
    Column("via", String(16), nullable=False),
    Column("record", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

#: The patients and studies an audit record concerns (kind ``P`` or ``S``), for listing
#: by patient or study; derived from the record and checked against it by verification.
audit_subject = Table(
    "audit_subject",
    metadata,
    Column("kind", String(1), primary_key=True),
    Column("value", String(64), primary_key=True),
    Column("seq", Id, primary_key=True, autoincrement=False, index=True),
)

#: Stockade users (``stockade user``): argon2id hashes only, never a password.
users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(256), nullable=False),
    Column("must_change", Integer, nullable=False),
    Column("disabled", Integer, nullable=False),
    Column("failed_logins", Integer, nullable=False),
    Column("locked_until", DateTime(timezone=True)),
    Column("scope", Text),  # JSON: {"studies": [...], "patients": [...]}; NULL: everything
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("password_changed_at", DateTime(timezone=True), nullable=False),
)

#: Bearer tokens and browser sessions, stored as the SHA-256 of the secret.
tokens = Table(
    "tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("user_pk", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(8), nullable=False),  # api | session
    Column("label", String(64), nullable=False),
    Column("csrf_digest", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)
