"""A node's client certificate fingerprint (binds a certificate to an AE title).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("cert_sha256", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("cert_sha256")
