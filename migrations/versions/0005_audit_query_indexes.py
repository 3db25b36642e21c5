"""audit query indexes for ``db.audit_queries.ensemble_reflections``: retraining
jobs by the ensemble version they published; a shard's matches by the shard
version that erased them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_shard_retrain_jobs_dataset_ensemble_version", "shard_retrain_jobs",
                    ["dataset_id", "ensemble_version_id"], unique=False)
    op.create_index("ix_request_matches_dataset_shard_erased", "request_matches",
                    ["dataset_id", "shard", "erased_in_shard_version"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_request_matches_dataset_shard_erased", table_name="request_matches")
    op.drop_index("ix_shard_retrain_jobs_dataset_ensemble_version", table_name="shard_retrain_jobs")
