"""Staging journal: instances whose blob may still be on its way to disk.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "staging_journal",
        sa.Column("token", sa.String(32), primary_key=True),
        sa.Column("area", sa.String(64), nullable=False),
        sa.Column("instance_pk", Id, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_staging_journal_area", "staging_journal", ["area"])


def downgrade() -> None:
    op.drop_table("staging_journal")
