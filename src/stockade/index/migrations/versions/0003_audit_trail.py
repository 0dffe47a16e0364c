"""Audit trail: hash-chained, append-only records and the patients and studies they concern.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_record",
        sa.Column("seq", Id, primary_key=True, autoincrement=False),
        sa.Column("time", sa.String(40), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor_user", sa.String(128)),
        sa.Column("actor_ae", sa.String(16)),
        sa.Column("actor_address", sa.String(64)),
        sa.Column("via", sa.String(16), nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_record_time", "audit_record", ["time"])
    op.create_index("ix_audit_record_type", "audit_record", ["type"])
    op.create_index("ix_audit_record_actor_user", "audit_record", ["actor_user"])
    op.create_index("ix_audit_record_actor_ae", "audit_record", ["actor_ae"])
    op.create_table(
        "audit_subject",
        sa.Column("kind", sa.String(1), primary_key=True),
        sa.Column("value", sa.String(64), primary_key=True),
        sa.Column("seq", Id, primary_key=True, autoincrement=False),
    )
    op.create_index("ix_audit_subject_seq", "audit_subject", ["seq"])


def downgrade() -> None:
    op.drop_table("audit_subject")
    op.drop_table("audit_record")
