"""Initial index: patients, studies, series, instances, nodes, blob deletions.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("patient_name_key", sa.String(324)),
        sa.Column("birth_date", sa.String(8)),
        sa.Column("sex", sa.String(16)),
        sa.Column("num_studies", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id"),
    )
    op.create_index("ix_patients_patient_name_key", "patients", ["patient_name_key"])
    op.create_table(
        "studies",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column(
            "patient_pk",
            Id,
            sa.ForeignKey("patients.id", name="fk_studies_patient_pk"),
            nullable=False,
        ),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_time", sa.String(16)),
        sa.Column("accession_number", sa.String(16)),
        sa.Column("study_id", sa.String(16)),
        sa.Column("description", sa.String(64)),
        sa.Column("referring_name", sa.String(324)),
        sa.Column("referring_name_key", sa.String(324)),
        sa.Column("modalities", sa.String(256)),
        sa.Column("num_series", sa.Integer, nullable=False),
        sa.Column("num_instances", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_table(
        "series",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column(
            "study_pk", Id, sa.ForeignKey("studies.id", name="fk_series_study_pk"), nullable=False
        ),
        sa.Column("modality", sa.String(16)),
        sa.Column("series_number", sa.Integer),
        sa.Column("description", sa.String(64)),
        sa.Column("body_part", sa.String(16)),
        sa.Column("series_date", sa.String(8)),
        sa.Column("series_time", sa.String(16)),
        sa.Column("num_instances", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("series_uid", name="uq_series_series_uid"),
    )
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_table(
        "instances",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column(
            "series_pk",
            Id,
            sa.ForeignKey("series.id", name="fk_instances_series_pk"),
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer),
        sa.Column("rows", sa.Integer),
        sa.Column("columns", sa.Integer),
        sa.Column("frames", sa.Integer),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("blob_key", sa.String(96), nullable=False),
        sa.Column("preamble", sa.String(16), nullable=False),
        sa.Column("trailing_bytes", sa.BigInteger, nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("sender_ae", sa.String(16)),
        sa.Column("sender_address", sa.String(64)),
        sa.Column("received_at", TS, nullable=False),
        sa.UniqueConstraint("sop_uid", name="uq_instances_sop_uid"),
    )
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_index("ix_instances_blob_key", "instances", ["blob_key"])
    op.create_table(
        "nodes",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(253), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("allow", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("name", name="uq_nodes_name"),
    )
    op.create_table(
        "blob_deletions",
        sa.Column("blob_key", sa.String(96), primary_key=True),
        sa.Column("queued_at", TS, nullable=False),
    )


def downgrade() -> None:
    for table in ("blob_deletions", "nodes", "instances", "series", "studies", "patients"):
        op.drop_table(table)
