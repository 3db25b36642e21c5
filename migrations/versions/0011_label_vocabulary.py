"""label vocabulary per dataset and monolithic baselines (issue 11, points 4 and 5)

- ``datasets.label_kind``: ``integer`` or ``names``, fixed at the first labelled
  ingest (NULL until then). Datasets from before could only hold integer labels.
- ``label_vocabulary``: a dataset's class names and the index each is trained as
  (indices 0..K-1; K is the model's number of classes).
- ``baseline_models``: one monolithic model per ``erasure train --baseline``, for
  comparison only (never an ensemble member); the shard versions it saw, so that an
  erasure from one of them deletes its file (``file_purged_at``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("label_kind", sa.String(16), nullable=True))
    op.execute("UPDATE datasets SET label_kind = 'integer'")
    op.create_table(
        "label_vocabulary",
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="RESTRICT"), primary_key=True),
        sa.Column("label_index", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("dataset_id", "name", name="uq_label_vocabulary_dataset_name"),
    )
    op.create_table(
        "baseline_models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("checkpoint_key", sa.String(64), nullable=False),
        sa.Column("path", sa.String(4096), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("records_seen", sa.Integer, nullable=False),
        sa.Column("config_digest", sa.String(64), nullable=False),
        sa.Column("shard_versions", sa.Text, nullable=False),  # JSON {shard: version} it was trained on
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("file_purged_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_baseline_models_dataset", "baseline_models", ["dataset_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_baseline_models_dataset", table_name="baseline_models")
    op.drop_table("baseline_models")
    op.drop_table("label_vocabulary")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("label_kind")
