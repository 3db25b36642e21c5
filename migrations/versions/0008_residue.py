"""residue checks and upstream actions (issue 10, points 3 and 4): an operator's mark
that an ingested source file no longer holds an erased subject's rows upstream

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_actions_done",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("source_file_id", sa.Integer(), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_by", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["erasure_requests.id"], ondelete="RESTRICT",
                                name=op.f("fk_upstream_actions_done_request_id_erasure_requests")),
        sa.ForeignKeyConstraint(["source_file_id"], ["source_files.id"], ondelete="RESTRICT",
                                name=op.f("fk_upstream_actions_done_source_file_id_source_files")),
        sa.PrimaryKeyConstraint("request_id", "source_file_id", name=op.f("pk_upstream_actions_done")),
    )


def downgrade() -> None:
    op.drop_table("upstream_actions_done")
