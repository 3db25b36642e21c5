"""console indexes: the requests table pages through every request by deadline
(keyset on ``(due_at, id)``), whatever the state filter

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-11
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_erasure_requests_due_at_id", "erasure_requests", ["due_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_erasure_requests_due_at_id", table_name="erasure_requests")
