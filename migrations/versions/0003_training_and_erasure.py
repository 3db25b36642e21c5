"""training and erasure: checkpoints, ensemble versions and members, request
matches, per-shard retraining jobs

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("slice", sa.Integer(), nullable=False),
        sa.Column("shard_version", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=4096), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("records_seen", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_checkpoints_dataset_id_datasets"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("dataset_id", "key", name=op.f("pk_checkpoints")),
    )

    op.create_table(
        "ensemble_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.String(length=64), nullable=False),
        sa.Column("parent_version_id", sa.String(length=64), nullable=True),
        sa.Column("manifest_path", sa.String(length=4096), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_ensemble_versions_dataset_id_datasets"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ensemble_versions")),
        sa.UniqueConstraint("dataset_id", "version_id", name="uq_ensemble_versions_dataset_version"),
    )

    op.create_table(
        "ensemble_members",
        sa.Column("ensemble_id", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_key", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id", "checkpoint_key"], ["checkpoints.dataset_id", "checkpoints.key"],
            name="fk_ensemble_members_checkpoint", ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["ensemble_id"], ["ensemble_versions.id"],
            name=op.f("fk_ensemble_members_ensemble_id_ensemble_versions"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("ensemble_id", "shard", name=op.f("pk_ensemble_members")),
    )

    op.create_table(
        "shard_retrain_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("due_at", _utc(), nullable=False),
        sa.Column("target_shard_version", sa.Integer(), nullable=True),
        sa.Column("ensemble_version_id", sa.String(length=64), nullable=True),
        sa.Column("restored_slice", sa.Integer(), nullable=True),
        sa.Column("samples_processed", sa.Integer(), nullable=True),
        sa.Column("full_training_samples", sa.Integer(), nullable=True),
        sa.Column("wall_seconds", sa.Float(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_shard_retrain_jobs_dataset_id_datasets"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shard_retrain_jobs")),
    )
    op.create_index("ix_shard_retrain_jobs_status_due_at", "shard_retrain_jobs", ["status", "due_at"], unique=False)

    op.create_table(
        "request_matches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("match_ref", sa.String(length=200), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("shard_version", sa.Integer(), nullable=False),
        sa.Column("slice", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.String(length=256), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("hop", sa.Integer(), nullable=False),
        sa.Column("query", sa.String(length=300), nullable=False),
        sa.Column("final_decision", sa.String(length=16), nullable=True),
        sa.Column("erased_in_shard_version", sa.Integer(), nullable=True),
        sa.Column("retrain_job_id", sa.Integer(), nullable=True),
        sa.Column("found_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_request_matches_dataset_id_datasets"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["request_id"], ["erasure_requests.id"],
            name=op.f("fk_request_matches_request_id_erasure_requests"), ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["retrain_job_id"], ["shard_retrain_jobs.id"],
            name=op.f("fk_request_matches_retrain_job_id_shard_retrain_jobs"), ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_matches")),
        sa.UniqueConstraint("request_id", "dataset_id", "shard", "record_id", name="uq_request_matches_request_record"),
    )
    op.create_index("ix_request_matches_dataset_record", "request_matches", ["dataset_id", "record_id"], unique=False)
    op.create_index(op.f("ix_request_matches_request_id"), "request_matches", ["request_id"], unique=False)
    op.create_index(op.f("ix_request_matches_retrain_job_id"), "request_matches", ["retrain_job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_request_matches_retrain_job_id"), table_name="request_matches")
    op.drop_index(op.f("ix_request_matches_request_id"), table_name="request_matches")
    op.drop_index("ix_request_matches_dataset_record", table_name="request_matches")
    op.drop_table("request_matches")
    op.drop_index("ix_shard_retrain_jobs_status_due_at", table_name="shard_retrain_jobs")
    op.drop_table("shard_retrain_jobs")
    op.drop_table("ensemble_members")
    op.drop_table("ensemble_versions")
    op.drop_table("checkpoints")
