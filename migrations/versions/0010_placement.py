"""placement mode per dataset (issue 11, point 1): ``subject`` or ``record``

Fixed per dataset like its layout. Datasets from before were placed by record.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("placement", sa.String(16), nullable=False, server_default="record"))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("placement")
